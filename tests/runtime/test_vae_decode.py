"""The VAE decoder in row strips (models/vae_decode.py): the image diffusers' FlaxAutoencoderKL decodes, with
a fraction of the temporaries, and what the pipelines run on CPU. Against PyTorch it is covered by every
pipeline parity test (they decode through it on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from blipdiff_jax import components
from blipdiff_jax.models import vae_decode
from blipdiff_jax.models.conv import winograd_valid_3x3
from blipdiff_jax.models.vae_decode import decode_in_strips
from blipdiff_jax.pipelines import denoise
from blipdiff_jax.runtime import Runtime
from blipdiff_jax.tiny import random_params, vae_config

TOLERANCE = 2e-5  # fp32 max abs on outputs of magnitude ~4: the same sums in another order
BF16_TOLERANCE = 0.1  # bf16 weights and activations: one rounding of 2^-8 relative, several layers deep

THREE_BLOCKS = dict(vae_config(), block_out_channels=[32, 64, 64], layers_per_block=2,
                    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)


def _vae(config, dtype=jnp.float32):
    """The decoder with random params drawn in numpy (as tiny.random_params: op by op, JAX's init and a
    perturbation compile every op for every shape, seconds per config on 2 cores)."""
    vae = components.build_model("vae", config, dtype)
    shapes = jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
    params = random_params({path: leaf.shape for path, leaf in flatten_dict(shapes).items()}, seed=0)
    # init-like values leave GroupNorm at scale 1, bias 0 and biases at 0: perturb everything so each param counts
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf + 0.05 * rng.standard_normal(leaf.shape), dtype), params)
    return vae, params


def _reference(vae, params, latents):
    """diffusers' FlaxAutoencoderKL decode, as one compiled program (op by op it is seconds of small compiles)."""
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
    return np.asarray(decode(params, latents).transpose(0, 2, 3, 1), np.float32)


@pytest.mark.parametrize("config,latent,strip_rows,tiled_blocks", [
    pytest.param(vae_config(), (2, 4, 12, 10), 32, 2, id="one-strip", marks=pytest.mark.slow),  # one strip per layer, all tiled
    pytest.param(vae_config(), (2, 4, 12, 10), 5, 1, id="last-block"),  # 24 rows in strips of 4; only the last block
    pytest.param(THREE_BLOCKS, (1, 4, 10, 6), 8, 2, id="upsampler", marks=pytest.mark.slow),  # 40 rows in strips of 8
    pytest.param(THREE_BLOCKS, (1, 4, 10, 6), 3, 3, id="all-blocks"),  # every block: strips of 2 rows at 10, 20 and 40 rows
    pytest.param(THREE_BLOCKS, (1, 4, 10, 6), 5, 3, id="odd-strips"),  # strips of 5 rows: odd, so XLA's convolution, not Winograd
])
def test_strips_decode_the_same_image(config, latent, strip_rows, tiled_blocks):
    vae, params = _vae(config)
    latents = jax.random.normal(jax.random.PRNGKey(2), latent)
    expected = _reference(vae, params, latents)
    out = jax.jit(lambda p, z: decode_in_strips(vae, p, z, strip_rows=strip_rows, tiled_blocks=tiled_blocks))(params, latents)
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_strips_in_bf16():
    vae, params = _vae(THREE_BLOCKS, jnp.bfloat16)
    latents = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 10, 6)).astype(jnp.bfloat16)
    out = jax.jit(lambda p, z: decode_in_strips(vae, p, z, strip_rows=8))(params, latents)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _reference(vae, params, latents), rtol=0, atol=BF16_TOLERANCE)


@pytest.mark.cpu_only  # strips are a CPU measure: on a GPU, XLA's buffer assignment gives the same temporaries either way
def test_strips_need_less_memory():
    """XLA's own count of temporaries, for a decoder whose last blocks dominate (as SD's does at 512x512)."""
    config = dict(vae_config(), block_out_channels=[64, 128])
    vae = components.build_model("vae", config, jnp.float32)
    params = jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
    latents = jax.ShapeDtypeStruct((1, 4, 64, 64), jnp.float32)

    def temporaries(fn):
        return jax.jit(fn).lower(params, latents).compile().memory_analysis().temp_size_in_bytes

    full = temporaries(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
    shipped = temporaries(lambda p, z: decode_in_strips(vae, p, z))  # fp32: Winograd in strips of 8 rows
    # Winograd's transformed tiles cost ~4x a strip's rows, a larger share in this small decoder than in SD's
    # (real size: 0.362 GiB of 0.875, 41%)
    assert shipped < 0.65 * full, (shipped, full)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vae_decode, "takes_winograd", lambda *args: False)
        direct = temporaries(lambda p, z: decode_in_strips(vae, p, z, strip_rows=vae_decode.STRIP_ROWS))
    assert direct < 0.6 * full, (direct, full)


def test_pipelines_decode_in_strips_on_cpu_only(monkeypatch):
    vae, params = _vae(vae_config())
    latents = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 8, 8))
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return decode_in_strips(*args, **kwargs)

    monkeypatch.setattr(denoise, "decode_in_strips", counting)
    images = denoise.decode_latents(vae, params, latents, in_strips=Runtime.for_backend(cpu_rewrites=True).decode_in_strips)
    expected_calls = [1] if jax.default_backend() == "cpu" else []
    assert calls == expected_calls
    expected = np.clip(_reference(vae, params, latents / vae.config.scaling_factor) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(np.asarray(images), expected, rtol=0, atol=TOLERANCE)
    full = denoise.decode_latents(vae, params, latents, in_strips=False)
    assert calls == expected_calls
    np.testing.assert_allclose(np.asarray(full), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("dtype,expected", [(jnp.float32, True), (jnp.bfloat16, False)])
def test_strip_convolutions_use_winograd_in_fp32_only(monkeypatch, dtype, expected):
    vae, params = _vae(vae_config(), dtype)
    used = []
    monkeypatch.setattr(vae_decode, "_winograd", lambda *args: used.append(1) or winograd_valid_3x3(*args))
    jax.eval_shape(lambda p, z: decode_in_strips(vae, p, z), params, jax.ShapeDtypeStruct((1, 4, 8, 8), dtype))
    assert bool(used) == expected
