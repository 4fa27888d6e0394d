"""Small convolutions as matmuls (models/conv.py), swapped into the reused UNet on CPU: same numbers as
flax's convolution, taken only where the formulation holds. Through the pipeline they are covered by every
parity test: the tiny test UNet's 3x3 convolutions at 8x8 latents and below take the matmul, the others XLA's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blipdiff_jax.models import conv, cpu_rewrites
from blipdiff_jax.runtime import Runtime

TOLERANCE = 1e-5  # fp32 max abs on outputs of magnitude ~1: the same sums in another order


def _conv_and_inputs(kernel_size, padding, size, use_bias=True, channels=12, **kwargs):
    module = nn.Conv(20, kernel_size, padding=padding, use_bias=use_bias, **kwargs)
    inputs = np.random.default_rng(0).standard_normal((2, size, size + 1, channels), np.float32)
    params = module.init(jax.random.PRNGKey(0), inputs)
    # a bias that is not zero, so adding it is checked too
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size, params)
    return module, params, inputs


@pytest.mark.parametrize("kernel_size,padding", [((3, 3), ((1, 1), (1, 1))), ((3, 3), "SAME"), ((1, 1), "VALID")])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matmul_conv_equals_flax_conv(kernel_size, padding, use_bias):
    module, params, inputs = _conv_and_inputs(kernel_size, padding, size=7, use_bias=use_bias)
    expected = module.apply(params, inputs)
    taken = []

    def swapped(params, inputs):
        def interceptor(next_fun, args, kwargs, context):
            taken.append(conv.takes_matmul(context.module, args[0]))
            return conv.matmul_conv(context.module, args[0])

        with nn.intercept_methods(interceptor):
            return module.apply(params, inputs)

    out = jax.jit(swapped)(params, inputs)
    assert taken == [True]
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("case", [
    dict(kernel_size=(3, 3), padding=((1, 1), (1, 1)), strides=(2, 2)),
    dict(kernel_size=(3, 3), padding=((1, 1), (1, 1)), size=17),  # 17 x 18 pixels > MAX_PIXELS
    dict(kernel_size=(3, 3), padding=((1, 1), (1, 1)), kernel_dilation=(2, 2)),
    dict(kernel_size=(3, 3), padding="VALID"),
    dict(kernel_size=(1, 1), padding="VALID", feature_group_count=4),
    dict(kernel_size=(5, 5), padding="SAME"),
], ids=["stride2", "large", "dilated", "unpadded", "grouped", "5x5"])
def test_other_convolutions_are_left_to_xla(case):
    module, params, inputs = _conv_and_inputs(size=case.pop("size", 7), **case)
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        seen.append(conv.takes_matmul(context.module, args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(params, inputs)
    assert seen == [False]


@pytest.mark.cpu_only
def test_the_cpu_kernels_route_small_convolutions_and_xla_leaves_them(monkeypatch):
    module, params, inputs = _conv_and_inputs((3, 3), ((1, 1), (1, 1)), size=7)
    calls = []
    monkeypatch.setattr(cpu_rewrites, "matmul_conv", lambda m, x: calls.append(m.name) or conv.matmul_conv(m, x))
    expected = module.apply(params, inputs)
    with nn.intercept_methods(Runtime.for_backend("blockwise", cpu_rewrites=True).unet_interceptor):
        out = module.apply(params, inputs)
    assert calls == [None] and jax.default_backend() == "cpu"
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=TOLERANCE)
    assert Runtime.for_backend("xla", cpu_rewrites=False).unet_interceptor is None  # diffusers' UNet as shipped


@pytest.mark.parametrize("shape,features", [((2, 10, 14, 16), 24), ((1, 34, 18, 40), 16), ((1, 6, 6, 16), 32)])
def test_winograd_equals_the_convolution(shape, features):
    """F(2x2, 3x3) against XLA's 'VALID' 3x3 convolution, fp32: only the order of the sums differs."""
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.standard_normal(shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], features), np.float32) / np.sqrt(9 * shape[-1]))
    assert conv.takes_winograd(inputs, kernel)
    expected = jax.lax.conv_general_dilated(inputs, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = jax.jit(conv.winograd_valid_3x3)(inputs, kernel)
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("case", [
    dict(dtype=jnp.bfloat16), dict(compute=jnp.bfloat16), dict(shape=(1, 9, 10, 16)), dict(shape=(1, 10, 9, 16)),
    dict(shape=(1, 10, 10, 8)), dict(features=3), dict(kernel_size=5),
], ids=["bf16", "bf16-compute", "odd-height", "odd-width", "thin-in", "thin-out", "5x5"])
def test_winograd_is_taken_only_where_it_holds(case):
    shape, size = case.get("shape", (1, 10, 10, 16)), case.get("kernel_size", 3)
    inputs = jnp.zeros(shape, case.get("dtype", jnp.float32))
    kernel = jnp.zeros((size, size, shape[-1], case.get("features", 16)), case.get("dtype", jnp.float32))
    assert not conv.takes_winograd(inputs, kernel, case.get("compute"))
