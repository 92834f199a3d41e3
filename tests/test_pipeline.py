"""The protocol and the equilibrium sweep end to end on the tiny config, in subprocesses
(as a user runs them), plus their bad-input errors and restart after a kill."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


def distgame(*args, timeout=900):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained(ci_models, tmp_path_factory):
    """The trained ci models (conftest.ci_models) in this module's run directory."""
    import shutil

    return shutil.copytree(ci_models, tmp_path_factory.mktemp("run") / "run")


def _snapshot(directory: pathlib.Path) -> dict:
    return {p.relative_to(directory): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def _assert_one_line_exit_2(capsys, command, run_dir, override, message):
    """The CLI's own entry point in this process (a config error is raised before jax is touched); the
    subprocess tests below check once per command that the process exits with that status."""
    from experiments.cli import main

    assert main([command, "--config", "ci", f"run_dir={run_dir}", override, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_protocol_end_to_end_and_resume(trained):
    result = distgame("protocol", "--config", "ci", f"run_dir={trained}", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    results = json.loads(pathlib.Path(summary["results"]).read_text())
    labels = [r["label"] for r in results["rows"]]
    assert labels == ["standard", "poe γ=0.5", "ads λ=0.5", "ads_fd λ=0.5", "strategic_poe γ=0.3, η=0.1"]
    for row in results["rows"]:
        assert len(row["teacher_accuracy"]["values"]) == 2  # two seeds
        assert {"passive", "adaptive(beta=2)", "soft_topk"} <= set(row["students"])
        assert ("poe_inversion" in row["students"]) == (row["defense"] == "poe")
        assert row["mean_trace_length"] > 0 and 0 <= row["degeneracy_rate"] <= 1
        assert row["cost"]["wallclock_ratio"] > 0
    by = {r["defense"]: r for r in results["rows"]}
    assert (
        by["standard"]["cost"]["forward_passes_per_token"] == 1 and by["poe"]["cost"]["forward_passes_per_token"] == 2
    )
    assert by["ads"]["cost"]["flops_ratio"] > by["poe"]["cost"]["flops_ratio"] > 1
    md = (trained / "RESULTS.md").read_text()
    assert "| poe γ=0.5 |" in md and "wall-clock ratio" in md
    assert (trained / "teacher_vs_student.png").stat().st_size > 10_000

    # Re-running reuses every stage: no trace, student or timing file is rewritten, and the wall-clock ratios
    # are the first run's (re-measured, they would drift with the machine's load).
    stages = {k: v for k, v in _snapshot(trained / "protocol").items()}
    assert len([p for p in stages if p.name.startswith("wallclock-")]) == 1
    again = distgame("protocol", "--config", "ci", f"run_dir={trained}")
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in _snapshot(trained / "protocol").items()} == stages
    rerun = json.loads((trained / "results.json").read_text())
    assert [r["cost"] for r in rerun["rows"]] == [r["cost"] for r in results["rows"]]


def test_protocol_restarts_where_it_was_killed(trained, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("protocol", "*.json", "*.md", "*.png", "*.csv"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    # Two settings are enough to be killed mid-way and resume: fewer programs to compile twice.
    shorter = ["protocol.defenses=[{name: standard}, {name: poe, strength: 0.5}]", "protocol.distill.attacks=[]"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.cli",
            "protocol",
            "--config",
            "ci",
            f"run_dir={run}",
            *shorter,
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((run / "protocol").glob("student-*.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _snapshot(run / "protocol")
    assert done, "the run was killed before finishing any stage"
    result = distgame("protocol", "--config", "ci", f"run_dir={run}", *shorter)
    assert result.returncode == 0, result.stderr
    after = _snapshot(run / "protocol")
    for path, mtime in done.items():
        if not path.name.startswith("."):
            assert after[path] == mtime, f"{path} was recomputed"
    assert (run / "results.json").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "protocol.defenses=[{name: poe, strength: 1.0}]",
            "protocol.defenses[0].strength=1.0 must be a PoE gamma in [0, 1)",
        ),
        (
            "protocol.defenses=[{name: ads, strength: -0.1}]",
            "protocol.defenses[0].strength=-0.1 must be an ADS lambda >= 0",
        ),
        ("protocol.defenses=[{name: rot13}]", "protocol.defenses[0].name='rot13' is not a defense"),
        ("protocol.defenses=[]", "protocol.defenses is empty"),
        ("protocol.distill.attacks=[steal]", "unknown attack 'steal'"),
    ],
)
def test_protocol_bad_input(trained, override, message, capsys):
    before = _snapshot(trained)
    _assert_one_line_exit_2(capsys, "protocol", trained, override, message)
    assert _snapshot(trained) == before


@pytest.mark.parametrize(
    "command, override", [("protocol", "protocol.defenses=[]"), ("equilibrium", "equilibrium.budgets=[-0.1]")]
)
def test_bad_input_exits_2_with_one_line_from_a_process(trained, command, override):
    result = distgame(command, "--config", "ci", f"run_dir={trained}", override)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_protocol_missing_checkpoint_is_one_line(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for step in (run / "proxy" / "checkpoints").iterdir():
        if step.is_dir():
            for f in step.rglob("*"):
                if f.is_file() and f.stat().st_size:
                    f.write_bytes(b"\0")
    result = distgame("protocol", "--config", "ci", f"run_dir={run}")
    assert result.returncode == 2 and "proxy/checkpoints" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_equilibrium_end_to_end(trained):
    result = distgame("equilibrium", "--config", "ci", f"run_dir={trained}", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    eq = json.loads(pathlib.Path(summary["equilibrium"]).read_text())
    assert len(eq["points"]) == 4 and len(eq["trajectories"]) == 4
    for p in eq["points"]:
        assert 0 <= p["gamma_star"] <= 0.9
        assert "teacher_accuracy" in p and "student_accuracy" in p
    names = sorted(pathlib.Path(p).name for p in summary["plots"])
    assert names == ["frontier.png", "gamma_star.png", "gap.png", "trajectories.png"]
    log = (trained / "equilibrium" / "solver_log.jsonl").read_text().splitlines()
    # one line per iteration, budget, start (multi-start: 3) and tilt
    assert len(log) == 3 * 2 * 3 * 2 and {"gamma", "gamma0", "mu", "violation", "J", "U"} <= set(json.loads(log[0]))
    assert {"interior_budgets_passive", "interior_budgets_adaptive", "monotone_passive", "check_delta_passive"} <= set(
        summary
    )


def test_equilibrium_frontier_end_to_end(trained, tmp_path):
    """method 'frontier': every γ* is the best grid point of its β's J curve within the budget's exact bound,
    the teacher's utility loss at γ* is within the budget, and the curve plot replaces the trajectories."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("equilibrium", "*.png", "*.csv"))
    result = distgame(
        "equilibrium",
        "--config",
        "ci",
        f"run_dir={run}",
        "equilibrium.method=frontier",
        "equilibrium.check_points=largest",  # the default's; 'all' is test_equilibrium_end_to_end's
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    eq = json.loads(pathlib.Path(summary["equilibrium"]).read_text())
    assert len(eq["points"]) == 4 and [c["beta"] for c in eq["curves"]] == [0.0, 2.0]
    for p in eq["points"]:
        curve = next(c for c in eq["curves"] if c["beta"] == p["beta"])
        feasible = [(m, g) for g, m in zip(curve["gamma"], curve["J_mean"]) if g <= p["gamma_bound"] + 1e-9]
        assert p["gamma_star"] == max(feasible)[1] and p["J"] == max(feasible)[0]
        assert eq["utility_ref"] - p["U"] <= p["delta"] + 1e-9 and p["violation"] <= 1e-9
        assert np.array(curve["J"]).shape == (2, len(curve["gamma"]))  # curve_seeds pools per strength
    names = sorted(pathlib.Path(p).name for p in summary["plots"])
    assert names == ["curve.png", "frontier.png", "gamma_star.png", "gap.png"]
    assert summary["check_within_budget"] == 1


def test_equilibrium_solver_never_calls_an_infeasible_iterate_an_equilibrium(trained, tmp_path):
    """One iteration from γ_0 = γ_max with a budget of 1e-6 nats/token ends far outside it: that budget's γ* is
    NaN (feasible false, the iterate kept as gamma_last) and the empirical check skips it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("equilibrium", "*.png", "*.csv"))
    result = distgame(
        "equilibrium",
        "--config",
        "ci",
        f"run_dir={run}",
        "equilibrium.budgets=[1e-6]",
        "equilibrium.betas=[0.0]",
        "equilibrium.multi_start=false",
        "equilibrium.solver.gamma_init=0.9",
        "equilibrium.solver.max_iters=1",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (p,) = json.loads(pathlib.Path(summary["equilibrium"]).read_text())["points"]
    assert not p["feasible"] and p["violation"] > 1e-4 and p["gamma_last"] > 0.5
    assert p["gamma_star"] is None and "student_accuracy" not in p  # NaN, written as null
    assert summary["interior_budgets_passive"] == 0 and "check_delta_passive" not in summary


@pytest.mark.parametrize(
    "override, message",
    [
        ("equilibrium.check_points=some", "equilibrium.check_points='some' must be 'all' or 'largest'"),
        ("equilibrium.method=newton", "equilibrium.method='newton' must be one of frontier, solver"),
        ("equilibrium.curve_gammas=[0.5, 0.2]", "equilibrium.curve_gammas=[0.5, 0.2] must be >= 2 increasing"),
        ("equilibrium.budgets=[0.1, 0.05]", "must be strictly increasing"),
        ("equilibrium.budgets=[-0.1]", "must be >= 0"),
        ("equilibrium.solver.gamma_max=1.2", "equilibrium.solver.gamma_max=1.2 must lie in (0, 1)"),
        ("equilibrium.solver.unroll_steps=0", "equilibrium.solver.unroll_steps=0 must be an integer >= 1"),
        ("equilibrium.solver.algorithm=newton", "equilibrium.solver.algorithm='newton' must be one of"),
    ],
)
def test_equilibrium_bad_input(trained, override, message, capsys):
    _assert_one_line_exit_2(capsys, "equilibrium", trained, override, message)


def test_equilibrium_nan_names_iteration_and_quantity(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("equilibrium"))
    result = distgame(
        "equilibrium",
        "--config",
        "ci",
        f"run_dir={run}",
        "equilibrium.solver.unroll_from=current",
        "equilibrium.solver.student_lr=1e30",
        "equilibrium.solver.student_optimizer=sgd",
        "equilibrium.betas=[0.0]",
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and "at iteration" in line[0] and ("NaN in" in line[0] or "non-finite value in" in line[0])
    assert (run / "equilibrium" / "solver_log.jsonl").read_text()  # the partial log is kept


def test_equilibrium_sigterm_resumes_to_the_same_equilibrium(trained, tmp_path):
    """SIGTERM mid-solve: the solver state is checkpointed and the run exits 0; the re-run
    resumes and ends at the same γ*, μ and trajectory as the uninterrupted solve of
    test_equilibrium_end_to_end (β=0 is solved independently of the other tilts)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("equilibrium", "*.png", "*.csv"))

    def cmd(d):
        return [
            "equilibrium",
            "--config",
            "ci",
            f"run_dir={d}",
            "equilibrium.betas=[0.0]",
            "equilibrium.empirical_check=false",
        ]

    reference = trained / "equilibrium" / "equilibrium.json"
    if not reference.exists():  # this test run alone: solve uninterrupted first
        reference = tmp_path / "ref" / "equilibrium" / "equilibrium.json"
        shutil.copytree(run, tmp_path / "ref")
        assert distgame(*cmd(tmp_path / "ref")).returncode == 0
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *cmd(run), "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run / "equilibrium" / "solver_log.jsonl"
    try:
        deadline = time.monotonic() + 600
        while not log.exists():  # opened just before the first iteration
            assert proc.poll() is None and time.monotonic() < deadline, "the solve ended or stalled before starting"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the stop is checked after each iteration: it lands after the first
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "solver preempted after iteration 1;" in err and "re-run the same command" in err, (
        err
    )
    assert not (run / "equilibrium" / "equilibrium.json").exists()
    assert len(list((run / "equilibrium" / "checkpoints").glob("beta0_*/1"))) == 1, err

    again = distgame(*cmd(run))
    assert again.returncode == 0, again.stderr
    a = json.loads((run / "equilibrium" / "equilibrium.json").read_text())
    b = json.loads(reference.read_text())
    ref_points = [p for p in b["points"] if p["beta"] == 0.0]
    ref_traj = [t for t in b["trajectories"] if t["beta"] == 0.0]
    assert len(a["points"]) == len(ref_points) == 2
    for pa, pb, ta, tb in zip(a["points"], ref_points, a["trajectories"], ref_traj):
        for key in ("gamma_star", "mu", "J", "U", "violation", "iterations"):
            assert pa[key] == pytest.approx(pb[key], abs=1e-6), key
        assert ta["gamma"] == pytest.approx(tb["gamma"], abs=1e-6) and ta["mu"] == pytest.approx(tb["mu"], abs=1e-6)
    assert (
        len(log.read_text().splitlines()) == 3 * 2 * 3
    )  # every iteration (× budget × start) logged once across the two runs
