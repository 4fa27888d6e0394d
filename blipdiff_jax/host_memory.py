"""The C heap of the host process: when freed memory goes back to the OS (glibc only; elsewhere a no-op).

A real-size model in fp32 is 5.8 GiB of params; everything else a generation needs is XLA's temporaries
(0.75 GiB at 512x512) and buffers that XLA, TensorStore and orbax allocate and free by the thousand. glibc
serves a block of 128 KiB or more with its own `mmap`, so freeing it unmaps it, but it raises that threshold
(up to 32 MiB) every time such a block is freed. From then on, blocks of 128 KiB-32 MiB come from its heap
arenas, and when freed they stay in the process. Pinning the threshold keeps them going back.

Measured on the real-size model (2-core CPU, one process each, warm compilation cache):
- fp32: loading peaked at 7.53 GiB with glibc's defaults and 6.61 GiB with the threshold pinned at 128 KiB;
  loading plus one 512x512 generation at 8.35 and 7.79 GiB;
- fp32, 256x256 (torch not imported): peak 7.18-7.52 GiB with glibc's defaults, 6.95 GiB pinned.
Pinned for good, the generation's own scratch buffers come fresh from the OS every time: a 256x256 image took
21.7 s instead of 17.8 s. So `returning_large_blocks` pins it only while a checkpoint is read (17.3 s, 6.95 GiB).

Compiling leaves its own garbage in the heap (XLA's and LLVM's), freed but kept, right before the program that
needs the most memory runs. `trimmed_after_compiling` hands it back between the compile and the run: bf16,
512x512, peak 4.45 -> 3.99 GiB when the program is compiled in the process, 4.14 -> 3.98 GiB when it is read
from the persistent cache.

What a program frees while it runs is the opposite case: its scratch buffers are needed again by the next
operation, so while our programs run glibc keeps up to 16 MiB of free memory at the top of each heap arena
(`keep_freed_scratch`) instead of 128 KiB, and while XLA compiles it goes back to 128 KiB.

All of this is opt-in: glibc's settings are the application's, not a library's. Until `tune_host_memory()` is
called (the CLI and the benchmarks call it), loading a checkpoint and compiling our programs leave the C heap
alone; the functions below that name one glibc call (`release_freed_memory`, `return_large_blocks_to_os`,
`keep_freed_scratch`) do what they say whenever called.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading

# glibc's default for the first threshold, and the value it is pinned at while a checkpoint is read.
MMAP_THRESHOLD = 128 * 1024
# After reading: the ceiling of glibc's own rule on 64-bit, where it takes the threshold anyway once large
# blocks have been freed. Left at 128 KiB, every convolution's scratch buffer of a generation came fresh from
# the OS (page faults): a 256x256 image took 21.7 s instead of 17.8 s, its denoising steps unchanged.
AFTER_READING = 32 * 1024 * 1024
# glibc's trim threshold: a heap arena's free top larger than this goes back to the OS when a block is freed.
# Setting the mmap threshold turns glibc's own rule off (which would raise it to twice the mmap threshold), so
# it stays at 128 KiB: every freed scratch buffer at the top of an arena went back to the OS, to be faulted in
# again by the next operation. 16 MiB keeps them (an eighth of the page faults); 64 MiB saved little more, and
# it, or a high threshold while XLA compiles, raised the bf16 cold peak; so 16 MiB, and 128 KiB while
# compiling (numbers in docs/performance.md).
TRIM_WHILE_RUNNING = 16 * 2**20
TRIM_WHILE_COMPILING = MMAP_THRESHOLD
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
# Set to "0" to leave the C heap as glibc configures it. A MALLOC_MMAP_THRESHOLD_ in the environment (glibc's
# own tunable) is the user's choice and is left alone too.
OPT_OUT_ENV = "BLIPDIFF_JAX_TUNE_MALLOC"


_tuning = {"on": False}  # set by tune_host_memory()


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT_ENV, "1") == "0"


def tune_host_memory() -> bool:
    """Turn on this module's glibc tuning for the rest of the process: the mmap threshold pinned while a
    checkpoint is read, the heap trimmed after loading and after each compile of our programs, freed scratch
    kept while they run. Process-wide, so an application's choice (the CLI and the benchmarks make it), never
    made on import. Returns whether it is on: not without glibc, nor with BLIPDIFF_JAX_TUNE_MALLOC=0."""
    _tuning["on"] = not _opted_out() and _glibc() is not None
    return _tuning["on"]


def host_memory_tuned() -> bool:
    """Whether `tune_host_memory()` turned the tuning on (and BLIPDIFF_JAX_TUNE_MALLOC=0 does not hold it off)."""
    return _tuning["on"] and not _opted_out()


@functools.lru_cache(maxsize=None)
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
            return libc
    except OSError:
        pass
    return None  # musl, macOS, Windows


def _mallopt(parameter: int, value: int, user_env: str) -> bool:
    """glibc's `mallopt(parameter, value)`; False (nothing set) without glibc, with BLIPDIFF_JAX_TUNE_MALLOC=0,
    or when the user set glibc's own tunable for it (`user_env`) in the environment."""
    if _opted_out() or user_env in os.environ:
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(parameter, value))


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`); False where there is no glibc.

    Reading a checkpoint allocates and frees gigabytes of read buffers on orbax's and TensorStore's threads;
    glibc keeps small freed blocks in its per-thread arenas, where the model never reuses them. Measured on
    the real-size model in bf16, with glibc's default threshold: 0.45 GB released right after loading."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def return_large_blocks_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at `threshold` bytes, so every freed block at least that large is unmapped
    at once (see the module docstring). Process-wide and lasting; returns whether it was set. Not set where
    there is no glibc, when MALLOC_MMAP_THRESHOLD_ is in the environment, or when BLIPDIFF_JAX_TUNE_MALLOC=0."""
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold!r}")
    return _mallopt(_M_MMAP_THRESHOLD, threshold, "MALLOC_MMAP_THRESHOLD_")


def keep_freed_scratch(keep: bool) -> bool:
    """Set glibc's trim threshold: `TRIM_WHILE_RUNNING` (keep) or `TRIM_WHILE_COMPILING` (see above). Not set
    where there is no glibc, when MALLOC_TRIM_THRESHOLD_ is in the environment, or when
    BLIPDIFF_JAX_TUNE_MALLOC=0; returns whether it was set."""
    return _mallopt(_M_TRIM_THRESHOLD, TRIM_WHILE_RUNNING if keep else TRIM_WHILE_COMPILING, "MALLOC_TRIM_THRESHOLD_")


@contextlib.contextmanager
def returning_large_blocks():
    """For reading a checkpoint, once `tune_host_memory()` was called: the threshold pinned at 128 KiB while
    inside, so the readers' freed buffers go back to the OS; on leaving, raised to 32 MiB (`AFTER_READING`)
    and the heap's free pages handed back. Without the tuning it does nothing."""
    if not host_memory_tuned():
        yield False
        return
    pinned = return_large_blocks_to_os()
    try:
        yield pinned
    finally:
        if pinned:
            return_large_blocks_to_os(AFTER_READING)
            keep_freed_scratch(True)
        release_freed_memory()


# What JAX reports after every backend compile, fresh or read from the persistent cache, in the thread that
# then runs the program (jax._src.dispatch.BACKEND_COMPILE_EVENT; tests/runtime/test_memory.py checks it still fires),
# and after lowering a program, which comes before its compile (JAXPR_TO_MLIR_MODULE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
LOWERED_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_scope = {"depth": 0}
_scope_lock = threading.Lock()


def _after_compile(event, duration, **kwargs):
    if _scope["depth"] <= 0:
        return
    if event == LOWERED_EVENT:  # a compile follows: hand its freed blocks back as it goes
        keep_freed_scratch(False)
    elif event == COMPILE_EVENT:  # the program runs next: its garbage back to the OS, its scratch kept
        release_freed_memory()
        keep_freed_scratch(True)


@contextlib.contextmanager
def releasing_after_compiles():
    """While inside, each XLA compilation runs with glibc's trim threshold low and is followed by
    `release_freed_memory()` and the threshold raised, before its program runs (see the module docstring).
    Re-entrant. JAX's compile events are listened to only while some thread is inside: the listener is
    registered on the first entry and removed on the last exit. Does nothing until `tune_host_memory()`."""
    if not host_memory_tuned():
        yield False
        return
    import jax.monitoring

    with _scope_lock:
        if _scope["depth"] == 0:
            jax.monitoring.register_event_duration_secs_listener(_after_compile)
        _scope["depth"] += 1
    try:
        yield True
    finally:
        with _scope_lock:
            _scope["depth"] -= 1
            if _scope["depth"] == 0:
                jax.monitoring.unregister_event_duration_listener(_after_compile)


def listening_to_compiles() -> bool:
    """Whether our compile listener is registered with `jax.monitoring` now (only inside `releasing_after_compiles`)."""
    from jax._src import monitoring

    return _after_compile in monitoring.get_event_duration_listeners()


class trimmed_after_compiling:
    """A jitted (or pmapped) function whose calls run inside `releasing_after_compiles()`; its other
    attributes (`lower`, `trace`, `_cache_size`) are the wrapped function's."""

    def __init__(self, jitted):
        self._jitted = jitted

    def __call__(self, *args, **kwargs):
        with releasing_after_compiles():
            return self._jitted(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._jitted, name)
