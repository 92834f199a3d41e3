"""The Cloud TPU launcher: the gcloud commands it prints and runs, quoting, and bad input.

No TPU and no network: a stand-in `gcloud` on PATH records every call and plays
the workers by running each `--command` script with real bash in a per-worker
home directory, where a stand-in `distgame` records the arguments it received.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from experiments.config import CONFIG_DIR, load_config
from launch import gcloud
from launch.accelerators import ACCELERATORS, LaunchError, by_topology, check_mesh_fits, lookup
from launch.tpu import main

REPO = pathlib.Path(__file__).resolve().parents[1]
V5E = ["--name", "my-run", "--zone", "us-west4-a", "--project", "my-proj"]
V4 = ["--name", "pod-run", "--zone", "us-central2-b", "--project", "my-proj"]


def with_dry_run(args) -> list[str]:
    split = args.index("--") if "--" in args else len(args)
    return [*args[:split], "--dry-run", *args[split:]]


def dry(capsys, *args) -> list[str]:
    assert main(with_dry_run(list(args))) == 0
    out = capsys.readouterr().out
    return out.strip().splitlines()


def remote_script(line: str) -> str:
    argv = shlex.split(line)
    assert argv[-1].startswith("--command=")
    return argv[-1].removeprefix("--command=")


def distgame_argv(run_line: str) -> tuple[dict, list[str]]:
    """Undo both quoting levels of the run step: local line -> worker script -> `bash -c` program."""
    words = shlex.split(remote_script(run_line))
    inner = words[words.index("-c") + 1]
    program = shlex.split(inner.split("; echo $?")[0])
    assert program[0] == "env"
    exe = next(i for i, w in enumerate(program) if w.endswith("/bin/distgame"))
    env = dict(w.split("=", 1) for w in program[1:exe])
    return env, program[exe + 1 :]


# -- the accelerator table -----------------------------------------------------


def test_table_entries():
    v5e8, v432, v5p64 = lookup("v5litepod-8"), lookup("v4-32"), lookup("v5p-64")
    assert (v5e8.hosts, v5e8.chips_per_host, v5e8.topology, v5e8.runtime_version) == (
        1,
        8,
        "v5e:2x4",
        "v2-alpha-tpuv5-lite",
    )
    assert (v432.hosts, v432.chips_per_host, v432.topology, v432.runtime_version) == (
        4,
        4,
        "v4:2x2x4",
        "tpu-ubuntu2204-base",
    )
    assert (v5p64.hosts, v5p64.chips, v5p64.topology, v5p64.runtime_version) == (8, 32, "v5:2x4x4", "v2-alpha-tpuv5")
    assert lookup("v5e-8") is v5e8 and by_topology("v5e:2x4") is v5e8 and by_topology("v4-32") is v432
    for s in ACCELERATORS.values():  # names count chips (v5e, v6e) or TensorCores = 2 per chip (v4, v5p)
        cores = int(s.accelerator_type.rsplit("-", 1)[1])
        assert s.chips == (cores // 2 if s.generation in ("v4", "v5p") else cores), s
        assert s.chips == eval("*".join(s.topology.split(":")[1].split("x"))), s


def test_unknown_accelerator_and_mesh_that_does_not_fit():
    with pytest.raises(LaunchError, match=r"unknown accelerator type 'v5litepod-9'.*did you mean 'v5litepod-8'"):
        lookup("v5litepod-9")
    with pytest.raises(LaunchError, match="unknown TPU topology 'v5e:3x3'"):
        by_topology("v5e:3x3")
    mesh = load_config("tpu_v5e8").mesh
    assert check_mesh_fits(mesh, lookup("v5litepod-8")) == (2, 2, 2)
    with pytest.raises(LaunchError, match=r"does not fit v4-32 \(16 chips = 4 hosts x 4\)"):
        check_mesh_fits(mesh, lookup("v4-32"))


# -- dry runs ------------------------------------------------------------------


def test_dry_run_single_host_vm(capsys):
    lines = dry(capsys, "job", *V5E, "--accelerator", "v5litepod-8", "--", "protocol", "--config", "tpu_v5e8")
    flags = "--zone=us-west4-a --project=my-proj"
    archive = os.path.join(__import__("tempfile").gettempdir(), "distgame-my-run.tar.gz")
    assert (
        lines[0]
        == f"gcloud compute tpus tpu-vm create my-run {flags} --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"
    )
    assert lines[1] == f"git -C {shlex.quote(str(REPO))} archive --format=tar.gz --output={shlex.quote(archive)} HEAD"
    assert (
        lines[2] == f"gcloud compute tpus tpu-vm scp {shlex.quote(archive)} my-run:distgame.tar.gz --worker=all {flags}"
    )
    install, run, logs = lines[3:6]
    for line in (install, run):
        assert line.startswith(f"gcloud compute tpus tpu-vm ssh my-run --worker=all {flags} ")
    assert logs.startswith(f"gcloud compute tpus tpu-vm ssh my-run --worker=0 {flags} ")
    assert "tar -xzf distgame.tar.gz -C distgame" in remote_script(install)
    assert "pip install --quiet --python ../distgame-venv/bin/python -e '.[tpu]'" in remote_script(install)
    env, args = distgame_argv(run)
    assert env == {"PYTHONUNBUFFERED": "1"} and args == ["protocol", "--config", "tpu_v5e8", "--no-progress"]
    assert "tail -n +1 -F" in remote_script(logs) and "logs/protocol.log" in remote_script(logs)
    assert lines[6:] == [
        "mkdir -p runs",
        f"gcloud compute tpus tpu-vm scp --recurse my-run:distgame/runs/tpu_v5e8 runs --worker=0 {flags}",
    ]
    assert not any("delete" in line for line in lines)  # only with --delete


def test_dry_run_multi_host_queued_spot_delete(capsys):
    lines = dry(
        capsys,
        "job",
        *V4,
        "--accelerator",
        "v4-32",
        "--queued",
        "--spot",
        "--delete",
        "--job",
        "eq",
        "--git-url",
        "https://example.org/a b.git",
        "--git-ref",
        "v1.0",
        "--",
        "equilibrium",
        "--config",
        "tpu_v4_32",
        "run_dir=gs://bucket/runs/v4",
    )
    flags = "--zone=us-central2-b --project=my-proj"
    assert lines[0] == (
        f"gcloud compute tpus queued-resources create pod-run {flags} --accelerator-type=v4-32 "
        "--runtime-version=tpu-ubuntu2204-base --node-id=pod-run --spot"
    )
    assert lines[1] == f"gcloud compute tpus queued-resources describe pod-run {flags} '--format=value(state.state)'"
    assert not any(line.startswith("git ") or " scp " in line and "distgame.tar.gz" in line for line in lines)
    install = remote_script(lines[2])
    assert (
        "git clone --quiet -- 'https://example.org/a b.git' distgame && git -C distgame checkout --quiet v1.0"
        in install
    )
    assert [shlex.split(line)[6] for line in lines[2:5]] == ["--worker=all", "--worker=all", "--worker=0"]
    assert "logs/eq.log" in remote_script(lines[3]) and "logs/eq.pid" in remote_script(lines[4])
    assert lines[5:] == [
        "mkdir -p runs",
        "gcloud storage cp --recursive gs://bucket/runs/v4 runs",
        f"gcloud compute tpus queued-resources delete pod-run {flags} --force --quiet",
    ]


def test_dry_run_reserved_and_single_actions(capsys):
    assert dry(
        capsys, "create", *V5E, "--accelerator", "v5e-8", "--reserved", "--runtime-version", "v2-alpha-tpuv5-lite"
    )[0].endswith("--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --reserved")
    assert dry(capsys, "delete", *V5E) == [
        "gcloud compute tpus tpu-vm delete my-run --zone=us-west4-a --project=my-proj --quiet"
    ]
    logs = dry(capsys, "logs", "--name", "my-run", "--zone", "us-west4-a", "--job", "train")
    assert len(logs) == 1 and logs[0].startswith(
        "gcloud compute tpus tpu-vm ssh my-run --worker=0 --zone=us-west4-a '--command="
    )


def test_quoting_round_trips_hostile_values(capsys):
    hostile = [
        "name=x; rm -rf /",
        "run_dir=$(touch /tmp/pwned)",
        "protocol.distill.betas=[1.0, 2.0]",
        "teacher.train.lr=1e-3",
    ]
    lines = dry(
        capsys,
        "run",
        *V5E,
        "--accelerator",
        "v5litepod-8",
        "--env",
        "X=`id` $HOME 'q' \"d\"",
        "--",
        "protocol",
        "--config",
        "tpu_v5e8",
        *hostile,
    )
    assert len(lines) == 1
    env, args = distgame_argv(lines[0])
    assert env == {"PYTHONUNBUFFERED": "1", "X": "`id` $HOME 'q' \"d\""}
    assert args == ["protocol", "--config", "tpu_v5e8", *hostile, "--no-progress"]


@pytest.mark.parametrize("bad", ["x; rm -rf /", "$(touch /tmp/pwned)", "My-Run", "a" * 64])
def test_hostile_names_are_rejected(capsys, bad):
    assert main(["create", "--name", bad, "--zone", "us-west4-a", "--accelerator", "v5litepod-8", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "--name" in err and repr(bad) in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", *V5E, "--accelerator", "v9-8"], "unknown accelerator type 'v9-8'"),
        (["job", *V4, "--accelerator", "v4-32", "--", "protocol", "--config", "tpu_v5e8"], "does not fit v4-32"),
        (
            [
                "run",
                *V4,
                "--accelerator",
                "v4-32",
                "--",
                "run",
                "--config",
                "tpu_v4_32",
                "teacher.train.batch_size=1020",
            ],
            "teacher.train.batch_size=1020 is not divisible by data*fsdp = 8",
        ),
        (["run", *V5E, "--accelerator", "v5litepod-8"], "give the distgame command after '--'"),
        (["run", *V5E, "--accelerator", "v5litepod-8", "--", "nosuch"], "invalid choice: 'nosuch'"),
        (
            ["run", *V5E, "--accelerator", "v5litepod-8", "--", "protocol", "--config", "nosuch"],
            "unknown config 'nosuch'",
        ),
        (
            ["run", *V5E, "--accelerator", "v5litepod-8", "--env", "NOVALUE", "--", "run", "--config", "tpu_v5e8"],
            "KEY=VALUE",
        ),
        (
            ["run", *V5E, "--accelerator", "v5litepod-8", "--env", "A B=1", "--", "run", "--config", "tpu_v5e8"],
            "--env name",
        ),
        (["install", *V5E, "--git-url=--upload-pack=touch /tmp/pwned"], "--git-url"),
        (["create", "--name", "a", "--zone", "us west", "--accelerator", "v4-8"], "--zone"),
        (
            ["fetch", *V5E, "--", "run", "--config", "tpu_v5e8", "run_dir=$(touch /tmp/pwned)"],
            "fetch needs a plain path",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, message):
    assert main(with_dry_run(args)) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("entry", [["-m", "launch.tpu"], ["-m", "experiments.cli", "launch"]])
def test_cli_entry_points(entry):
    bad = subprocess.run(
        [sys.executable, *entry, "create", "--name", "x", "--zone", "us-west4-a", "--accelerator", "v9-8"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    ok = subprocess.run(
        [sys.executable, *entry, "delete", "--name", "x", "--zone", "us-west4-a", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert ok.returncode == 0 and ok.stdout == "gcloud compute tpus tpu-vm delete x --zone=us-west4-a --quiet\n"


# -- real runs against a stand-in gcloud ---------------------------------------

FAKE_GCLOUD = """\
import json, os, pathlib, shutil, subprocess, sys
argv, root = sys.argv[1:], pathlib.Path(os.environ["FAKE_TPU_ROOT"])
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\\n")
worker = next((a.split("=", 1)[1] for a in argv if a.startswith("--worker=")), "0")
homes = [root / f"worker{i}" for i in (range(int(os.environ["FAKE_TPU_WORKERS"])) if worker == "all" else [int(worker)])]
verb = argv[:4]
if verb == ["compute", "tpus", "queued-resources", "describe"]:
    print("ACTIVE")
