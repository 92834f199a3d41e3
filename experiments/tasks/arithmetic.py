"""Built-in synthetic reasoning task: multi-step arithmetic word problems.

A problem is a tiny story in a fixed word-problem language, answered by a
step-by-step solution that ends in a GSM8K-style final-answer marker::

    prompt:   ann has 7 apples . she buys 5 . she sells 3 . she doubles them . how many ?
    solution: 7 + 5 = 12 . 12 - 3 = 9 . 9 * 2 = 18 . #### 18

Operations (verbs chosen uniformly within a kind):

- add:       ``buys N`` / ``finds N`` / ``gets N``        -> ``a + N = c``
- subtract:  ``sells N`` / ``loses N`` / ``drops N``      -> ``a - N = c``
- multiply:  ``doubles them`` / ``triples them``          -> ``a * 2 = c`` / ``a * 3 = c``

Every prompt ends with the fixed token sequence :data:`PROMPT_SUFFIX`
(``how many ?``), so the model input for sampling is ``BOS + encode(prompt)``
and the training target is ``encode(solution) + EOS``. Every intermediate
result stays in ``[0, max_value]``: at each step the operation is drawn from
the operations whose result is in range (adds of ``1..max_operand`` that do not
overflow, subtractions that do not go negative, multiplications of a positive
quantity that stay ``<= max_value``).

Splits are disjoint by construction: a problem belongs to the split given by a
stable hash (BLAKE2b) of its prompt text, bucket ``hash % 10``: train 0-7,
heldout 8, test 9. :func:`make_split` samples problems from a generator seeded
by ``(seed, split, step range)`` and keeps those that hash into the requested
split, skipping duplicates, until it has ``n``. The result is deterministic and
prefix-stable: ``make_split(..., n=k)`` equals ``make_split(..., n=m)[:k]`` for
``k <= m``.

Problem lengths are bounded: :meth:`ArithmeticTaskConfig.validate` checks that
the longest possible problem fits in ``max_len`` (see
:func:`max_sequence_tokens`), so generated problems never need truncation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import random
import re
from collections.abc import Callable

import numpy as np

from experiments.fields import documented as _help

# --- the word-problem language ----------------------------------------------

NAMES: tuple[tuple[str, str], ...] = (
    ("ann", "she"),
    ("bob", "he"),
    ("cara", "she"),
    ("dan", "he"),
    ("eve", "she"),
    ("finn", "he"),
    ("gina", "she"),
    ("hugo", "he"),
)
"""(name, pronoun) pairs."""

ITEMS: tuple[str, ...] = ("apples", "pens", "coins", "cards", "books", "shells", "stamps", "marbles")
ADD_VERBS: tuple[str, ...] = ("buys", "finds", "gets")
SUB_VERBS: tuple[str, ...] = ("sells", "loses", "drops")
MUL_VERBS: tuple[tuple[str, int], ...] = (("doubles", 2), ("triples", 3))
"""(verb, factor) pairs; the sentence is ``<pronoun> <verb> them .``."""

PROMPT_SUFFIX = "how many ?"
"""Every prompt ends with this fixed token sequence."""

ANSWER_MARKER = "####"
"""The final answer follows the last occurrence of this token."""

_SYMBOLS: tuple[str, ...] = ("+", "-", "*", "=", ".", "?", ANSWER_MARKER)
_FIXED_WORDS: tuple[str, ...] = ("has", "them", "how", "many")
_REASONING_WORDS: tuple[str, ...] = ("first", "so", "then", "now", "check", "verify", "next", "thus")
"""Words of the reasoning task's solution texts (:mod:`experiments.tasks.reasoning`); one tokenizer serves both tasks."""

SPLITS: tuple[str, ...] = ("train", "heldout", "test")
_SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "train": frozenset(range(8)),
    "heldout": frozenset({8}),
    "test": frozenset({9}),
}


def vocabulary_words() -> tuple[str, ...]:
    """Every non-digit word the task can emit, in a fixed order (for the tokenizer)."""
    words: list[str] = list(_SYMBOLS) + list(_FIXED_WORDS)
    for name, pronoun in NAMES:
        words += [name, pronoun]
    words += list(ITEMS) + list(ADD_VERBS) + list(SUB_VERBS) + [v for v, _ in MUL_VERBS]
    words += list(_REASONING_WORDS)  # appended last: the arithmetic task's ids are unchanged
    return tuple(dict.fromkeys(words))  # dedupe (pronouns repeat), keep order


