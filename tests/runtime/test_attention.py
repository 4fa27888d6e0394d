"""The attention kernels swapped into the reused UNet (models/attention.py): same numbers as diffusers' own
attention, in isolation, through the pipeline against PyTorch, and under editing's attention control."""

import jax
import numpy as np
import pytest
import torch
from support.images import make_image

from blipdiff_jax import FlaxBlipDiffusionPipeline
from blipdiff_jax.models import attention

KERNEL_TOLERANCE = 1e-5  # fp32, same math in another order
IMAGE_TOLERANCE = 2e-3  # max abs, images in [0, 1], as the other pipeline parity tests
INVERSION_TOLERANCE = 4.4e-3  # max abs after DDIM inversion, which amplifies rounding (see the editing test)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 x 256 scores, so the tiny model's 16x16 latents (256 tokens) take the blockwise path."""
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", 16 * 256)


@pytest.mark.parametrize("block_size", [16, None], ids=["16-queries", "by-score-budget"])
@pytest.mark.parametrize("batch,queries,keys,dim", [(4, 64, 64, 8), (2, 96, 7, 16), (3, 40, 40, 4), (1, 16, 16, 8)])
def test_blockwise_equals_the_plain_formula(batch, queries, keys, dim, block_size, monkeypatch):
    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", 16 * 64)  # by budget: blocks of 16, 96, 20 queries; plain
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, n, dim), np.float32) for n in (queries, keys, keys))
    scores = np.einsum("bid,bjd->bij", q, k) * dim**-0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (probs / probs.sum(-1, keepdims=True)) @ v
    out = jax.jit(lambda q, k, v: attention.blockwise_attention(q, k, v, dim**-0.5, block_size))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=KERNEL_TOLERANCE)


def test_queries_per_block_keeps_the_scores_within_the_budget():
    assert attention.queries_per_block(4096, 4096) == 1024  # 64x64 latents (512x512): 16 MiB of fp32 scores
    assert attention.queries_per_block(1024, 1024) == 1024  # 32x32: a whole head
    assert attention.queries_per_block(6144, 6144) == 384  # 64x96 (512x768): halved until it fits
    assert attention.queries_per_block(4096, 77) == 4096  # cross-attention
    assert attention.queries_per_block(45, 4096, scores_per_block=1000) == 45  # odd: cannot be halved


@pytest.mark.parametrize("implementation", ["blockwise", "dot_product", "cudnn"])  # cudnn: XLA's form off GPU
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_interceptor_equals_diffusers_attention(implementation, cross, small_blocks):
    import flax.linen as nn
    from diffusers.models.attention_flax import FlaxAttention

    module = FlaxAttention(query_dim=32, heads=4, dim_head=8)
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, 64, 32), np.float32)
    context = rng.standard_normal((2, 7, 32), np.float32) if cross else None
    params = module.init(jax.random.PRNGKey(0), hidden, context)
    expected = module.apply(params, hidden, context)

    def swapped(params, hidden, context):
        with nn.intercept_methods(attention.attention_interceptor(implementation)):
            return module.apply(params, hidden, context)

    np.testing.assert_allclose(np.asarray(jax.jit(swapped)(params, hidden, context)), np.asarray(expected),
                               rtol=0, atol=KERNEL_TOLERANCE)


@pytest.mark.slow
def test_blockwise_pipeline_matches_xla_and_pytorch(torch_pipeline, converted_model, small_blocks):
    latents = np.random.RandomState(0).randn(1, 4, 16, 16).astype(np.float32)
    args = ("on a sofa", make_image(0), "dog", "dog")
    common = dict(guidance_scale=7.5, height=32, width=32, num_inference_steps=3, output_type="np", latents=latents)
    images = {}
    for name in ("blockwise", "xla"):
        pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, attention=name)
        assert pipeline.attention == name
        images[name] = pipeline(*args, params=params, **common).images
    reference = torch_pipeline(*args, **{**common, "latents": torch.from_numpy(latents)}).images
    np.testing.assert_allclose(images["blockwise"], images["xla"], rtol=0, atol=KERNEL_TOLERANCE)
    np.testing.assert_allclose(images["blockwise"], reference, rtol=0, atol=IMAGE_TOLERANCE)


