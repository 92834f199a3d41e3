"""The game solver made to survive preemption: orbax checkpoints of the solver state
(student params, the three players' optimizer states, γ's parameter, μ, iteration count,
convergence streak) plus JSON metadata (trajectory, what the caller needs to rebuild its
current batch), saved when SIGTERM arrives and when the solve ends. The loop itself is
`game.solver.solve` (one driver); this module only adds the orbax checkpoint and the
SIGTERM hook.

The loop is deterministic given (state, iteration): the caller's batches may depend only
on the iteration and on what it keeps in `meta` (e.g. the γ of the current resampling
round; random keys are derived from the round index), so a resumed solve ends with the
same state as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Callable

from etils import epath

from experiments import preemption
from game import solver as sv
from models.checkpoint import Checkpointer, abstract_like


class SolverCheckpoint:
    """The latest solver state of one solve, in its own orbax directory."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = epath.Path(directory)  # local or gs://
        # A budget δ may be +inf (no constraint); the solver checks its own diagnostics (SolverDivergedError).
        self.ckpt = Checkpointer(self.directory, keep=1, require_finite=False)

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
    game: sv.Game,
    cfg: sv.SolverConfig,
    state: sv.SolverState,
    batch_for: Callable[[int, sv.SolverState, dict, Any], Any],
    on_iteration: Callable[[int, dict, dict], None],
    checkpoint: SolverCheckpoint | None = None,
    optimizers: sv.Optimizers | None = None,
    per_state_student_batch: bool = False,
) -> sv.SolveResult:
    """`game.solver.solve` with `checkpoint` and SIGTERM (experiments.preemption): on a stop
    request it checkpoints after the current iteration and raises Preempted; a re-run
    resumes (bitwise: the batches depend only on the iteration and meta)."""
    listen = preemption.checkpointed() if checkpoint is not None else contextlib.nullcontext()
    with listen:
        result = sv.solve(
            game,
            cfg,
            state,
            batch_for,
            callback=on_iteration,
            optimizers=optimizers,
            per_state_student_batch=per_state_student_batch,
            checkpoint=checkpoint,
            should_stop=preemption.stop_requested if checkpoint is not None else None,
        )
    if result.stopped:
        raise preemption.Preempted(
            f"solver preempted after iteration {result.iterations}; state saved in {checkpoint.directory}"
        )
    return result
