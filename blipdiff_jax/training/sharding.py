"""Mesh axes and sharding rules of training, in one place.

The training mesh has two named axes:

    data   pure data parallelism: each group of devices along it holds a full copy of the model state
    fsdp   fully sharded data parallelism: parameters, gradients and optimizer state are split over it

The batch is split over both axes (`BATCH`), so every device sees `batch_size / (data * fsdp)` examples.
A parameter (or optimizer-state leaf) with at least `min_size` elements is split over `fsdp` on its largest
dimension that `fsdp` divides (`param_spec`); smaller leaves (biases, norms, scalars) are replicated, as are
leaves no dimension of which divides. XLA inserts the all-gathers (forward), reduce-scatters (gradients) and
keeps the AdamW update local to each shard. With `fsdp=1` this is plain data parallelism.

The rule depends on a leaf's shape only, so the optimizer state (AdamW's moments, the EMA) gets the sharding of
the parameter it belongs to without naming it.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
BATCH = PartitionSpec(AXES)  # the leading (example) dimension over every device
REPLICATED = PartitionSpec()
DEFAULT_MIN_SIZE = 2**18  # elements: kernels of real-size layers are split, biases and norms are not


def parse_mesh(text: str | None, devices: int, name: str = "--mesh") -> dict:
    """{"data": D, "fsdp": F} from "data=D,fsdp=F" (either may be left out: 1; None: all devices on data)."""
    if text is None:
        return {DATA: devices, FSDP: 1}
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string like 'data=2,fsdp=4', not {type(text).__name__}")
    sizes = {DATA: 1, FSDP: 1}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        axis, _, value = part.partition("=")
        if axis.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{name}={text!r}: expected axis=size pairs among {AXES}, e.g. 'data=2,fsdp=4'")
        sizes[axis.strip()] = int(value)
    if sizes[DATA] * sizes[FSDP] > devices:
        raise ValueError(f"{name}={text!r} needs {sizes[DATA] * sizes[FSDP]} devices; {devices} available")
    return sizes


def make_mesh(data: int, fsdp: int, devices=None) -> Mesh:
    """A (data, fsdp) mesh over the first data*fsdp devices (every process's, in `jax.devices()` order: on TPU
    that order follows the interconnect, so fsdp neighbours are physical neighbours)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices[: data * fsdp]).reshape(data, fsdp), AXES)


def param_spec(shape, fsdp: int, min_size: int = DEFAULT_MIN_SIZE) -> PartitionSpec:
    """The rule: split the largest dimension `fsdp` divides when the leaf has >= `min_size` elements."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return REPLICATED
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return PartitionSpec(*([None] * dim), FSDP)
    return REPLICATED


def state_shardings(tree, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE):
    """NamedSharding of every leaf of `tree` (arrays or ShapeDtypeStructs) by `param_spec`."""
    fsdp = mesh.shape[FSDP]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, REPLICATED)


def place(tree, shardings):
    """Host (numpy) tree -> global arrays, each device given only its shard (`make_array_from_callback`), so
    the whole model is never copied to every device and every process can place its own devices' shards."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x[index])), tree, shardings)


def place_batch(local, sharding: NamedSharding):
    """This process's part of the batch (leading dimension) -> the global batch over every process."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
