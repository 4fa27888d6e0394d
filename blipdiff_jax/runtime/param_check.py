"""Flax's shape check of existing params, without tracing an initializer per param.

When a module reads a param that already exists, flax 0.12's `Scope.param` checks its shape by tracing the
param's initializer (`jax.eval_shape(init_fn)`), for every param, every time a program is traced: 1076 traces
for the UNet, 2.4 of the 6.1 s that tracing a 512x512 generation takes, paid again in every new process even
when the compiled program comes from the persistent cache. Nearly every initializer is called as
`init(key, shape, dtype)`: when the stored param has exactly that `shape`, the module's settings match it and
the check needs no tracing. Anything else (a different shape, boxed metadata, an initializer called another
way) goes through flax's own check, which raises flax's own error.

`Scope.param` is replaced only while our programs are traced (`fast_param_check`), and flax's own is bound
back when the last tracing leaves; the flax code it stands in for is pinned (runtime/pinned.py).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
from flax.core import meta
from flax.core.scope import Scope

_flax_param = Scope.param
_lock = threading.Lock()
_depth = 0


def _is_shape(value) -> bool:
    return isinstance(value, (tuple, list)) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in value)


def _param(self, name, init_fn, *init_args, unbox: bool = True, **init_kwargs):
    if init_args and _is_shape(init_args[0]) and self.has_variable("params", name):
        value = self.get_variable("params", name)
        if not isinstance(value, meta.AxisMetadata) and hasattr(value, "shape") \
                and tuple(value.shape) == tuple(int(n) for n in init_args[0]):
            self.reserve(name, "params")  # what flax's own path does first
            return value
    return _flax_param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)


@contextlib.contextmanager
def fast_param_check():
    """While active (re-entrant; process-wide, as a class attribute is), existing params whose shape is the
    one their module asks for are returned without tracing their initializer."""
    global _depth
    with _lock:
        _depth += 1
        Scope.param = _param
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                Scope.param = _flax_param


def traced_with_fast_param_check(fn):
    """`fn` (a function to trace: jit, pmap) run under `fast_param_check`."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with fast_param_check():
            return fn(*args, **kwargs)

    return wrapped
