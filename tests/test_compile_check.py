"""`distgame compile-check`: the train step compiled ahead of time, its memory per device.

The default install has no libtpu; then the TPU path is checked for its error
message only, and the same compile runs for real on the 8 simulated CPU devices
(`--topology local`). With libtpu (the `test` extra installs it on Linux x86-64, so `make test` and CI run these), the
tests marked `needs_libtpu` compile for real TPU topologies on this CPU machine.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest

from experiments.cli import main as distgame
from experiments.config import load_config
from experiments.train import Trainer, make_mesh
from launch.accelerators import ACCELERATORS
from launch.compile_check import run_compile_check
from launch.compile_steps import compile_train_step
from models import sharding as shd

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")


def test_local_compile_reports_memory_of_the_trainers_own_step():
    cfg = load_config("ci")
    report = run_compile_check(cfg, "local", ("teacher",))
    assert report["devices"] == 8 and report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    (teacher,) = report["roles"]
    # data-parallel only: every device holds the params and both AdamW moments in float32
    assert teacher["argument_bytes"] >= 3 * 4 * teacher["params"]
    assert teacher["peak_bytes_estimate"] >= teacher["argument_bytes"] - teacher["alias_bytes"]

    # The compiled program is the one Trainer runs: same step, same shardings, same memory.
    mesh = make_mesh(cfg)
    trainer = Trainer(cfg, "teacher", mesh)
    batch = shd.shard_batch(trainer.batch_at(trainer.training_data(), 0), mesh)
    real = trainer.step_fn.lower(trainer.state, batch).compile().memory_analysis()
    ahead, _, _ = compile_train_step(cfg, "teacher", mesh)
    for field in ("argument", "output", "alias", "temp"):
        assert getattr(ahead.memory_analysis(), f"{field}_size_in_bytes") == getattr(real, f"{field}_size_in_bytes"), (
            field
        )


def test_cli_json(capsys):
    assert distgame(["compile-check", "--config", "ci", "--topology", "local", "--role", "student", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("compile-check: config ci on local devices: 8 x cpu")
    summary = json.loads(out[-1])
    assert [r["role"] for r in summary["roles"]] == ["student"] and summary["roles"][0]["temp_bytes"] > 0


def test_tpu_topology_without_libtpu_says_what_to_install(capsys, monkeypatch):
    if HAS_LIBTPU:  # hide it, as on a machine with the default install
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a)
        )
    assert distgame(["compile-check", "--config", "ci", "--topology", "v5e:2x4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "needs libtpu" in err and f"jax[tpu]=={jax.__version__}" in err


@pytest.mark.parametrize("topology, message", [("v5e:3x3", "unknown TPU topology"), ("v4-32", "does not fit v4-32")])
def test_bad_topology_or_mesh(topology, message, capsys):
    assert distgame(["compile-check", "--config", "tpu_v5e8", "--topology", topology]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


@needs_libtpu
def test_table_matches_libtpu_topologies():
    from jax.experimental import topologies

    for s in ACCELERATORS.values():
        devices = topologies.get_topology_desc(
            platform="tpu",
            topology_name=s.topology,
            chip_config_name=s.chip_config_name,
            chips_per_host_bounds=s.chips_per_host_bounds,
            num_slices=1,
        ).devices
        assert len(devices) == s.chips and len({d.process_index for d in devices}) == s.hosts, s


@needs_libtpu
@pytest.mark.parametrize("topology, hosts, kind", [("v5e:2x4", 1, "TPU v5 lite"), ("v4-32", 4, "TPU v4")])
def test_tpu_compile_without_tpu(topology, hosts, kind):
    cfg = load_config("ci", ["mesh.data=-1", "teacher.train.batch_size=32"])
    report = run_compile_check(cfg, topology, ("teacher",))
    assert report["hosts"] == hosts and report["device_kind"] == kind
    (teacher,) = report["roles"]
    assert 0 < teacher["peak_bytes_estimate"] < report["hbm_bytes_per_device"]
    assert np.isclose(teacher["xla_flops_per_device"], teacher["model_flops_per_device"], rtol=0.5)


@needs_libtpu
def test_cli_keeps_off_an_absent_tpu_so_libtpu_stays_quiet():
    """With libtpu installed and no TPU, every distgame command uses the CPU without libtpu's warnings."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = (
        "from experiments.distributed import keep_off_absent_tpu as k; switched = k(); import jax; "
        "print(switched, jax.devices()[0].platform)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "cpu"]
    assert "TPU_ACCELERATOR_TYPE" not in out.stderr
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "cpu"]  # the user's choice wins


def test_roofline_bound_is_the_slower_of_compute_and_memory():
    from experiments.device_peaks import DevicePeak, roofline

    peak = DevicePeak("x", 100e12, 1e12)  # ridge at 100 FLOPs/byte
    compute = roofline(2e12, 1e9, peak)  # 20 ms of FLOPs, 1 ms of traffic
    assert compute["bound_by"] == "compute" and compute["roofline_bound_s"] == pytest.approx(0.02)
    assert compute["max_utilisation"] == pytest.approx(1.0) and compute["arithmetic_intensity"] == pytest.approx(2000)
    memory = roofline(1e12, 5e10, peak)  # 10 ms of FLOPs, 50 ms of traffic
    assert memory["bound_by"] == "memory" and memory["roofline_bound_s"] == pytest.approx(0.05)
    assert memory["max_utilisation"] == pytest.approx(0.2)


def test_local_devices_have_no_peak_so_no_roofline():
    report = run_compile_check(load_config("ci"), "local", ("student",))
    assert report["roles"][0]["roofline"] is None


@needs_libtpu
def test_tpu_compile_reports_flops_and_roofline_not_a_measured_mfu(capsys):
    assert (
        distgame(
            [
                "compile-check",
                "--config",
                "ci",
                "mesh.data=-1",
                "teacher.train.batch_size=32",
                "--topology",
                "v5e:2x4",
                "--role",
                "teacher",
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    (teacher,) = json.loads(out[-1])["roles"]
    roof = teacher["roofline"]
    assert roof["device"] == "TPU v5e" and roof["peak_bf16_flops_per_s"] == 197e12
    assert roof["compute_bound_s"] == pytest.approx(teacher["xla_flops_per_device"] / 197e12)
    assert roof["memory_bound_s"] == pytest.approx(teacher["xla_bytes_accessed_per_device"] / 0.819e12)
    assert roof["roofline_bound_s"] == max(roof["compute_bound_s"], roof["memory_bound_s"])
    assert 0 < roof["max_mfu"] <= 1.5  # model FLOPs may differ from XLA's count, not by much
    assert any("roofline on TPU v5e" in line and "MFU <=" in line for line in out)
