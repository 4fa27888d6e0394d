"""Convolutions as matrix products for XLA's CPU backend: the UNet's small ones (swapped in by interception),
and Winograd's F(2x2, 3x3) for the VAE decoder's strips (models/vae_decode.py).

XLA's CPU convolution slows down as the image shrinks and the channels grow, its matrix product does not. A 1x1
conv is the same product with no copy, at least as fast at every size. For a 3x3 conv the product is over im2col
patches, (pixels x 9*channels) @ (9*channels x out). Against XLA's Eigen convolution (as our CPU programs
compile them, see compilation.py) the matmul wins at 8x8 and loses at 16x16 (numbers in docs/performance.md).
So, on CPU: 1x1 convs always, and stride-1 3x3 convs at up to `MAX_PIXELS` pixels,
become matmuls; the result equals the convolution up to float summation order.

In bf16 on CPU every stride-1 3x3 conv becomes bf16 products, at any size: XLA's convolution has no bf16
kernel (it converts to fp32), its bf16 matmul does (models/bf16_matmul.py). 64x64x320 -> 320 at batch 2: 45 ms
as an fp32 convolution, 13 ms as one bf16 product over im2col patches (the copy not counted). We use three
products over a copy three times the input instead (`_bf16_rows_conv`): in the 512x512 UNet step the same
speed, half the temporaries (0.16 against 0.32 GiB).

Winograd (below) in the UNet itself was measured too: 22-35% faster per 64x64 convolution alone, but in the
whole step it raised XLA's temporaries from 0.29 to 0.39-1.1 GiB (the transformed kernels and tiles), for a
gain within this machine's noise; it is used only where the decoder's strips bound its memory.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from . import bf16_matmul

MAX_PIXELS = 8 * 8  # 3x3 convs at this many pixels or fewer go through the matmul

_UNIT = (None, 1, (1, 1))


def _padding_is(padding, pad: int) -> bool:
    if pad == 0 and padding in ("VALID", "SAME"):  # "SAME" of a 1x1 kernel pads nothing
        return True
    if pad == 1 and padding == "SAME":
        return True
    return padding in (pad, ((pad, pad), (pad, pad)), [(pad, pad), (pad, pad)])


def takes_matmul(module: nn.Module, inputs) -> bool:
    """Whether `module(inputs)` is a plain 1x1 or small stride-1 3x3 NHWC convolution to run as a matmul (in
    bf16 on CPU: a 3x3 of any size, padded by 0 or 1 on each side)."""
    if type(module) is not nn.Conv or getattr(inputs, "ndim", 0) != 4:
        return False
    if module.strides not in _UNIT or module.input_dilation not in _UNIT or module.kernel_dilation not in _UNIT:
        return False
    if module.feature_group_count != 1 or module.mask is not None or not module.has_variable("params", "kernel"):
        return False
    kernel_size = tuple(module.kernel_size)
    if kernel_size == (1, 1):
        return _padding_is(module.padding, 0)
    if kernel_size == (3, 3):
        if bf16_matmul.runs_bf16_matmuls(module.dtype):
            return _pads_3x3(module.padding) is not None
        return _padding_is(module.padding, 1) and inputs.shape[1] * inputs.shape[2] <= MAX_PIXELS
    return False


def _pads_3x3(padding):
    """((top, bottom), (left, right)) of a 3x3 conv's `padding` when each is 0 or 1, else None."""
    if padding == "SAME":
        return ((1, 1), (1, 1))
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    try:
        pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    except (TypeError, ValueError):
        return None
    return pads if len(pads) == 2 and all(len(pair) == 2 and set(pair) <= {0, 1} for pair in pads) else None


def matmul_conv(module: nn.Conv, inputs):
    """What `module(inputs)` computes (see `takes_matmul`), as matrix products: in fp32 one over im2col
    patches; in bf16 on CPU three bf16 ones (`_bf16_rows_conv`)."""
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    size, _, channels, features = kernel.shape
    batch, height, width, _ = inputs.shape
    if bf16_matmul.runs_bf16_matmuls(module.dtype):
        pads = _pads_3x3(module.padding) if size == 3 else ((0, 0), (0, 0))
        out = _bf16_rows_conv(inputs, kernel, pads)
        out = out if bias is None else out + bias.astype(jnp.float32)  # in fp32, one rounding to bf16
        return out.astype(module.dtype)
    if size == 3:
        padded = jnp.pad(inputs, ((0, 0), (1, 1), (1, 1), (0, 0)))
        # (i, j, c) channel order, the order of the HWIO kernel flattened below
        inputs = jnp.concatenate([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], axis=-1)
    out = jnp.matmul(inputs.reshape(-1, size * size * channels), kernel.reshape(-1, features),
                     precision=module.precision)
    out = out.reshape(batch, height, width, features)
    return out if bias is None else out + bias


