"""What a new user meets when something goes wrong: a diverging run, a one-seed result, an empty config
file, output redirected to a log file. Each is one clear line (exit 2) or a file a strict reader accepts."""

import ast
import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from experiments import io as rio
from experiments.progress import LineProgress, tqdm
from experiments.stats import mean_stderr

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("game", "models", "experiments", "launch")


def distgame(*args, **env):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as jq and JavaScript do."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _digest(directory: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode() + p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# A diverging run
# ---------------------------------------------------------------------------


def test_diverging_run_is_one_line_exit_2_and_keeps_earlier_checkpoints(tmp_path):
    common = [
        "train",
        "--role",
        "student",
        "--config",
        "ci",
        f"run_dir={tmp_path}",
        "student.train.checkpoint_every=5",
        "student.train.log_every=5",
        "--no-progress",
    ]
    first = distgame(*common)  # 10 steps at the config's learning rate: checkpoints 5 and 10
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "student" / "checkpoints"
    before = {name: _digest(ckpts / name) for name in ("5", "10")}

    # Resumed from step 10 with an absurd learning rate: the loss is NaN by the next check (step 15).
    result = distgame(*common, "student.train.steps=20", "student.train.lr=1e12")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert "student" in lines[0] and "step 15" in lines[0] and "loss became nan" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    # The checkpoints of the steps before the divergence are there and unchanged; none was written after it.
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["10", "5"]
    assert {name: _digest(ckpts / name) for name in ("5", "10")} == before


