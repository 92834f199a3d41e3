"""A `gs://` run_dir: results.json, RESULTS.md, plots, CSVs, stage files and logs written through
experiments.io (etils.epath) and read back, against an in-memory fsspec filesystem registered for the
`gs` protocol (no network, no gcsfs)."""

import csv
import io
import json
import os
import uuid

import fsspec
import matplotlib.image as mpimg
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from experiments import io as rio
from experiments.calibration_plot import plot_calibration
from experiments.protocol import add_paired_deltas, headline, results_markdown, write_results
from experiments.stats import mean_stderr

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeGCS(MemoryFileSystem):
    """What epath's fsspec backend asks for gs:// (`fsspec.filesystem('gcs', finalize_on_close=True)`), in memory."""

    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.fixture
def bucket(monkeypatch):
    """gs://<unique bucket>, served from memory; every object written there is removed afterwards."""
    saved = {k: fsspec.registry.get(k) for k in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    name = f"distgame-test-{uuid.uuid4().hex[:8]}"
    cwd_before = set(os.listdir("."))
    yield f"gs://{name}"
    for key in [k for k in FakeGCS.store if name in k]:
        del FakeGCS.store[key]
    FakeGCS.pseudo_dirs[:] = [d for d in FakeGCS.pseudo_dirs if name not in d]
    for key, impl in saved.items():
        if impl is None:
            fsspec.registry._registry.pop(key, None) if hasattr(fsspec.registry, "_registry") else None
        else:
            fsspec.register_implementation(key, impl, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert set(os.listdir(".")) == cwd_before, "a gs:// path leaked onto the local disk (e.g. a 'gs:' directory)"


def _objects(prefix: str) -> dict[str, bytes]:
    return {k: v.getvalue() for k, v in FakeGCS.store.items() if k.startswith(prefix)}


def _results() -> dict:
    """A protocol result as Protocol.run builds it: 2 defenses, 3 seeds, a learning curve, paired deltas."""

    def row(label, defense, strength, teacher, passive, adaptive):
        return {
            "label": label,
            "defense": defense,
            "strength": strength,
            "setting": {"name": defense},
            "teacher_accuracy": mean_stderr(teacher),
            "students": {"passive": mean_stderr(passive), "adaptive(beta=0.5)": mean_stderr(adaptive)},
            "adaptive_key": "adaptive(beta=0.5)",
            "relative_gain": 0.05,
            "cost": {
                "forward_passes_per_token": 1 if defense == "standard" else 2,
                "flops_per_token": 1e9,
                "flops_ratio": 1.0 if defense == "standard" else 1.4,
                "poe_wallclock_bound": 1.54,
                "wallclock_ratio": 1.0 if defense == "standard" else 1.3,
            },
            "mean_trace_length": 180.5,
            "degeneracy_rate": 0.01,
            "trace_accuracy": 0.86,
        }

    rows = [
        row("standard", "standard", 0.0, [0.88, 0.87, 0.89], [0.55, 0.57, 0.56], [0.57, 0.58, 0.58]),
        row("poe γ=0.65", "poe", 0.65, [0.85, 0.84, 0.86], [0.50, 0.52, 0.49], [0.53, 0.52, 0.52]),
    ]
    rows[0]["learning_curve"] = {"50": mean_stderr([0.3, 0.31, 0.29]), "100": mean_stderr([0.55, 0.57, 0.56])}
    results = {
        "config": "gsm8k_paper_tpu",
        "world": None,
        "seeds": 3,
        "n_test": 1319,
        "n_traces": 7473,
        "distill_steps": 100,
        "temperature": 0.6,
        "rows": rows,
        "seconds": 12.0,
        "task": "gsm8k",
    }
    add_paired_deltas(rows)
    results["headline"] = headline(results)
    return results


def test_results_markdown_and_plots_round_trip_through_gs(bucket):
    run_dir = f"{bucket}/runs/paper"
    results = _results()
    paths = write_results(run_dir, results)

    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "results.json",
            "RESULTS.md",
            "teacher_vs_student.png",
            "teacher_vs_student.csv",
            "learning_curve.png",
            "learning_curve.csv",
        ]
    )
    assert all(str(p).startswith(run_dir + "/") for p in paths)
    stored = _objects(f"{run_dir}/")
    assert sorted(k.rsplit("/", 1)[1] for k in stored) == names  # nothing else (no temporary files left)

    assert json.loads(rio.read_text(f"{run_dir}/results.json")) == json.loads(json.dumps(results))
    assert rio.read_text(f"{run_dir}/RESULTS.md") == results_markdown(results)
    assert "poe γ=0.65" in rio.read_text(f"{run_dir}/RESULTS.md")
    for stem in ("teacher_vs_student", "learning_curve"):
        png = rio.path(f"{run_dir}/{stem}.png").read_bytes()
        assert png[:8] == PNG_SIGNATURE and mpimg.imread(io.BytesIO(png), format="png").shape[0] > 300
    rows = list(csv.reader(io.StringIO(rio.read_text(f"{run_dir}/teacher_vs_student.csv"))))
    assert [r[0] for r in rows[1:]] == ["standard", "poe γ=0.65"]
    assert float(rows[2][1]) == pytest.approx(results["rows"][1]["teacher_accuracy"]["mean"])
    curve = list(csv.reader(io.StringIO(rio.read_text(f"{run_dir}/learning_curve.csv"))))
    assert [int(r[0]) for r in curve[1:]] == [50, 100]