def _bf16_rows_conv(inputs, kernel, pads):
    """A stride-1 NHWC convolution with an HWIO `kernel` (1x1 or 3x3, `pads` ((top, bottom), (left, right))) as
    bf16 products summed in fp32; returns fp32. A 3x3 kernel's three column taps are side by side in channels
    (a copy three times the input, not im2col's nine), and each kernel row is one product over the rows of
    that copy it reaches: in the flattened (rows * width, 3 * channels) copy, a contiguous slice."""
    dot = bf16_matmul.matmul
    size, _, channels, features = kernel.shape
    if size == 1:
        return dot(inputs, kernel[0, 0])
    (top, bottom), (left, right) = pads
    padded = jnp.pad(inputs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    batch, rows, width = padded.shape[0], padded.shape[1], padded.shape[2] - 2
    height = rows - 2
    columns = bf16_matmul.concatenate([padded[:, :, j:j + width] for j in range(3)], axis=-1)
    columns = columns.reshape(batch, rows * width, 3 * channels)
    out = sum(dot(columns[:, i * width:(i + height) * width], kernel[i].reshape(3 * channels, features)) for i in range(3))
    return out.reshape(batch, height, width, features)


# ---------------------------------------------------------------------------------------------- Winograd
# F(2x2, 3x3): a 2x2 output tile is A^T [(G g G^T) * (B^T d B)] A for its 4x4 input tile d and the 3x3 kernel
# g, so the convolution becomes 16 (tiles x in) @ (in x out) matrix products: 2.25x fewer multiplications
# than the direct form. The transforms only add, subtract and halve, so in fp32 the result matches the
# convolution to ~2e-6 relative (checked in tests/runtime/test_conv.py).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
WINOGRAD_MIN_CHANNELS = 16  # thin convolutions (an image's 3 colours) gain nothing from the transforms


def _combine(coefficients, parts):
    """sum(c * p) over the nonzero coefficients, without multiplying by 1 or -1."""
    total = None
    for c, part in zip(coefficients, parts):
        if c == 0:
            continue
        term = part if c == 1 else -part if c == -1 else c * part
        total = term if total is None else total + term
    return total


def takes_winograd(inputs, kernel, dtype=None) -> bool:
    """Whether `winograd_valid_3x3(inputs, kernel)` applies: fp32 throughout (`dtype`: the layer's compute
    dtype), a 3x3 kernel with at least `WINOGRAD_MIN_CHANNELS` channels in and out, and an output of even
    height and width (the inputs' less 2)."""
    if getattr(inputs, "ndim", 0) != 4 or tuple(kernel.shape[:2]) != (3, 3):
        return False
    dtypes = {jnp.dtype(inputs.dtype), jnp.dtype(kernel.dtype), jnp.dtype(dtype or inputs.dtype)}
    _, height, width, _ = inputs.shape
    return (dtypes == {jnp.dtype(jnp.float32)} and min(kernel.shape[2:]) >= WINOGRAD_MIN_CHANNELS
            and height >= 4 and width >= 4 and height % 2 == 0 and width % 2 == 0)


def winograd_valid_3x3(inputs, kernel):
    """The 'VALID' 3x3 convolution of NHWC `inputs` (B, H + 2, W + 2, C) with an HWIO `kernel`: (B, H, W, F),
    by Winograd's F(2x2, 3x3). H and W must be even (see `takes_winograd`)."""
    batch, padded_height, padded_width, channels = inputs.shape
    height, width, features = padded_height - 2, padded_width - 2, kernel.shape[-1]
    taps = [[kernel[i, j] for j in range(3)] for i in range(3)]
    kernel_rows = [[_combine(_G[k], [taps[i][j] for i in range(3)]) for j in range(3)] for k in range(4)]
    kernel_tiles = jnp.stack([_combine(_G[l], kernel_rows[k]) for k in range(4) for l in range(4)])  # (16, C, F)
    d = [[inputs[:, i:i + height:2, j:j + width:2] for j in range(4)] for i in range(4)]  # each (B, H/2, W/2, C)
    rows = [[_combine(_BT[k], [d[i][j] for i in range(4)]) for j in range(4)] for k in range(4)]
    tiles = jnp.stack([_combine(_BT[l], rows[k]) for k in range(4) for l in range(4)])  # (16, B, H/2, W/2, C)
    products = jnp.matmul(tiles.reshape(16, -1, channels), kernel_tiles)  # (16, tiles, F)
    products = products.reshape(4, 4, batch, height // 2, width // 2, features)
    half = [[_combine(_AT[a], [products[k, l] for k in range(4)]) for l in range(4)] for a in range(2)]
    out = jnp.stack([jnp.stack([_combine(_AT[b], half[a]) for b in range(2)]) for a in range(2)])  # (2, 2, B, H/2, W/2, F)
    return out.transpose(2, 3, 0, 4, 1, 5).reshape(batch, height, width, features)
