"""The VAE decoder with its full-resolution layers run in row strips: the same image, 40% of the temporaries.

At 512x512 the decoder's last blocks hold (1, 512, 512, 256) and (1, 512, 512, 128) activations, and XLA's CPU
convolution needs its inputs whole and, for bf16 weights, converted to fp32: the decoder needed 0.875 GiB of
temporaries in fp32 and 0.625 GiB with bf16 weights, against 0.31 GiB for the text encoder and the whole
denoising loop. It set the peak memory of a generation.

Measured at 512x512 (XLA's buffer assignment; 2-core CPU): the decoder's temporaries 0.875 -> 0.347 GiB in
fp32 and 0.625 -> 0.25 GiB in bf16, so a whole generation's 0.75 -> 0.347 and 0.625 -> 0.318 GiB; the fp32
decode took 31.6 s against 32.2 s.

Here the layers of the last `tiled_blocks` up blocks (and the upsampler feeding them) run as loops over strips
of `strip_rows` output rows, each strip reading its input rows plus one halo row on each side. GroupNorm still
normalises over the whole image, so nothing is approximated (unlike PyTorch diffusers' `enable_tiling`, which
blends tiles decoded on their own): the statistics of each layer come from the whole tensor before its strips
run. Between layers the activations are kept whole in the model's dtype; the output of an upsampler that feeds
a resnet with a shortcut convolution is never stored at all: one pass over strips computes it for its
statistics and the shortcut, a second computes it again for the first convolution.

In fp32 the strips' 3x3 convolutions run by Winograd's F(2x2, 3x3) (models/conv.py), in strips of 8 rows
(`FP32_STRIP_ROWS`). XLA's CPU convolution ran these layers (1.7 of the decoder's 2.4 TFLOP at 512x512) at
~80 GFLOP/s; Winograd brings the fp32 decode level with PyTorch's for slightly more temporaries (numbers in
docs/performance.md).

Everything before those blocks (post-quant conv, conv_in, the mid block with its attention) runs through
diffusers' own `FlaxAutoencoderKL` modules, with the same params.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .conv import takes_winograd, winograd_valid_3x3

# jitted so that each shape is traced and lowered once per process, however many layers and passes share it
# (Winograd's ~80 ops per call otherwise add ~1 s to tracing a 512x512 decode)
_winograd = jax.jit(winograd_valid_3x3)
STRIP_ROWS = 32  # rows per strip, at most (the largest divisor of the height up to this)
# In fp32 the strip convolutions run by Winograd's algorithm, whose transformed tiles take ~4x a strip's rows:
# strips of 8 rows keep a 512x512 decode's temporaries at 0.362 GiB (0.454 GiB with 32).
FP32_STRIP_ROWS = 8
TILED_BLOCKS = 2  # the last up blocks (and the upsampler before them) run in strips
EPSILON = 1e-6  # diffusers' FlaxResnetBlock2D / FlaxDecoder GroupNorm epsilon
_PAD = 2  # how far outside the image a window may start (halo of a conv of an upsampled input)


class _Rows(NamedTuple):
    """A (B, H, W, C) activation known by its rows: `fetch(start, n)` gives rows [start, start + n); rows
    outside 0..H-1 may hold anything (they are masked after normalisation). `whole`: the stored tensor, if any."""

    shape: tuple
    dtype: object
    fetch: Callable
    whole: jax.Array | None = None
    source: jax.Array | None = None  # the stored tensor the rows are computed from


def _window(x, start, n):
    """Rows [start, start + n) of x on axis 1, zeros outside the image; `start` may lie _PAD rows outside."""
    height = x.shape[1]
    if n > height:
        base, rows = 0, x
    else:
        base = jnp.clip(start, 0, height - n)
        rows = lax.dynamic_slice_in_dim(x, base, n, axis=1)
    zeros = jnp.zeros(rows.shape[:1] + (_PAD,) + rows.shape[2:], rows.dtype)
    return lax.dynamic_slice_in_dim(jnp.concatenate([zeros, rows, zeros], axis=1), start - base + _PAD, n, axis=1)


def _zero_outside(rows, start, height):
    index = start + jnp.arange(rows.shape[1])
    inside = (index >= 0) & (index < height)
    return jnp.where(inside[None, :, None, None], rows, jnp.zeros((), rows.dtype))


def _strip_rows(height: int, most: int) -> int:
    return max(d for d in range(1, min(height, most) + 1) if height % d == 0)


# ---------------------------------------------------------------------------------------------- layers


def _conv(params, x, padding, dtype):
    """flax's nn.Conv with the VAE's own params (same dtype promotion and convolution call)."""
    size = params["kernel"].shape[:2]
    module = nn.Conv(params["kernel"].shape[-1], kernel_size=size, padding=padding, dtype=dtype)
    return module.apply({"params": params}, x)


def _conv3x3_rows(params, source: Callable, start, n, dtype):
    """Rows [start, start + n) of a 3x3 'SAME' conv whose (zero-padded) input rows `source(start, n)` gives.
    In fp32, by Winograd's algorithm (models/conv.py): XLA's CPU convolution ran these layers at ~80 GFLOP/s."""
    rows = source(start - 1, n + 2)
    padded = jnp.pad(rows, ((0, 0), (0, 0), (1, 1), (0, 0)))
    if takes_winograd(padded, params["kernel"], dtype):
        return _winograd(padded, params["kernel"]) + params["bias"]
    return _conv(params, rows, ((0, 0), (1, 1)), dtype)


def _group_sums(x, groups):
    """Per (batch, group) sums of x and x^2 in fp32 (flax computes GroupNorm statistics in fp32)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, groups, c // groups).astype(jnp.float32)
    return jnp.sum(x, axis=(1, 2, 4)), jnp.sum(x * x, axis=(1, 2, 4))


