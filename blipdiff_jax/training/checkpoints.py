"""Training checkpoints (orbax) and the loss log.

A checkpoint holds the trained params, the optimizer state, the RNG key and the step. Orbax writes each one
to a temporary folder and renames it into place when complete, so a kill during a save leaves the previous
checkpoint as the latest. Host (numpy) copies are saved: the device buffers are donated to the next step.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np


def manager(directory: str, keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(manager, step: int, trainable, opt_state, rng) -> None:
    """Start saving (written in the background; `manager.wait_until_finished()` waits)."""
    import orbax.checkpoint as ocp

    state = jax.device_get({"trainable": trainable, "opt_state": opt_state, "rng": rng})
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step})))


def restore_latest(manager, trainable, opt_state, rng):
    """(step, trainable, opt_state, rng) of the latest checkpoint as host arrays. The arguments give the
    structure, shapes and dtypes (arrays or `jax.ShapeDtypeStruct`s); nothing is allocated on a device."""
    import orbax.checkpoint as ocp

    target = jax.tree_util.tree_map(lambda x: np.empty(x.shape, x.dtype), {"trainable": trainable, "opt_state": opt_state, "rng": rng})
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
