"""Two CPU processes (4 devices each, gloo collectives) joined with jax.distributed train
the same sharded steps and sample the same tokens as one process with 8 devices; only
process 0 writes metrics and the summary; a coordinator that never answers is one clear line."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from waiting import communicate

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
CPU_BUDGET_S = 1200.0
"""A hung collective fails the test instead of hanging CI: tests/waiting.py tells a hang (the processes stop
using the CPU) from a slow run on a loaded machine, whatever the wall-clock time. This budget only catches a
runaway: the processes of one test use 43 (training) and 99 (protocol) CPU-seconds together, measured on the
2-core dev machine under load (59 s and 124 s of wall-clock time there)."""
JOIN_S = 600
"""distributed.initialization_timeout: how long a process waits for its peers to join. A peer that never joins
is caught sooner by the hang check (the waiting processes sleep); this only has to outlast a slow start."""
OVERRIDES = [
    "proxy.train.steps=4",
    "proxy.train.log_every=1",
    "sample.max_new_tokens=8",
    "sample.batch_size=16",
    "task.n_test=16",
    f"distributed.initialization_timeout={JOIN_S}",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTGAME_")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        **extra,
    )
    return env


def _start(run_dir, env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(run_dir), *OVERRIDES],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    outputs = []
    for p, (out, err) in zip(procs, communicate(procs, CPU_BUDGET_S)):
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def _losses(run_dir: pathlib.Path) -> list[float]:
    lines = (run_dir / "proxy" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    port = free_port()
    # All three processes start at once: the reference run overlaps the 2-process job.
    procs = [_start(one, _env(8))]
    procs += [
        _start(
            two,
            _env(4, DISTGAME_COORDINATOR=f"127.0.0.1:{port}", DISTGAME_NUM_PROCESSES="2", DISTGAME_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    ref, p0, p1 = _finish(procs)
    assert (ref["processes"], ref["devices"]) == (1, 8)
    assert (p0["process"], p0["processes"], p0["devices"]) == (0, 2, 8) and p1["process"] == 1

    ref_losses, dist_losses = _losses(one), _losses(two)
    assert len(ref_losses) == 4
    assert dist_losses == pytest.approx(ref_losses, abs=1e-5)
    # Sampling (non-greedy) on a batch sharded over both processes: the same tokens, gathered on each.
    assert p0["tokens"] == ref["tokens"] and p1["tokens"] == ref["tokens"]
    assert p0["logprob_sum"] == pytest.approx(ref["logprob_sum"], abs=1e-4)
    assert p0["test_accuracy"] == p1["test_accuracy"] == ref["test_accuracy"]

    # Only process 0 wrote metrics and the summary (once each, not once per process); the
    # checkpoint was written collectively (one orbax step with both processes' shards).
    assert len((two / "proxy" / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((two / "proxy" / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (two / "proxy").iterdir()) == ["checkpoints", "metrics.jsonl", "summary.json"]
    state = two / "proxy" / "checkpoints" / "4" / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in state.iterdir()}
    # A preemption notice seen by the last process only: every process agrees to stop.
    assert ref["stop_before"] is False and p0["stop_before"] is False and p1["stop_before"] is False
    assert ref["stop_agreed"] is True and p0["stop_agreed"] is True and p1["stop_agreed"] is True
    print(f"preemption agreement all-gather: {p0['agree_ms']:.2f} ms per step (2 processes)")


def test_coordinator_that_never_answers_is_one_line(tmp_path):
    port = free_port()  # nothing listens there
    env = _env(1, DISTGAME_COORDINATOR=f"127.0.0.1:{port}", DISTGAME_NUM_PROCESSES="2", DISTGAME_PROCESS_ID="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.cli",
            "train",
            "--role",
            "proxy",
            "--config",
            "ci",
            f"run_dir={tmp_path}",
            "distributed.initialization_timeout=2",
            "--no-progress",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    [(_, err)] = communicate([proc], cpu_budget_s=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"coordinator 127.0.0.1:{port} did not answer within 2s" in lines[0], lines
    assert not (tmp_path / "proxy").exists()


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"DISTGAME_COORDINATOR": "127.0.0.1:1234"},
            "num_processes (DISTGAME_NUM_PROCESSES), process_id (DISTGAME_PROCESS_ID) not set",
        ),
        (
            {"DISTGAME_COORDINATOR": "nohost", "DISTGAME_NUM_PROCESSES": "2", "DISTGAME_PROCESS_ID": "0"},
            "'nohost' must look like host:port",
        ),
        (
            {"DISTGAME_COORDINATOR": "h:1", "DISTGAME_NUM_PROCESSES": "2", "DISTGAME_PROCESS_ID": "2"},
            "process_id=2 must lie in [0, num_processes=2)",
        ),
        ({"DISTGAME_NUM_PROCESSES": "two"}, "DISTGAME_NUM_PROCESSES='two' must be an integer"),
    ],
)
def test_bad_distributed_settings(env, message):
    from experiments.distributed import CoordinatorError, DistributedConfig, resolve

    with pytest.raises(CoordinatorError) as e:
        resolve(DistributedConfig(), env=env, tpu=False)
    assert message in str(e.value)


def test_resolution_order():
    from experiments.distributed import DistributedConfig, resolve

    cfg = DistributedConfig(coordinator_address="10.0.0.1:8476", num_processes=4, process_id=3)
    assert resolve(cfg, env={}, tpu=False) == resolve(cfg, env={}, tpu=True)  # config wins over TPU detection
    assert resolve(cfg, env={}).process_id == 3
    env = {"DISTGAME_COORDINATOR": "10.0.0.2:9000", "DISTGAME_PROCESS_ID": "1"}
    r = resolve(cfg, env=env)
    assert (r.kind, r.coordinator_address, r.num_processes, r.process_id) == ("explicit", "10.0.0.2:9000", 4, 1)
    assert resolve(DistributedConfig(), env={}, tpu=False).kind == "single"
    assert resolve(DistributedConfig(), env={}, tpu=True).kind == "tpu"
    assert resolve(DistributedConfig(mode="off"), env=env, tpu=True).kind == "single"


def test_protocol_on_two_processes_writes_results_once(ci_run):
    """`distgame protocol` joined over 2 processes, on models trained by one (conftest.ci_models): every process
    restores them and computes every stage; process 0 alone prints and writes the results (the stage files are
    written by both, atomically)."""
    port = free_port()
    overrides = [
        "protocol.defenses=[{name: standard}, {name: poe, strength: 0.5}]",
        "protocol.distill.attacks=[]",
        "protocol.distill.betas=[]",  # the passive student's distillation step is the collective under test
        "protocol.distill.steps=5",
        "protocol.seeds=2",
        "protocol.n_traces=16",
        "protocol.cost_batch=8",
        "task.n_test=16",
        "sample.max_new_tokens=16",
        f"distributed.initialization_timeout={JOIN_S}",
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.cli",
                "protocol",
                "--config",
                "ci",
                "--no-progress",
                f"run_dir={ci_run}",
                *overrides,
            ],
            env=_env(
                4, DISTGAME_COORDINATOR=f"127.0.0.1:{port}", DISTGAME_NUM_PROCESSES="2", DISTGAME_PROCESS_ID=str(i)
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p, (out, err) in zip(procs, communicate(procs, CPU_BUDGET_S)):
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    assert "# Results" in outs[0] and "# Results" not in outs[1]
    results = json.loads((ci_run / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == ["standard", "poe γ=0.5"]
    assert all(r["mean_trace_length"] > 0 and len(r["students"]["passive"]["values"]) == 2 for r in results["rows"])
    assert (ci_run / "RESULTS.md").exists() and not list(ci_run.rglob("*.tmp"))


@pytest.mark.parametrize("cores, count", [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8)])
def test_cpu_device_count_is_a_power_of_two_per_core(cores, count):
    from experiments.distributed import cpu_device_count

    assert cpu_device_count({}, cores=cores) == count
    assert cpu_device_count({"DISTGAME_CPU_DEVICES": "3"}, cores=cores) == 3  # the user's count wins
    assert cpu_device_count({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}, cores=cores) is None
    assert cpu_device_count({"JAX_NUM_CPU_DEVICES": "5"}, cores=cores) is None


@pytest.mark.parametrize("raw", ["0", "-2", "two"])
def test_bad_cpu_device_count(raw):
    from experiments.distributed import CoordinatorError, cpu_device_count

    with pytest.raises(CoordinatorError, match=f"DISTGAME_CPU_DEVICES={raw!r}|DISTGAME_CPU_DEVICES={raw} must be"):
        cpu_device_count({"DISTGAME_CPU_DEVICES": raw})


def test_cli_gives_jax_one_cpu_device_per_core():
    """A fresh process without XLA_FLAGS: the CLI's setup gives JAX the chosen number of CPU devices."""
    code = (
        "from experiments.distributed import cpu_devices_per_core; import jax; "
        "n = cpu_devices_per_core(); print(n, jax.device_count('cpu'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(DISTGAME_CPU_DEVICES="3", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "3"]


def test_game_inputs_go_to_one_cpu_device():
    """The equilibrium's horizon students take unsharded pools: on several CPU devices of one process their
    inputs are committed to one device, so the devices do not each run the whole computation."""
    import jax
    import numpy as np

    from experiments.game_wiring import on_one_cpu_device

    assert jax.device_count() > 1  # the suite's simulated devices
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = jax.device_put(
        np.ones((4, 3), np.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    out = on_one_cpu_device({"theta": replicated, "pool": np.arange(6)})
    for leaf in jax.tree.leaves(out):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(out["pool"], np.arange(6))
