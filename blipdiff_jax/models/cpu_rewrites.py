"""The CPU rewrites of the models' layers, swapped in by interception: what `cpu_rewrites=` turns on or off.

- bf16 products (bf16_matmul.py): a bf16 `nn.Dense` or stride-1 convolution as bf16 products summed in fp32,
  which XLA's CPU backend runs on its bf16 kernel instead of converting to fp32;
- convolutions as matrix products (conv.py): 1x1 and small 3x3 ones in the UNet;
- the UNet's feed-forwards in chunks of rows (feed_forward.py), so each chunk's hidden state stays in cache.

The fourth, the VAE decoder in row strips (vae_decode.py), is a function rather than an interceptor. Each
computes what the layer computes, up to float summation order. Which programs take them is decided in one
place, `blipdiff_jax.runtime`.
"""

from __future__ import annotations

import flax.linen as nn

from . import bf16_matmul
from .conv import matmul_conv, takes_matmul
from .feed_forward import chunk_rows, chunked_feed_forward


def _inputs(args, kwargs):
    return args[0] if args else kwargs.get("inputs")


def bf16_interceptor(next_fun, args, kwargs, context):
    """For `nn.intercept_methods`: bf16 `nn.Dense` layers and stride-1 convolutions on CPU as bf16 products
    (`bf16_matmul.dense`, conv.py's `matmul_conv`); every other call as it is."""
    module = context.module
    if context.method_name == "__call__" and bf16_matmul.runs_bf16_matmuls(getattr(module, "dtype", None)):
        inputs = _inputs(args, kwargs)
        if bf16_matmul.takes_dense(module):
            return bf16_matmul.dense(module, inputs)
        if isinstance(module, nn.Conv) and takes_matmul(module, inputs):
            return matmul_conv(module, inputs)
    return next_fun(*args, **kwargs)


def bf16_products():
    """A context in which the layers applied inside compute as `bf16_interceptor` says: around the text encoder,
    the Q-Former and the inversion's VAE encoder (the UNet takes `unet_interceptor`). The pipelines leave
    the VAE decoder out: in bf16 products it decodes faster but compiling it takes more memory than the
    whole generation's peak allows."""
    return nn.intercept_methods(bf16_interceptor)


def unet_interceptor(next_fun, args, kwargs, context):
    """For `nn.intercept_methods` around the UNet/ControlNet on CPU: bf16 `nn.Dense` as bf16 products, the
    feed-forwards in chunks of rows, 1x1 and small (in bf16: every stride-1) 3x3 convolutions as matrix
    products; every other call (attention among them) as it is."""
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    module = context.module
    if bf16_matmul.takes_dense(module):  # bf16 on CPU: the product on bf16 operands
        return bf16_matmul.dense(module, _inputs(args, kwargs))
    deterministic = args[1] if len(args) > 1 else kwargs.get("deterministic", True)
    rows = chunk_rows(module, args[0] if args else None, deterministic)
    if rows:
        return chunked_feed_forward(module, args[0], rows)
    if isinstance(module, nn.Conv):
        inputs = _inputs(args, kwargs)
        if takes_matmul(module, inputs):  # False for inputs None (not an array)
            return matmul_conv(module, inputs)
    return next_fun(*args, **kwargs)
