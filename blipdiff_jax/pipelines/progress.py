"""The progress bar over compiled steps, shared by generation, editing and inversion so that all show the same
bar: "compiling" until the first step runs, then one tick per finished step."""

from __future__ import annotations

import contextlib

import numpy as np


class Progress:
    """One bar at a time. `on_step` is the host side (a `jax.debug.callback` target inside a compiled loop, or
    called between one-step programs); `runtime.compiling()` wraps the compiles run ahead of the clock."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.bar = None
        self.desc = ""

    def on_step(self, step):
        """Step -1: the program has started, so the time so far was compiling; the bar's clock starts again.
        pmap calls it once per device, so a step already counted is ignored."""
        bar = self.bar
        if bar is None:
            return
        step = int(step)
        if step < 0:
            if bar.desc.startswith("compiling") and bar.n == 0:
                bar.set_description(self.desc, refresh=False)
                bar.reset()
        elif step + 1 > bar.n:
            bar.update(step + 1 - bar.n)

    @contextlib.contextmanager
    def showing(self, enabled: bool, total: int, desc: str):
        """A progress bar over `total` steps while the block runs: "compiling" until the program starts."""
        if not enabled:
            yield
            return
        from tqdm.auto import tqdm  # only when a bar is asked for: tqdm's import is not free

        self.desc = desc
        self.bar = tqdm(total=total, desc=f"compiling, then {desc}", unit="step")
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None

    def queued_steps(self, run_step, carry, total, before_clock=None):
        """`run_step(carry, start, stop)` once per step (a compiled program without host callbacks, which JAX's
        persistent cache stores): every call is queued at once, so the device never waits for the host, and the
        bar advances as each finishes. Its clock starts once the step program is compiled and
        `before_clock(carry)` has run (another program compiled ahead). Returns the last carry."""
        finished = []
        for step in range(total):
            carry = run_step(carry, np.int32(step), np.int32(step + 1))
            if step == 0:
                if before_clock is not None:
                    with self.runtime.compiling():  # as the jitted calls' compiles
                        before_clock(carry)
                self.on_step(-1)
            finished.append(carry["latents"])
        for step, latents in enumerate(finished):
            latents.block_until_ready()
            self.on_step(step)
        return carry
