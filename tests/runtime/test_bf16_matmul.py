"""bf16 products at bf16 speed on CPU (models/bf16_matmul.py): the same numbers as the products of the
bf16-rounded operands summed exactly, rounded to bf16 once, and compiled programs whose dots really take bf16
operands (XLA's CPU backend would otherwise convert them to fp32 and run its fp32 kernel)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.programs import hlo_bodies, jaxpr_equations

from blipdiff_jax import components
from blipdiff_jax.models import attention, bf16_matmul, conv
from blipdiff_jax.runtime import Runtime

pytestmark = pytest.mark.cpu_only  # the bf16 products are XLA-CPU specific

BF16_ROUNDING = 2.0**-8  # one bf16 rounding, relative (8 significant bits)


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def dot_operand_types(hlo_text: str) -> list[tuple[str, str]]:
    """The element types of every dot's two operands in a compiled program (as XLA will run it)."""
    found = []
    for lines in hlo_bodies(hlo_text).values():
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", "\n".join(lines)))
        for line in lines:
            match = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
            if match:
                found.append((types[match.group(1)], types[match.group(2)]))
    return found


def convolution_strides(hlo_text: str) -> list[str]:
    """The window of every convolution left in a compiled program."""
    return re.findall(r" convolution\(.*?window=\{([^}]*)\}", hlo_text)


def _intercepted(module):
    interceptor = Runtime.for_backend("blockwise", cpu_rewrites=True).unet_interceptor

    def apply(params, *inputs):
        with nn.intercept_methods(interceptor):
            return module.apply(params, *inputs)

    return jax.jit(apply)


def _params(module, *inputs, dtype=jnp.bfloat16):
    params = module.init(jax.random.PRNGKey(0), *inputs)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size, params)
    return jax.tree.map(lambda p: p.astype(dtype), params)


def test_dense_sums_bf16_products_in_fp32_and_rounds_once():
    module = nn.Dense(48, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    inputs = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 96)), jnp.bfloat16)
    params = _params(module, inputs)
    assert bf16_matmul.takes_dense(module.bind(params))
    fn = _intercepted(module)
    out = fn(params, inputs)
    assert out.dtype == jnp.bfloat16
    p = params["params"]
    exact = _bf16(inputs) @ _bf16(p["kernel"]) + _bf16(p["bias"])
    np.testing.assert_allclose(_bf16(out), exact, rtol=BF16_ROUNDING, atol=1e-6)
    assert dot_operand_types(fn.lower(params, inputs).compile().as_text()) == [("bf16", "bf16")]


def test_fp32_layers_are_left_alone():
    module = nn.Dense(8)
    assert not bf16_matmul.takes_dense(module.bind(module.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))))
    assert not bf16_matmul.runs_bf16_matmuls(jnp.float32) and not bf16_matmul.runs_bf16_matmuls(jnp.float16)
    conv32 = nn.Conv(8, (3, 3), padding="SAME")
    large = jnp.ones((1, 17, 18, 4))
    assert not conv.takes_matmul(conv32.bind(conv32.init(jax.random.PRNGKey(0), large)), large)
    for padding in (((2, 2), (1, 1)), "CIRCULAR"):  # bf16, but padded otherwise than 0 or 1: XLA's convolution
        conv16 = nn.Conv(8, (3, 3), padding=padding, dtype=jnp.bfloat16)
        assert not conv.takes_matmul(conv16.bind(conv16.init(jax.random.PRNGKey(0), large)), large)


@pytest.mark.parametrize("kernel_size,padding", [((3, 3), "SAME"), ((3, 3), ((1, 1), (1, 1))), ((1, 1), "VALID"),
                                                 ((3, 3), ((0, 0), (1, 1))), ((3, 3), "VALID"), ((3, 3), ((1, 0), (0, 1)))])
def test_bf16_convolution_at_any_size_is_bf16_matmuls(kernel_size, padding):
    module = nn.Conv(20, kernel_size, padding=padding, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    inputs = jnp.asarray(np.random.default_rng(1).standard_normal((2, 17, 18, 12)), jnp.bfloat16)  # > MAX_PIXELS
    params = _params(module, inputs)
    assert conv.takes_matmul(module.bind(params), inputs)
    fn = _intercepted(module)
    out = fn(params, inputs)
    assert out.dtype == jnp.bfloat16
    p = params["params"]
    exact = jax.lax.conv_general_dilated(_bf16(inputs), _bf16(p["kernel"]), (1, 1), padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    assert out.shape == exact.shape
    exact = np.asarray(exact) + _bf16(p["bias"])
    np.testing.assert_allclose(_bf16(out), exact, rtol=BF16_ROUNDING, atol=1e-5)
    text = fn.lower(params, inputs).compile().as_text()
    # one product per kernel row (conv.py's _bf16_rows_conv), no convolution left
    assert dot_operand_types(text) == [("bf16", "bf16")] * kernel_size[0] and convolution_strides(text) == []


def test_bf16_concatenate_moves_bits_and_has_the_concatenate_gradient():
    rng = np.random.default_rng(2)
    parts = [jnp.asarray(rng.standard_normal((2, 3, n)), jnp.bfloat16) for n in (4, 1, 5)]
    ours = bf16_matmul.concatenate(parts, axis=-1)
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)),
                                  np.asarray(jnp.concatenate(parts, axis=-1).astype(jnp.float32)))
    weights = jnp.asarray(rng.standard_normal((2, 3, 10)), jnp.bfloat16)
    loss = lambda concat: lambda *xs: (concat(xs, axis=2).astype(jnp.float32) * weights).sum()  # noqa: E731
    for got, want in zip(jax.grad(loss(bf16_matmul.concatenate), argnums=(0, 1, 2))(*parts),
                         jax.grad(loss(jnp.concatenate), argnums=(0, 1, 2))(*parts)):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    text = jax.jit(lambda *xs: bf16_matmul.concatenate(xs, axis=2)).lower(*parts).compile().as_text()
    assert "f32[" not in text  # no round trip through fp32