elif verb == ["compute", "tpus", "tpu-vm", "ssh"]:  # what ssh does: the login shell runs the script
    script = next(a for a in argv if a.startswith("--command=")).removeprefix("--command=")
    codes = [subprocess.run(["bash", "-c", script], cwd=h, env={**os.environ, "HOME": str(h)}).returncode for h in homes]
    sys.exit(max(codes))
elif verb == ["compute", "tpus", "tpu-vm", "scp"]:
    src, dst = [a for a in argv[4:] if not a.startswith("--")]
    for h in homes:
        if ":" in dst:
            shutil.copy(src, h / dst.split(":", 1)[1])
        else:
            remote = pathlib.Path(src.split(":", 1)[1])
            shutil.copytree(h / remote, pathlib.Path(dst) / remote.name, dirs_exist_ok=True)
"""

FAKE_DISTGAME = """\
#!/bin/bash
# stands in for the installed distgame on a worker (run from ~/distgame)
printf '%s\\n' "$@" > args.txt
printf '%s' "$X" > env_x.txt
echo "hello from $HOME"
sleep 1
mkdir -p runs/fake && echo '{"ok": true}' > runs/fake/results.json
echo "job done"
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture
def fake_tpu(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    (bin_dir / "gcloud").chmod(0o755)
    for i in range(4):
        venv_bin = tmp_path / f"worker{i}" / "distgame-venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "distgame").write_text(FAKE_DISTGAME)
        (venv_bin / "distgame").chmod(0o755)
        (tmp_path / f"worker{i}" / "distgame").mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TPU_ROOT", str(tmp_path))
    monkeypatch.setenv("FAKE_TPU_WORKERS", "4")
    return tmp_path


def test_real_run_matches_dry_run_and_executes_nothing_injected(fake_tpu, capfd):
    pwned = fake_tpu / "pwned"
    hostile_override = f"name=x; rm -rf {fake_tpu}/worker0 $(touch {pwned}1)"
    actions = [
        ["create", *V4, "--accelerator", "v4-32", "--queued", "--spot"],
        [
            "run",
            *V4,
            "--accelerator",
            "v4-32",
            "--env",
            f"X=$(touch {pwned}2)",
            "--",
            "protocol",
            "--config",
            "tpu_v4_32",
            "run_dir=runs/fake",
            hostile_override,
        ],
        ["logs", *V4, "--job", "protocol"],
        ["fetch", *V4, "--to", str(fake_tpu / "local"), "--", "protocol", "--config", "tpu_v4_32", "run_dir=runs/fake"],
        ["delete", *V4, "--queued"],
    ]
    expected = []
    for args in actions:
        assert main(with_dry_run(args)) == 0
        expected += [shlex.split(line) for line in capfd.readouterr().out.strip().splitlines()]
    for args in actions:
        assert main(args) == 0, args
    out = capfd.readouterr().out

    calls = [json.loads(line) for line in (fake_tpu / "calls.jsonl").read_text().splitlines()]
    assert [["gcloud", *c] for c in calls] == [e for e in expected if e[0] == "gcloud"]
    assert not list(fake_tpu.glob("pwned*")), "a quoted value was executed"
    for i in range(4):  # every worker ran the job with the literal arguments and environment
        home = fake_tpu / f"worker{i}" / "distgame"
        assert (home / "args.txt").read_text().splitlines() == [
            "protocol",
            "--config",
            "tpu_v4_32",
            "run_dir=runs/fake",
            hostile_override,
            "--no-progress",
        ]
        assert (home / "env_x.txt").read_text() == f"$(touch {pwned}2)"
        assert (home / "logs" / "protocol.exit").read_text().strip() == "0"
    # logs streamed worker 0's log only, to the end; fetch copied worker 0's run directory
    assert f"hello from {fake_tpu / 'worker0'}" in out and "job done" in out and "worker1" not in out
    assert json.loads((fake_tpu / "local" / "fake" / "results.json").read_text()) == {"ok": True}


def test_job_status_is_the_exit_status_and_delete_always_runs(fake_tpu, capfd):
    run = ["run", *V5E, "--accelerator", "v5litepod-8", "--env", "FAKE_EXIT=3", "--", "bench", "--config", "tpu_v5e8"]
    assert main(run) == 0  # starting the job succeeds
    assert main(["logs", *V5E, "--job", "bench"]) == 3
    assert main(["logs", *V5E, "--job", "never-ran"]) == 2
    assert "no job never-ran on worker 0" in capfd.readouterr().err
    # a failing step stops the job but --delete still deletes: the stand-in fails every scp
    (fake_tpu / "bin" / "gcloud").write_text(
        (fake_tpu / "bin" / "gcloud")
        .read_text()
        .replace(
            'elif verb == ["compute", "tpus", "tpu-vm", "scp"]:',
            'elif verb == ["compute", "tpus", "tpu-vm", "scp"]:\n    sys.exit(7)',
        )
    )
    (fake_tpu / "calls.jsonl").unlink()
    assert main(["job", *V5E, "--accelerator", "v5litepod-8", "--delete", "--", "bench", "--config", "tpu_v5e8"]) == 1
    verbs = [c[2:4] for c in map(json.loads, (fake_tpu / "calls.jsonl").read_text().splitlines())]
    assert verbs == [["tpu-vm", "create"], ["tpu-vm", "scp"], ["tpu-vm", "delete"]]
    assert "failed with exit status 7" in capfd.readouterr().err


def test_shipped_archive_unpacks_on_a_worker(tmp_path):
    """The local-checkout install path for real: git archive of HEAD, then the workers' unpack command."""
    source = gcloud.LocalSource(str(REPO), str(tmp_path / "a.tar.gz"))
    archive_cmd = source.commands(gcloud.Target("t", "us-west4-a"))[0]
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    subprocess.run(archive_cmd, check=True)
    home = tmp_path / "worker0"
    home.mkdir()
    (home / gcloud.REMOTE_ARCHIVE).write_bytes((tmp_path / "a.tar.gz").read_bytes())
    subprocess.run(["bash", "-c", source.unpack()], cwd=home, check=True)
    assert (home / "distgame" / "launch" / "tpu.py").exists() and (home / "distgame" / "pyproject.toml").exists()


# -- the TPU configs -----------------------------------------------------------

TPU_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("tpu_*.yaml"))


