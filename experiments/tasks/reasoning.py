"""The built-in default task: the arithmetic word problems with many valid solution texts.

Same problems, splits and answers as :mod:`experiments.tasks.arithmetic`; what changes is the
solution *text*. Real reasoning traces carry entropy (many correct texts per problem), and a
defense can act on which correct text the teacher emits (learnability), not only on whether
it is right. Each solution is written in a *style*: a set of probabilities for independent
choices, drawn per line from a generator seeded by ``(style, seed, prompt)``:

- ``connective``: a line after the first opens with nothing or one of ``so``, ``then``, ``now``, ``next``, ``thus``
  (the first line with nothing or ``first``);
- ``commute``: ``a + b`` / ``a * b`` is written ``b + a`` / ``b * a``;
- ``fuse``: an add/subtract step joins the previous add/subtract line without writing the
  intermediate result (``7 + 5 - 3 = 9 .`` instead of ``7 + 5 = 12 . 12 - 3 = 9 .``; at most
  ``MAX_FUSED`` operations per line, evaluated left to right);
- ``check``: a one-operation line is followed by its inverse check, ``check 12 - 5 = 7 .``
  (``verify`` instead of ``check`` half the time; ``a * 2 = c`` is checked as ``a + a = c``,
  ``a * 3`` is not checked);
- ``spell``: a multiplication is spelled out as repeated addition (``9 * 2 = 18 .`` becomes
  ``9 + 9 = 18 .``; ``4 * 3 = 12 .`` becomes ``4 + 4 = 8 . 8 + 4 = 12 .``); spelled lines take no
  check and no fused step.

Every text ends with ``#### <answer>``; the answer is unique and checked as in the arithmetic task.
Styles (:data:`STYLES`, a role picks one with ``train.style``):

- ``mixed``: the teacher's and the student base's data, every choice open;
- ``schoolbook``: the proxy's: the same, but it spells out every multiplication. The proxy is the
  provider's smaller model with habits of its own (as the paper's Qwen2.5-3B beside an R1-distilled
  teacher); PoE mixes its habit into the teacher's texts. Spelling out never changes the answer and
  the teacher adds two-digit numbers reliably, so it stays right. Students trained on reference
  texts (2 seeds, 800 steps) reach 56% with no multiplication spelled out and 42% with every one
  spelled out (old world, spell 0.3 teacher); under PoE γ=0.3 the default's passive student loses 6.7 points and its correct-traces-only twin 8.5
  (see the README);
- ``careful`` (checks every line it can), ``terse`` (fuses most add/subtract chains; fused lines
  are hard even for the teacher: 24 of 28 wrong at τ=0.85, top-p 0.9) and ``canonical`` (the arithmetic task's
  one text), for experiments.
"""

from __future__ import annotations

import dataclasses
import random
import re

from experiments.tasks import arithmetic as ar

MAX_FUSED = 2
"""Most operations written on one fused line."""

CONNECTIVES = ("so", "then", "now", "next", "thus")
CHECK_WORDS = ("check", "verify")


@dataclasses.dataclass(frozen=True)
class Style:
    """Probabilities of the independent choices a solution text makes (see the module docstring)."""

    connective: float  # P(a line opens with a word); the word is uniform among the options
    commute: float  # P(operands of + or * are swapped)
    fuse: float  # P(an add/subtract step joins the previous add/subtract line)
    check: float  # P(a one-operation line is followed by its inverse check)
    spell: float = 0.0  # P(a multiplication is spelled out as repeated addition)


STYLES: dict[str, Style] = {
    "mixed": Style(connective=0.8, commute=0.5, fuse=0.15, check=0.25, spell=0.12),
    "schoolbook": Style(connective=0.8, commute=0.5, fuse=0.15, check=0.25, spell=1.0),
    "careful": Style(connective=0.8, commute=0.5, fuse=0.15, check=1.0, spell=0.12),
    "terse": Style(connective=0.0, commute=0.5, fuse=0.85, check=0.0),
    "canonical": Style(connective=0.0, commute=0.0, fuse=0.0, check=0.0),
}


