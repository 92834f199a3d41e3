"""Orbax checkpoints of a train state (params, optimizer state, step) plus JSON metadata.

Saves are atomic (orbax writes to a temporary directory and renames), so a killed
run never leaves a half-written latest checkpoint. Restores take an abstract target
carrying shardings, so every array comes back directly onto its shards.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing or unreadable; the message names the path."""


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int = 2, create: bool = True):
        # epath keeps gs://BUCKET/... intact (pathlib would fold it into gs:/BUCKET); local paths are made absolute.
        self.directory = epath.Path(directory) if "://" in os.fspath(directory) else epath.Path(os.path.abspath(directory))
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {str(self.directory)!r} does not exist; train the model first")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
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
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
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
