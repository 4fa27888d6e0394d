"""Faster attention for the reused diffusers UNet/ControlNet, swapped in by interception (no UNet copy).

diffusers' `FlaxAttention` materialises every (batch x head) score matrix at once: at 512x512 the 64x64
self-attentions write 2 x 8 x 4096 x 4096 fp32 scores (1 GiB) per call and XLA's CPU backend spends most of
a UNet step moving them through memory. Here the same softmax(q k^T * scale) v is computed for a block of
queries of one (batch, head) at a time inside a `lax.map`, each block's scores at most `SCORES_PER_BLOCK`
(16 MiB in fp32), so they stay in the cache; the result is the same up to float rounding (~1e-7). On GPU,
`jax.nn.dot_product_attention` picks cuDNN's fused (flash) kernel, which never writes the scores to memory
either.

Implementations ("auto" picks by backend):
- "blockwise": the cache-sized blocks above (default on CPU);
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused kernel (default on GPU);
  it takes fp16/bf16 only, so fp32 programs, and any shape cuDNN refuses, get "dot_product" instead;
- "dot_product": `jax.nn.dot_product_attention` as XLA lowers it (default on TPU);
- "xla": diffusers' own attention, untouched.

The choice is the attention kernel only: the CPU rewrites of the UNet's other layers (models/cpu_rewrites.py)
have their own switch, `cpu_rewrites=` (blipdiff_jax.runtime). "xla" with `cpu_rewrites=False` is diffusers'
UNet exactly as shipped, the reference the other choices are tested against.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from diffusers.models.attention_flax import FlaxAttention

from . import bf16_matmul
from .feed_forward import halved_to_fit

IMPLEMENTATIONS = ("auto", "blockwise", "cudnn", "dot_product", "xla")
FUSED_DTYPES = (jnp.float16, jnp.bfloat16)
# Score elements (queries x keys) per block: 16 MiB in fp32. XLA's CPU runtime pays ~0.2 ms per loop iteration,
# which favours few large blocks, up to the point where a block no longer stays in the (last-level) cache
# (numbers in docs/performance.md).
SCORES_PER_BLOCK = 4 * 2**20


def resolve_implementation(implementation: str, backend: str | None = None) -> str:
    """The kernel `implementation` names; "auto" picks by `backend` (default: JAX's default backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return {"cpu": "blockwise", "gpu": "cudnn"}.get(backend or jax.default_backend(), "dot_product")
    return implementation


def dot_product_attention(query, key, value, scale: float, fused: bool = False):
    """`jax.nn.dot_product_attention` on (B, L, H, d) inputs; with `fused`, cuDNN's kernel where it applies
    (a GPU, fp16/bf16, a head size cuDNN takes), else XLA's formulation. cuDNN's checks run at trace time,
    so a refusal falls back here rather than failing the compile."""
    if fused and jax.default_backend() == "gpu" and query.dtype in FUSED_DTYPES:
        try:
            return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation="cudnn")
        except (RuntimeError, ValueError):  # NotImplementedError is a RuntimeError
            pass
    return jax.nn.dot_product_attention(query, key, value, scale=scale)


def _softmax_attention(scaled_query, key, value, out_dtype=None):
    """softmax(scaled_query key^T) value over the last two axes, normalised after the product with `value`:
    dividing the (queries x dim) result saves a pass over the (queries x keys) probabilities."""
    if bf16_matmul.runs_bf16_matmuls(value.dtype):
        return _softmax_attention_bf16(scaled_query, key, value, out_dtype or value.dtype)
    scores = jnp.einsum("...id,...jd->...ij", scaled_query, key)
    probs = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = (probs @ value) / probs.sum(-1, keepdims=True)
    return out if out_dtype is None else out.astype(out_dtype)


def _softmax_attention_bf16(scaled_query, key, value, out_dtype):
    """The same in bf16 on CPU: both products on bf16 operands summed in fp32 (models/bf16_matmul.py), the
    softmax in fp32, the probabilities rounded to bf16 once and normalised by the sum of those rounded
    values: the fastest of the normalisations tried (numbers in docs/performance.md)."""
    scores = bf16_matmul.einsum("...id,...jd->...ij", scaled_query, key)
    probs = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True))).astype(jnp.bfloat16)
    weighted = bf16_matmul.einsum("...ij,...jd->...id", probs, value)
    return (weighted / probs.astype(jnp.float32).sum(-1, keepdims=True)).astype(out_dtype)


