"""The UNet's small convolutions as matrix products, for XLA's CPU backend (swapped in by interception).

Measured on a 2-core AVX2 CPU (fp32, batch 2), XLA's CPU convolution slows down as the image shrinks and the
channels grow, while its matrix product does not: a 3x3 conv at 8x8x1280 runs at ~30 GFLOP/s as a convolution
and ~80 as one (pixels x 9*channels) @ (9*channels x out) product; at 16x16 ~60 against ~80; at 32x32 and above
the convolution is the faster one. A 1x1 conv is the same product with no copy, at least as fast at every size.
So, on CPU: 1x1 convs always, and stride-1 3x3 convs at up to `MAX_PIXELS` pixels, become matmuls (im2col);
the result equals the convolution up to float summation order.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

MAX_PIXELS = 16 * 16  # 3x3 convs at this many pixels or fewer go through the matmul

_UNIT = (None, 1, (1, 1))


def _padding_is(padding, pad: int) -> bool:
    if pad == 0 and padding in ("VALID", "SAME"):  # "SAME" of a 1x1 kernel pads nothing
        return True
    if pad == 1 and padding == "SAME":
        return True
    return padding in (pad, ((pad, pad), (pad, pad)), [(pad, pad), (pad, pad)])


def takes_matmul(module: nn.Module, inputs) -> bool:
    """Whether `module(inputs)` is a plain 1x1 or small stride-1 3x3 NHWC convolution to run as a matmul."""
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
        return _padding_is(module.padding, 1) and inputs.shape[1] * inputs.shape[2] <= MAX_PIXELS
    return False


def matmul_conv(module: nn.Conv, inputs):
    """What `module(inputs)` computes (see `takes_matmul`), as one matrix product over im2col patches."""
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    size, _, channels, features = kernel.shape
    batch, height, width, _ = inputs.shape
    if size == 3:
        padded = jnp.pad(inputs, ((0, 0), (1, 1), (1, 1), (0, 0)))
        # (i, j, c) channel order, the order of the HWIO kernel flattened below
        inputs = jnp.concatenate([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], axis=-1)
    out = jnp.matmul(inputs.reshape(-1, size * size * channels), kernel.reshape(-1, features),
                     precision=module.precision)
    out = out.reshape(batch, height, width, features)
    return out if bias is None else out + bias
