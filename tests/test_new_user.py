"""What a new user hit (issue 24): each test failed before its fix. Tiny models, CPU."""

import inspect
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from blipdiff_jax import FlaxBlipDiffusionPipeline
from blipdiff_jax.checkpoint import save_converted
from blipdiff_jax.cli import main

BF16_TOLERANCE = 0.05  # max abs on images in [0, 1], as in test_bf16.py and the README
SMALL = dict(height=16, width=16, num_inference_steps=2, output_type="np")


def _call(pipeline, params, **change):
    args = dict(prompt="on grass", reference_image=make_image(0), source_subject_category="dog",
                target_subject_category="dog", params=params, prng_seed=jax.random.PRNGKey(0), **SMALL)
    args.update(change)
    return pipeline(**args)


# ------------------------------------------------------------------ 4: steps above num_train_timesteps


@pytest.mark.parametrize("entry", ["call", "edit", "edit_real", "edit_inversion", "invert"])
def test_more_steps_than_the_scheduler_has_are_refused(flax_pipeline, entry):
    pipeline, params = flax_pipeline
    edit = dict(prompt="on a sofa", reference_image=make_image(0), source_subject_category="dog",
                target_subject_category="dog", original_subject="cat", params=params,
                prng_seed=jax.random.PRNGKey(0), height=16, width=16)
    calls = {
        "call": (lambda: _call(pipeline, params, num_inference_steps=1001), "num_inference_steps=1001"),
        "edit": (lambda: pipeline.edit(**edit, num_inference_steps=1001), "num_inference_steps=1001"),
        "edit_real": (lambda: pipeline.edit(**edit, image=make_image(5), num_inference_steps=1001), "num_inference_steps=1001"),
        "edit_inversion": (lambda: pipeline.edit(**edit, image=make_image(5), num_inference_steps=2, num_inversion_steps=1001),
                           "num_inversion_steps=1001"),
        "invert": (lambda: pipeline.invert(make_image(5), "a cat", params=params, num_inference_steps=1001,
                                           height=16, width=16), "num_inference_steps=1001"),
    }
    run, name = calls[entry]
    with pytest.raises(ValueError, match=rf"{name} must be at most 1000 \(the scheduler's num_train_timesteps\)"):
        run()


def test_controlnet_refuses_more_steps_than_the_scheduler_has(flax_controlnet_pipeline):
    pipeline, params = flax_controlnet_pipeline
    with pytest.raises(ValueError, match=r"num_inference_steps=1001 must be at most 1000"):
        _call(pipeline, params, conditioning_image=Image.new("RGB", (8, 8)), num_inference_steps=1001)


# ------------------------------------------------------------------ 3: the seed's noise in every dtype


def test_a_seed_gives_the_same_image_in_bf16_as_in_fp32(flax_pipeline, converted_model):
    pipeline32, params32 = flax_pipeline
    pipeline16, params16 = FlaxBlipDiffusionPipeline.from_converted(converted_model, dtype=jnp.bfloat16)
    common = dict(height=32, width=32, num_inference_steps=3)
    fp32 = _call(pipeline32, params32, prng_seed=jax.random.PRNGKey(7), **common).images
    bf16 = _call(pipeline16, params16, prng_seed=jax.random.PRNGKey(7), **common).images
    print("bf16 vs fp32 from one seed: max abs", np.abs(bf16 - fp32).max())
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=BF16_TOLERANCE)
    # The noise itself: the fp32 draw, rounded once to bf16.
    noise32 = pipeline32._latents(None, jax.random.PRNGKey(7), 1, 32, 32)
    noise16 = pipeline16._latents(None, jax.random.PRNGKey(7), 1, 32, 32)
    assert noise16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(noise16), np.asarray(noise32.astype(jnp.bfloat16)))


# ------------------------------------------------------------------ 11: typed and raw keys


def test_typed_and_raw_keys_give_the_same_image(flax_pipeline):
    pipeline, params = flax_pipeline
    raw = _call(pipeline, params, prng_seed=jax.random.PRNGKey(3)).images
    typed = _call(pipeline, params, prng_seed=jax.random.key(3)).images
    np.testing.assert_array_equal(typed, raw)
    # per-device keys, typed or raw: the first one
    split = _call(pipeline, params, prng_seed=jax.random.split(jax.random.key(3), 4)).images
    np.testing.assert_array_equal(split, _call(pipeline, params, prng_seed=jax.random.split(jax.random.PRNGKey(3), 4)[0]).images)


@pytest.mark.parametrize("seed,what", [(0, "int"), (np.float32(1.5), "float32"),
                                       (np.zeros(2, np.float32), "float32 with shape")])
