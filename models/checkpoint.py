"""Orbax checkpoints of a train state (params, optimizer state, step) plus JSON metadata.

Saves are atomic (orbax writes to a temporary directory and renames), so a killed
run never leaves a half-written latest checkpoint, and refuse a state holding a NaN or
±inf (one jitted reduction over the tree first), so a diverged run never replaces good
checkpoints with a poisoned one. Restores take an abstract target carrying shardings,
so every array comes back directly onto its shards.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing or unreadable; the message names the path."""


class NonFiniteStateError(FloatingPointError):
    """A state to be saved holds a NaN or ±inf; the message names the label, the step and the first such leaf."""


@functools.lru_cache(maxsize=None)
def _finite_flags(out_sharding):
    """jit of leaves -> bool [n_leaves] (leaf i is all-finite), returned with `out_sharding` (None: default)."""
    return jax.jit(lambda leaves: jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]), out_shardings=out_sharding)


def first_nonfinite(tree: Any) -> str | None:
    """Path ('params/…') of the first floating-point leaf of `tree` holding a NaN or ±inf, else None.

    One jitted reduction over every leaf; on a mesh the flags come back replicated, so every process of a
    multi-process run reaches the same answer (and raises together)."""
    flat = [
        (path, x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not flat:
        return None
    leaves = [x for _, x in flat]
    sharding = getattr(leaves[0], "sharding", None)
    out_sharding = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    flags = np.asarray(_finite_flags(out_sharding)(leaves))
    if flags.all():
        return None
    return jax.tree_util.keystr(flat[int(np.argmin(flags))][0], simple=True, separator="/")


class Checkpointer:
    """`label` names the saved thing in errors (e.g. the role; default: the directory). `require_finite`
    (default on): `save` raises NonFiniteStateError instead of writing a state that holds a NaN or ±inf."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        keep: int = 2,
        create: bool = True,
        label: str | None = None,
        require_finite: bool = True,
    ):
        # epath keeps gs://BUCKET/... intact (pathlib would fold it into gs:/BUCKET); local paths are made absolute.
        self.directory = (
            epath.Path(directory) if "://" in os.fspath(directory) else epath.Path(os.path.abspath(directory))
        )
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {str(self.directory)!r} does not exist; train the model first")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.label = label or str(self.directory)
        self.require_finite = require_finite

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write `state` as checkpoint `step` (earlier ones beyond `keep` are pruned); nothing is written,
        nothing pruned, when `require_finite` and the state holds a NaN or ±inf."""
        bad = first_nonfinite(state) if self.require_finite else None
        if bad is not None:
            raise NonFiniteStateError(
                f"{self.label}: {bad} holds NaN or inf at step {step}; checkpoint {step} not written"
            )
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {str(self.directory)!r}; train the model first")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint {str(self.directory / str(step))!r} is unreadable or does not match the model "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete it or use a matching config"
            ) from None
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
