"""LoRA subject fine-tuning: the loss of `loss.DiffusionLoss` on weights merged from the frozen base and trained
low-rank factors (`blipdiff_jax.models.lora`), and what a LoRA run writes.

    trainable = {"unet_lora": factors, ["text_encoder_lora": factors], "subject_embeddings": (1, Q, D)}
    frozen    = {"vae", "unet", "text_encoder"}         the base: never differentiated, not in the optimizer state

Each step merges `W + alpha / rank * down @ up` inside the compiled loss, so the gradients reach the factors only
and the optimizer holds two moments of the factors and embeddings (megabytes) instead of the UNet's (gigabytes).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from .. import components
from ..lora_files import write_lora_directory
from ..models.lora import DEFAULT_TARGETS, init_factors, merge, target_modules
from .loss import DiffusionLoss

FACTOR_KEYS = {"unet": "unet_lora", "text_encoder": "text_encoder_lora"}


class LoraDiffusionLoss(DiffusionLoss):
    """`DiffusionLoss` over `trainable` = {"unet_lora", ["text_encoder_lora"], "subject_embeddings"} and `frozen`
    = {"vae", "unet", "text_encoder"}: the adapted kernels are merged (`scale` = alpha / rank) before the loss."""

    def __init__(self, configs: dict, ctx_begin_pos: int, compute_dtype, remat: bool, scale: float, **kwargs):
        super().__init__(configs, ctx_begin_pos, compute_dtype, remat, **kwargs)
        self.lora_scale = float(scale)

    def merged(self, trainable, frozen) -> dict:
        """The trainable tree `DiffusionLoss` takes: merged UNet (and text encoder) and the subject embeddings."""
        out = {"subject_embeddings": trainable["subject_embeddings"]}
        for name, key in FACTOR_KEYS.items():
            if key in trainable:
                out[name] = merge(frozen[name], trainable[key], self.lora_scale)
        return out

    def __call__(self, trainable, frozen, latents, noise, timesteps, input_ids):
        return super().__call__(self.merged(trainable, frozen), frozen, latents, noise, timesteps, input_ids)


def lora_targets(config) -> dict[str, tuple]:
    """Target modules (PyTorch names, peft's matching) of each adapted component."""
    targets = {"unet": tuple(config.lora_target_modules or DEFAULT_TARGETS["unet"])}
    if config.lora_text_encoder:
        targets["text_encoder"] = tuple(config.lora_text_target_modules or DEFAULT_TARGETS["text_encoder"])
    return targets


def lora_modules(params: dict, config, name=str) -> dict:
    """{component: {module name: (Flax path, kernel shape)}} of the modules the run adapts; a target naming no
    module is a ValueError naming the setting."""
    fields = {"unet": "lora_target_modules", "text_encoder": "lora_text_target_modules"}
    modules = {}
    for component, targets in lora_targets(config).items():
        try:
            modules[component] = target_modules(params[component], components.NAMING_STYLE[component], targets)
        except ValueError as err:
            raise ValueError(f"{name(fields[component])}: {err}") from None
    return modules


def initial_factors(modules: dict, rank: int, seed: int) -> dict:
    """Host trees of the starting factors, keyed as in `trainable` (peft's init: the model starts unchanged)."""
    return {FACTOR_KEYS[component]: init_factors(found, rank, seed + i) for i, (component, found) in enumerate(modules.items())}


def check_resumed_rank(config_file: str, config, name=str) -> None:
    """Resuming: the run in OUT must be LoRA (of the same rank) exactly when this one is (the other LoRA settings
    are compared with the rest, `FinetuneConfig.resume_settings`)."""
    if not config.resume or not os.path.isfile(config_file):
        return
    with open(config_file) as f:
        stored = json.load(f).get("lora_rank", 0)
    if stored != config.lora_rank:
        raise ValueError(f"{name('lora_rank')}={config.lora_rank} differs from the run being resumed ({stored}); "
                         "resume with the same settings")


def alpha_of(config) -> float:
    return float(config.lora_rank if config.lora_alpha is None else config.lora_alpha)


def merged_params(params: dict, trainable: dict, config) -> dict:
    """The model's params with the trained factors merged (previews; what `load_lora` of the export gives)."""
    out = dict(params)
    for name, key in FACTOR_KEYS.items():
        if key in trainable:
            out[name] = merge(params[name], trainable[key], alpha_of(config) / config.lora_rank)
    return out


def export_lora(out: str, trainable: dict, config) -> str:
    """OUT/pytorch_lora_weights.safetensors (peft keys, diffusers' metadata), subject_embeddings.npy, lora.json."""
    host = jax.device_get(trainable)
    factors = {name: host[key] for name, key in FACTOR_KEYS.items() if key in host}
    configs = {name: {"r": int(config.lora_rank), "lora_alpha": alpha_of(config), "target_modules": list(targets)}
               for name, targets in lora_targets(config).items()}
    extra = {"subject": config.subject, "lora_rank": int(config.lora_rank), "lora_alpha": alpha_of(config),
             "target_modules": {name: list(targets) for name, targets in lora_targets(config).items()}}
    return write_lora_directory(out, factors, configs, components.NAMING_STYLE,
                                np.asarray(host["subject_embeddings"], np.float32), config.base_model, extra)