def test_a_seed_that_is_not_a_key_is_a_type_error_naming_prng_seed(flax_pipeline, seed, what):
    pipeline, params = flax_pipeline
    with pytest.raises(TypeError, match=rf"prng_seed must be a JAX PRNG key.*{what}"):
        _call(pipeline, params, prng_seed=seed)
    with pytest.raises(TypeError, match="prng_seed must be a JAX PRNG key"):
        pipeline.edit("on a sofa", make_image(0), "dog", "dog", "cat", params=params, prng_seed=seed, height=16, width=16)


# ------------------------------------------------------------------ 7: NaN subject embeddings


def test_nan_subject_embeddings_passed_in_are_refused(flax_pipeline):
    pipeline, params = flax_pipeline
    embeddings = np.array(pipeline.encode_subject(make_image(0), "dog", params))
    embeddings[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="subject_embeddings hold NaN or inf"):
        _call(pipeline, params, reference_image=None, subject_embeddings=embeddings)
    with pytest.raises(ValueError, match="subject_embeddings hold NaN or inf"):
        pipeline.edit("on a sofa", None, None, "dog", "cat", params=params, subject_embeddings=embeddings,
                      prng_seed=jax.random.PRNGKey(0), height=16, width=16)


def test_nan_from_the_subject_encoder_names_it(flax_pipeline):
    pipeline, params = flax_pipeline
    poisoned = dict(params, qformer=jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params["qformer"]))
    with pytest.raises(FloatingPointError, match=r"subject encoder \(Q-Former\)"):
        _call(pipeline, poisoned)


# ------------------------------------------------------------------ 10: errors that named the wrong argument


def test_edit_names_num_inversion_steps(flax_pipeline):
    pipeline, params = flax_pipeline
    with pytest.raises(ValueError, match=r"num_inversion_steps=0 must be at least 1"):
        pipeline.edit("on a sofa", make_image(0), "dog", "dog", "cat", image=make_image(5), params=params,
                      num_inference_steps=2, num_inversion_steps=0, height=16, width=16)


@pytest.mark.parametrize("change,error,match", [
    (dict(prompt_strength=float("nan")), ValueError, r"prompt_strength=nan must be a finite number >= 0"),
    (dict(prompt_strength="1"), TypeError, "prompt_strength must be a number"),
    (dict(prompt_reps=-1), ValueError, r"prompt_reps=-1 must be >= 0"),
    (dict(prompt=["a", "b", "c"], source_subject_category=["dog", "cat"]), ValueError,
     r"source_subject_category has 2 entries for 3 prompts \(give 1 or 3\)"),
    (dict(reference_image=[make_image(0), make_image(1)]), ValueError, r"reference_image has 2 entries for 1 prompt \(give 1\)"),
])
def test_prompt_arguments_are_named(flax_pipeline, change, error, match):
    pipeline, params = flax_pipeline
    compiled = pipeline._generate_jit._cache_size()
    with pytest.raises(error, match=match):
        _call(pipeline, params, **change)
    assert pipeline._generate_jit._cache_size() == compiled


def test_conditioning_image_count_message(flax_controlnet_pipeline):
    pipeline, params = flax_controlnet_pipeline
    with pytest.raises(ValueError, match=r"conditioning_image has 2 images for 1 prompt \(give 1\)$"):
        _call(pipeline, params, conditioning_image=[Image.new("RGB", (8, 8))] * 2)


# ------------------------------------------------------------------ 15: the long-prompt warning's line


def test_long_prompt_warning_points_at_the_callers_line(flax_pipeline):
    pipeline, params = flax_pipeline
    with pytest.warns(UserWarning, match="truncated") as record:
        line = inspect.currentframe().f_lineno + 1
        pipeline("very " * 100, make_image(0), "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0), **SMALL)
    warning = next(w for w in record if "truncated" in str(w.message))
    assert (warning.filename, warning.lineno) == (__file__, line)


# ------------------------------------------------------------------ 1: ControlNet editing


@pytest.mark.parametrize("method", ["edit", "invert"])
def test_the_controlnet_pipeline_refuses_to_edit_instead_of_ignoring_the_controlnet(flax_controlnet_pipeline, method):
    pipeline, params = flax_controlnet_pipeline
    args = {"edit": ("on a sofa", make_image(0), "dog", "dog", "cat"), "invert": (make_image(5), "a cat")}[method]
    with pytest.raises(NotImplementedError, match=rf"{method}: ControlNet-guided editing is not supported.*FlaxBlipDiffusionPipeline"):
        getattr(pipeline, method)(*args, params=params, height=16, width=16)