def test_a_non_finite_parameter_behind_a_finite_loss_is_not_checkpointed(tmp_path):
    """lr=1e39 is past float32's range: the first update at that rate makes the parameters NaN/inf, while the loss
    of that same step (computed before the update) is still finite, so the loss check passes and the checkpoint
    at that step is where it is caught: refused, in one line naming the role, the step and the parameter."""
    common = [
        "train",
        "--role",
        "student",
        "--config",
        "ci",
        f"run_dir={tmp_path}",
        "student.train.checkpoint_every=5",
        "student.train.log_every=5",
        "--no-progress",
    ]
    first = distgame(*common)  # checkpoints 5 and 10
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "student" / "checkpoints"
    before = {name: _digest(ckpts / name) for name in ("5", "10")}

    result = distgame(
        *common,
        "student.train.steps=12",
        "student.train.lr=1e39",
        "student.train.checkpoint_every=1",
        "student.train.log_every=1",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # The other stderr lines are numpy's "overflow encountered in cast" warnings about the lr itself.
    ours = [line for line in result.stderr.splitlines() if line.startswith("distgame")]
    assert len(ours) == 1 and ours[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert re.fullmatch(
        r"distgame train: diverged: student: params/\S+ holds NaN or inf at step 11; checkpoint 11 not "
        r"written \(checkpoints of earlier steps are kept\)",
        ours[0],
    ), ours[0]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["10", "5"]
    assert {name: _digest(ckpts / name) for name in ("5", "10")} == before


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_checkpointer_refuses_a_non_finite_state_and_keeps_the_last_one(tmp_path, where):
    import jax.numpy as jnp

    from models.checkpoint import Checkpointer, NonFiniteStateError

    def state(bad):
        return {
            "params": {"w": jnp.ones((3,), jnp.bfloat16), "x": jnp.array([1.0, bad if where == "params" else 2.0])},
            "opt_state": {"mu": jnp.array([bad if where == "opt_state" else 0.0, 0.0])},
            "step": jnp.int32(7),
        }

    ckpt = Checkpointer(tmp_path / "ckpt", keep=1, label="teacher")
    try:
        ckpt.save(1, state(1.0), {"step": 1})
        kept = _digest(tmp_path / "ckpt" / "1")
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(NonFiniteStateError) as e:
                ckpt.save(2, state(bad), {"step": 2})
            assert isinstance(e.value, FloatingPointError)
            path = "params/x" if where == "params" else "opt_state/mu"
            assert str(e.value) == f"teacher: {path} holds NaN or inf at step 2; checkpoint 2 not written"
        assert ckpt.latest_step() == 1 and _digest(tmp_path / "ckpt" / "1") == kept
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]
    finally:
        ckpt.close()
    unchecked = Checkpointer(tmp_path / "unchecked", keep=1, require_finite=False)
    try:
        unchecked.save(3, state(float("nan")), {"step": 3})
        assert unchecked.latest_step() == 3
    finally:
        unchecked.close()


def test_diverging_distillation_is_one_line_exit_2(tmp_path):
    result = distgame(
        "protocol",
        "--config",
        "ci",
        f"run_dir={tmp_path}",
        "protocol.defenses=[{name: standard}]",
        "protocol.distill.attacks=[]",
        "protocol.seeds=1",
        "protocol.distill.lr=1e12",
        "--no-progress",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(
        r"diverged: distill passive on standard: the distillation loss of seed 0 stopped being finite "
        r"at step \d+ of \d+; lower protocol.distill.lr",
        lines[0],
    ), lines
    assert (tmp_path / "student" / "checkpoints").is_dir()  # the models trained before it are kept


# ---------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------


def _one_seed_results() -> dict:
    from experiments.protocol import add_paired_deltas, headline

    def row(label, defense, teacher, passive):
        return {
            "label": label,
            "defense": defense,
            "strength": 0.0,
            "setting": {"name": defense},
            "teacher_accuracy": mean_stderr(teacher),
            "students": {"passive": mean_stderr(passive)},
            "relative_gain": float("nan"),
            "cost": {
                "forward_passes_per_token": 1,
                "flops_per_token": 1e6,
                "flops_ratio": 1.0,
                "poe_wallclock_bound": 1.5,
                "wallclock_ratio": 1.0,
            },
            "mean_trace_length": 30.0,
            "degeneracy_rate": 0.0,
        }

    rows = [row("standard", "standard", [0.9], [0.4]), row("poe γ=0.5", "poe", [0.85], [0.35])]
    results = {
        "config": "t",
        "world": None,
        "seeds": 1,
        "n_test": 8,
        "n_traces": 8,
        "distill_steps": 3,
        "temperature": 1.0,
        "rows": rows,
        "seconds": 1.0,
    }
    add_paired_deltas(rows)
    results["headline"] = headline(results)
    return results


def test_results_of_one_seed_are_strict_json_with_null_stderr(tmp_path):
    from experiments.protocol import results_markdown, write_results

    results = _one_seed_results()
    assert results["rows"][0]["teacher_accuracy"]["stderr"] != results["rows"][0]["teacher_accuracy"]["stderr"]  # NaN
    write_results(tmp_path, results)
    stored = strict_loads((tmp_path / "results.json").read_text())
    assert stored["rows"][0]["teacher_accuracy"] == {"mean": 0.9, "stderr": None, "values": [0.9]}
    assert stored["rows"][1]["relative_gain"] is None
    assert "nan" not in results_markdown(results).lower()  # the table leaves an undefined ± out


def test_every_json_writer_is_strict(tmp_path):
    record = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (2, "x"), "e": 0.5}
    expected = {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": 0.5}
    rio.save_json(tmp_path / "x.json", record)
    assert strict_loads((tmp_path / "x.json").read_text()) == expected
    with rio.JsonlLog(tmp_path / "log.jsonl") as log:
        log.write(record)
    assert strict_loads((tmp_path / "log.jsonl").read_text()) == expected
    assert strict_loads(rio.to_json(record)) == expected


def _json_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("dump", "dumps")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "json"
        ):
            yield node


HASH_ONLY = {("experiments/io.py", "fingerprint"), ("experiments/equilibrium.py", "checkpoint_dir")}
"""json.dumps calls whose text is hashed into a name, never written: they keep Python's defaults (changing them
would rename every stage file)."""


def test_no_json_is_written_outside_the_strict_writers():
    """Every json.dump(s) in the project's modules is strict (allow_nan=False, directly or via experiments.io.to_json)
    or only feeds a hash."""
    loose = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            owners = {
                id(call): fn.name
                for fn in ast.walk(tree)
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                for call in _json_calls(fn)
            }
            for call in _json_calls(tree):
                rel = str(path.relative_to(ROOT))
                strict = any(
                    k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in call.keywords
                )
                if not strict and (rel, owners.get(id(call))) not in HASH_ONLY:
                    loose.append(f"{rel}:{call.lineno}")
    assert not loose, f"json.dump(s) without allow_nan=False (use experiments.io.to_json / save_json): {loose}"


# ---------------------------------------------------------------------------
# An empty config file
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "\n\n"])
def test_empty_config_file_is_refused_in_one_line(tmp_path, capsys, text):
    from experiments.cli import main

    cfg = tmp_path / "mine.yaml"
    cfg.write_text(text)
    assert main(["config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"config file '{cfg}' is empty" in err[0], err


def test_a_config_file_with_one_setting_is_accepted(tmp_path):
    from experiments.config import CONFIG_DIR, load_config

    cfg = tmp_path / "mine.yaml"
    cfg.write_text((CONFIG_DIR / "ci.yaml").read_text() + "seed: 3\n")
    assert load_config(str(cfg)).seed == 3


# ---------------------------------------------------------------------------
# Progress in a log file
# ---------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def every_tenth(monkeypatch):
    """A line at every tenth, however fast the bar (by default at most one per MIN_INTERVAL_S)."""
    from experiments import progress

    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_file(every_tenth):
    from tqdm.auto import tqdm as terminal_tqdm

    bar = tqdm(total=5, file=_Terminal(), desc="x")
    assert isinstance(bar, terminal_tqdm)
    bar.close()
    log = io.StringIO()
    bar = tqdm(total=1000, desc="train teacher", file=log, leave=False)
    assert isinstance(bar, LineProgress)
    for step in range(1, 1001):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / step:.4f}")  # what the training loop does: a refresh per call
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" ")[2] for line in lines] == [f"{100 * k}/1000" for k in range(1, 11)]
    assert lines[0].startswith("train teacher: 100/1000 (10%)") and lines[-1].endswith("loss=0.0010")


