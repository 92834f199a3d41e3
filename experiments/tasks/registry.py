"""The task a run is about: the built-in arithmetic task or a text dataset read through TFDS.

``task.name`` picks it:

- ``reasoning``: the built-in default, the arithmetic word problems with many valid solution texts
  (:mod:`experiments.tasks.reasoning`; each role's ``train.style`` picks the mix of texts it learns);
- ``arithmetic``: the same problems with one canonical solution text each (:mod:`experiments.tasks.arithmetic`);
- ``gsm8k`` / ``math``: the project's own TFDS builders (:mod:`experiments.tasks.tfds_builders`),
  numeric answer checking for GSM8K, normalised-LaTeX ``\\boxed{}`` checking for MATH;
- ``tfds:<name>``: any dataset tfds knows, with ``task.prompt_field``/``solution_field``/``answer_field``
  naming its features and ``task.checker`` the answer check.

Every task offers the same interface to training, evaluation and the protocol (:class:`Task`):
``tokenizer``, ``max_len``, ``problems(split, seed, n)`` (objects with ``prompt``, ``solution``,
``answer``), ``is_correct(text, answer)`` and ``training_rows(...)`` (a :class:`~experiments.tasks.batches.RowSource`).

Text datasets are read with ``tfds.data_source`` (array_record, no tensorflow). GSM8K and MATH have
no held-out split, so for every text task the *last* ``n_heldout`` rows of the train split are the
held-out set and never trained on. Rows whose ``BOS + prompt + solution + EOS`` exceed ``max_len``
tokens are skipped for evaluation and traces (so prompts and reference solutions always fit) and
truncated for training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import numpy as np

from experiments.fields import documented as _help
from experiments.tasks import arithmetic as ar
from experiments.tasks import reasoning as rs
from experiments.tasks.batches import ArrayRows, LazyRows, RowSource

BUILTIN_TASKS = ("reasoning", "arithmetic")
TEXT_TASKS = ("gsm8k", "math")
CHECKERS = ("gsm8k", "math", "exact")


class TaskError(ValueError):
    """A task setting that cannot be used (unknown dataset, missing data directory, ...); one line for the user."""


@dataclasses.dataclass(frozen=True)
class TaskConfig(ar.ArithmeticTaskConfig):
    """The task: the built-in arithmetic problems (fields above) or a text dataset through TFDS (fields below).
    n_train / n_heldout / n_test / max_len apply to every task; the step and value ranges to arithmetic only."""

    name: str = _help(
        "task: 'reasoning' (built-in, many valid solution texts), 'arithmetic' (built-in, one text), 'gsm8k', "
        "'math', or 'tfds:<dataset>' (any dataset tfds knows)",
        "reasoning",
    )
    tokenizer: str = _help(
        "'word' (built-in tasks only), 'byte' (UTF-8 bytes, no download), or a path to tokenizer.json / a SentencePiece .model",
        "word",
    )
    data_dir: str = _help(
        "TFDS data directory (local or gs://; '' = tfds's default ~/tensorflow_datasets); must exist", ""
    )
    download: bool = _help("text tasks: download and prepare the dataset into data_dir when it is not there yet", True)
    train_split: str = _help(
        "text tasks: TFDS split to train on (its last n_heldout rows are the held-out set)", "train"
    )
    test_split: str = _help("text tasks: TFDS split to evaluate on", "test")
    prompt_field: str = _help("tfds:<name> only: feature holding the problem text", "question")
    solution_field: str = _help("tfds:<name> only: feature holding the worked solution", "answer")
    answer_field: str = _help(
        "tfds:<name> only: feature holding the final answer ('' = extract it from the solution)", ""
    )
    checker: str = _help(
        "tfds:<name> only: answer check 'gsm8k' (numeric after ####), 'math' (\\boxed{} LaTeX) or 'exact'", "gsm8k"
    )

    @property
    def is_text(self) -> bool:
        return self.name not in BUILTIN_TASKS

    def validate(self) -> "TaskConfig":
        if self.name in BUILTIN_TASKS:
            if self.tokenizer != "word":
                raise ValueError(f"task.tokenizer={self.tokenizer!r}: the {self.name} task uses the 'word' tokenizer")
            arithmetic = self.arithmetic_fields()
            if self.name == "reasoning":  # longer texts than the canonical ones: check its own bound first
                need = rs.max_sequence_tokens(arithmetic)
                if self.max_len < need:
                    raise ValueError(
                        f"task.max_len={self.max_len} is too small: a reasoning problem with "
                        f"task.max_steps={self.max_steps} steps can need {need} tokens"
                    )
            arithmetic.validate()  # the arithmetic checks, on the arithmetic fields only
            return self
        if self.name not in TEXT_TASKS and not (self.name.startswith("tfds:") and len(self.name) > 5):
            raise ValueError(
                f"task.name={self.name!r} must be 'reasoning', 'arithmetic', 'gsm8k', 'math' or 'tfds:<dataset>'"
            )
        if self.tokenizer == "word":
            raise ValueError(
                f"task.tokenizer='word' only spells the arithmetic task; use 'byte' or a tokenizer file for task.name={self.name!r}"
            )
        for name in ("n_train", "n_heldout", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)} must be >= 1")
        if self.max_len < 8:
            raise ValueError(f"task.max_len={self.max_len} must be >= 8")
        if self.checker not in CHECKERS:
            raise ValueError(f"task.checker={self.checker!r} must be one of {', '.join(CHECKERS)}")
        return self

    def arithmetic_fields(self) -> ar.ArithmeticTaskConfig:
        """The built-in tasks' fields (step and value ranges, sizes, max_len) on their own."""
        return ar.ArithmeticTaskConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ar.ArithmeticTaskConfig)}
        )

    def identity(self) -> Any:
        """What results depend on; for arithmetic exactly the arithmetic fields (so cached stages keep their keys)."""
        return self.arithmetic_fields() if self.name == "arithmetic" else self


