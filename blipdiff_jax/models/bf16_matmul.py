"""bf16 matrix products at bf16 speed on XLA's CPU backend.

XLA's CPU backend has no bf16 arithmetic but its matrix products. A bf16 x bf16 -> bf16 dot (what Flax's
`nn.Dense` and `nn.Conv` write with bf16 params) is rewritten into converts to fp32 and an fp32 dot, while a
bf16 x bf16 dot that asks for an fp32 result (`preferred_element_type`) runs on YNNPACK's bf16 kernel (AMX /
AVX512-BF16 where the CPU has them), several times faster than the fp32 dot on the UNet's shapes (numbers in
docs/performance.md). The numbers are the same: a product of two bf16 is
exact in fp32 and both forms sum in fp32, so the results differ by summation order only.

So, where a layer computes in bf16 on CPU, its products run here: `nn.Dense` as `dense`, stride-1
convolutions as three products over a column-tap copy (models/conv.py), attention's two products in
attention.py; swapped in by the interceptors of cpu_rewrites.py (the text encoder, the Q-Former, the
inversion's VAE encoder, the UNet). Also: XLA's CPU backend upcasts a bf16 `concatenate` to fp32 (a 9-tap im2col of
a 64x64x960 activation became a 283 MB fp32 array and a convert back); `concatenate` moves the bits as uint16
instead. Products have their own VJP, so the backward products take bf16 operands too.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp


def runs_bf16_matmuls(dtype) -> bool:
    """Whether layers computing in `dtype` take the bf16 products here: bf16 on the CPU backend (elsewhere
    XLA's own bf16 dots already accumulate in fp32 on bf16 hardware)."""
    return dtype is not None and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and jax.default_backend() == "cpu"


def einsum(spec: str, lhs, rhs, out_dtype=jnp.float32):
    """`jnp.einsum(spec, lhs, rhs)` of the operands rounded to bf16, summed in fp32, returned as `out_dtype`.
    `spec` is a product of two operands ("...id,...jd->...ij"): every index of an operand appears in the other
    operand or in the result."""
    return _bf16_einsum(spec, lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)).astype(out_dtype)


# Differentiated by hand so that the backward products take bf16 operands too: JAX's own rule would multiply
# the fp32 cotangent with a bf16 operand, which XLA's CPU backend runs as an fp32 product.
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_einsum(spec, lhs, rhs):
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)


def _bf16_einsum_fwd(spec, lhs, rhs):
    return _bf16_einsum(spec, lhs, rhs), (lhs, rhs)


def _bf16_einsum_bwd(spec, operands, cotangent):
    lhs, rhs = operands
    inputs, out = spec.replace(" ", "").split("->")
    left, right = inputs.split(",")
    cotangent = cotangent.astype(jnp.bfloat16)
    d_lhs = jnp.einsum(f"{out},{right}->{left}", cotangent, rhs, preferred_element_type=jnp.float32)
    d_rhs = jnp.einsum(f"{out},{left}->{right}", cotangent, lhs, preferred_element_type=jnp.float32)
    return d_lhs.astype(jnp.bfloat16), d_rhs.astype(jnp.bfloat16)


_bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def matmul(inputs, kernel, out_dtype=jnp.float32):
    """`inputs @ kernel` for inputs (..., K) and a (K, N) kernel, by `einsum`."""
    return einsum("...k,kn->...n", inputs, kernel, out_dtype)


def dense(module, inputs):
    """What a bf16 `nn.Dense` computes, with the product in `matmul` and the bias added in fp32."""
    out = matmul(inputs, module.get_variable("params", "kernel"))
    if module.use_bias:
        out = out + module.get_variable("params", "bias").astype(jnp.float32)
    return out.astype(module.dtype)


def takes_dense(module) -> bool:
    """Whether `module` is a plain `nn.Dense` computing in bf16 on CPU (subclasses may compute otherwise)."""
    return type(module) is nn.Dense and runs_bf16_matmuls(module.dtype) and module.has_variable("params", "kernel")


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _concatenate_bits(arrays, axis, sizes):
    bits = [jax.lax.bitcast_convert_type(x, jnp.uint16) for x in arrays]
    return jax.lax.bitcast_convert_type(jnp.concatenate(bits, axis=axis), jnp.bfloat16)


def _concatenate_fwd(arrays, axis, sizes):
    return _concatenate_bits(arrays, axis, sizes), None


def _concatenate_bwd(axis, sizes, _, cotangent):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = tuple(jax.lax.slice_in_dim(cotangent, start, start + size, axis=axis) for start, size in zip(starts, sizes))
    return (parts,)


_concatenate_bits.defvjp(_concatenate_fwd, _concatenate_bwd)


def concatenate(arrays, axis: int):
    """`jnp.concatenate` of bf16 arrays without XLA's CPU round trip through fp32 (differentiable)."""
    axis = axis % arrays[0].ndim
    return _concatenate_bits(tuple(arrays), axis, tuple(x.shape[axis] for x in arrays))
