"""The task's settings (``task.*``): ``TaskConfig``, the built-in arithmetic problems' fields plus a text dataset's
through TFDS, and their validation; ``TaskError``, the one-line error of a task setting that cannot be used. The
tasks themselves are built by :func:`experiments.tasks.registry.build_task`."""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.fields import documented as _help
from experiments.tasks import arithmetic as ar
from experiments.tasks import reasoning as rs

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
