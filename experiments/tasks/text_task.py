"""Text datasets read through TFDS as a task (``gsm8k``, ``math``, ``tfds:<name>``): how a dataset's rows
become problems (prompt template, fields, reference answer and answer checker), the splits opened with
``tfds.data_source`` (array_record, no tensorflow), and :class:`TextTask`, which fetches and encodes rows on demand.

GSM8K and MATH have no held-out split, so for every text task the *last* ``n_heldout`` rows of the train split are
the held-out set and never trained on. Rows whose ``BOS + prompt + solution + EOS`` exceed ``max_len`` tokens are
skipped for evaluation and traces (so prompts and reference solutions always fit) and truncated for training
(:func:`encode_truncated`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from experiments.tasks import arithmetic as ar
from experiments.tasks.batches import LazyRows, RowSource
from experiments.tasks.task_config import TaskConfig, TaskError


@dataclasses.dataclass(frozen=True)
class TextProblem:
    """One dataset row as the pipeline sees it: ``prompt`` (ends where the model continues),
    ``solution`` (the reference continuation) and ``answer`` (the reference final answer, text)."""

    prompt: str
    solution: str
    answer: str


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How rows of one dataset become problems."""

    dataset: str
    prompt_field: str
    solution_field: str
    answer_field: str  # '' = extract from the solution with the checker's extractor
    checker: str
    template: str  # prompt text; "{problem}" is replaced by the row's problem text


FORMATS = {
    "gsm8k": TextFormat("distgame_gsm8k", "question", "solution", "answer", "gsm8k", "Question: {problem}\nAnswer:"),
    "math": TextFormat("distgame_math", "problem", "solution", "answer", "math", "Problem: {problem}\nSolution:"),
}


def text_format(tc: TaskConfig) -> TextFormat:
    if tc.name in FORMATS:
        return FORMATS[tc.name]
    return TextFormat(
        tc.name.removeprefix("tfds:"),
        tc.prompt_field,
        tc.solution_field,
        tc.answer_field,
        tc.checker,
        "Question: {problem}\nAnswer:",
    )


def checker(name: str) -> Callable[[str, str], bool]:
    from experiments.tasks import answers

    if name == "gsm8k":
        return answers.gsm8k_is_correct
    if name == "math":
        return answers.math_is_correct
    return lambda text, ref: text.strip() == str(ref).strip()


def reference_answer(checker_name: str, solution: str) -> str:
    from experiments.tasks import answers

    if checker_name == "gsm8k":
        return solution.rsplit(answers.GSM8K_MARKER, 1)[-1].strip()
    if checker_name == "math":
        return answers.last_boxed(solution) or ""
    return solution.strip()


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def check_data_dir(data_dir: str) -> None:
    """Refuse a data directory that does not exist (gs:// paths need gcsfs to be checked and read without tensorflow)."""
    if not data_dir:
        return
    from etils import epath

    try:
        exists = epath.Path(data_dir).exists()
    except ImportError as e:
        raise TaskError(f"task.data_dir={data_dir!r} cannot be read: {e} (pip install gcsfs for gs:// paths)") from None
    if not exists:
        raise TaskError(f"task.data_dir={data_dir!r} does not exist")


def open_split(tc: TaskConfig, dataset: str, split: str):
    """``tfds.data_source`` of one split (array_record random access; prepares the dataset if allowed)."""
    import tensorflow_datasets as tfds

    from experiments.tasks import tfds_builders  # noqa: F401  (registers distgame_gsm8k / distgame_math)

    check_data_dir(tc.data_dir)
    try:
        return tfds.data_source(
            dataset,
            split=split,
            data_dir=tc.data_dir or None,
            download=tc.download,
            builder_kwargs={"file_format": "array_record"},
        )
    except tfds.core.registered.DatasetNotFoundError:
        raise TaskError(f"task.name={tc.name!r}: tfds does not know a dataset named {dataset!r}") from None
    except Exception as e:  # download / preparation failures: report, don't dump a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskError(
            f"task.name={tc.name!r}: cannot read split {split!r} of {dataset!r} "
            f"(data_dir={tc.data_dir or 'default'!r}, download={tc.download}): {first}"
        ) from None