@pytest.mark.slow
def test_real_image_editing_with_the_blockwise_kernel(converted_model, small_blocks):
    """DDIM inversion runs every attention through the kernel; the controlled edit loop hands it the layers the
    controller leaves alone (none in the tiny UNet, whose only cross-attention level is the control
    resolution). DDIM inversion amplifies float rounding (it runs the model backwards, from the image to its
    noise): the same 3-step edit differs from diffusers' attention by 2.2e-3 at most and 2e-4 on average
    (measured with the scale folded into the queries; 2.3e-3 on an H100),
    while the edit itself moves pixels by 0.045 on average. Held to twice that worst case, and to a mean 100x
    below the edit's."""
    edits = {}
    for name in ("blockwise", "xla"):
        pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, attention=name)
        edits[name] = pipeline.edit("on a sofa", make_image(0), "dog", "dog", "cat", image=make_image(5, (40, 40)),
                                    params=params, prng_seed=jax.random.PRNGKey(0), height=32, width=32,
                                    num_inference_steps=3, output_type="np").images
    edit_effect = np.abs(edits["xla"][0] - edits["xla"][1]).mean()
    assert edit_effect > 1e-2  # the edit changes the image
    np.testing.assert_allclose(edits["blockwise"], edits["xla"], rtol=0, atol=INVERSION_TOLERANCE)
    assert np.abs(edits["blockwise"] - edits["xla"]).mean() < edit_effect / 100


def test_auto_picks_by_backend_and_bad_names_are_refused(tmp_path):
    expected = {"cpu": "blockwise", "gpu": "cudnn"}.get(jax.default_backend(), "dot_product")
    assert attention.resolve_implementation("auto") == expected
    assert attention.attention_interceptor("xla") is None
    with pytest.raises(ValueError, match="attention='flash'"):
        FlaxBlipDiffusionPipeline.from_pretrained(str(tmp_path / "not-there"), attention="flash")


def test_cudnn_is_asked_only_in_half_precision_on_gpu_and_a_refusal_falls_back(monkeypatch):
    """cuDNN's kernel takes fp16/bf16 on a GPU; where it refuses a shape (its checks raise while tracing) the
    same attention runs in XLA's formulation. Here the backend and cuDNN's answer are stand-ins."""
    import jax.numpy as jnp

    asked = []
    plain = jax.nn.dot_product_attention

    def stand_in(query, key, value, scale=None, implementation=None):
        asked.append(implementation)
        if implementation == "cudnn":
            raise NotImplementedError("The head dim must be <= 256")
        return plain(query, key, value, scale=scale)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 8, 2, 8)), jnp.bfloat16) for i in range(3))
    expected = plain(q, k, v, scale=0.3)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    attention.dot_product_attention(q, k, v, 0.3, fused=True)
    assert asked == [None]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    asked.clear()
    attention.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 0.3, fused=True)
    assert asked == [None]  # fp32: never asked
    asked.clear()
    out = attention.dot_product_attention(q, k, v, 0.3, fused=True)
    assert asked == ["cudnn", None]
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    asked.clear()
    attention.dot_product_attention(q, k, v, 0.3, fused=False)
    assert asked == [None]


@pytest.mark.gpu
def test_cudnn_kernel_is_compiled_in_on_a_gpu_and_matches_xla_in_bf16():
    """On a real GPU (the stand-ins above aside): the program calls cuDNN's fused attention, with XLA's
    numbers up to bf16 rounding."""
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 64, 4, 64)), jnp.bfloat16) for i in range(3))
    fused = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, 0.125, fused=True))
    assert "cudnn" in fused.lower(q, k, v).compile().as_text().lower()
    expected = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), scale=0.125)
    np.testing.assert_allclose(np.asarray(fused(q, k, v), np.float32), np.asarray(expected), rtol=0, atol=2e-2)
