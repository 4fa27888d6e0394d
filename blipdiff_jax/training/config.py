"""Settings of a fine-tuning run (LAVIS `finetune-db-*.yaml` defaults: 40 steps, batch 3, AdamW at a constant
5e-6 with weight decay 0.01, 512 pixels, seed 42)."""

from __future__ import annotations

import dataclasses
import math
import os

import jax.numpy as jnp
import numpy as np

from . import data

# Settings that must match when resuming (the rest may change, e.g. more steps); the LoRA ones in LoRA runs.
RESUME_KEYS = ("images", "subject", "resolution", "batch_size", "learning_rate", "weight_decay",
               "train_text_encoder", "seed")
LORA_RESUME_KEYS = ("lora_rank", "lora_alpha", "lora_text_encoder", "lora_target_modules", "lora_text_target_modules")
FULL_LEARNING_RATE, LORA_LEARNING_RATE = 5e-6, 1e-4  # LAVIS's; a common LoRA one (the factors start at zero)


def check_ints(config, minimum: dict, name) -> None:
    """Each field of `minimum` is an int (not a bool) at least its value; errors name the field via `name`."""
    for field, low in minimum.items():
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name(field)} must be an int, not {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name(field)}={value} must be at least {low}")


@dataclasses.dataclass
class FinetuneConfig:
    images: str
    subject: str
    out: str
    steps: int = 40
    batch_size: int = 3
    learning_rate: float | None = None  # None: 5e-6, or 1e-4 with lora_rank
    weight_decay: float = 0.01
    resolution: int = 512
    train_text_encoder: bool = False
    checkpoint_every: int = 0  # 0: only after the last step
    resume: bool = False
    seed: int = 42
    preview_every: int = 0  # 0: no previews
    preview_prompt: str = ""
    preview_steps: int = 25
    compute_dtype: object = jnp.float32  # jnp.bfloat16: bf16 compute, fp32 master weights
    remat: bool = False  # recompute each UNet block's activations in the backward pass
    devices: int | None = None  # data-parallel over this many devices (None: as many as divide batch_size)
    progress: bool = True
    # LoRA fine-tuning (training/lora.py): with lora_rank > 0 only rank-r factors of the target modules (and the
    # subject embeddings) train; OUT holds the adapter, not a model. alpha None: the rank (scale 1).
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_text_encoder: bool = False
    lora_target_modules: tuple = ("to_q", "to_k", "to_v", "to_out.0")
    lora_text_target_modules: tuple = ("q_proj", "k_proj", "v_proj", "out_proj")
    base_model: str | None = None  # what a LoRA output's manifest names (from_pretrained(OUT) loads it)

    def __post_init__(self):
        if self.learning_rate is None:
            lora = isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank > 0
            self.learning_rate = LORA_LEARNING_RATE if lora else FULL_LEARNING_RATE

    def validate(self, names: dict | None = None) -> None:
        """Type and range checks; errors name the setting (as `names` maps it, e.g. to CLI flags)."""
        name = lambda field: (names or {}).get(field, field)  # noqa: E731
        for field in ("images", "subject", "out", "preview_prompt"):
            if not isinstance(getattr(self, field), (str, os.PathLike)):
                raise TypeError(f"{name(field)} must be a string, not {type(getattr(self, field)).__name__}")
        check_ints(self, {"steps": 1, "batch_size": 1, "resolution": 8, "checkpoint_every": 0, "preview_every": 0,
                          "preview_steps": 1, "seed": 0}, name)
        if self.devices is not None and (isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1):
            raise ValueError(f"{name('devices')}={self.devices!r} must be a positive int or None")
        for field, positive in (("learning_rate", True), ("weight_decay", False)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name(field)} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"{name(field)}={value} must be a finite number {'> 0' if positive else '>= 0'}")
        if jnp.dtype(self.compute_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"{name('compute_dtype')}={self.compute_dtype!r} must be float32, bfloat16 or float16")
        data.normalize_subject(self.subject, name("subject"))
        self._validate_lora(name)

    def _validate_lora(self, name) -> None:
        check_ints(self, {"lora_rank": 0}, name)
        lora = self.lora_rank > 0
        if self.lora_alpha is not None:
            value = self.lora_alpha
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name('lora_alpha')} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name('lora_alpha')}={value} must be a finite number > 0")
            if not lora:
                raise ValueError(f"{name('lora_alpha')}: only with {name('lora_rank')}")
        if self.lora_text_encoder and not lora:
            raise ValueError(f"{name('lora_text_encoder')}: only with {name('lora_rank')}")
        if lora and self.train_text_encoder:
            raise ValueError(f"{name('train_text_encoder')} trains the whole text encoder; with {name('lora_rank')} "
                             f"use {name('lora_text_encoder')}")
        for field in ("lora_target_modules", "lora_text_target_modules"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
                    or not all(isinstance(t, str) and t for t in value):
                raise ValueError(f"{name(field)}={value!r} must be a non-empty list of module names")
        if self.base_model is not None and not isinstance(self.base_model, (str, os.PathLike)):
            raise TypeError(f"{name('base_model')} must be a path or Hub id, not {type(self.base_model).__name__}")

    def resume_settings(self) -> dict:
        settings = {k: getattr(self, k) for k in RESUME_KEYS}
        settings["images"] = os.path.abspath(self.images)
        settings["subject"] = data.normalize_subject(self.subject)
        if self.lora_rank > 0:
            settings.update({k: list(v) if isinstance(v, tuple) else v for k in LORA_RESUME_KEYS
                             for v in [getattr(self, k)]})
        return settings
