"""The transformer blocks' feed-forward in chunks of rows on CPU (models/feed_forward.py): the same numbers as
diffusers' `FlaxFeedForward`, alone, under gradient and in the pipeline, and chunked only where it pays."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.images import make_image
from support.programs import jaxpr_equations
from diffusers.models.attention_flax import FlaxFeedForward

from blipdiff_jax import FlaxBlipDiffusionPipeline
from blipdiff_jax.models import attention, cpu_rewrites, feed_forward
from blipdiff_jax.runtime import Runtime

TOLERANCE = 1e-5  # fp32: the same rows through the same layers, the products' summation order aside


def _module_and_input(dim=32, batch=2, length=256, dropout=0.0):
    module = FlaxFeedForward(dim, dropout=dropout)
    hidden = np.random.default_rng(0).standard_normal((batch, length, dim), np.float32)
    return module, module.init(jax.random.PRNGKey(0), hidden), hidden


@pytest.mark.parametrize("rows", [64, 128, 256])
def test_chunks_equal_the_module(rows):
    module, params, hidden = _module_and_input()
    expected = module.apply(params, hidden)
    chunked = jax.jit(lambda p, x: module.apply(p, x, method=lambda m, x: feed_forward.chunked_feed_forward(m, x, rows)))
    np.testing.assert_allclose(np.asarray(chunked(params, hidden)), np.asarray(expected), rtol=0, atol=TOLERANCE)


@pytest.mark.cpu_only
def test_interceptor_chunks_and_gradients_match(monkeypatch):
    monkeypatch.setattr(feed_forward, "CHUNK_BYTES", 64 * 8 * 32 * 4)  # 64 rows of the 8 * dim hidden state
    module, params, hidden = _module_and_input()

    def loss(params, hidden, interceptor):
        with attention.intercept_attention(interceptor):
            return jnp.sum(module.apply(params, hidden) ** 2)

    swapped = Runtime.for_backend("blockwise", cpu_rewrites=True).unet_interceptor
    jaxpr = jax.make_jaxpr(lambda p, x: loss(p, x, swapped))(params, hidden).jaxpr
    scans = [e for e in jaxpr_equations(jaxpr, ("scan",)) if e.params["length"] == 2 * 256 // 64]
    assert scans, "the interceptor did not run the feed-forward in 8 chunks"
    # each chunk checkpointed: under a gradient its hidden state is recomputed, not stacked (fine-tuning memory)
    assert all(any(True for _ in jaxpr_equations(e.params["jaxpr"].jaxpr, ("checkpoint", "remat2"))) for e in scans)
    for argnums in (0, 1):
        got = jax.jit(jax.grad(lambda p, x: loss(p, x, swapped), argnums))(params, hidden)
        want = jax.grad(lambda p, x: loss(p, x, None), argnums)(params, hidden)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            # the weight gradients sum 512 rows' terms, chunk by chunk here: rounding of ~4e-5 on values ~80
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_rows_per_chunk_at_the_real_sizes():
    # 512x512, batch 2 under guidance: 64x64, 32x32, 16x16 and 8x8 latents; GEGLU hidden width 8 x dim
    assert feed_forward.rows_per_chunk(2 * 64 * 64, 8 * 320) == 1024
    assert feed_forward.rows_per_chunk(2 * 32 * 32, 8 * 640) == 512
    assert feed_forward.rows_per_chunk(2 * 16 * 16, 8 * 1280) is None  # two chunks: slower than none
    assert feed_forward.rows_per_chunk(2 * 8 * 8, 8 * 1280) is None
    assert feed_forward.rows_per_chunk(2 * 96 * 64, 8 * 320) == 768  # 512x768: halved while even
    assert feed_forward.rows_per_chunk(2 * 45, 8 * 320, chunk_bytes=1000) is None  # odd, cannot be halved


def test_left_whole_when_it_should_be():
    module, _, hidden = _module_and_input(dropout=0.1)
    assert feed_forward.chunk_rows(module, hidden, deterministic=False, chunk_bytes=128 * 1024) is None  # dropout on
    assert feed_forward.chunk_rows(module, hidden, deterministic=True, chunk_bytes=128 * 1024) == 128  # 512 rows, 1 KiB each
    assert feed_forward.chunk_rows(module, hidden[0], deterministic=True, chunk_bytes=128 * 1024) is None  # not (B, L, D)
    assert feed_forward.chunk_rows(nn.Dense(4), hidden, deterministic=True, chunk_bytes=128 * 1024) is None


@pytest.mark.parametrize("positional", [False, True])
def test_interceptor_leaves_dropout_whole(positional, monkeypatch):
    """A feed-forward with dropout on, `deterministic=False` passed either way, runs whole (no chunk loop)."""
    monkeypatch.setattr(feed_forward, "CHUNK_BYTES", 64 * 8 * 32 * 4)
    module, params, hidden = _module_and_input(dropout=0.1)
    call = (lambda m, x: m(x, False)) if positional else (lambda m, x: m(x, deterministic=False))

    def run(params, hidden):
        with attention.intercept_attention(Runtime.for_backend("blockwise", cpu_rewrites=True).unet_interceptor):
            return module.apply(params, hidden, method=call, rngs={"dropout": jax.random.PRNGKey(1)})

    assert not list(jaxpr_equations(jax.make_jaxpr(run)(params, hidden).jaxpr, ("scan",)))


@pytest.mark.slow
@pytest.mark.cpu_only
def test_pipeline_with_chunked_feed_forwards(converted_model, monkeypatch):
    """The tiny pipeline with its 16x16-latent feed-forwards in chunks gives the images it gives without."""
    latents = np.random.RandomState(0).randn(1, 4, 16, 16).astype(np.float32)
    args = ("on a sofa", make_image(0), "dog", "dog")
    common = dict(guidance_scale=7.5, height=32, width=32, num_inference_steps=2, output_type="np", latents=latents)
    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, attention="blockwise", cpu_rewrites=True)
    whole = pipeline(*args, params=params, **common).images
    monkeypatch.setattr(feed_forward, "CHUNK_BYTES", 4096)
    calls = []
    original = feed_forward.chunked_feed_forward
    monkeypatch.setattr(cpu_rewrites, "chunked_feed_forward", lambda *a: calls.append(a[2]) or original(*a))
    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, attention="blockwise", cpu_rewrites=True)
    chunked = pipeline(*args, params=params, **common).images
    assert calls, "no feed-forward ran in chunks"
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=TOLERANCE)
