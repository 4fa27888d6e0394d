"""Subject-driven editing: ours against a PyTorch reference of LAVIS's semantics (tiny models, fp32, CPU)."""

import copy

import jax
import numpy as np
import pytest
import torch
from conftest import make_image, shared_image
from p2p_reference import Controller, attach, ddim_invert, decode, edit_loop

from blipdiff_jax.pipelines.attention_control import refinement_mapper, time_window
from blipdiff_jax.pipelines.editing import LAVIS_DDIM_CONFIG, prepare_real_image

TOLERANCE = 2e-3  # max abs, images in [0, 1] and inverted latents
SIZE, STEPS = 32, 4
PROMPT, ORIGINAL, TARGET = "on a sofa", "cat", "dog"


@pytest.fixture(scope="module")
def reference(torch_pipeline):
    """Deep copies: attention processors must not leak into other tests' UNet."""
    return copy.deepcopy(torch_pipeline)


def _torch_edit(ref, pipeline, params, latents, real_image, guidance=7.5, cross=0.8, self_steps=0.4, lb=0.3, blend=True,
                original=ORIGINAL, controller="refine", equalizer=None):
    """Run the PyTorch reference on the same tokens, subject embeddings and schedules as ours."""
    tokens = pipeline._edit_tokens(PROMPT, original, TARGET, controller, equalizer)
    source_ids, target_ids = tokens["source"], tokens["target"]
    embeds = torch.from_numpy(np.array(pipeline.encode_subject(make_image(0), "dog", params)))
    uncond_ids = pipeline.tokenizer([""], padding="max_length", max_length=77, return_tensors="np").input_ids
    with torch.no_grad():
        te = ref.text_encoder
        source = te(input_ids=torch.from_numpy(source_ids).long())[0]
        target = te(input_ids=torch.from_numpy(target_ids).long(), ctx_embeddings=embeds, ctx_begin_pos=[2])[0]
        uncond = te(input_ids=torch.from_numpy(uncond_ids).long())[0]
        context = torch.cat([uncond, uncond, source, target]) if guidance > 1 else torch.cat([source, target])
        controller = Controller(time_window(STEPS, cross), time_window(STEPS, self_steps, scale_by_rows=False),
                                tokens["mapper"], tokens["alphas"], tokens["blend_words"], lb,
                                pipeline.control_pixels(SIZE, SIZE), guidance > 1, blend, tokens["equalizer"])
        attach(ref.unet, controller)
        try:
            if real_image:
                from diffusers import DDIMScheduler

                scheduler = DDIMScheduler(**LAVIS_DDIM_CONFIG)
            else:
                scheduler = copy.deepcopy(ref.scheduler)
            out = edit_loop(ref.unet, scheduler, torch.from_numpy(np.asarray(latents)).expand(2, -1, -1, -1), context,
                            guidance, STEPS, controller, real_image)
        finally:
            from diffusers.models.attention_processor import AttnProcessor

            ref.unet.set_attn_processor(AttnProcessor())
        return decode(ref.vae, out)


