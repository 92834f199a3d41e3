"""Device mesh `(data, fsdp, tensor)` and the logical-axis rule table.

Parameters name their axes logically ("vocab", "embed", "heads", ...); one rule
table maps each logical name to a mesh axis (or None = replicated). Batches are
split over ("data", "fsdp"). State is created already sharded: the model is
traced abstractly, shardings are derived from the rule table, and a jitted init
with `out_shardings` materialises each shard on its own device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 (= all remaining devices)."""

    data: int = dataclasses.field(
        default=-1, metadata={"help": "data-parallel axis size (batch split, params replicated)"}
    )
    fsdp: int = dataclasses.field(
        default=1, metadata={"help": "fully-sharded data-parallel axis (batch and params split)"}
    )
    tensor: int = dataclasses.field(default=1, metadata={"help": "tensor-parallel axis (heads / mlp / vocab split)"})

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(
                f"mesh: at most one axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}"
            )
        for name, size in zip(MESH_AXES, sizes):
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name}={size} must be a positive size or -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh: fixed axes multiply to {known}, which does not divide the {n_devices} devices")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(
                f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} "
                f"but there are {n_devices} devices"
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    # Process-major device order: process i's devices form the i-th block of the batch
    # axes, so its rows of a global batch are the contiguous `process_slice` (see below).
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    shape = cfg.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(axes: tuple[str | None, ...], rules: dict[str, str | None]) -> P:
    """PartitionSpec for one parameter's logical axes under the rule table."""
    mesh_axes = []
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"sharding rules: no rule for logical axis {name!r}")
        target = rules.get(name) if name is not None else None
        mesh_axes.append(None if target in mesh_axes else target)  # a mesh axis may split one dim only
    return P(*mesh_axes)


def param_shardings(axes_tree: Any, shapes_tree: Any, rules: dict[str, str | None], mesh: Mesh) -> Any:
    """NamedSharding per parameter; refuses dims that the mesh axis does not divide."""

    def one(path, axes, shape):
        spec = spec_for(axes, rules)
        for dim, axis in zip(shape.shape, spec):
            if axis is not None and dim % mesh.shape[axis]:
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ValueError(
                    f"sharding: parameter {where} dim {dim} is not divisible by mesh axis {axis!r} "
                    f"of size {mesh.shape[axis]}; change the rule table or the mesh"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def create_sharded(init_fn: Callable[[], Any], shardings: Any) -> Any:
    """Run `init_fn` under jit so every array is born on its shards (never whole on one device)."""
    return jax.jit(init_fn, out_shardings=shardings)()


def process_slice(global_batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous rows `[i*B/n, (i+1)*B/n)` of a global batch of B rows
    (i, n default to this process's index and the process count).

    The batch axes are laid out over devices in process order (jax.devices() lists
    process 0's devices first), so process i's devices hold exactly these rows and
    a 1-process run sees the same global batch as an n-process one.
    """
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch_size % n:
        raise ValueError(f"batch: global batch size {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays split over the batch axes, from this process's rows (`process_slice`).

    With one process the local batch is the whole batch. With n processes every
    process passes its own contiguous slice and
    `jax.make_array_from_process_local_data` assembles the global array (nothing is
    sent between hosts).
    """
    n = batch_divisor(mesh)
    out = {}
    for key, value in local_batch.items():
        rows = value.shape[0] * jax.process_count()
        if rows % n:
            raise ValueError(
                f"batch: {key} has batch size {rows}, not divisible by data*fsdp = {n}; "
                "change the batch size or the mesh"
            )
        sharding = batch_sharding(mesh, value.ndim)
        if jax.process_count() == 1:
            out[key] = jax.device_put(value, sharding)
        else:
            out[key] = jax.make_array_from_process_local_data(sharding, value, (rows,) + value.shape[1:])
    return out


def put_global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds whole (e.g. prompts built
    from a shared seed): each process places only the shards of its own devices."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(value: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array as numpy on every process."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