def queries_per_block(length: int, keys: int, scores_per_block: int | None = None) -> int:
    """The most queries (`length` halved while even) whose scores against `keys` keys fit `scores_per_block`."""
    return halved_to_fit(length, keys, scores_per_block or SCORES_PER_BLOCK)


def blockwise_attention(query, key, value, scale: float, block_size: int | None = None):
    """softmax(query key^T * scale) value for (B, q, d) x (B, k, d) inputs (heads folded into B), one
    (batch-head, query-block) at a time. `block_size`: queries per block (default: as many as keep a block's
    scores within `SCORES_PER_BLOCK`). When everything fits one block, or `block_size` does not divide the
    queries, it is the plain formula."""
    batch, length, dim = query.shape
    keys = key.shape[1]
    # Scaled once here, not per score: XLA fuses a multiply of the scores into the product, and that cost 12%
    # of a 64x64 self-attention (301 -> 265 ms, 2-core Xeon).
    query = query * jnp.asarray(scale, query.dtype)
    if block_size is None:
        if batch * length * keys <= SCORES_PER_BLOCK:
            return _softmax_attention(query, key, value)
        block_size = queries_per_block(length, keys)
    elif length % block_size or length == block_size and batch == 1:
        return _softmax_attention(query, key, value)
    blocks = length // block_size

    def one_block(index):
        b, j = index // blocks, index % blocks
        q = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(query, b, keepdims=False), j * block_size, block_size)
        k = jax.lax.dynamic_index_in_dim(key, b, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(value, b, keepdims=False)
        return _softmax_attention(q, k, v, block_dtype)

    # Checkpointed: under a gradient (fine-tuning) each block's probabilities are recomputed in the backward
    # pass instead of stored, so training memory does not grow with queries x keys either.
    # bf16 blocks are stacked in fp32: XLA's CPU backend would write each into the bf16 stack through fp32.
    block_dtype = jnp.float32 if bf16_matmul.runs_bf16_matmuls(value.dtype) else value.dtype
    out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(batch * blocks))  # (batch * blocks, block_size, d)
    return out.reshape(batch, length, dim).astype(value.dtype)


def attend(module: FlaxAttention, hidden_states, context, implementation: str, block_size: int | None = None):
    """What `FlaxAttention.__call__` computes (dropout is 0 in inference), with the chosen kernel."""
    source = hidden_states if context is None else context
    query, key, value = module.query(hidden_states), module.key(source), module.value(source)
    if implementation in ("dot_product", "cudnn"):
        split = lambda x: x.reshape(x.shape[0], x.shape[1], module.heads, -1)  # noqa: E731  (B, L, H, d)
        out = dot_product_attention(split(query), split(key), split(value), module.scale, implementation == "cudnn")
        out = out.reshape(out.shape[0], out.shape[1], -1)
    else:
        out = blockwise_attention(*(module.reshape_heads_to_batch_dim(x) for x in (query, key, value)),
                                  module.scale, block_size)
        out = module.reshape_batch_dim_to_heads(out)
    return module.proj_attn(out)


def attention_interceptor(implementation: str = "auto", block_size: int | None = None):
    """An interceptor for `nn.intercept_methods` that runs every `FlaxAttention` with `implementation` and
    every other call as it is; None for "xla" (nothing to intercept)."""
    implementation = resolve_implementation(implementation)
    if implementation == "xla":
        return None

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, FlaxAttention):
            return next_fun(*args, **kwargs)
        encoder = args[1] if len(args) > 1 else kwargs.get("context")
        return attend(context.module, args[0], encoder, implementation, block_size)

    return interceptor


def intercept_attention(interceptor):
    """A context in which the UNet/ControlNet layers run `interceptor` (nothing changes for None)."""
    return contextlib.nullcontext() if interceptor is None else nn.intercept_methods(interceptor)