def write_solution(steps, rng: random.Random, style: Style) -> str:
    """One solution text for ``steps = [(a, op, b, c), ...]`` (op in ``+ - *``)."""
    # [first operand, [(op, operand), ...], result, plain]; a spelled-out line is not plain: it takes no
    # fused step and no check (so a spelled a * 3 is two lines, as long as a line and its check)
    lines: list[list] = []
    for a, op, b, c in steps:
        last = lines[-1] if lines else None
        if op == "*" and rng.random() < style.spell:  # a * 3 = c  ->  a + a = 2a . 2a + a = c
            lines += [[a, [("+", a)], 2 * a, False]] + ([[2 * a, [("+", a)], c, False]] if b == 3 else [])
        elif (
            last is not None
            and last[3]
            and op in "+-"
            and all(o in "+-" for o, _ in last[1])
            and len(last[1]) < MAX_FUSED
            and rng.random() < style.fuse
        ):
            last[1].append((op, b))
            last[2] = c
        else:
            lines.append([a, [(op, b)], c, True])
    words: list[str] = []
    for i, (first, ops, result, plain) in enumerate(lines):
        if rng.random() < style.connective:
            words.append("first" if i == 0 else CONNECTIVES[int(rng.random() * len(CONNECTIVES))])
        (op0, b0), rest = ops[0], ops[1:]
        if op0 in "+*" and rng.random() < style.commute:
            first, b0 = b0, first
        words += [str(first), op0, str(b0)]
        for op, b in rest:
            words += [op, str(b)]
        words += ["=", str(result), "."]
        if plain and len(ops) == 1 and rng.random() < style.check:
            check = _inverse_check(first, op0, b0, result)
            if check:
                words += [CHECK_WORDS[int(rng.random() * len(CHECK_WORDS))]] + check + ["."]
    words += [ar.ANSWER_MARKER, str(steps[-1][3])]
    return " ".join(words)


def _inverse_check(a: int, op: str, b: int, c: int) -> list[str] | None:
    if op == "+":
        return [str(c), "-", str(b), "=", str(a)]
    if op == "-":
        return [str(c), "+", str(b), "=", str(a)]
    if op == "*" and 2 in (a, b):  # a * 2 = c  ->  a + a = c
        x = a if b == 2 else b
        return [str(x), "+", str(x), "=", str(c)]
    return None


def solution_writer(style: str, seed: int):
    """``write(prompt, steps)`` for :func:`experiments.tasks.arithmetic.make_split`: the text of a
    problem is a function of (style, seed, prompt) alone, so every split and run agree on it."""
    spec = STYLES[style]
    return lambda prompt, steps: write_solution(steps, random.Random(f"{style}|{seed}|{prompt}"), spec)


def max_solution_tokens(cfg: ar.ArithmeticTaskConfig, max_steps: int | None = None) -> int:
    """Upper bound on ``len(encode(solution) + EOS)`` in any style."""
    steps = cfg.max_steps if max_steps is None else max_steps
    d = ar._ndigits(max(cfg.max_value, cfg.max_start, cfg.max_operand, 3))
    line = 1 + d + (1 + d) + 1 + d + 1  # connective a op b = c .
    check = 1 + d + 1 + d + 1 + d + 1  # check c - b = a .
    return steps * (line + check) + 1 + d + 1  # #### answer EOS


def max_sequence_tokens(cfg: ar.ArithmeticTaskConfig, max_steps: int | None = None) -> int:
    """Upper bound on ``len(BOS + prompt + solution + EOS)`` in any style (86 for the default config)."""
    return ar.max_prompt_tokens(cfg, max_steps) + max_solution_tokens(cfg, max_steps)


# --- checking the reasoning, not just the answer ----------------------------------

_LINE_RE = re.compile(rf"^(?:(?:{'|'.join(('first',) + CONNECTIVES + CHECK_WORDS)}) )?(\d+(?: [-+*] \d+)+) = (\d+)$")


def text_features(text: str) -> dict[str, float]:
    """What a solution text is made of: ``valid`` (every line true, :func:`reasoning_is_valid`),
    ``checks`` (check lines), ``fused`` (lines with more than one operation) and ``times`` (lines
    that multiply: a multiplication spelled out as repeated addition has none)."""
    lines = [s.strip() for s in text.rpartition(ar.ANSWER_MARKER)[0].split(" .") if s.strip()]
    work = [line for line in lines if not line.startswith(CHECK_WORDS)]
    return {
        "valid": float(reasoning_is_valid(text)),
        "checks": float(len(lines) - len(work)),
        "fused": float(sum(len(re.findall(r" [-+*] ", " " + line)) > 1 for line in work)),
        "times": float(sum(" * " in line for line in work)),
    }


def reasoning_is_valid(text: str) -> bool:
    """Whether every line of a solution text is well formed and arithmetically true (left to
    right), and the text ends with ``#### <the last line's result>``. Independent of how the text
    was written: it parses the words, so it also judges sampled traces."""
    body, marker, tail = text.rpartition(ar.ANSWER_MARKER)
    answer = ar.extract_answer(text)
    if not marker or answer is None or tail.strip() != str(answer):
        return False
    lines = [s.strip() for s in body.split(" .")]
    if lines[-1] != "" or len(lines) < 2:
        return False
    last_result = None
    for line in lines[:-1]:
        m = _LINE_RE.match(line)
        if not m:
            return False
        terms = m.group(1).split()
        value = int(terms[0])
        for op, x in zip(terms[1::2], terms[2::2]):
            value = value + int(x) if op == "+" else value - int(x) if op == "-" else value * int(x)
        if value != int(m.group(2)):
            return False
        if not line.startswith(CHECK_WORDS):
            last_result = value
    return last_result == answer
