"""Text datasets through TFDS without tensorflow: the project's GSM8K / MATH builders prepared offline,
tfds's mock data, per-process batch reading, bad input, and `distgame protocol` end to end on mock GSM8K."""

import contextlib
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import cli
from experiments.tasks import answers, tfds_builders  # noqa: F401  (registers distgame_gsm8k / distgame_math)
from experiments.tasks.batches import ArrayRows, LazyRows, global_batch_indices, local_batch, process_slice
from experiments.tasks.registry import build_task
from experiments.tasks.task_config import TaskConfig, TaskError

# --- GSM8K-format rows (the release's exact layout: calculator annotations, "#### <answer>") -------


def gsm8k_row(i: int) -> dict:
    trays, per = 3 + i % 17, 2 + i % 5
    muffins, price = trays * per, 20 + 10 * (i % 9)
    total = muffins * price
    question = (
        f"A baker bakes {trays} trays of {per} muffins each and sells every muffin for ${price}. "
        "How many dollars does the baker earn?"
    )
    solution = (
        f"The baker bakes {trays}*{per} = <<{trays}*{per}={muffins}>>{muffins} muffins.\n"
        f"She earns {muffins}*{price} = $<<{muffins}*{price}={total}>>{total}.\n#### {total:,}"
    )
    return {"question": question, "answer": solution}


TRAIN = [gsm8k_row(i) for i in range(40)]
TEST = [gsm8k_row(100 + i) for i in range(12)]


def _as_tfds_row(row: dict) -> dict:
    """A row as `tfds.data_source` returns it for the project's builder (Text features come back as bytes)."""
    final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    return {"question": row["question"].encode(), "solution": row["answer"].encode(), "answer": final.encode()}


@contextlib.contextmanager
def mock_gsm8k(reads: list | None = None):
    """tfds's mock data with real-format GSM8K rows; `reads` records every row index a data source serves."""

    class Source(list):
        def __getitem__(self, i):
            if reads is not None:
                reads.append(i)
            return list.__getitem__(self, i)

    def as_data_source(self, split, **kwargs):
        return Source([_as_tfds_row(r) for r in {"train": TRAIN, "test": TEST}[split]])

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
        yield


def gsm8k_task(tmp_path, **kw):
    fields = dict(
        name="gsm8k", tokenizer="byte", data_dir=str(tmp_path), max_len=320, n_train=1000, n_heldout=4, n_test=6
    )
    return TaskConfig(**{**fields, **kw}).validate()


# --- the builders, really prepared (array_record) from local copies of the official files -----------


