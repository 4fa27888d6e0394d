"""FlaxBlipDiffusionControlNetPipeline against diffusers' PyTorch BlipDiffusionControlNetPipeline (tiny, fp32, CPU)."""

import os

import jax
import numpy as np
import pytest
import torch
from support.images import edge_picture, make_image
from support.paths import shared_image
from PIL import Image, ImageDraw

from blipdiff_jax import FlaxBlipDiffusionControlNetPipeline, FlaxBlipDiffusionPipeline
from blipdiff_jax.image_processing import canny

TOLERANCE = 2e-3  # max abs difference of images in [0, 1]
PROMPTS = ["on a marble table", "in a garden"]


def _latents(seed=0, size=32):
    return np.random.RandomState(seed).randn(2, 4, size // 2, size // 2).astype(np.float32)


@pytest.mark.parametrize("guidance", [pytest.param(1.0, marks=pytest.mark.slow), 7.5])
def test_images_match_pytorch(torch_controlnet_pipeline, flax_controlnet_pipeline, guidance):
    pipeline, params = flax_controlnet_pipeline
    maps = [canny(edge_picture(0), 30, 70), canny(edge_picture(1), 30, 70)]
    refs = [make_image(0), make_image(1, (70, 50))]
    latents = _latents()
    common = dict(guidance_scale=guidance, height=32, width=32, num_inference_steps=3, output_type="np")
    ours = pipeline(PROMPTS, refs, maps, ["flower", "dog"], ["teapot", "cat"], params=params, latents=latents, **common).images
    ref = torch_controlnet_pipeline(PROMPTS, refs, maps, ["flower", "dog"], ["teapot", "cat"],
                                    latents=torch.from_numpy(latents), **common).images
    assert ours.shape == (2, 32, 32, 3) and ours.std() > 0.02
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_cpu_rewrites_match_pytorch(torch_controlnet_pipeline, torch_controlnet_pipeline_dir):
    """The CPU layer rewrites in the UNet and the ControlNet (CPU users' default) within the same bound."""
    pipeline, params = FlaxBlipDiffusionControlNetPipeline.from_pretrained(torch_controlnet_pipeline_dir, from_pt=True,
                                                                          cpu_rewrites=True)
    assert pipeline.runtime.cpu_rewrites == (jax.default_backend() == "cpu")
    maps, refs, latents = [canny(edge_picture(4), 30, 70)] * 2, [make_image(4), make_image(5)], _latents(3, 16)
    args = (PROMPTS, refs, maps, ["flower", "dog"], ["teapot", "cat"])
    common = dict(guidance_scale=7.5, height=16, width=16, num_inference_steps=2, output_type="np")
    ours = pipeline(*args, params=params, latents=latents, **common).images
    ref = torch_controlnet_pipeline(*args, latents=torch.from_numpy(latents), **common).images
    assert ours.std() > 0.02
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_zero_conditioning_scale_is_the_zero_shot_image(flax_controlnet_pipeline, converted_model):
    pipeline, params = flax_controlnet_pipeline
    latents = _latents(1, 16)
    kwargs = dict(latents=latents, height=16, width=16, num_inference_steps=2, output_type="np")
    controlled = pipeline(PROMPTS, make_image(2), canny(edge_picture(2)), "dog", "dog", params=params,
                          controlnet_conditioning_scale=0.0, **kwargs).images
    zero_shot_pipeline, zero_shot_params = FlaxBlipDiffusionPipeline.from_converted(converted_model)
    plain = zero_shot_pipeline(PROMPTS, make_image(2), "dog", "dog", params=zero_shot_params, **kwargs).images
    np.testing.assert_allclose(controlled, plain, rtol=0, atol=1e-6)
    full = pipeline(PROMPTS, make_image(2), canny(edge_picture(2)), "dog", "dog", params=params, **kwargs).images
    assert np.abs(full - plain).max() > 1e-3  # the ControlNet does change the image at scale 1


def test_pytorch_spelling_and_one_map_for_the_batch(flax_controlnet_pipeline):
    pipeline, params = flax_controlnet_pipeline
    kwargs = dict(params=params, latents=_latents(2, 16), height=16, width=16, num_inference_steps=2, output_type="np")
    edge = canny(edge_picture(3))
    a = pipeline(PROMPTS, make_image(3), source_subject_category="dog", target_subject_category="dog", condtioning_image=edge, **kwargs).images
    b = pipeline(PROMPTS, make_image(3), [edge, edge], "dog", "dog", **kwargs).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_base_model_plus_separate_controlnet(torch_pipeline_dir, torch_controlnet_pipeline_dir, flax_controlnet_pipeline, tmp_path):
    from blipdiff_jax.checkpoint import save_converted
    from convert.pytorch_dir import read_pytorch_directory

    base = save_converted(read_pytorch_directory(torch_pipeline_dir), str(tmp_path / "base"))
    with pytest.raises(ValueError, match="controlnet"):
        FlaxBlipDiffusionControlNetPipeline.from_pretrained(base)
    pipeline, params = FlaxBlipDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=os.path.join(torch_controlnet_pipeline_dir, "controlnet"))
    reference, reference_params = flax_controlnet_pipeline
    kwargs = dict(latents=_latents(3, 16), height=16, width=16, num_inference_steps=2, output_type="np")
    args = (PROMPTS, make_image(4), canny(edge_picture(4)), "dog", "dog")
    np.testing.assert_array_equal(pipeline(*args, params=params, **kwargs).images,
                                  reference(*args, params=reference_params, **kwargs).images)


