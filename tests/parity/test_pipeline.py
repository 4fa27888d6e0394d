"""FlaxBlipDiffusionPipeline against diffusers' PyTorch BlipDiffusionPipeline (tiny random model, fp32, CPU)."""

import jax
import numpy as np
import pytest
import torch
from support.images import make_image
from support.paths import shared_image
from PIL import Image

from blipdiff_jax import FlaxBlipDiffusionPipeline

TOLERANCE = 2e-3  # max abs difference of images in [0, 1]
PROMPTS = ["swimming underwater", "on a sofa"]
SUBJECTS = ["dog", "cat"]


def _latents(batch, height, width, seed=0):
    return np.random.RandomState(seed).randn(batch, 4, height // 2, width // 2).astype(np.float32)


def _both(torch_pipeline, pipeline, params, images, height, width, guidance, steps=3, **kwargs):
    latents = _latents(2, height, width)
    args = (PROMPTS, images, SUBJECTS, SUBJECTS)
    common = dict(guidance_scale=guidance, height=height, width=width, num_inference_steps=steps, output_type="np")
    ours = pipeline(*args, params=params, latents=latents, **common, **kwargs).images
    ref = torch_pipeline(*args, latents=torch.from_numpy(latents), **common).images
    return ours, ref


@pytest.mark.parametrize("guidance,height,width", [
    pytest.param(1.0, 32, 32, id="no-guidance", marks=pytest.mark.slow),
    pytest.param(7.5, 32, 32, id="guidance"),
    pytest.param(7.5, 32, 24, id="non-square", marks=pytest.mark.slow),
])
def test_images_match_pytorch(torch_pipeline, flax_pipeline, guidance, height, width):
    pipeline, params = flax_pipeline
    ours, ref = _both(torch_pipeline, pipeline, params, [make_image(0), make_image(1, (70, 50))], height, width, guidance)
    assert ours.shape == (2, height, width, 3)
    assert ours.std() > 0.02  # not a flat image
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


def test_cpu_rewrites_match_pytorch(torch_pipeline, flax_pipeline_cpu_rewrites):
    """The CPU layer rewrites (CPU users' default; the rest of the suite runs without them) within the same bound."""
    pipeline, params = flax_pipeline_cpu_rewrites
    ours, ref = _both(torch_pipeline, pipeline, params, [make_image(0), make_image(1, (70, 50))], 32, 24, 7.5)
    assert ours.std() > 0.02
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_ddim_matches_pytorch(torch_pipeline, converted_model):
    from diffusers import DDIMScheduler, FlaxDDIMScheduler

    config = dict(converted_model.configs["scheduler"], _class_name="DDIMScheduler")
    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, scheduler=FlaxDDIMScheduler.from_config(config))
    original = torch_pipeline.scheduler
    torch_pipeline.scheduler = DDIMScheduler.from_config(original.config)
    try:
        ours, ref = _both(torch_pipeline, pipeline, params, [make_image(2)], 32, 32, 7.5, steps=4)
    finally:
        torch_pipeline.scheduler = original
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["FlaxEulerDiscreteScheduler", "FlaxDPMSolverMultistepScheduler", "FlaxDDPMScheduler"])
def test_other_flax_schedulers_run(converted_model, name):
    import diffusers

    config = {k: v for k, v in converted_model.configs["scheduler"].items() if not k.startswith("_")}
    if name == "FlaxDDPMScheduler":
        with pytest.raises(ValueError, match="variance_type"):
            FlaxBlipDiffusionPipeline.from_converted(converted_model, scheduler=diffusers.FlaxDDPMScheduler.from_config(config))
        config["variance_type"] = "fixed_large"
    scheduler = getattr(diffusers, name).from_config(config)
    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, scheduler=scheduler)
    out = pipeline("on the beach", make_image(3), "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0),
                   height=16, width=16, num_inference_steps=3, output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all() and out.std() > 0


def test_untraceable_lms_scheduler_is_refused_clearly(converted_model):
    from diffusers import FlaxLMSDiscreteScheduler

    scheduler = FlaxLMSDiscreteScheduler.from_config({k: v for k, v in converted_model.configs["scheduler"].items() if not k.startswith("_")})
    with pytest.raises(ValueError, match="scheduler: FlaxLMSDiscreteScheduler is not supported"):
        FlaxBlipDiffusionPipeline.from_converted(converted_model, scheduler=scheduler)


def test_second_call_does_not_recompile(flax_pipeline):
    pipeline, params = flax_pipeline
    kwargs = dict(params=params, height=16, width=16, num_inference_steps=2, output_type="np")
    first = pipeline("on grass", make_image(4), "dog", "dog", prng_seed=jax.random.PRNGKey(1), **kwargs).images
    compiled = pipeline._generate_jit._cache_size()
    second = pipeline("in snow", make_image(5), "cat", "cat", prng_seed=jax.random.PRNGKey(2), **kwargs).images
    assert pipeline._generate_jit._cache_size() == compiled
    assert not np.allclose(first, second)


@pytest.mark.slow
def test_subject_embeddings_are_a_reusable_value(flax_pipeline):
    pipeline, params = flax_pipeline
    image = make_image(6)
    embeddings = pipeline.encode_subject(image, "dog", params)
    assert embeddings.shape == (1, pipeline.num_query_tokens, 32)
    latents = _latents(2, 16, 16)
    kwargs = dict(params=params, latents=latents, height=16, width=16, num_inference_steps=2, output_type="np")
    from_value = pipeline(PROMPTS, None, None, ["dog", "dog"], subject_embeddings=embeddings, **kwargs).images
    from_image = pipeline(PROMPTS, image, "dog", "dog", **kwargs).images
    np.testing.assert_allclose(from_value, from_image, rtol=0, atol=1e-6)


def test_blend_of_subjects_is_their_weighted_sum(flax_pipeline):
    pipeline, params = flax_pipeline
    images = [make_image(7), make_image(8)]
    each = pipeline.encode_subject(images, ["dog", "cat"], params)
    blended = pipeline.encode_subject(images, ["dog", "cat"], params, ratio=[0.3, 0.7])
    np.testing.assert_allclose(np.asarray(blended[0]), 0.3 * np.asarray(each[0]) + 0.7 * np.asarray(each[1]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        pipeline.encode_subject(images, ["dog", "cat"], params, ratio=[0.5, 0.6])


def test_reference_image_forms_agree(flax_pipeline, tmp_path):
    pipeline, params = flax_pipeline
    image = make_image(9, (50, 40))
    image.save(tmp_path / "ref.png")
    as_pil = pipeline.encode_subject(image, "dog", params)
    as_array = pipeline.encode_subject(np.asarray(image), "dog", params)
    as_path = pipeline.encode_subject(str(tmp_path / "ref.png"), "dog", params)
    as_rgba = pipeline.encode_subject(image.convert("RGBA"), "dog", params)
    for other in (as_array, as_path, as_rgba):
        np.testing.assert_array_equal(np.asarray(other), np.asarray(as_pil))


def test_pil_output(flax_pipeline):
    pipeline, params = flax_pipeline
    out = pipeline(PROMPTS, make_image(10), "dog", SUBJECTS, params=params, prng_seed=jax.random.PRNGKey(0),
                   height=16, width=16, num_inference_steps=2)
    assert len(out.images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in out.images)


def test_long_prompt_is_truncated_with_a_warning(flax_pipeline):
    pipeline, params = flax_pipeline
    with pytest.warns(UserWarning, match="truncated"):
        pipeline("very " * 100, make_image(11), "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0),
                 height=16, width=16, num_inference_steps=2, output_type="np")


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(prompt=["a", "b", "c"], target_subject_category=["dog", "cat"]), ValueError, "target_subject_category"),
        (dict(reference_image=[make_image(0)] * 3, prompt=["a", "b"]), ValueError, "reference_image"),
        (dict(height=30), ValueError, "height"),
        (dict(width=0), ValueError, "width"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (dict(latents=np.zeros((1, 4, 5, 5), np.float32)), ValueError, "latents"),
        (dict(reference_image="/no/such/file.png"), FileNotFoundError, "reference_image"),
        (dict(reference_image=42), TypeError, "reference_image"),
        (dict(output_type="pt"), ValueError, "output_type"),
        (dict(prompt=None), TypeError, "prompt"),
        (dict(height="32"), TypeError, "height"),
    ],
)
def test_bad_input_is_named_before_compiling(flax_pipeline, tmp_path, change, error, match):
    pipeline, params = flax_pipeline
    args = dict(prompt="on grass", reference_image=make_image(0), source_subject_category="dog",
                target_subject_category="dog", params=params, prng_seed=jax.random.PRNGKey(0),
                height=16, width=16, num_inference_steps=2)
    args.update(change)
    compiled = pipeline._generate_jit._cache_size()
    with pytest.raises(error, match=match):
        pipeline(**args)
    assert pipeline._generate_jit._cache_size() == compiled


def test_unreadable_image_file_is_named(flax_pipeline, tmp_path):
    pipeline, params = flax_pipeline
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="reference_image"):
        pipeline.encode_subject(str(bad), "dog", params)


def test_real_photo_reference(flax_pipeline):
    pipeline, params = flax_pipeline
    out = pipeline("swimming underwater", shared_image("dog.png"), "dog", "dog", params=params,
                   prng_seed=jax.random.PRNGKey(0), height=16, width=16, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