# --- config -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Synthetic multi-step arithmetic word problems (the built-in task)."""

    min_steps: int = _help("Fewest operations per problem (>= 1).", 2)
    max_steps: int = _help("Most operations per problem (>= min_steps); the count is uniform in between.", 4)
    max_start: int = _help("Largest starting quantity; starts are uniform in [1, max_start].", 20)
    max_operand: int = _help("Largest add/subtract operand; operands are drawn from [1, max_operand].", 9)
    max_value: int = _help("Every intermediate result stays in [0, max_value] (>= max_start).", 99)
    n_train: int = _help("Number of training problems.", 20000)
    n_heldout: int = _help("Number of held-out problems (for the proxy's held-out gradient and example values).", 512)
    n_test: int = _help("Number of test problems (accuracy / utility evaluation).", 512)
    max_len: int = _help(
        "Max tokens of BOS + prompt + solution + EOS; must fit the longest possible problem (62 for the defaults).", 64
    )

    def validate(self) -> "ArithmeticTaskConfig":
        """Raise ``ValueError`` naming the offending field; return ``self`` when valid."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"task.{f.name}={v!r} must be an integer")
        if self.min_steps < 1:
            raise ValueError(f"task.min_steps={self.min_steps} must be >= 1")
        if self.max_steps < self.min_steps:
            raise ValueError(f"task.max_steps={self.max_steps} must be >= task.min_steps={self.min_steps}")
        for name in ("max_start", "max_operand", "n_train", "n_heldout", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)} must be >= 1")
        if self.max_value < self.max_start:
            raise ValueError(f"task.max_value={self.max_value} must be >= task.max_start={self.max_start}")
        need = max_sequence_tokens(self)
        if self.max_len < need:
            raise ValueError(
                f"task.max_len={self.max_len} is too small: a problem with task.max_steps={self.max_steps} "
                f"steps can need {need} tokens (BOS + prompt + solution + EOS)"
            )
        return self


def _ndigits(x: int) -> int:
    return len(str(int(x)))


def max_prompt_tokens(cfg: ArithmeticTaskConfig, max_steps: int | None = None) -> int:
    """Upper bound on ``len(BOS + encode(prompt))`` (size of sampling prompts)."""
    steps = cfg.max_steps if max_steps is None else max_steps
    first = 4 + _ndigits(cfg.max_start)  # name has N item .
    per_step = 3 + _ndigits(cfg.max_operand)  # pronoun verb N .   (multiply: pronoun verb them .)
    return 1 + first + steps * per_step + len(PROMPT_SUFFIX.split())


def max_solution_tokens(cfg: ArithmeticTaskConfig, max_steps: int | None = None) -> int:
    """Upper bound on ``len(encode(solution) + EOS)`` (a sampling budget that always suffices)."""
    steps = cfg.max_steps if max_steps is None else max_steps
    d_v = _ndigits(max(cfg.max_value, cfg.max_start))
    per_step = 2 * d_v + _ndigits(max(cfg.max_operand, 3)) + 3  # a op b = c .
    return steps * per_step + 1 + d_v + 1  # #### answer EOS


def max_sequence_tokens(cfg: ArithmeticTaskConfig, max_steps: int | None = None) -> int:
    """Upper bound on ``len(BOS + prompt + solution + EOS)``; 62 for the default config."""
    return max_prompt_tokens(cfg, max_steps) + max_solution_tokens(cfg, max_steps)


# --- problems ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem: ``prompt`` (ends with :data:`PROMPT_SUFFIX`), step-by-step
    ``solution`` (ends with ``#### <answer>``) and the integer ``answer``."""

    prompt: str
    solution: str
    answer: int

    @property
    def num_steps(self) -> int:
        return self.solution.count(" = ")