def test_canny_finds_the_edges_of_a_square():
    image = Image.new("RGB", (40, 40), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([10, 10, 29, 29], fill=(255, 255, 255))
    edges = np.asarray(canny(image, 30, 70))[..., 0] > 0
    assert edges.shape == (40, 40)
    assert edges[10:30, 8:12].any() and edges[10:30, 28:32].any()  # left and right sides
    assert not edges[15:25, 15:25].any() and not edges[:5, :5].any()  # flat inside and outside
    assert not np.asarray(canny(image, 2000, 3000)).any()  # thresholds above every gradient
    with pytest.raises(ValueError, match="thresholds"):
        canny(image, 70, 30)


@pytest.mark.parametrize("change,error,match", [
    (dict(conditioning_image=[Image.new("RGB", (8, 8))] * 3), ValueError, "conditioning_image"),
    (dict(conditioning_image="/no/such/edges.png"), FileNotFoundError, "conditioning_image"),
    (dict(conditioning_image=None), ValueError, "conditioning_image"),
    (dict(controlnet_conditioning_scale=float("inf")), ValueError, "controlnet_conditioning_scale"),
    (dict(height=18), ValueError, "height"),
])
def test_bad_input_is_named_before_compiling(flax_controlnet_pipeline, change, error, match):
    pipeline, params = flax_controlnet_pipeline
    args = dict(prompt=PROMPTS, reference_image=make_image(0), conditioning_image=Image.new("RGB", (8, 8)),
                source_subject_category="dog", target_subject_category="dog", params=params,
                prng_seed=jax.random.PRNGKey(0), height=16, width=16, num_inference_steps=2)
    args.update(change)
    compiled = pipeline._generate_jit._cache_size()
    with pytest.raises(error, match=match):
        pipeline(**args)
    assert pipeline._generate_jit._cache_size() == compiled


def test_unreadable_conditioning_image_is_named(flax_controlnet_pipeline, tmp_path):
    pipeline, params = flax_controlnet_pipeline
    bad = tmp_path / "edges.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="conditioning_image"):
        pipeline("x", make_image(0), str(bad), "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0),
                 height=16, width=16, num_inference_steps=2)


@pytest.mark.slow
def test_stylization_example_from_the_paper(flax_controlnet_pipeline):
    """Style subject "flower" from flower.jpg, structure from the canny map of kettle.jpg, target "teapot"."""
    pipeline, params = flax_controlnet_pipeline
    edges = canny(shared_image("kettle.jpg"), 30, 70)
    out = pipeline("on a marble table", shared_image("flower.jpg"), edges, "flower", "teapot", params=params,
                   prng_seed=jax.random.PRNGKey(0), height=32, width=32, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
