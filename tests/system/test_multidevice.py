"""Multi-device paths on 4 fake CPU devices (XLA_FLAGS set in conftest): same images as one device."""

import jax
import numpy as np
import pytest
from support.images import make_image
from flax.jax_utils import replicate
from jax.sharding import Mesh

PROMPTS = ["on grass", "in snow", "at night", "on a boat"]


@pytest.fixture(scope="module")
def reference(flax_pipeline):
    if jax.local_device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 set before jax starts")
    pipeline, params = flax_pipeline
    latents = np.random.RandomState(5).randn(4, 4, 8, 8).astype(np.float32)
    kwargs = dict(latents=latents, height=16, width=16, num_inference_steps=2, output_type="np")
    single = pipeline(PROMPTS, make_image(0), "dog", ["dog", "cat", "dog", "cat"], params=params, **kwargs).images
    return kwargs, single


def test_pmap_convention_matches_one_device(flax_pipeline, reference):
    pipeline, params = flax_pipeline
    kwargs, single = reference
    out = pipeline(PROMPTS, make_image(0), "dog", ["dog", "cat", "dog", "cat"], params=replicate(params), jit=True, **kwargs).images
    np.testing.assert_allclose(out, single, rtol=0, atol=1e-5)


def test_mesh_matches_one_device(flax_pipeline, reference):
    pipeline, params = flax_pipeline
    kwargs, single = reference
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    out = pipeline(PROMPTS, make_image(0), "dog", ["dog", "cat", "dog", "cat"], params=params, mesh=mesh, **kwargs).images
    np.testing.assert_allclose(out, single, rtol=0, atol=1e-5)


def test_pmap_needs_replicated_params_and_a_divisible_batch(flax_pipeline, reference):
    pipeline, params = flax_pipeline
    with pytest.raises(ValueError, match="replicate"):
        pipeline(PROMPTS, make_image(0), "dog", "dog", params=params, jit=True, prng_seed=jax.random.PRNGKey(0), height=16, width=16)
    with pytest.raises(ValueError, match="devices"):
        pipeline(PROMPTS[:3], make_image(0), "dog", "dog", params=params, jit=True, prng_seed=jax.random.PRNGKey(0), height=16, width=16)


def test_controlnet_pmap_and_mesh_match_one_device(flax_controlnet_pipeline, reference):
    from blipdiff_jax.image_processing import canny

    pipeline, params = flax_controlnet_pipeline
    kwargs, _ = reference
    edges = canny(make_image(1, (32, 32)), 30, 70)
    args = (PROMPTS, make_image(0), edges, "dog", ["dog", "cat", "dog", "cat"])
    single = pipeline(*args, params=params, **kwargs).images
    pmapped = pipeline(*args, params=replicate(params), jit=True, **kwargs).images
    meshed = pipeline(*args, params=params, mesh=Mesh(np.array(jax.devices()[:4]), ("data",)), **kwargs).images
    np.testing.assert_allclose(pmapped, single, rtol=0, atol=1e-5)
    np.testing.assert_allclose(meshed, single, rtol=0, atol=1e-5)
