"""Trace each kind of repeated block once per program, not once per use (nested `jax.jit`, by interception).

A 512x512 generation runs 22 UNet resnets, 16 transformer blocks and 2 x 12 CLIP text layers, most of them
with the same settings and input shapes as another. Inside `traced_once_per_block()`, a call to one of
`REPEATED_BLOCKS` becomes a call to a `jax.jit` of that block's own `apply`, keyed by the block's settings and
its non-array arguments: JAX traces and lowers each distinct (settings, shapes) once and reuses the result for
the other uses. XLA inlines the nested calls before it optimises, so the compiled program is the same one (same
instructions, same temporaries: checked on the real-size UNet). What changes is the time to trace and lower,
which a process pays again even when the compiled program comes from the persistent cache: the UNet step at
512x512 traces in ~1 s instead of ~2.8 s and lowers in 0.3 s instead of 0.6 s.

Only for programs without attention control: editing's controller reads each attention's place in the UNet
and sows maps into a collection, which a block traced on its own would not see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import flax.linen as nn
import jax
import numpy as np
from diffusers.models.attention_flax import FlaxTransformer2DModel
from diffusers.models.resnet_flax import FlaxResnetBlock2D
from transformers.models.clip.modeling_flax_clip import FlaxCLIPEncoderLayer

from .subject_encoder import FlaxBlip2EncoderLayer

REPEATED_BLOCKS = (FlaxTransformer2DModel, FlaxResnetBlock2D, FlaxCLIPEncoderLayer, FlaxBlip2EncoderLayer)

_inside = threading.local()  # set while a block's own trace runs: the blocks inside it run as they are


def _hashable(value):
    """`value` when it can be part of a cache key; else its identity (a shared config object)."""
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def _key(module: nn.Module, static_args: tuple, kwargs: dict):
    fields = tuple((f.name, _hashable(getattr(module, f.name))) for f in dataclasses.fields(module)
                   if f.name not in ("parent", "name"))
    return (type(module), fields, static_args, tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))


def _is_array(value) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))  # tracers are jax.Arrays


def _interceptor(cache: dict):
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, REPEATED_BLOCKS)
                or getattr(_inside, "active", False) or set(module.variables) - {"params"} or module.scope.rngs
                or any(_is_array(v) for v in kwargs.values())):  # arrays only as positional inputs
            return next_fun(*args, **kwargs)
        # Arrays are the traced inputs; everything else (None, ints, flags) is part of the key.
        static_args = tuple((i, _hashable(a)) for i, a in enumerate(args) if not _is_array(a))
        key = _key(module, static_args, kwargs)
        jitted = cache.get(key)
        if jitted is None:
            block = module.clone(parent=None)
            array_positions = [i for i, a in enumerate(args) if _is_array(a)]
            statics = {i: a for i, a in enumerate(args) if not _is_array(a)}

            def run(params, *arrays):
                full = {**statics, **dict(zip(array_positions, arrays))}
                outer, _inside.active = getattr(_inside, "active", False), True
                try:
                    return block.apply({"params": params}, *(full[i] for i in range(len(full))), **kwargs)
                finally:
                    _inside.active = outer

            jitted = cache[key] = jax.jit(run)
        return jitted(module.variables.get("params", {}), *(a for a in args if _is_array(a)))

    return interceptor


@contextlib.contextmanager
def traced_once_per_block():
    """While active, each of `REPEATED_BLOCKS` is traced once per (settings, non-array arguments, shapes)."""
    with nn.intercept_methods(_interceptor({})):
        yield
