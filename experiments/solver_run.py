"""A game-solver loop that survives preemption: orbax checkpoints of the solver state
(student params, the three players' optimizer states, γ's parameter, μ, iteration count,
convergence streak) plus JSON metadata (trajectory, what the caller needs to rebuild its
current batch), saved when SIGTERM arrives and when the solve ends.

The loop is deterministic given (state, iteration): the caller's batches may depend only
on the iteration and on what it keeps in `meta` (e.g. the γ of the current resampling
round; random keys are derived from the round index), so a resumed solve ends with the
same state as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Callable

import jax
import numpy as np

from experiments import preemption
from game import solver as sv
from models.checkpoint import Checkpointer, abstract_like


class SolverCheckpoint:
    """The latest solver state of one solve, in its own orbax directory."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.ckpt = Checkpointer(self.directory, keep=1)

    def restore(self, template: sv.SolverState) -> tuple[sv.SolverState, dict] | None:
        """(state, meta) of the latest save, placed like `template`; None if nothing was saved."""
        if self.ckpt.latest_step() is None:
            return None
        return self.ckpt.restore(abstract_like(template))

    def save(self, state: sv.SolverState, meta: dict) -> None:
        self.ckpt.save(int(meta["iteration"]), state, meta)

    def close(self) -> None:
        self.ckpt.close()


def resumable_solve(
    step: Callable,
    state: sv.SolverState,
    max_iters: int,
    batch_for: Callable[[int, sv.SolverState, dict, Any], Any],
    on_iteration: Callable[[int, dict, dict], None],
    checkpoint: SolverCheckpoint | None = None,
) -> tuple[sv.SolverState, dict]:
    """Run `step(state, *batches) -> (state, diagnostics)` until every budget converged or
    max_iters, resuming from `checkpoint` if it holds a save. Returns (state, meta) with
    meta["iteration"], meta["converged"], meta["done"], meta["diag"] (last diagnostics).

    - `batch_for(i, state, meta, previous)` returns the batches of iteration i (it may reuse
      `previous`, which is None right after a start or a resume, and store in `meta` what it
      needs to rebuild them);
    - `on_iteration(i, diag, meta)` records diagnostics (numpy) after each accepted iteration;
    - SIGTERM (experiments.preemption): checkpoint after the current iteration, raise Preempted.
    Raises SolverDivergedError on a non-finite diagnostic (the last good state is not saved).
    """
    meta: dict = {"iteration": 0, "done": False, "converged": False, "diag": {}}
    if checkpoint is not None and (restored := checkpoint.restore(state)) is not None:
        state, meta = restored
    already_done, batches = meta["done"], None
    listen = preemption.checkpointed() if checkpoint is not None else contextlib.nullcontext()
    with listen:
        while not meta["done"] and int(meta["iteration"]) < max_iters:
            i = int(meta["iteration"])
            batches = batch_for(i, state, meta, batches)
            new_state, diag_dev = step(state, *batches)
            diag = {k: np.asarray(v) for k, v in jax.device_get(diag_dev).items()}
            bad = sv.first_nonfinite(diag)
            if bad is not None:
                raise sv.SolverDivergedError(i, bad, diag[bad])
            state = new_state
            meta["iteration"] = i + 1
            meta["diag"] = {k: v.tolist() for k, v in diag.items()}
            on_iteration(i, diag, meta)
            meta["converged"] = bool(np.all(diag["converged"]))
            meta["done"] = meta["converged"] or i + 1 >= max_iters
            if not meta["done"] and checkpoint is not None and preemption.stop_requested():
                checkpoint.save(state, meta)
                raise preemption.Preempted(f"solver preempted after iteration {i + 1}; state saved in {checkpoint.directory}")
    meta["done"] = True
    if checkpoint is not None and not already_done:
        checkpoint.save(state, meta)  # the finished solve: a re-run reuses it instead of solving again
    return state, meta
