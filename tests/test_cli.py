"""`distgame` end to end on the tiny config: train, resume, JSON summary, bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.config import ConfigError, describe, load_config


def distgame(*args, env_devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={env_devices}")
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_train_resume_and_json(tmp_path):
    run = f"run_dir={tmp_path}"
    first = distgame("train", "--role", "teacher", "--config", "ci", run, "--json", "--no-progress")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["role"] == "teacher" and summary["steps"] == 20
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    ckpt = pathlib.Path(summary["checkpoint"])
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["10", "20"]
    lines = (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20

    # Same command with more steps resumes from step 20 instead of starting over.
    more = distgame(
        "train", "--role", "teacher", "--config", "ci", run, "teacher.train.steps=30", "--json", "--no-progress"
    )
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout.strip().splitlines()[-1])["steps"] == 30
    steps = [json.loads(line)["step"] for line in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [25, 30] and 5 not in steps[len(lines) :]


def test_resume_continues_the_same_run(tmp_path):
    """Train 20 steps at once vs 10 + resume 10: the final checkpoints hold the same parameters."""
    import numpy as np
    import orbax.checkpoint as ocp

    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        distgame(
            "train", "--role", "proxy", "--config", "ci", f"run_dir={a}", "proxy.train.steps=20", "--no-progress"
        ).returncode
        == 0
    )
    assert (
        distgame(
            "train",
            "--role",
            "proxy",
            "--config",
            "ci",
            f"run_dir={b}",
            "proxy.train.steps=20",
            "proxy.train.checkpoint_every=10",
            "--no-progress",
        ).returncode
        == 0
    )
    # Remove b's final checkpoint so the re-run restarts from step 10.
    import shutil

    shutil.rmtree(b / "proxy" / "checkpoints" / "20")
    assert (
        distgame(
            "train",
            "--role",
            "proxy",
            "--config",
            "ci",
            f"run_dir={b}",
            "proxy.train.steps=20",
            "proxy.train.checkpoint_every=10",
            "--no-progress",
        ).returncode
        == 0
    )

    def load(d):
        return ocp.StandardCheckpointer().restore(d / "proxy" / "checkpoints" / "20" / "state")["params"]

    pa, pb = load(a), load(b)
    np.testing.assert_allclose(pa["embed_vd"], pb["embed_vd"], atol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "teacher.model.d_modle=64",
            "unknown config key 'teacher.model.d_modle' (did you mean 'teacher.model.d_model'?)",
        ),
        ("teacher.train.steps=ten", "teacher.train.steps='ten' must be of type int"),
        ("mesh.data=3", "mesh: data*fsdp*tensor = 3*1*1 = 3 but there are 1 devices"),
        ("teacher.train.batch_size=7", None),
        ("sample.top_p=1.5", "sample.top_p=1.5 must be in (0, 1]"),
        ("teacher.model.n_kv_heads=3", "teacher.model.n_kv_heads=3 must divide teacher.model.n_heads=4"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    env_devices = 2 if "batch_size" in override else 1
    if "batch_size" in override:
        message = "teacher.train.batch_size=7 is not divisible by mesh data*fsdp = 2"
    result = distgame(
        "train", "--role", "teacher", "--config", "ci", f"run_dir={tmp_path}", override, env_devices=env_devices
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "teacher").exists()  # nothing written


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path):
    run = f"run_dir={tmp_path}"
    assert distgame("train", "--role", "student", "--config", "ci", run, "--no-progress").returncode == 0
    state_dir = tmp_path / "student" / "checkpoints" / "10" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    result = distgame("train", "--role", "student", "--config", "ci", run, "student.train.steps=12")
    assert result.returncode == 2
    assert "checkpoints/10" in result.stderr and "unreadable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    assert before == after


def test_missing_config_and_unknown_role():
    result = distgame("train", "--role", "teacher", "--config", "nope")
    assert result.returncode == 2 and "unknown config 'nope'" in result.stderr
    result = distgame("train", "--role", "attacker", "--config", "ci")
    assert result.returncode != 0 and "invalid choice: 'attacker'" in result.stderr


def test_config_documents_itself():
    text = describe(load_config("default"))
    assert "d_model: 128  # width of the residual stream" in text
    assert "batch_size" in text and "#" in text.splitlines()[0]


def test_override_types_and_nesting():
    cfg = load_config("ci", ["teacher.train.lr=1e-3", "sample.top_p=0.5", "rules.mlp=null"])
    assert cfg.teacher.train.lr == 1e-3 and cfg.sample.top_p == 0.5 and cfg.rules["mlp"] is None
    with pytest.raises(ConfigError, match="rules.mlp='gpu' must be one of data, fsdp, tensor or null"):
        load_config("ci", ["rules.mlp=gpu"])
    with pytest.raises(ConfigError, match="override 'teacher' must look like key=value"):
        load_config("ci", ["teacher"])


def test_every_builtin_config_loads():
    from experiments.config import CONFIG_DIR

    for path in CONFIG_DIR.glob("*.yaml"):
        load_config(path.stem)


def test_options_and_overrides_in_any_order():
    from experiments.cli_args import parse_args

    args = parse_args(["protocol", "a.b=1", "--no-progress", "c=2", "--config", "ci", "a.b=3"])
    assert args.overrides == ["a.b=1", "c=2", "a.b=3"] and args.no_progress and args.config == "ci"
    result = distgame("config", "--config", "ci", "seed=3", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