class TextTask:
    """A text dataset read through ``tfds.data_source``; rows are fetched and encoded on demand."""

    def __init__(self, tc: TaskConfig, tokenizer):
        self.tc, self.tokenizer = tc, tokenizer
        self.max_len, self.n_test = tc.max_len, tc.n_test
        self.fmt = text_format(tc)
        self._check = checker(self.fmt.checker)
        self.train_source = open_split(tc, self.fmt.dataset, tc.train_split)
        self.test_source = open_split(tc, self.fmt.dataset, tc.test_split)
        n_rows = len(self.train_source)
        if n_rows <= tc.n_heldout:
            raise TaskError(
                f"task.n_heldout={tc.n_heldout} leaves no training rows: split {tc.train_split!r} has {n_rows}"
            )
        self.n_train_rows = min(tc.n_train, n_rows - tc.n_heldout)
        self._heldout_start = n_rows - tc.n_heldout

    # -- rows ---------------------------------------------------------------
    def _problem(self, row: dict) -> TextProblem:
        f = self.fmt
        for key in (f.prompt_field, f.solution_field) + ((f.answer_field,) if f.answer_field else ()):
            if key not in row:
                raise TaskError(
                    f"task.name={self.tc.name!r}: dataset rows have no feature {key!r} (features: {', '.join(row)})"
                )
        solution = _text(row[f.solution_field]).strip()
        answer = _text(row[f.answer_field]).strip() if f.answer_field else reference_answer(f.checker, solution)
        return TextProblem(f.template.format(problem=_text(row[f.prompt_field]).strip()), " " + solution, answer)

    @functools.lru_cache(maxsize=None)
    def _encoded_len(self, problem: TextProblem) -> int:
        return 2 + len(self.tokenizer.encode(problem.prompt)) + len(self.tokenizer.encode(problem.solution))

    def _fits(self, problem: TextProblem) -> bool:
        return self._encoded_len(problem) <= self.max_len

    def _order(self, split: str, seed: int) -> tuple[Any, np.ndarray]:
        if split == "train":  # a seeded permutation of the training rows (held-out tail excluded)
            return self.train_source, np.random.default_rng([seed, 7]).permutation(self._heldout_start)
        if split == "heldout":
            return self.train_source, np.arange(self._heldout_start, len(self.train_source))
        if split == "test":
            return self.test_source, np.arange(len(self.test_source))
        raise ValueError(f"unknown split {split!r}; expected one of {ar.SPLITS}")

    def problems(self, split, seed, n=None, *, easy_max_steps=None) -> list[TextProblem]:
        """The first ``n`` rows of ``split`` (train: in a ``seed``-permuted order) whose sequence fits
        ``max_len`` and that have a reference answer.

        Deterministic and prefix-stable; held-out and test sets do not depend on ``seed``.
        """
        if easy_max_steps:
            raise TaskError(
                f"task.name={self.tc.name!r} has no 'easy' problems; set train.data to 'solutions' or 'prompts'"
            )
        if n is None:
            n = {"train": self.n_train_rows, "heldout": self.tc.n_heldout, "test": self.tc.n_test}[split]
        return list(self._problems(split, seed if split == "train" else 0, n))

    @functools.lru_cache(maxsize=64)  # the protocol asks for the same test set many times
    def _problems(self, split: str, seed: int, n: int) -> tuple[TextProblem, ...]:
        source, order = self._order(split, seed)
        out: list[TextProblem] = []
        for i in order:
            if len(out) == n:
                break
            p = self._problem(source[int(i)])
            if p.answer and self._fits(p):
                out.append(p)
        if not out and n:
            raise TaskError(
                f"task.max_len={self.max_len}: no {split!r} problem of {self.fmt.dataset!r} fits; raise task.max_len"
            )
        return tuple(out)

    def is_correct(self, text: str, answer: str) -> bool:
        return self._check(text, answer)

    def text_features(self, text: str) -> dict[str, float]:
        return {}  # free-form text: no structure to count

    def training_rows(self, seed, n, *, with_solution, easy_max_steps=None, style=None) -> RowSource:
        """The first ``n`` rows of the training order, encoded (and truncated to ``max_len``) only when read."""
        if easy_max_steps:
            raise TaskError(
                f"task.name={self.tc.name!r} has no 'easy' problems; set train.data to 'solutions' or 'prompts'"
            )
        _, order = self._order("train", seed)
        order = order[: min(n, self.n_train_rows)]

        def encode(idx: np.ndarray) -> dict[str, np.ndarray]:
            problems = [self._problem(self.train_source[int(order[i])]) for i in idx]
            return encode_truncated(problems, self.tokenizer, self.max_len, with_solution)

        return LazyRows(len(order), encode)


def encode_truncated(problems, tokenizer, max_len: int, with_solution: bool = True) -> dict[str, np.ndarray]:
    """Like :func:`experiments.tasks.encoding.encode_problems` (same layout and mask alignment), but
    sequences longer than ``max_len`` are cut at ``max_len`` instead of refused (training on real text)."""
    n = len(problems)
    tokens = np.full((n, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, max_len), np.float32)
    for i, p in enumerate(problems):
        prompt_ids = [tokenizer.bos_id] + tokenizer.encode(p.prompt)
        seq = (prompt_ids + (tokenizer.encode(p.solution) if with_solution else []) + [tokenizer.eos_id])[:max_len]
        tokens[i, : len(seq)] = seq
        first_target = len(prompt_ids) - 1 if with_solution else 0
        mask[i, min(first_target, len(seq) - 1) : len(seq) - 1] = 1.0
    return {"tokens_bt": tokens, "loss_mask_bt": mask}