def _header_command(name: str, prefix: str) -> list[str]:
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") and prefix in line:
            return shlex.split(line.split(prefix, 1)[1].split("  (")[0])
    raise AssertionError(f"{name}.yaml has no '{prefix}' line in its header")


def test_tpu_configs_cover_single_and_multi_host():
    hosts = {lookup(_header_command(n, "--accelerator")[0]).hosts for n in TPU_CONFIGS}
    assert 1 in hosts and max(hosts) > 1, hosts


@pytest.mark.parametrize("name", TPU_CONFIGS)
def test_tpu_config_fits_its_slice_and_its_commands_work(name, capsys):
    """The launch command in the config's header dry-runs (mesh and batches fit the table's slice),
    and its compile-check line names the same slice."""
    launch_args = _header_command(name, "python -m launch.tpu")
    lines = dry(capsys, *launch_args)
    slice_ = lookup(launch_args[launch_args.index("--accelerator") + 1])
    cfg = load_config(name)
    data, fsdp, tensor = check_mesh_fits(cfg.mesh, slice_)
    assert data * fsdp * tensor == slice_.chips
    assert f"--config {name}" in remote_script(next(line for line in lines if "setsid" in line))
    check_args = _header_command(name, "distgame compile-check")
    assert by_topology(check_args[check_args.index("--topology") + 1]) is slice_


def test_ctrl_c_leaves_the_tpu_running_and_says_how_to_delete(fake_tpu, monkeypatch, capfd):
    import launch.tpu

    real_run = subprocess.run

    def interrupted_at_install(argv, *args, **kwargs):  # the user presses Ctrl-C during the install step
        if any(a.startswith("--command=") for a in argv):
            raise KeyboardInterrupt
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(launch.tpu.subprocess, "run", interrupted_at_install)
    assert main(["job", *V5E, "--accelerator", "v5litepod-8", "--delete", "--", "bench", "--config", "tpu_v5e8"]) == 130
    verbs = [c[2:4] for c in map(json.loads, (fake_tpu / "calls.jsonl").read_text().splitlines())]
    assert verbs == [["tpu-vm", "create"], ["tpu-vm", "scp"]]  # no delete
    assert "delete it with: gcloud compute tpus tpu-vm delete my-run" in capfd.readouterr().err
