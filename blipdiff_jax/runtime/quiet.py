"""The one-line Flax deprecation notices of diffusers and transformers, dropped while our own code runs theirs.

We pin the last releases that still ship those classes on purpose; users should see only our messages. The
notices come from many module loggers (each block's `setup`, each scheduler) that propagate to each library's
root handler. `quiet_flax_notices()` filters them on those loggers and handlers only while inside (building
our models and schedulers, tracing our programs) and removes its filters on leaving: outside our calls, the
libraries' logging is as they configure it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

NOTICES = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")
LIBRARIES = ("diffusers", "transformers")


class DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in str(record.msg) for notice in NOTICES)


_FILTER = DropFlaxDeprecation()
_lock = threading.Lock()
_state = {"depth": 0, "targets": []}


def library_log_targets() -> list:
    """The diffusers/transformers loggers now registered, and their root loggers' handlers."""
    targets = []
    for name, log in list(logging.root.manager.loggerDict.items()):
        if isinstance(log, logging.Logger) and (name in LIBRARIES or name.startswith(tuple(f"{lib}." for lib in LIBRARIES))):
            targets.append(log)
    for library in LIBRARIES:
        if library in logging.root.manager.loggerDict:
            targets += logging.getLogger(library).handlers
    return targets


@contextlib.contextmanager
def quiet_flax_notices():
    """While inside (re-entrant, any thread), the Flax deprecation notices are dropped; our filters are removed
    from every logger and handler they were put on when the last caller leaves."""
    with _lock:
        for target in library_log_targets():  # on a nested entry: loggers imported since the first
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
                _state["targets"].append(target)
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for target in _state["targets"]:
                    target.removeFilter(_FILTER)
                _state["targets"] = []


def quietly(fn):
    """`fn` called inside `quiet_flax_notices()`."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with quiet_flax_notices():
            return fn(*args, **kwargs)

    return wrapped
