"""The transformer blocks' feed-forward (GEGLU, then a Dense) in chunks of rows on CPU, swapped in by
interception.

diffusers' `FlaxFeedForward` projects every token to 8 x dim (the GEGLU's two halves), then back to dim. At a
512x512 UNet's 64x64 level that hidden state is 8192 x 2560 fp32, 84 MB, written by one product and read back
by the next: XLA's CPU backend runs the layers one at a time, so it goes out to memory and back. Run over
chunks of rows (`lax.map`), each chunk's hidden state stays in the cache: faster at 64x64 and 32x32, while at
16x16 two chunks were slower than none, hence `MIN_CHUNKS` (numbers in docs/performance.md). Every row is computed
as before, by the same modules, so only the products' summation order may change.
"""

from __future__ import annotations

import jax
from diffusers.models.attention_flax import FlaxFeedForward

# GEGLU hidden state per chunk: 1024 rows at dim 320, 512 at dim 640 (fp32). 512 and 256 rows at 64x64 were
# 78 and 81 ms against 77 for 1024; 1024 rows at 32x32 75 ms against 72 for 512.
CHUNK_BYTES = 10 * 2**20
MIN_CHUNKS = 4


def halved_to_fit(length: int, width: int, budget: int) -> int:
    """`length` halved while even, until `length x width` elements fit `budget` (also the attention's query
    blocks, models/attention.py)."""
    size = length
    while size * width > budget and size % 2 == 0:
        size //= 2
    return size


def rows_per_chunk(rows: int, hidden_width: int, chunk_bytes: int | None = None) -> int | None:
    """Rows per chunk (`rows` halved while even, until the chunk's fp32 hidden state fits `chunk_bytes`), or
    None when that leaves fewer than `MIN_CHUNKS` chunks."""
    size = halved_to_fit(rows, hidden_width, (chunk_bytes or CHUNK_BYTES) // 4)
    return size if rows // size >= MIN_CHUNKS else None


def chunk_rows(module, hidden_states, deterministic: bool, chunk_bytes: int | None = None) -> int | None:
    """Rows per chunk for `module(hidden_states)`, or None to run it whole: not a `FlaxFeedForward`, not (B, L,
    D), dropout that is on, or too few rows."""
    if type(module) is not FlaxFeedForward or getattr(hidden_states, "ndim", 0) != 3:
        return None
    if module.dropout and not deterministic:
        return None
    batch, length, _ = hidden_states.shape
    return rows_per_chunk(batch * length, 8 * module.dim, chunk_bytes)


def chunked_feed_forward(module: FlaxFeedForward, hidden_states, rows: int):
    """`module(hidden_states)` (dropout off) over chunks of `rows` rows of the flattened (B * L, D) input, each
    through the module's own GEGLU and Dense, applied as unbound copies with its params (a bound flax module
    cannot be called inside a JAX loop). Interceptors around the call apply inside too."""
    batch, length, dim = hidden_states.shape
    geglu, dense = module.net_0, module.net_2
    geglu_vars, dense_vars = geglu.variables, dense.variables
    geglu, dense = geglu.clone(parent=None), dense.clone(parent=None)

    def one_chunk(chunk):  # (1, rows, D): FlaxGEGLU splits its hidden state on axis 2
        return dense.apply(dense_vars, geglu.apply(geglu_vars, chunk, deterministic=True))

    # Checkpointed: under a gradient (fine-tuning) each chunk's hidden state is recomputed in the backward pass
    # rather than stacked for it. Stacked, the 512x512 batch-3 training step's temporaries grew from 9.2 to
    # 11.3 GiB (XLA's buffer assignment, benchmarks/finetune_memory.py analyse).
    chunks = hidden_states.reshape(batch * length // rows, 1, rows, dim)
    return jax.lax.map(jax.checkpoint(one_chunk), chunks).reshape(batch, length, -1)
