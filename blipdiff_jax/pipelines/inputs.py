"""Argument normalisation shared by the entry points: each error names the argument."""

from __future__ import annotations

import math

import numpy as np

OUTPUT_TYPES = ("pil", "np")
MAX_SIDE = 4096  # documented maximum height/width in pixels


def as_list(value, argname: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{argname} is an empty list")
        return list(value)
    raise TypeError(f"{argname} must be a string or a list of strings, not {type(value).__name__}")


def broadcast(values: list, batch: int, argname: str) -> list:
    if len(values) == batch:
        return values
    if len(values) == 1:
        return values * batch
    raise ValueError(f"{argname} has {len(values)} entries for {prompts(batch)} ({give(batch)})")


def prompts(batch: int) -> str:
    return "1 prompt" if batch == 1 else f"{batch} prompts"


def give(batch: int) -> str:
    """What a per-prompt argument may hold: one entry, or one per prompt."""
    return "give 1" if batch == 1 else f"give 1 or {batch}"


def as_prng_key(prng_seed):
    """One PRNG key from `prng_seed`: a raw key (`jax.random.PRNGKey`, uint32) or a typed one (`jax.random.key`);
    of per-device keys, the first. Typed keys of the default implementation become raw keys, so both share
    one compiled program."""
    import jax
    import jax.numpy as jnp

    if isinstance(prng_seed, (bool, int, float, np.integer, np.floating)):
        raise TypeError(f"prng_seed must be a JAX PRNG key such as jax.random.key({prng_seed!r}) or "
                        f"jax.random.PRNGKey({prng_seed!r}), not {type(prng_seed).__name__}")
    try:
        key = jnp.asarray(prng_seed)
    except (TypeError, ValueError):
        raise TypeError(f"prng_seed must be a JAX PRNG key (jax.random.key or jax.random.PRNGKey), not "
                        f"{type(prng_seed).__name__}") from None
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = key.reshape(-1)[0]
        if jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0)):
            key = jax.random.key_data(key)
        return key
    size = jax.random.key_data(jax.random.key(0)).shape[-1]
    if key.dtype != jnp.uint32 or key.ndim < 1 or key.shape[-1] != size:
        raise TypeError(f"prng_seed must be a JAX PRNG key (jax.random.key or jax.random.PRNGKey), not an array of "
                        f"{key.dtype} with shape {tuple(key.shape)}")
    return key.reshape(-1, size)[0]


def check_size(height, width, multiple: int):
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < 1 or value > MAX_SIDE:
            raise ValueError(f"{name}={value} must be between 1 and {MAX_SIDE}")
        if value % multiple:
            raise ValueError(f"{name}={value} must be a multiple of {multiple} for this model")


def check_steps(steps, argname: str, scheduler):
    """1 <= steps <= the scheduler's num_train_timesteps (beyond it every timestep is 0)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{argname} must be an int, not {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"{argname}={steps} must be at least 1")
    limit = int(scheduler.config.num_train_timesteps)
    if steps > limit:
        raise ValueError(f"{argname}={steps} must be at most {limit} (the scheduler's num_train_timesteps)")


def check_common(height, width, num_inference_steps, guidance_scale, output_type, multiple: int, scheduler):
    """The checks every entry point shares: size (a multiple of `multiple`), steps, guidance, output type."""
    check_size(height, width, multiple)
    check_steps(num_inference_steps, "num_inference_steps", scheduler)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"guidance_scale must be a number, not {type(guidance_scale).__name__}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be a finite number >= 0")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
