"""`Runtime`: how one pipeline's (or trainer's) programs are compiled and traced on the backend it runs on.

On CPU (XLA's CPU backend, where this library's tuning was measured):
- compiled with `compilation.compiler_options()` (convolutions on XLA's Eigen kernel), and, once
  `tune_host_memory()` was called, the C heap trimmed after each compile (host_memory.py);
- traced with the shortcuts that cut tracing time without changing the program: flax's param shape check
  without an initializer trace (runtime/param_check.py), each repeated block traced once (models/block_traces.py);
- with `cpu_rewrites` (default on, `BLIPDIFF_JAX_CPU_REWRITES=0` or `cpu_rewrites=False` to turn off): the
  layer rewrites of models/cpu_rewrites.py (bf16 products, convolutions as matmuls, chunked feed-forwards)
  and the VAE decoder in row strips (models/vae_decode.py).
On GPU and TPU it adds nothing: `jit` is `jax.jit`, `tracing()` enters nothing and the UNet runs diffusers'
layers with the chosen attention kernel.

Everywhere, `attention` picks the UNet's attention kernel only (models/attention.py), and diffusers' and
transformers' Flax deprecation notices are dropped while our programs trace (runtime/quiet.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax

from .. import compilation
from ..host_memory import releasing_after_compiles, trimmed_after_compiling
from ..models import cpu_rewrites as rewrites
from ..models.attention import attention_interceptor, intercept_attention, resolve_implementation
from ..models.block_traces import traced_once_per_block
from .param_check import fast_param_check
from .quiet import quiet_flax_notices

CPU_REWRITES_ENV = "BLIPDIFF_JAX_CPU_REWRITES"  # "0": no CPU rewrites unless a pipeline asks for them


def cpu_rewrites_by_default() -> bool:
    return os.environ.get(CPU_REWRITES_ENV, "1") != "0"


def chained(*interceptors):
    """One `nn.intercept_methods` interceptor running `interceptors` (None ones left out) outermost first, as
    nested `intercept_methods` contexts would; None when none is left."""
    interceptors = [i for i in interceptors if i is not None]
    if len(interceptors) <= 1:
        return interceptors[0] if interceptors else None
    outer, inner = interceptors[0], chained(*interceptors[1:])

    def interceptor(next_fun, args, kwargs, context):
        return outer(lambda *a, **k: inner(next_fun, a, k, context), args, kwargs, context)

    return interceptor


@dataclasses.dataclass(frozen=True)
class Runtime:
    """backend: "cpu", "gpu", "tpu"; attention: the resolved kernel; cpu_rewrites: whether the CPU layer
    rewrites run (never off CPU)."""

    backend: str
    attention: str
    cpu_rewrites: bool

    @classmethod
    def for_backend(cls, attention: str = "auto", cpu_rewrites: bool | None = None, backend: str | None = None):
        """The runtime for `backend` (default: JAX's default backend). `cpu_rewrites`: None follows
        BLIPDIFF_JAX_CPU_REWRITES (on unless "0"); ignored off CPU."""
        if cpu_rewrites is not None and not isinstance(cpu_rewrites, bool):
            raise TypeError(f"cpu_rewrites must be True, False or None, not {cpu_rewrites!r}")
        backend = backend or jax.default_backend()
        wanted = cpu_rewrites_by_default() if cpu_rewrites is None else cpu_rewrites
        return cls(backend, resolve_implementation(attention, backend), wanted and backend == "cpu")

    @property
    def on_cpu(self) -> bool:
        return self.backend == "cpu"

    # ------------------------------------------------------------------ compiling

    def _traced(self, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with quiet_flax_notices(), fast_param_check() if self.on_cpu else contextlib.nullcontext():
                return fn(*args, **kwargs)

        return traced

    def jit(self, fn, **jit_kwargs):
        """`jax.jit(fn, **jit_kwargs)`; on CPU also compiled with our compiler options, traced with the fast
        param check and trimmed after compiling (a no-op until `tune_host_memory()`)."""
        if not self.on_cpu:
            return jax.jit(self._traced(fn), **jit_kwargs)
        return trimmed_after_compiling(jax.jit(self._traced(fn), compiler_options=compilation.compiler_options(),
                                               **jit_kwargs))

    def pmap(self, fn, **pmap_kwargs):
        """`jax.pmap(fn, **pmap_kwargs)`; on CPU traced with the fast param check and trimmed after compiling."""
        pmapped = jax.pmap(self._traced(fn), **pmap_kwargs)
        return trimmed_after_compiling(pmapped) if self.on_cpu else pmapped

    def compiling(self):
        """Around an ahead-of-time compile (`jitted.lower(...).compile()`): on CPU, the heap trimmed after it as
        after the compiles `jit` runs (host_memory.py; a no-op until `tune_host_memory()`)."""
        return releasing_after_compiles() if self.on_cpu else contextlib.nullcontext()

    # ------------------------------------------------------------------ tracing

    @contextlib.contextmanager
    def tracing(self, repeated_blocks: bool = True, bf16_products: bool = True):
        """Around a traced body. On CPU: `repeated_blocks` traces each repeated block once (not for programs
        with attention control, whose controller must see every attention in place); `bf16_products` runs the
        bf16 layers of the encoders as bf16 products (with `cpu_rewrites`). Elsewhere nothing."""
        with contextlib.ExitStack() as stack:
            if repeated_blocks and self.on_cpu:
                stack.enter_context(traced_once_per_block())
            if bf16_products and self.cpu_rewrites:
                stack.enter_context(rewrites.bf16_products())
            yield

    @functools.cached_property
    def unet_interceptor(self):
        """The interceptor around the UNet/ControlNet: the CPU rewrites (when on), then the attention kernel;
        None when neither changes anything."""
        return chained(rewrites.unet_interceptor if self.cpu_rewrites else None, attention_interceptor(self.attention))

    def unet_layers(self):
        """A context in which the UNet/ControlNet layers run `unet_interceptor`."""
        return intercept_attention(self.unet_interceptor)

    @property
    def decode_in_strips(self) -> bool:
        """Whether the VAE decoder runs its full-resolution layers in row strips (a CPU rewrite)."""
        return self.cpu_rewrites
