"""Build each model of a BLIP-Diffusion checkpoint from its config, and list its parameter shapes.

One place that knows which Flax class serves which folder of a diffusers-layout directory; conversion
(shapes to fill) and loading (modules to run) both go through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict
from transformers import Blip2Config, CLIPTextConfig

from .runtime.quiet import quiet_flax_notices, quietly

with quiet_flax_notices():  # diffusers' Flax embeddings log the notice as their classes are defined
    from diffusers import FlaxAutoencoderKL, FlaxControlNetModel, FlaxUNet2DConditionModel

    from .models import FlaxBlip2QFormerModel, FlaxContextCLIPTextModel

MODEL_COMPONENTS = ("qformer", "text_encoder", "unet", "vae", "controlnet")
# The naming style of each component's Flax tree: transformers-like `layers/0` or diffusers' `down_blocks_0`.
NAMING_STYLE = {"qformer": "transformers", "text_encoder": "transformers", "unet": "diffusers",
                "vae": "diffusers", "controlnet": "diffusers"}


# Keys diffusers' PyTorch configs carry that its Flax classes do not take, with the values the Flax code
# implicitly assumes. Any other value would change the math, so it is refused rather than ignored.
_PYTORCH_ONLY_KEYS = {
    "act_fn": "silu", "attention_type": "default", "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "upcast_attention": False, "force_upcast": True, "latents_mean": None,
    "latents_std": None, "mid_block_add_attention": True, "shift_factor": None, "use_post_quant_conv": True,
    "use_quant_conv": True, "global_pool_conditions": False, "addition_embed_type_num_heads": 64,
    "conditioning_channels": 3, "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": 1,
    "addition_embed_type": None, "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
}
# Settings that only change numerical precision or the PyTorch runtime, accepted whatever their value.
_HARMLESS_KEYS = {"upcast_attention", "force_upcast"}


def flax_config(cls, config: dict, component: str) -> dict:
    """The part of a PyTorch config that `cls` (a diffusers Flax model) takes; refuses settings it would ignore."""
    accepted = set(cls.__dataclass_fields__)
    out = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in accepted:
            out[key] = value
        elif key in _HARMLESS_KEYS:
            continue
        elif key not in _PYTORCH_ONLY_KEYS:
            raise ValueError(f"{component}/config.json: {key}={value!r} is not supported by {cls.__name__}")
        elif value != _PYTORCH_ONLY_KEYS[key] and not (value is None and _PYTORCH_ONLY_KEYS[key] is None):
            raise ValueError(
                f"{component}/config.json: {key}={value!r} is not supported by {cls.__name__} "
                f"(only {_PYTORCH_ONLY_KEYS[key]!r})"
            )
    return out


def qformer_config(config: dict) -> Blip2Config:
    return Blip2Config.from_dict(dict(config))


@quietly
def build_model(name: str, config: dict, dtype=jnp.float32):
    """The Flax module for component `name`, configured by its `config.json` contents."""
    if name == "qformer":
        return FlaxBlip2QFormerModel(qformer_config(config), dtype=dtype)
    if name == "text_encoder":
        return FlaxContextCLIPTextModel(CLIPTextConfig.from_dict(dict(config)), dtype=dtype)
    classes = {"unet": FlaxUNet2DConditionModel, "vae": FlaxAutoencoderKL, "controlnet": FlaxControlNetModel}
    if name not in classes:
        raise ValueError(f"unknown component {name!r}; expected one of {MODEL_COMPONENTS}")
    return classes[name].from_config(flax_config(classes[name], config, name), dtype=dtype)


@quietly
def init_params(name: str, module, rng=None):
    """Random parameters (for tests and the demo model), never used to fill a checkpoint's gaps."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if name == "qformer":
        vision = module.config.vision_config
        pixels = jnp.zeros((1, 3, vision.image_size, vision.image_size))
        ids = jnp.zeros((1, 1), jnp.int32)
        return module.init(rng, ids, jnp.ones((1, 1), jnp.int32), pixels)["params"]
    if name == "text_encoder":
        return module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    if name == "controlnet":
        # diffusers' init_weights assumes an 8x conditioning embedding; size the image from the config instead.
        factor = 2 ** (len(module.conditioning_embedding_out_channels) - 1)
        sample = jnp.zeros((1, module.in_channels, 8, 8))
        cond = jnp.zeros((1, 3, 8 * factor, 8 * factor))
        context = jnp.zeros((1, 1, module.cross_attention_dim))
        return module.init(rng, sample, jnp.ones((1,), jnp.int32), context, cond)["params"]
    return module.init_weights(rng)


@quietly
def param_shapes(name: str, module) -> dict[tuple, tuple]:
    """Flat Flax path -> shape of every parameter, without allocating them."""
    tree = jax.eval_shape(lambda: init_params(name, module))
    return {path: tuple(leaf.shape) for path, leaf in flatten_dict(tree).items()}


def cast_params(params, dtype):
    """Floating leaves as device arrays of `dtype` (e.g. bf16 weights for inference); leaves already of that
    dtype are moved without an extra copy of the cast."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return jax.tree_util.tree_map(cast, params)
