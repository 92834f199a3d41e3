"""SIGTERM (the Cloud TPU preemption notice) during `distgame train`: the run saves a
checkpoint at the current step and exits 0 saying how to resume; the re-run resumes and
ends with exactly the parameters and losses of an uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
from waiting import communicate, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU_BUDGET_S = 600.0
"""Per process: a runaway budget (a training run here takes ~5 CPU-seconds, measured); a hang or a slow machine is told
apart by tests/waiting.py, not by the wall clock."""
STEPS = 100  # long enough that the SIGTERM (sent after step 5) lands mid-run: steps take milliseconds each
ARGS = [
    "train",
    "--role",
    "proxy",
    "--config",
    "ci",
    f"proxy.train.steps={STEPS}",
    "proxy.train.log_every=1",
    "proxy.train.checkpoint_every=0",
    "sample.max_new_tokens=4",
    "task.n_test=8",
    "--no-progress",
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTGAME_")}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    return env


def _start(run_dir) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *ARGS[:5], f"run_dir={run_dir}", *ARGS[5:]],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, metrics: pathlib.Path, step: int) -> None:
    wait_until(lambda: metrics.exists() and sum(1 for _ in metrics.open()) >= step, proc, CPU_BUDGET_S)


def _losses(run_dir: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "proxy" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _final_params(run_dir: pathlib.Path) -> dict:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(run_dir / "proxy" / "checkpoints" / str(STEPS) / "state")["params"]


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _start(ref_dir)  # the uninterrupted run, alongside
    proc = _start(run_dir)
    try:
        _wait_for_step(proc, run_dir / "proxy" / "metrics.jsonl", 5)
        proc.send_signal(signal.SIGTERM)
        [(_, err)] = communicate([proc], CPU_BUDGET_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "preempted at step" in err and "re-run the same command to resume" in err, err
    saved = [int(p.name) for p in (run_dir / "proxy" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 5 <= saved[0] < STEPS, (saved, err)  # checkpoint_every=0: only the SIGTERM save
    assert f"preempted at step {saved[0]}/{STEPS}" in err
    assert not (run_dir / "proxy" / "summary.json").exists()

    again = _start(run_dir)
    [(_, err)] = communicate([again], CPU_BUDGET_S)
    assert again.returncode == 0, err
    [(_, err)] = communicate([ref], CPU_BUDGET_S)
    assert ref.returncode == 0, err

    # Every step logged exactly once across the two runs, with the same losses bit for bit.
    resumed, reference = _losses(run_dir), _losses(ref_dir)
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
    assert resumed == reference
    a, b = _final_params(run_dir), _final_params(ref_dir)
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b) > 0
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_resumable_solve_on_the_toy_game(tmp_path):
    """The solver driver itself (game state = student params, three optax states, γ, μ, iteration,
    streak; batched over two budgets): a stop after iteration 3 checkpoints and raises Preempted;
    resuming from the checkpoint ends bitwise where an uninterrupted solve ends."""
    import pytest

    from experiments import preemption
    from experiments.solver_run import SolverCheckpoint, resumable_solve
    from game import solver as sv
    from game import toy

    spec = toy.default_toy_spec()
    game, batches = toy.toy_game(spec), toy.toy_batches(spec)
    cfg = sv.SolverConfig(gamma_max=spec.gamma_max, patience=100, max_iters=8)

    def fresh():
        return sv.init_state(game, cfg, toy.toy_theta_init(spec), batches[2], delta=np.array([0.1, 0.3]))

    def batch_for(i, state, meta, previous):
        return batches

    ran = []

    def record(stop_after=None):
        def on_iteration(i, diag, meta):
            ran.append(i)
            meta.setdefault("gammas", []).append(diag["gamma"].tolist())
            if i + 1 == stop_after:
                preemption.request_stop()

        return on_iteration

    ref = resumable_solve(game, cfg, fresh(), batch_for, record())
    ref_state, ref_meta = ref.state, ref.meta
    with preemption.watch_sigterm():
        ckpt = SolverCheckpoint(tmp_path / "solve")
        with pytest.raises(preemption.Preempted, match="after iteration 3"):
            resumable_solve(game, cfg, fresh(), batch_for, record(stop_after=3), ckpt)
        ckpt.close()
    assert [p.name for p in (tmp_path / "solve").iterdir() if p.name.isdigit()] == ["3"]
    ckpt = SolverCheckpoint(tmp_path / "solve")
    ran.clear()
    res = resumable_solve(game, cfg, fresh(), batch_for, record(), ckpt)
    state, meta = res.state, res.meta
    ckpt.close()
    assert ran == [3, 4, 5, 6, 7]  # it resumed instead of starting over
    assert meta["iteration"] == ref_meta["iteration"] == 8 and meta["done"]
    assert meta["gammas"] == ref_meta["gammas"]  # 3 from the first run + 5 after the resume
    for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_outside_a_checkpointed_loop_still_terminates():
    """Only loops that can save (training, the solver) turn SIGTERM into a stop request;
    anywhere else (e.g. a protocol stage) the process ends at once, as it always did."""
    script = (
        "import os, signal\n"
        "from experiments import preemption\n"
        "with preemption.watch_sigterm():\n"
        "    with preemption.checkpointed():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        assert preemption._requested\n"
        "    print('survived inside', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('survived outside', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.stdout.splitlines() == ["survived inside"], result.stderr
    assert result.returncode == -signal.SIGTERM