def test_token_mapper_aligns_around_the_subject_placeholders():
    # source: BOS a cat on sofa EOS ; target: BOS a P P dog on sofa EOS (P: subject embeddings)
    mapper, alphas = refinement_mapper([0, 1, 2, 3, 4, 9], [0, 1, -1, -1, 5, 3, 4, 9], 10)
    np.testing.assert_array_equal(alphas[:8], [1, 1, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(mapper[[0, 1, 5, 6, 7]], [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(mapper[8:], [8, 9])


def test_time_windows_follow_lavis():
    np.testing.assert_array_equal(time_window(4, 0.8), [1, 1, 1, 1, 0])  # int(0.8 * 5) = 4 rows of 5
    np.testing.assert_array_equal(time_window(4, (0.25, 0.5), scale_by_rows=False), [0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="cross_replace_steps"):
        time_window(4, 1.5)


def test_synthetic_edit_matches_pytorch(flax_pipeline, reference):
    pipeline, params = flax_pipeline
    latents = np.random.RandomState(0).randn(1, 4, SIZE // 2, SIZE // 2).astype(np.float32)
    ours = pipeline.edit(PROMPT, make_image(0), "dog", TARGET, ORIGINAL, params=params, latents=latents,
                         height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np").images
    ref = _torch_edit(reference, pipeline, params, latents, real_image=False)
    assert ours.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # the edit changes something
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


def test_replace_and_reweight_controllers_match_pytorch(flax_pipeline, reference):
    """AttentionReplace (a same-length word swap: "cat" -> "dog") with AttentionReweight on top."""
    pipeline, params = flax_pipeline
    latents = np.random.RandomState(2).randn(1, 4, SIZE // 2, SIZE // 2).astype(np.float32)
    options = dict(controller="replace", equalizer={"sofa": 2.0})
    ours = pipeline.edit(PROMPT, make_image(0), "dog", TARGET, ORIGINAL, params=params, latents=latents, height=SIZE,
                         width=SIZE, num_inference_steps=STEPS, output_type="np", **options).images
    ref = _torch_edit(reference, pipeline, params, latents, real_image=False, **options)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)
    with pytest.raises(ValueError, match="same token length"):
        pipeline.edit(PROMPT, make_image(0), "dog", "teapot", ORIGINAL, params=params, controller="replace", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="equalizer"):
        pipeline.edit(PROMPT, make_image(0), "dog", TARGET, ORIGINAL, params=params, equalizer={"moon": 2.0}, height=SIZE, width=SIZE)


def test_real_image_edit_and_inversion_match_pytorch(flax_pipeline, reference):
    pipeline, params = flax_pipeline
    photo = make_image(5, (50, 40))
    inverted = pipeline.invert(photo, f"a {ORIGINAL} {PROMPT}", params=params, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    pixels = torch.from_numpy(prepare_real_image(photo, SIZE, SIZE))
    with torch.no_grad():
        from diffusers import DDIMScheduler

        latents = reference.vae.encode(pixels).latent_dist.mean * reference.vae.config.scaling_factor
        ids = pipeline.tokenizer([f"a {ORIGINAL} {PROMPT}"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        context = reference.text_encoder(input_ids=ids)[0]
        ref_inverted = ddim_invert(reference.unet, DDIMScheduler(**LAVIS_DDIM_CONFIG), latents, context, STEPS)
    np.testing.assert_allclose(np.asarray(inverted), ref_inverted.numpy(), rtol=0, atol=TOLERANCE)

    ours = pipeline.edit(PROMPT, make_image(0), "dog", TARGET, ORIGINAL, image=photo, params=params, height=SIZE,
                         width=SIZE, num_inference_steps=STEPS, num_inversion_steps=STEPS, output_type="np").images
    ref = _torch_edit(reference, pipeline, params, ref_inverted.numpy(), real_image=True)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


def test_threshold_above_one_keeps_the_source_image(flax_pipeline):
    pipeline, params = flax_pipeline
    out = pipeline.edit(PROMPT, make_image(0), "dog", TARGET, ORIGINAL, params=params, prng_seed=jax.random.PRNGKey(0),
                        height=SIZE, width=SIZE, num_inference_steps=STEPS, lb_threshold=1.5, output_type="np").images
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=1e-6)


def test_without_control_each_branch_is_its_own_generation(flax_pipeline):
    pipeline, params = flax_pipeline
    latents = np.random.RandomState(1).randn(1, 4, SIZE // 2, SIZE // 2).astype(np.float32)
    kwargs = dict(params=params, latents=latents, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    free = dict(cross_replace_steps=0.0, self_replace_steps=0.0, local_blend=False)
    edit = pipeline.edit(PROMPT, make_image(0), "dog", TARGET, ORIGINAL, **free, **kwargs).images
    # The edited branch is zero-shot generation of "a dog on a sofa" (no prompt repetition) ...
    alone = pipeline(PROMPT, make_image(0), "dog", TARGET, prompt_reps=1, **kwargs).images
    np.testing.assert_allclose(edit[1], alone[0], rtol=0, atol=1e-5)
    # ... and the source branch does not depend on the edited one.
    other = pipeline.edit(PROMPT, make_image(7), "cat", "flower", ORIGINAL, **free, **kwargs).images
    np.testing.assert_allclose(edit[0], other[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("change,error,match", [
    (dict(original_subject="   "), ValueError, "original_subject"),
    (dict(original_subject=None), TypeError, "original_subject"),
    (dict(lb_threshold=float("nan")), ValueError, "lb_threshold"),
    (dict(cross_replace_steps=1.5), ValueError, "cross_replace_steps"),
    (dict(self_replace_steps=(0.6, 0.2)), ValueError, "self_replace_steps"),
    (dict(image="/no/such/photo.png"), FileNotFoundError, "image"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
])
def test_bad_edit_input_is_named(flax_pipeline, change, error, match):
    pipeline, params = flax_pipeline
    args = dict(prompt=PROMPT, reference_image=make_image(0), source_subject_category="dog",
                target_subject_category=TARGET, original_subject=ORIGINAL, params=params,
                prng_seed=jax.random.PRNGKey(0), height=SIZE, width=SIZE, num_inference_steps=STEPS)
    args.update(change)
    with pytest.raises(error, match=match):
        pipeline.edit(**args)


def test_virtual_try_on(flax_pipeline):
    """LAVIS editing_tryon_zeroshot: a dress model edited with the subject of a green skirt."""
    pipeline, params = flax_pipeline
    out = pipeline.edit("", shared_image("green-skirt.png"), "skirt", "skirt", "dress", image=shared_image("dress-model.png"),
                        params=params, height=SIZE, width=SIZE, num_inference_steps=2, num_inversion_steps=2)
    assert len(out.images) == 2 and out.images[1].size == (SIZE, SIZE)
