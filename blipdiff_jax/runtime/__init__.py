"""The backend boundary: the one place that decides how our programs are compiled and traced on each backend.

    runtime = Runtime.for_backend(attention="auto", cpu_rewrites=None)
    program = runtime.jit(fn, static_argnames=("steps",))
    def fn(params, x, steps):
        with runtime.tracing():
            ...

See `backend.Runtime` for what it does on CPU (and that it adds nothing elsewhere). Process-wide settings are
the application's: `tune_host_memory()` turns on the glibc tuning (the CLI and the benchmarks call it).
"""

from ..host_memory import host_memory_tuned, tune_host_memory
from .backend import CPU_REWRITES_ENV, Runtime, chained

__all__ = ["CPU_REWRITES_ENV", "Runtime", "chained", "host_memory_tuned", "tune_host_memory"]