def split_of(prompt: str) -> str:
    """The split a prompt belongs to (stable across processes and Python versions)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")
    bucket = h % 10
    return "train" if bucket < 8 else ("heldout" if bucket == 8 else "test")


def _derive_seed(seed: int, split: str, min_steps: int, max_steps: int) -> int:
    material = f"arithmetic-task|seed={seed}|split={split}|steps={min_steps}-{max_steps}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little")


def _sample(rng: random.Random, cfg: ArithmeticTaskConfig, min_steps: int, max_steps: int):
    """Draw one problem: returns (prompt, steps) with steps = [(a, op, b, c), ...]."""
    rand = rng.random
    randint = rng.randint
    max_value, max_operand = cfg.max_value, cfg.max_operand
    n_steps = randint(min_steps, max_steps)
    name, pronoun = NAMES[int(rand() * len(NAMES))]
    item = ITEMS[int(rand() * len(ITEMS))]
    a = randint(1, cfg.max_start)
    words = [name, "has", str(a), item, "."]
    steps = []
    for _ in range(n_steps):
        kinds = []
        if a < max_value:
            kinds.append("+")
        if a >= 1:
            kinds.append("-")
            if 2 * a <= max_value:
                kinds.append("*")
        op = kinds[int(rand() * len(kinds))]
        if op == "+":
            b = randint(1, min(max_operand, max_value - a))
            c = a + b
            words += [pronoun, ADD_VERBS[int(rand() * len(ADD_VERBS))], str(b), "."]
        elif op == "-":
            b = randint(1, min(max_operand, a))
            c = a - b
            words += [pronoun, SUB_VERBS[int(rand() * len(SUB_VERBS))], str(b), "."]
        else:
            choices = [vf for vf in MUL_VERBS if a * vf[1] <= max_value]
            verb, b = choices[int(rand() * len(choices))]
            c = a * b
            words += [pronoun, verb, "them", "."]
        steps.append((a, op, b, c))
        a = c
    words.append(PROMPT_SUFFIX)
    return " ".join(words), steps


def _solution(steps) -> str:
    parts = [f"{a} {op} {b} = {c} ." for a, op, b, c in steps]
    parts.append(f"{ANSWER_MARKER} {steps[-1][3]}")
    return " ".join(parts)


def make_split(
    cfg: ArithmeticTaskConfig,
    split: str,
    seed: int,
    n: int | None = None,
    *,
    min_steps: int | None = None,
    max_steps: int | None = None,
    write_solution: Callable[[str, list], str] | None = None,
) -> list[Problem]:
    """Generate ``n`` distinct problems of ``split`` ("train", "heldout" or "test").

    Deterministic given ``(cfg, split, seed, min_steps, max_steps)``; ``n``
    defaults to ``cfg.n_train`` / ``cfg.n_heldout`` / ``cfg.n_test``. Problems of
    different splits never share a prompt (membership is a hash of the prompt).
    ``min_steps`` / ``max_steps`` override the config's step range (e.g.
    ``min_steps=1, max_steps=1`` for an easy variant); the overridden config must
    still validate. ``write_solution(prompt, steps)`` spells the solution text (default: the one
    canonical text ``a op b = c . ... #### answer``). Raises ``ValueError`` for an unknown split or when the
    problem space is too small to hold ``n`` distinct problems of the split.
    """
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    overrides = {}
    if min_steps is not None:
        overrides["min_steps"] = min_steps
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    gen_cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    gen_cfg.validate()
    if n is None:
        n = {"train": cfg.n_train, "heldout": cfg.n_heldout, "test": cfg.n_test}[split]
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    seed = operator.index(seed)
    lo, hi = gen_cfg.min_steps, gen_cfg.max_steps
    rng = random.Random(_derive_seed(seed, split, lo, hi))

    buckets = _SPLIT_BUCKETS[split]
    blake2b = hashlib.blake2b
    seen: set[str] = set()
    out: list[Problem] = []
    # Expected attempts: n / P(split) (10 n for heldout/test) plus duplicates; the
    # cap only trips when the problem space cannot hold n distinct problems.
    max_attempts = 50 * n + 10_000
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could not generate n={n} distinct {split!r} problems with steps in [{lo}, {hi}] "
                f"after {max_attempts} attempts (got {len(out)}); the problem space is too small"
            )
        prompt, steps = _sample(rng, gen_cfg, lo, hi)
        h = int.from_bytes(blake2b(prompt.encode(), digest_size=8).digest(), "little")
        if h % 10 not in buckets or prompt in seen:
            continue
        seen.add(prompt)
        solution = write_solution(prompt, steps) if write_solution else _solution(steps)
        out.append(Problem(prompt=prompt, solution=solution, answer=steps[-1][3]))
    return out


# --- answers ----------------------------------------------------------------

_ANSWER_RE = re.compile(r"\s*(-?\d+)(?!\S)")


def extract_answer(text: str) -> int | None:
    """The integer right after the last ``####`` in ``text``; ``None`` if absent or garbled.

    The number must be the next whitespace-separated word (``"#### 18"``,
    ``"#### 18 ."``); anything else (``"#### x"``, ``"#### 1x"``, ``"18"``) is None.
    """
    if not isinstance(text, str):
        return None
    i = text.rfind(ANSWER_MARKER)
    if i < 0:
        return None
    m = _ANSWER_RE.match(text, i + len(ANSWER_MARKER))
    return int(m.group(1)) if m else None


def is_correct(text: str, answer: int) -> bool:
    """Whether the final answer extracted from ``text`` equals ``answer``."""
    got = extract_answer(text)
    return got is not None and got == int(answer)
