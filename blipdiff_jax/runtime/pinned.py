"""The third-party code our scoped patches replace or rely on, as the pinned releases ship it.

Two patches exist, each only while our own programs are traced (runtime/param_check.py: flax's
`Scope.param`; runtime/remat.py: the block names `FlaxUNet2DConditionModel.setup` reads). Each is correct for
the code below; `changed_code()` names what a new release changed (tests/runtime/test_side_effects.py fails on it),
so that an upgrade is read and checked again instead of silently patched.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

# "module:qualified.name" -> the first 16 hex digits of the SHA-256 of its source (flax 0.12.8, diffusers 0.39.0)
PINNED = {
    "flax.core.scope:Scope.param": "d41bf5f95de22356",
    "diffusers.models.unets.unet_2d_condition_flax:FlaxUNet2DConditionModel.setup": "053033fa6307c66c",
}


def source_hash(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def resolve(name: str):
    module, qualified = name.split(":")
    obj = importlib.import_module(module)
    for part in qualified.split("."):
        obj = getattr(obj, part)
    return obj


def changed_code() -> list[str]:
    """The entries of `PINNED` whose source is not the one our patches were written against."""
    return [name for name, expected in PINNED.items() if source_hash(resolve(name)) != expected]
