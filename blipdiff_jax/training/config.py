"""Settings of a fine-tuning run (LAVIS `finetune-db-*.yaml` defaults: 40 steps, batch 3, AdamW at a constant
5e-6 with weight decay 0.01, 512 pixels, seed 42)."""

from __future__ import annotations

import dataclasses
import math
import os

import jax.numpy as jnp
import numpy as np

from . import data

# Settings that must match when resuming (the rest may change, e.g. more steps).
RESUME_KEYS = ("images", "subject", "resolution", "batch_size", "learning_rate", "weight_decay",
               "train_text_encoder", "seed")


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
    learning_rate: float = 5e-6
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

    def resume_settings(self) -> dict:
        settings = {k: getattr(self, k) for k in RESUME_KEYS}
        settings["images"] = os.path.abspath(self.images)
        settings["subject"] = data.normalize_subject(self.subject)
        return settings
