"""Where the params live for each multi-device path, decided once: `shard_params` for a `mesh=` call,
`replicate` for diffusers' `jit=True` (pmap) convention. Calls that find params already placed transfer nothing,
so the model crosses to the devices (and, on a multi-host mesh, through the host) once, not per call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import NamedSharding, PartitionSpec


def replicated_on(mesh) -> NamedSharding:
    """The sharding of params on `mesh`: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_on(mesh) -> NamedSharding:
    """The sharding of per-example arrays on `mesh`: split over its first axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def _arrays(tree):
    return jax.tree_util.tree_leaves(tree)


def is_placed(params, sharding) -> bool:
    """Every leaf is a `jax.Array` already laid out as `sharding`."""
    def placed(leaf):
        return isinstance(leaf, jax.Array) and (leaf.sharding == sharding or leaf.sharding.is_equivalent_to(sharding, leaf.ndim))

    return all(placed(leaf) for leaf in _arrays(params))


def shard_params(params, mesh):
    """`params` replicated over `mesh`; returned unchanged (no transfer) when they already are. On a mesh that
    spans processes the params go through the host (`jax.device_put` takes host data there, the same in every
    process), which is why a caller places them once and passes the result to every call."""
    sharding = replicated_on(mesh)
    if is_placed(params, sharding):
        return params
    if mesh.is_multi_process:
        params = jax.device_get(params)
    return jax.device_put(params, sharding)


def shard_batch(batch, mesh):
    """Per-example arrays split over the mesh's first axis (through the host on a mesh spanning processes)."""
    if mesh.is_multi_process:
        batch = jax.device_get(batch)
    return jax.device_put(batch, batch_on(mesh))


def gathered(result, mesh):
    """Outputs of a program on `mesh`, whole in every process (multi-host: they span other processes' devices)."""
    return process_allgather(result, tiled=True) if mesh.is_multi_process else result


def _local_mesh():
    return jax.sharding.Mesh(np.array(jax.local_devices()), ("devices",))  # pmap's device order


def _stack_copies(tree):
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[None], (jax.local_device_count(),) + x.shape), tree)


def _first_copy(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def replicate(params):
    """`params` with a leading axis of one copy per local device, one copy on each (diffusers' `jit=True`
    convention; the arrays `flax.jax_utils.replicate` makes). One transfer and one program for the whole tree:
    flax's stacks leaf by leaf, a small compile per leaf shape."""
    mesh = _local_mesh()
    copies = jax.device_put(params, replicated_on(mesh))
    return jax.jit(_stack_copies, out_shardings=NamedSharding(mesh, PartitionSpec("devices")))(copies)


def is_replicated(params) -> bool:
    """Params of the pmap convention: every leaf a `jax.Array` whose leading axis holds one copy per local
    device, one on each (as `replicate` lays them out)."""
    count = jax.local_device_count()
    leaves = _arrays(params)

    def per_device(leaf):
        return (isinstance(leaf, jax.Array) and leaf.ndim >= 1 and leaf.shape[0] == count
                and len(leaf.sharding.device_set) == count and leaf.sharding.shard_shape(leaf.shape)[0] == 1)

    return bool(leaves) and all(per_device(leaf) for leaf in leaves)


def unreplicated(params):
    """One copy of replicated params (the first device's), for the programs that run once, not per device."""
    if not is_replicated(params):
        raise ValueError("params: with jit=True pass params replicated over devices (pipeline.replicate(params) "
                         "or flax.jax_utils.replicate(params))")
    return jax.jit(_first_copy)(params)  # one program for the tree, not an op per leaf


def split_over_devices(batch, devices: int):
    """Host arrays with a leading device axis: pmap splits them over the devices itself."""
    return {k: np.asarray(v).reshape((devices, v.shape[0] // devices) + v.shape[1:]) for k, v in batch.items()}