def test_bf16_attention_matches_the_exact_softmax_of_the_rounded_inputs():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 64, 16)) * s, jnp.bfloat16) for s in (0.5, 0.5, 1.0))
    fn = jax.jit(lambda q, k, v: attention.blockwise_attention(q, k, v, 0.25, block_size=16))
    out = fn(q, k, v)
    assert out.dtype == jnp.bfloat16
    scores = np.einsum("bid,bjd->bij", _bf16(q), _bf16(k)) * 0.25
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    exact = np.einsum("bij,bjd->bid", probs / probs.sum(-1, keepdims=True), _bf16(v))
    # probabilities and output rounded to bf16: a few roundings of the largest |v|
    np.testing.assert_allclose(_bf16(out), exact, rtol=0, atol=4 * BF16_ROUNDING * np.abs(exact).max())
    assert set(dot_operand_types(fn.lower(q, k, v).compile().as_text())) == {("bf16", "bf16")}


def test_bf16_unet_step_runs_every_product_on_bf16(converted_model):
    """The reused diffusers UNet in bf16 under our interceptor: every dot on bf16 operands, and the only
    convolutions left to XLA are the strided ones (the downsamplers)."""
    unet = components.build_model("unet", converted_model.configs["unet"], jnp.bfloat16)
    params = components.cast_params(converted_model.params["unet"], jnp.bfloat16)
    interceptor = Runtime.for_backend("blockwise", cpu_rewrites=True).unet_interceptor

    def step(params, latents, timestep, context):
        with attention.intercept_attention(interceptor):
            return unet.apply({"params": params}, latents, timestep, context).sample

    S = jax.ShapeDtypeStruct
    context_dim = converted_model.configs["unet"]["cross_attention_dim"]
    text = jax.jit(step).lower(params, S((2, unet.in_channels, 16, 16), jnp.bfloat16), S((2,), jnp.int32),
                               S((2, 8, context_dim), jnp.bfloat16)).compile().as_text()
    types = dot_operand_types(text)
    assert len(types) > 10 and set(types) == {("bf16", "bf16")}
    windows = convolution_strides(text)
    assert windows and all("stride=2x2" in window for window in windows)


@pytest.mark.slow
def test_bf16_generation_runs_text_encoder_and_unet_products_on_bf16(converted_model):
    """The whole bf16 generation program: every `nn.Dense` of the text encoder and the UNet takes bf16 operands.
    The products XLA still runs in fp32 are the attention-score einsums of transformers' CLIP text encoder (two
    per layer) and the VAE decoder's (see `FlaxBlipDiffusionPipeline._generate`: its bf16 products cost the compile 0.14 GiB): its
    mid-block attention (four `nn.Dense`, two einsums) and two 1x1 convolutions XLA runs as dots. Listed on the
    tiny model: 4 + 8. The UNet's convolutions are checked above."""
    from support.programs import abstract_generate_args

    from blipdiff_jax import FlaxBlipDiffusionPipeline

    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model, dtype=jnp.bfloat16, cpu_rewrites=True)
    args = abstract_generate_args(pipeline, params, latent_size=16)
    text = pipeline._generate_jit.lower(*args, num_inference_steps=1, do_cfg=True).compile().as_text()
    types = dot_operand_types(text)
    layers = pipeline.text_encoder.config.num_hidden_layers
    assert 0 < types.count(("f32", "f32")) <= 2 * layers + 8  # a text encoder left in fp32 would add 6 per layer
    assert types.count(("bf16", "bf16")) > 4 * types.count(("f32", "f32"))


def test_bf16_products_differentiate_in_bf16():
    """The gradients of `einsum` are those of the exact product of the rounded operands (within bf16
    roundings), and the backward products take bf16 operands too."""
    rng = np.random.default_rng(4)
    a, b = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((3, 6, 8), (3, 5, 8)))
    weights = rng.standard_normal((3, 6, 5))
    loss = lambda a, b: (bf16_matmul.einsum("...id,...jd->...ij", a, b) * weights).sum()  # noqa: E731
    grad_a, grad_b = jax.grad(loss, argnums=(0, 1))(a, b)
    assert grad_a.dtype == grad_b.dtype == jnp.float32  # back to the primal dtype
    exact_a = np.einsum("bij,bjd->bid", _bf16(weights), _bf16(b))
    exact_b = np.einsum("bij,bid->bjd", _bf16(weights), _bf16(a))
    for got, exact in ((grad_a, exact_a), (grad_b, exact_b)):
        np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=0, atol=4 * BF16_ROUNDING * np.abs(exact).max())
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(a, b).jaxpr  # forward and both backward
    dots = list(jaxpr_equations(jaxpr, ("dot_general",)))
    assert len(dots) == 3 and all(str(v.aval.dtype) == "bfloat16" for eqn in dots for v in eqn.invars)