class Task(Protocol):
    tokenizer: Any
    max_len: int
    n_test: int

    def problems(self, split: str, seed: int, n: int | None = None, *, easy_max_steps: int | None = None) -> list: ...

    def is_correct(self, text: str, answer: Any) -> bool: ...

    def text_features(self, text: str) -> dict[str, float]: ...

    def training_rows(
        self, seed: int, n: int, *, with_solution: bool, easy_max_steps: int | None = None, style: str | None = None
    ) -> RowSource: ...


# --- arithmetic ---------------------------------------------------------------


class ArithmeticTask:
    """The built-in tasks behind the common interface: ``arithmetic`` (one canonical text per problem)
    and ``reasoning`` (texts written in a style: ``mixed`` for reference solutions, a role's
    ``train.style`` for its training rows)."""

    def __init__(self, tc: TaskConfig, tokenizer):
        self.tc, self.tokenizer = tc, tokenizer
        self.max_len, self.n_test = tc.max_len, tc.n_test
        self.styled = tc.name == "reasoning"

    def problems(self, split, seed, n=None, *, easy_max_steps=None, style=None):
        steps = {"min_steps": 1, "max_steps": easy_max_steps} if easy_max_steps else {}
        if self.styled:
            steps["write_solution"] = rs.solution_writer(style or "mixed", seed)
        return ar.make_split(self.tc, split, seed, n, **steps)

    def is_correct(self, text, answer) -> bool:
        return ar.is_correct(text, answer)

    def text_features(self, text) -> dict[str, float]:
        """What a solution text is made of (:func:`experiments.tasks.reasoning.text_features`); {} for one-text arithmetic."""
        return rs.text_features(text) if self.styled else {}

    def training_rows(self, seed, n, *, with_solution, easy_max_steps=None, style=None) -> RowSource:
        problems = self.problems("train", seed, n, easy_max_steps=easy_max_steps, style=style)
        data = ar.encode_problems(problems, self.tokenizer, self.max_len, with_solution=with_solution)
        return ArrayRows({"tokens_bt": data["tokens_bt"], "loss_mask_bt": data["loss_mask_bt"]})


# --- text datasets through TFDS -------------------------------------------------


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
    """Like :func:`experiments.tasks.arithmetic.encode_problems` (same layout and mask alignment), but
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


def build_task(tc: TaskConfig, tokenizer=None) -> Task:
    """The task of a config; ``tokenizer`` defaults to the one ``task.tokenizer`` names."""
    if tokenizer is None:
        from experiments.tasks.text_tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tc.tokenizer)
    if tc.is_text:
        return TextTask(tc, tokenizer)
    return ArithmeticTask(tc, tokenizer)
