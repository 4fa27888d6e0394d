"""Multi-device paths on 4 fake CPU devices (XLA_FLAGS set in conftest): same images as one device."""

import jax
import numpy as np
import pytest
from support.images import make_image
from flax.jax_utils import replicate
from jax.sharding import Mesh

from blipdiff_jax.pipelines import placement

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


@pytest.mark.slow
def test_pmap_convention_matches_one_device(flax_pipeline, reference):
    pipeline, params = flax_pipeline
    kwargs, single = reference
    out = pipeline(PROMPTS, make_image(0), "dog", ["dog", "cat", "dog", "cat"], params=pipeline.replicate(params), jit=True,
                   **kwargs).images
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


@pytest.mark.slow
def test_controlnet_pmap_and_mesh_match_one_device(flax_controlnet_pipeline, reference):
    from blipdiff_jax.image_processing import canny

    pipeline, params = flax_controlnet_pipeline
    kwargs, _ = reference
    edges = canny(make_image(1, (32, 32)), 30, 70)
    args = (PROMPTS, make_image(0), edges, "dog", ["dog", "cat", "dog", "cat"])
    single = pipeline(*args, params=params, **kwargs).images
    pmapped = pipeline(*args, params=pipeline.replicate(params), jit=True, **kwargs).images
    meshed = pipeline(*args, params=params, mesh=Mesh(np.array(jax.devices()[:4]), ("data",)), **kwargs).images
    np.testing.assert_allclose(pmapped, single, rtol=0, atol=1e-5)
    np.testing.assert_allclose(meshed, single, rtol=0, atol=1e-5)


def _recording_transfers(monkeypatch):
    """The ids of every leaf handed to `jax.device_put` or `jax.device_get` from now on."""
    moved = []
    for name in ("device_put", "device_get"):
        real = getattr(jax, name)

        def recorded(tree, *args, _real=real, **kwargs):
            moved.extend(id(leaf) for leaf in jax.tree_util.tree_leaves(tree))
            return _real(tree, *args, **kwargs)

        monkeypatch.setattr(jax, name, recorded)
    return moved


def test_params_placed_on_the_mesh_once_are_not_transferred_again(flax_pipeline, reference, monkeypatch):
    pipeline, params = flax_pipeline
    kwargs, single = reference
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    args = (PROMPTS, make_image(0), "dog", ["dog", "cat", "dog", "cat"])
    unplaced = pipeline(*args, params=params, mesh=mesh, **kwargs).images
    placed = pipeline.shard_params(params, mesh)
    assert pipeline.shard_params(placed, mesh) is placed
    moved = _recording_transfers(monkeypatch)
    for _ in range(2):
        out = pipeline(*args, params=placed, mesh=mesh, **kwargs).images
        np.testing.assert_array_equal(out, unplaced)
    assert moved, "the batch still goes to the devices"
    assert not {id(leaf) for leaf in jax.tree_util.tree_leaves(placed)} & set(moved)
    np.testing.assert_allclose(out, single, rtol=0, atol=1e-5)


def test_replicated_params_are_recognised_by_their_sharding(flax_pipeline, reference):
    pipeline, params = flax_pipeline
    kwargs, single = reference
    replicated = pipeline.replicate(params)
    assert placement.is_replicated(replicated)
    # the arrays flax's replicate makes (shown on one block: flax compiles a stack per leaf shape)
    block = params["unet"]["conv_in"]
    for ours, flax_way in zip(jax.tree_util.tree_leaves(pipeline.replicate(block)), jax.tree_util.tree_leaves(replicate(block))):
        assert ours.shape == flax_way.shape and ours.sharding.is_equivalent_to(flax_way.sharding, ours.ndim)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax_way))
    assert placement.is_replicated(pipeline.replicate(jax.device_put(block, jax.devices()[1])))  # committed elsewhere
    assert not placement.is_replicated(params)
    # One kernel stacked per device is not a replicated tree.
    stacked_kernel = jax.tree_util.tree_map(lambda x: x, params)
    stacked_kernel["unet"]["conv_in"]["kernel"] = replicated["unet"]["conv_in"]["kernel"]
    assert not placement.is_replicated(stacked_kernel)
    out = pipeline(PROMPTS, make_image(0), "dog", ["dog", "cat", "dog", "cat"], params=replicated, jit=True, **kwargs).images
    np.testing.assert_allclose(out, single, rtol=0, atol=1e-5)