def test_stage_files_and_calibration_plot_round_trip_through_gs(bucket):
    stage = f"{bucket}/run/protocol/traces-standard-abc.npz"
    arrays = {"tokens_bt": np.arange(24, dtype=np.int32).reshape(2, 3, 4), "keep": np.array([[True, False, True]] * 2)}
    assert not rio.exists(stage)
    rio.save_npz(stage, **arrays)
    back = rio.load_npz(stage)
    assert back.keys() == arrays.keys() and all(
        np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in arrays.items()
    )
    rio.save_json(f"{bucket}/run/protocol/student.json", {"accuracy": [0.5, 0.25]})
    assert rio.load_json(f"{bucket}/run/protocol/student.json") == {"accuracy": [0.5, 0.25]}

    def stat(m):
        return {"mean": m, "stderr": 0.01}

    result = {
        "config": "x",
        "spearman": 1.0,
        "sign_agreement": 1.0,
        "points": [
            {"gamma": g, "J": stat(1 + g), "dJ": stat(0.1), "nll": stat(1.5 + g), "accuracy": stat(0.5 - g)}
            for g in (0.0, 0.3, 0.6)
        ],
    }
    png, csv_path = plot_calibration(result, f"{bucket}/run/calibration")
    assert rio.path(png).read_bytes()[:8] == PNG_SIGNATURE
    assert rio.read_text(csv_path).splitlines()[0].startswith("gamma,J_pred")


def test_jsonl_log_appends_on_gs_by_rewriting_the_object(bucket):
    target = f"{bucket}/run/teacher/metrics.jsonl"
    with rio.JsonlLog(target) as log:
        log.write({"step": 1})
        log.flush()
        assert rio.read_text(target) == '{"step": 1}\n'  # visible after a flush, before close
        log.write({"step": 2})
    with rio.JsonlLog(target) as log:  # a resumed run appends
        log.write({"step": 3})
    assert [json.loads(line)["step"] for line in rio.read_text(target).splitlines()] == [1, 2, 3]
    with rio.JsonlLog(target, append=False) as log:
        log.write({"step": 0})
    assert rio.read_text(target) == '{"step": 0}\n'


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_failed_write_keeps_the_old_file(bucket, tmp_path, where):
    target = f"{bucket}/run/results.json" if where == "gs" else str(tmp_path / "run" / "results.json")
    rio.save_json(target, {"old": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        rio.atomic_write(target, broken)
    assert rio.load_json(target) == {"old": 1}
    if where == "local":
        assert os.listdir(tmp_path / "run") == ["results.json"]  # the temporary file is gone
