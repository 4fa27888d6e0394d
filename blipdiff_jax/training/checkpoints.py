"""Training checkpoints (orbax) and the loss log.

A checkpoint holds the trained params, the optimizer state, the RNG key and the step. Orbax writes each one
to a temporary folder and renames it into place when complete, so a kill during a save leaves the previous
checkpoint as the latest. The global (possibly sharded, multi-process) arrays are saved as they are: every
process writes its own shards, and `save` returns once they are copied off the devices (their buffers are
donated to the next step), the writing going on in the background. A run's data position is a function of
its step (pretrain_data.py), so the step is the data iterator's whole state.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import jax


def manager(directory: str, keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(manager, step: int, trainable, opt_state, rng) -> None:
    """Start saving (written in the background; `manager.wait_until_finished()` waits)."""
    import orbax.checkpoint as ocp

    state = {"trainable": trainable, "opt_state": opt_state, "rng": rng}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step})))


def restore_latest(manager, trainable, opt_state, rng):
    """(step, trainable, opt_state, rng) of the latest checkpoint. The arguments give the structure, shapes,
    dtypes and shardings (`jax.ShapeDtypeStruct`s with `sharding`): each process reads its own shards straight
    onto its devices."""
    import orbax.checkpoint as ocp

    target = {"trainable": trainable, "opt_state": opt_state, "rng": rng}
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    state = restored["state"]
    return int(restored["meta"]["step"]), state["trainable"], state["opt_state"], state["rng"]


def trim_loss_log(path: str, step: int) -> None:
    """Keep the log lines of steps up to `step` (the later ones belong to the run that was interrupted)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


class Preemption:
    """SIGTERM (what TPU, Kubernetes and Slurm send before taking a machine) asks the run to stop: `reached(step)`
    is True at the first step after it on every process. One process: our own SIGTERM handler (the previous one
    comes back at `close()`). Several: JAX's preemption sync point, which the distributed runtime's own SIGTERM
    notifier feeds, so that all processes stop at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the distributed runtime was started without its preemption service
                return False
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