def test_a_fast_bar_writes_only_its_last_line():
    log = io.StringIO()
    for _ in tqdm(range(1000), desc="distill", file=log):
        pass
    assert log.getvalue().splitlines() == ["distill: 1000/1000 (100%) 0s"]


def test_progress_lines_for_iteration_assignment_and_an_early_stop(every_tenth):
    log = io.StringIO()
    assert [x for x in tqdm(["a", "b", "c"], desc="defenses", file=log)] == ["a", "b", "c"]
    assert log.getvalue().splitlines() == [f"defenses: {k}/3 ({p}%) 0s" for k, p in ((1, 33), (2, 67), (3, 100))]
    log = io.StringIO()
    bar = tqdm(total=200, initial=100, desc="resumed", file=log)  # resumed half way: no line for the old steps
    bar.n = 130  # the equilibrium sets n, then the postfix
    bar.set_postfix(viol="1e-3")
    bar.n = 133
    bar.close()  # stopped early: one last line where it stopped
    assert [line.split(" ")[1] for line in log.getvalue().splitlines()] == ["130/200", "133/200"]
    disabled = io.StringIO()
    bar = tqdm(total=10, file=disabled, disable=True)
    bar.update(10)
    bar.close()
    assert disabled.getvalue() == ""


def test_train_with_stderr_in_a_file_logs_lines_not_carriage_returns(tmp_path):
    """`distgame train ... 2> log`: at most a line per tenth of the steps (here, a few seconds: the last one
    alone), no carriage-return redraws."""
    result = distgame("train", "--role", "proxy", "--config", "ci", f"run_dir={tmp_path}", "proxy.train.steps=40")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    bar_lines = [line for line in result.stderr.splitlines() if line.startswith("train proxy: ")]
    assert 1 <= len(bar_lines) <= 10 and bar_lines[-1].startswith("train proxy: 40/40 (100%)"), result.stderr