def _stats(sums, count):
    total, squares = sums
    mean = total / count
    return mean, jnp.maximum(0.0, squares / count - mean * mean)  # flax's fast variance, clipped alike


def _stats_of(x, groups):
    """GroupNorm statistics of a stored tensor."""
    _, height, width, channels = x.shape
    return _stats(_group_sums(x, groups), height * width * (channels // groups))


def _norm_swish(params, x, stats, groups):
    """flax GroupNorm (given the statistics of the whole tensor) then swish, in flax's dtypes."""
    mean, var = (jnp.repeat(s, x.shape[-1] // groups, axis=-1)[:, None, None, :] for s in stats)
    y = (x - mean) * (lax.rsqrt(var + EPSILON) * params["scale"]) + params["bias"]
    return nn.swish(y.astype(jnp.result_type(x, params["scale"], params["bias"])))


def _activated(rows: _Rows, norm, stats, groups) -> Callable:
    """The zero-padded input of a conv that follows GroupNorm + swish of `rows`."""

    def fetch(start, n):
        return _zero_outside(_norm_swish(norm, rows.fetch(start, n), stats, groups), start, rows.shape[1])

    return fetch


# ---------------------------------------------------------------------------------------------- strip loops


def _fill(out, strip, compute):
    """out[:, r:r+strip] = compute(r, out) for every strip (in place: compute may read the rows it replaces)."""

    def body(i, out):
        start = i * strip
        return lax.dynamic_update_slice_in_dim(out, compute(start, out).astype(out.dtype), start, axis=1)

    return lax.fori_loop(0, out.shape[1] // strip, body, out)


def _norm_swish_conv(rows: _Rows, norm, stats, conv, out, groups, strip, dtype):
    """`out` (a `_blank`) filled, strip by strip, with conv3x3(swish(groupnorm(rows))) from whole-tensor `stats`."""
    activated = _activated(rows, norm, stats, groups)
    return _fill(out, strip, lambda start, _: _conv3x3_rows(conv, activated, start, strip, dtype))


def _blank(shape, dtype, after):
    """An array for `_fill` to overwrite. It is made from `after` (the previous stage's result) because XLA's
    default CPU scheduler runs anything without inputs first: a plain `zeros` would be allocated at the start
    of the program and stay allocated until its loop ends (0.84 GiB of temporaries at 512x512 in fp32 instead
    of 0.35). The product is never used for its value: `_fill` overwrites every row."""
    return jnp.zeros(shape, dtype) * after.reshape(-1)[0].astype(dtype)


def _materialise(rows: _Rows, most) -> _Rows:
    if rows.whole is not None:
        return rows
    strip = _strip_rows(rows.shape[1], most)
    return _tensor(_fill(_blank(rows.shape, rows.dtype, rows.source), strip, lambda start, _: rows.fetch(start, strip)))


def _tensor(x) -> _Rows:
    return _Rows(tuple(x.shape), x.dtype, lambda start, n: _window(x, start, n), x, x)


def _resnet(params, rows: _Rows, groups, dtype, most) -> _Rows:
    """diffusers' FlaxResnetBlock2D (dropout off): norm1, swish, conv1, norm2, swish, conv2, + (shortcut) input."""
    shortcut = params.get("conv_shortcut")
    if rows.whole is None and shortcut is None:  # an identity residual needs the input whole
        rows = _materialise(rows, most)
    batch, height, width, channels = rows.shape
    strip = _strip_rows(height, most)
    features = params["conv1"]["kernel"].shape[-1]
    out_shape = (batch, height, width, features)
    zeros = jnp.zeros((batch, groups), jnp.float32)

    if rows.whole is not None:
        stats1 = _stats_of(rows.whole, groups)
        if shortcut is None:
            residual = rows.whole
        else:
            residual = _fill(_blank(out_shape, rows.dtype, rows.whole), strip, lambda start, _: _conv(shortcut, rows.fetch(start, strip), "VALID", dtype))
    else:  # one pass for the statistics of the input and its shortcut, then the shortcut is all that is kept
        def sums_and_shortcut(i, carry):
            (total, squares), out = carry
            start = i * strip
            x = rows.fetch(start, strip)
            part = _group_sums(x, groups)
            s = _conv(shortcut, x, "VALID", dtype).astype(out.dtype)
            return (total + part[0], squares + part[1]), lax.dynamic_update_slice_in_dim(out, s, start, axis=1)

        sums, residual = lax.fori_loop(0, height // strip, sums_and_shortcut, ((zeros, zeros), _blank(out_shape, rows.dtype, rows.source)))
        stats1 = _stats(sums, height * width * (channels // groups))

    hidden = _norm_swish_conv(rows, params["norm1"], stats1, params["conv1"], _blank(out_shape, rows.dtype, residual), groups, strip, dtype)
    stats2 = _stats_of(hidden, groups)
    second = _activated(_tensor(hidden), params["norm2"], stats2, groups)

    def plus_residual(start, out):  # out holds the residual; each strip replaces its own rows
        conv = _conv3x3_rows(params["conv2"], second, start, strip, dtype)
        return conv + lax.dynamic_slice_in_dim(out, start, strip, axis=1)

    return _tensor(_fill(residual, strip, plus_residual))


def _upsampled(params, x, dtype) -> _Rows:
    """diffusers' FlaxUpsample2D (nearest x2, then a 3x3 conv) of a stored x, as rows computed on demand."""

    def nearest(start, n):  # rows [start, start + n) of x upsampled x2, zeros outside
        first = jnp.floor_divide(start, 2)
        rows = _window(x, first, n // 2 + 1)
        rows = jnp.repeat(jnp.repeat(rows, 2, axis=1), 2, axis=2)
        return lax.dynamic_slice_in_dim(rows, start - 2 * first, n, axis=1)

    batch, height, width, _ = x.shape
    shape = (batch, 2 * height, 2 * width, params["kernel"].shape[-1])
    fetch = lambda start, n: _conv3x3_rows(params, nearest, start, n, dtype)  # noqa: E731
    return _Rows(shape, jnp.dtype(dtype), fetch, None, x)  # nn.Conv computes and returns its `dtype`


# ---------------------------------------------------------------------------------------------- the decoder


def _decode_low_resolution(module, latents, first_tiled):
    """diffusers' modules up to the tiled blocks: post_quant_conv, conv_in, the mid block, the up blocks
    before `first_tiled`, except the upsampler of the last of them (it runs in strips). Latents NHWC."""
    decoder = module.decoder
    x = decoder.conv_in(module.post_quant_conv(latents))
    x = decoder.mid_block(x, deterministic=True)
    for index, block in enumerate(decoder.up_blocks[:first_tiled]):
        if index < first_tiled - 1:
            x = block(x, deterministic=True)
        else:
            for resnet in block.resnets:
                x = resnet(x, deterministic=True)
    return x


def decode_in_strips(vae, vae_params, latents, *, strip_rows: int | None = None, tiled_blocks: int = TILED_BLOCKS):
    """What `vae.apply({"params": vae_params}, latents, method=vae.decode).sample` computes, as NHWC.

    latents (B, C, h, w) or (B, h, w, C), already divided by the scaling factor. The last `tiled_blocks` up
    blocks, the upsampler of the block before them, and the output layers run in strips of at most
    `strip_rows` rows (see the module docstring; default `FP32_STRIP_ROWS` in fp32, else `STRIP_ROWS`)."""
    if latents.shape[-1] != vae.config.latent_channels:
        latents = jnp.transpose(latents, (0, 2, 3, 1))
    blocks = len(vae.config.block_out_channels)
    first_tiled = blocks - max(1, min(int(tiled_blocks), blocks))
    groups = vae.config.norm_num_groups
    dtype = vae.dtype
    strip_rows = strip_rows or (FP32_STRIP_ROWS if jnp.dtype(dtype) == jnp.float32 else STRIP_ROWS)
    decoder = vae_params["decoder"]
    x = vae.apply({"params": vae_params}, latents, first_tiled, method=_decode_low_resolution)
    rows = _tensor(x)
    if first_tiled > 0 and "upsamplers_0" in decoder[f"up_blocks_{first_tiled - 1}"]:
        rows = _upsampled(decoder[f"up_blocks_{first_tiled - 1}"]["upsamplers_0"]["conv"], x, dtype)
    for index in range(first_tiled, blocks):
        block = decoder[f"up_blocks_{index}"]
        layer = 0
        while f"resnets_{layer}" in block:
            rows = _resnet(block[f"resnets_{layer}"], rows, groups, dtype, strip_rows)
            layer += 1
        if "upsamplers_0" in block:
            rows = _upsampled(block["upsamplers_0"]["conv"], _materialise(rows, strip_rows).whole, dtype)
    # conv_norm_out, swish, conv_out
    rows = _materialise(rows, strip_rows)
    batch, height, width, _ = rows.shape
    strip = _strip_rows(height, strip_rows)
    stats = _stats_of(rows.whole, groups)
    conv_out = decoder["conv_out"]
    image = _blank((batch, height, width, conv_out["kernel"].shape[-1]), rows.dtype, stats[0])
    return _norm_swish_conv(rows, decoder["conv_norm_out"], stats, conv_out, image, groups, strip, dtype)
