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

The task's settings are :class:`experiments.tasks.task_config.TaskConfig`; text datasets are
:mod:`experiments.tasks.text_task`.
"""

from __future__ import annotations

from typing import Any, Protocol

from experiments.tasks import arithmetic as ar
from experiments.tasks import reasoning as rs
from experiments.tasks.batches import ArrayRows, RowSource
from experiments.tasks.encoding import encode_problems
from experiments.tasks.task_config import TaskConfig
from experiments.tasks.text_task import TextTask


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
        data = encode_problems(problems, self.tokenizer, self.max_len, with_solution=with_solution)
        return ArrayRows({"tokens_bt": data["tokens_bt"], "loss_mask_bt": data["loss_mask_bt"]})


def build_task(tc: TaskConfig, tokenizer=None) -> Task:
    """The task of a config; ``tokenizer`` defaults to the one ``task.tokenizer`` names."""
    if tokenizer is None:
        from experiments.tasks.text_tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tc.tokenizer)
    if tc.is_text:
        return TextTask(tc, tokenizer)
    return ArithmeticTask(tc, tokenizer)