def test_gsm8k_builder_prepares_array_record_offline_and_task_reads_it(tmp_path):
    """The documented offline route: the official jsonl files in <data_dir>/downloads/manual/, then any command."""
    data_dir = tmp_path / "tfds"
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name, rows in (("train", TRAIN), ("test", TEST)):
        (manual / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_task(gsm8k_task(data_dir))  # download=True: prepares from the manual folder, no network
    assert list(data_dir.glob("distgame_gsm8k/1.0.0/*.array_record*")), "no array_record files written"

    task = build_task(gsm8k_task(data_dir, download=False))  # now served from the prepared files only
    test = task.problems("test", seed=0)
    assert len(test) == 6
    by_question = {r["question"]: r for r in TEST}
    for p in test:
        assert p.prompt.startswith("Question: ") and p.prompt.endswith("\nAnswer:")
        row = by_question[p.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")]
        assert p.solution == " " + row["answer"]
        assert "," not in p.answer and p.answer == row["answer"].rsplit("#### ", 1)[1].replace(",", "")
        assert task.is_correct(p.solution, p.answer)  # the reference solution passes its own checker
        assert not task.is_correct(p.solution.replace("#### ", "#### 9"), p.answer)
    assert any(int(p.answer) >= 1000 for p in test)  # the thousands-comma case is exercised


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_math_builder_prepares_from_the_release_layout(tmp_path, layout):
    manual = tmp_path / "manual"
    problems = {
        ("train", "algebra", 1): ("Solve $2x = 1$.", "We get $x = \\boxed{\\dfrac{1}{2}}$.", "\\frac12"),
        ("train", "geometry", 2): ("Find the angle.", "It is $\\boxed{90^\\circ}$.", "90"),
        ("train", "algebra", 3): (
            "Point?",
            "It is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
            "(3,\\frac{\\pi}{2})",
        ),
        ("test", "algebra", 4): ("Length?", "So $\\boxed{10\\text{ cm}}$.", "10"),
        ("test", "number_theory", 5): ("Sum?", "The sum is $\\boxed{1,000}$.", "1000"),
    }
    for (split, subject, i), (problem, solution, _) in problems.items():
        d = manual / "MATH" / split / subject
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.json").write_text(
            json.dumps({"problem": problem, "level": "Level 1", "type": subject, "solution": solution})
        )
    if layout == "tar":  # the release tarball itself, as downloaded
        import shutil
        import tarfile

        with tarfile.open(manual / "MATH.tar", "w") as tar:
            tar.add(manual / "MATH", arcname="MATH")
        shutil.rmtree(manual / "MATH")
    data_dir = tmp_path / "tfds"
    builder = tfds.builder("distgame_math", data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    task = build_task(
        TaskConfig(
            name="math", tokenizer="byte", data_dir=str(data_dir), download=False, max_len=256, n_heldout=1, n_test=2
        ).validate()
    )
    rows = task.problems("train", seed=0) + task.problems("heldout", seed=0) + task.problems("test", seed=0)
    assert len(rows) == 5
    written = {p[0]: p for p in problems.values()}
    for p in rows:
        problem, solution, equivalent = written[p.prompt.removeprefix("Problem: ").removesuffix("\nSolution:")]
        assert p.solution == " " + solution
        assert task.is_correct(f"... so the answer is $\\boxed{{{equivalent}}}$", p.answer), (p.answer, equivalent)
        assert not task.is_correct("... so the answer is $\\boxed{7}$", p.answer)


# --- mock data: splits, determinism, length filter -------------------------------------------------


def test_text_task_splits_on_mock_gsm8k(tmp_path):
    with mock_gsm8k():
        task = build_task(gsm8k_task(tmp_path))
        train, held, test = (task.problems(s, seed=0) for s in ("train", "heldout", "test"))
        assert (len(train), len(held), len(test)) == (36, 4, 6)
        held_questions = [r["question"] for r in TRAIN[-4:]]
        assert [p.prompt for p in held] == [f"Question: {q}\nAnswer:" for q in held_questions]  # the train split's tail
        assert not {p.prompt for p in train} & {p.prompt for p in held}
        assert task.problems("train", seed=0, n=10) == train[:10]  # prefix-stable
        assert task.problems("train", seed=1, n=10) != train[:10]  # the seed permutes the training order
        assert task.problems("test", seed=5) == test  # evaluation sets do not depend on the seed
        # Rows that do not fit max_len are skipped for evaluation and cut for training.
        need = [2 + len((f"Question: {r['question']}\nAnswer: {r['answer']}").encode()) for r in TEST]
        short = build_task(gsm8k_task(tmp_path, max_len=223))
        want = [f"Question: {r['question']}\nAnswer:" for r, k in zip(TEST, need) if k <= 223][:6]
        assert 0 < len(want) < len(TEST) and [p.prompt for p in short.problems("test", seed=0)] == want
        rows = short.training_rows(seed=0, n=8, with_solution=True).rows(np.arange(8))
        assert rows["tokens_bt"].shape == (8, 223) and rows["loss_mask_bt"][:, -1].sum() == 0


def test_training_rows_mask_targets_the_solution(tmp_path):
    with mock_gsm8k():
        task = build_task(gsm8k_task(tmp_path))
        tok = task.tokenizer
        first = task.problems("train", seed=0, n=1)[0]
        rows = task.training_rows(seed=0, n=4, with_solution=True).rows(np.array([0]))
        t, m = rows["tokens_bt"][0], rows["loss_mask_bt"][0]
        n_prompt = 1 + len(first.prompt.encode())
        assert tok.decode(t[1:n_prompt]) == first.prompt
        targets = t[1:][m[:-1] == 1]  # mask[t] = 1 iff tokens[t+1] is a target
        assert tok.decode(targets) == first.solution and targets[-1] == tok.eos_id


# --- per-process reading --------------------------------------------------------------------------


def test_each_process_reads_only_its_contiguous_slice(tmp_path):
    reads: list = []
    with mock_gsm8k(reads):
        task = build_task(gsm8k_task(tmp_path))
        source = task.training_rows(seed=0, n=32, with_solution=True)
        reads.clear()
        whole = local_batch(source, 8, seed=3, step=5, process_index=0, process_count=1)
        assert len(reads) == 8
        parts = []
        for i in range(4):
            reads.clear()
            parts.append(local_batch(source, 8, seed=3, step=5, process_index=i, process_count=4))
            assert len(reads) == 2  # a host fetches only its 2 of the 8 rows
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert process_slice(8, 1, 4) == slice(2, 4)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        process_slice(8, 0, 3)


def test_single_process_batches_are_the_ones_the_trainer_always_drew():
    """The arithmetic task's batches are unchanged: the same permutation formula as before the reader existed."""
    arrays = {"x": np.arange(50)[:, None] * np.ones((1, 3), int)}
    for step in (0, 5, 6, 13):
        order = np.random.default_rng([7, step // 6]).permutation(50)  # 50 // 8 = 6 batches per epoch
        want = order[(step % 6) * 8 : (step % 6) * 8 + 8]
        np.testing.assert_array_equal(global_batch_indices(50, 8, 7, step), want)
        np.testing.assert_array_equal(local_batch(ArrayRows(arrays), 8, 7, step)["x"][:, 0], want)  # jax: 1 process
    calls = []
    lazy = LazyRows(50, lambda idx: calls.append(list(idx)) or {"x": idx})
    assert list(local_batch(lazy, 8, 7, 0)["x"]) == calls[0] and len(calls) == 1


# --- bad input: one line, exit 2 ------------------------------------------------------------------


def _cli(capsys, *args):
    rc = cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_missing_data_dir_and_unknown_dataset_are_one_line_exit_2(tmp_path, capsys):
    rc, err = _cli(
        capsys,
        "train",
        "--role",
        "teacher",
        "--config",
        "gsm8k_ci",
        f"run_dir={tmp_path}",
        f"task.data_dir={tmp_path}/nope",
        "--no-progress",
    )
    assert rc == 2 and len(err) == 1 and f"task.data_dir='{tmp_path}/nope' does not exist" in err[0]
    rc, err = _cli(
        capsys,
        "train",
        "--role",
        "teacher",
        "--config",
        "gsm8k_ci",
        f"run_dir={tmp_path}",
        f"task.data_dir={tmp_path}",
        "task.name=tfds:no_such_dataset_xyz",
        "--no-progress",
    )
    assert rc == 2 and len(err) == 1 and "tfds does not know a dataset named 'no_such_dataset_xyz'" in err[0]
    rc, err = _cli(capsys, "config", "--config", "gsm8k_ci", "task.name=squad")
    assert rc == 2 and len(err) == 1 and "task.name='squad'" in err[0]
    rc, err = _cli(capsys, "config", "--config", "gsm8k_ci", "task.tokenizer=word")
    assert rc == 2 and len(err) == 1 and "task.tokenizer='word'" in err[0]
    rc, err = _cli(
        capsys,
        "train",
        "--role",
        "teacher",
        "--config",
        "gsm8k_ci",
        f"run_dir={tmp_path}",
        f"task.data_dir={tmp_path}",
        f"task.tokenizer={tmp_path}/missing.json",
        "--no-progress",
    )
    assert rc == 2 and len(err) == 1 and "missing.json" in err[0]
    rc, err = _cli(
        capsys,
        "train",
        "--role",
        "teacher",
        "--config",
        "gsm8k_ci",
        f"run_dir={tmp_path}",
        f"task.data_dir={tmp_path}",
        "task.download=false",
        "--no-progress",
    )
    assert (
        rc == 2
        and len(err) == 1
        and "cannot read split 'train' of 'distgame_gsm8k'" in err[0]
        and "not been generated" in err[0]
    )
    assert not (tmp_path / "teacher").exists()  # nothing was written before the refusal


# --- `distgame protocol` end to end on mock GSM8K ----------------------------------------------------


# Runs in a subprocess with one CPU device (as tests/test_pipeline.py does): the protocol compiles ~15 programs,
# and SPMD-partitioning each for 8 simulated devices would double the test's time without testing more of the text path.
_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import test_text_task as t
from experiments import cli
from experiments.tasks import answers
checked = []
real = answers.gsm8k_is_correct
answers.gsm8k_is_correct = lambda text, ref: checked.append([text, ref]) or real(text, ref)
with t.mock_gsm8k():
    rc = cli.main(sys.argv[3:])
pathlib = __import__("pathlib")
pathlib.Path(sys.argv[2]).write_text(json.dumps(checked))
sys.exit(rc)
"""


def test_protocol_end_to_end_on_mock_gsm8k(tmp_path):
    import os
    import subprocess
    import sys

    checked_path = tmp_path / "checked.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _DRIVER,
            str(pathlib.Path(__file__).parent),
            str(checked_path),
            "protocol",
            "--config",
            "gsm8k_ci",
            f"run_dir={tmp_path / 'run'}",
            f"task.data_dir={tmp_path}",
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=pathlib.Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rows"] == 2
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "gsm8k" and results["n_test"] == 8
    assert [r["label"] for r in results["rows"]] == ["standard", "poe γ=0.5"]
    for row in results["rows"]:
        assert set(row["students"]) == {"passive", "adaptive(beta=2)"}
        for stat in [row["teacher_accuracy"], *row["students"].values()]:
            assert 0.0 <= stat["mean"] <= 1.0
        assert row["mean_trace_length"] > 0
    table = (run / "RESULTS.md").read_text()
    assert "| standard |" in table and "| poe γ=0.5 |" in table
    for role in ("teacher", "proxy", "student"):
        assert json.loads((run / role / "summary.json").read_text())["steps"] > 0
    # The numeric checker saw decoded model text and GSM8K reference answers (digits, no commas).
    checked = json.loads(checked_path.read_text())
    refs = {ref for _, ref in checked}
    assert refs and all(ref.lstrip("-").isdigit() for ref in refs)
    assert refs <= {r["answer"].rsplit("#### ", 1)[1].replace(",", "") for r in TRAIN + TEST}
    assert all(isinstance(text, str) for text, _ in checked)


def test_any_tfds_dataset_by_name_with_its_fields(tmp_path):
    """`tfds:<name>` reads a dataset tfds ships (here math_qa, random mock rows) through the named features."""
    fields = dict(
        name="tfds:math_qa",
        tokenizer="byte",
        data_dir=str(tmp_path),
        prompt_field="Problem",
        solution_field="Rationale",
        answer_field="correct",
        checker="exact",
        n_heldout=2,
        n_test=3,
        max_len=512,
    )
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        task = build_task(TaskConfig(**fields).validate())
        test = task.problems("test", seed=0)
        assert len(test) == 3 and len(task.problems("train", seed=0)) == 18
        p = test[0]
        assert p.prompt.startswith("Question: ") and p.answer
        assert task.is_correct(f"  {p.answer} ", p.answer) and not task.is_correct(p.answer + "x", p.answer)
        with pytest.raises(TaskError, match="dataset rows have no feature 'question'"):
            build_task(TaskConfig(**{**fields, "prompt_field": "question"}).validate()).problems("test", seed=0)


def test_gsm8k_builder_downloads_over_http(tmp_path, monkeypatch):
    """The download path itself (requests, no tensorflow), against a local HTTP server standing in for GitHub."""
    import functools
    import http.server
    import threading

    served = tmp_path / "www"
    served.mkdir()
    for name, rows in (("train", TRAIN), ("test", TEST)):
        (served / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(tfds_builders, "GSM8K_URL", f"http://127.0.0.1:{server.server_port}/{{split}}.jsonl")
        (tmp_path / "tfds").mkdir()
        task = build_task(gsm8k_task(tmp_path / "tfds"))
    finally:
        server.shutdown()
    assert len(task.problems("test", seed=0)) == 6 and len(task.problems("heldout", seed=0)) == 4
    assert list((tmp_path / "tfds" / "downloads").iterdir())  # the files went through tfds's download manager
