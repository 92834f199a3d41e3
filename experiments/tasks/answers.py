"""Final-answer extraction and checking for real datasets.

GSM8K (numeric): a solution ends with ``#### <number>``; numbers may carry thousands commas,
a sign, decimals, a ``$`` or a trailing ``.``/unit word. Two answers agree when they are the same
number (``Decimal`` comparison, so ``1,000`` == ``1000`` == ``1000.0``).

MATH (LaTeX): the final answer is the content of the last ``\\boxed{...}`` (nested braces allowed;
also ``\\boxed 5`` and ``\\fbox{...}``). Answers are compared after a normalisation modelled on
Hendrycks et al.'s ``is_equiv`` (the MATH paper's checker): ``\\dfrac``/``\\tfrac`` -> ``\\frac``,
``\\left``/``\\right`` dropped, spaces and thin spaces removed, ``\\frac12`` -> ``\\frac{1}{2}``,
``a/b`` -> ``\\frac{a}{b}``, ``0.5`` -> ``\\frac{1}{2}``, degrees, ``\\%``, ``\\$``, a trailing ``.``,
trailing units text (``5 \\text{ cm}``) and a leading ``x =`` removed.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# --- GSM8K ------------------------------------------------------------------

GSM8K_MARKER = "####"
_NUMBER_RE = re.compile(r"-?\$?\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\s*-?\.\d+")


def parse_number(text: str) -> Decimal | None:
    """The number spelt by ``text`` (``"1,234.50"``, ``"-3"``, ``"$5"``, ``"7."``), or None."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if s.startswith("--"):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_gsm8k_answer(text: str) -> Decimal | None:
    """The first number after the last ``####`` in ``text``; None when there is no marker or no number."""
    if not isinstance(text, str):
        return None
    i = text.rfind(GSM8K_MARKER)
    if i < 0:
        return None
    m = _NUMBER_RE.search(text, i + len(GSM8K_MARKER))
    # The number must follow the marker directly (spaces allowed), not somewhere later in prose.
    if not m or text[i + len(GSM8K_MARKER) : m.start()].strip():
        return None
    return parse_number(m.group(0))


def gsm8k_is_correct(text: str, reference: str) -> bool:
    """Whether the model's ``#### <number>`` equals the reference answer (a number as text)."""
    got, want = extract_gsm8k_answer(text), parse_number(reference)
    return got is not None and want is not None and got == want


# --- MATH -------------------------------------------------------------------


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it."""
    depth = 0
    for j in range(start, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : j], j + 1
    return None  # unbalanced


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in ``text``; None if absent."""
    if not isinstance(text, str):
        return None
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
    if text.startswith(" ", j):  # "\boxed 5": the answer runs to the next "$" or end of text
        rest = text[j + 1 :]
        return rest.split("$")[0].strip() or None
    if j < len(text) and text[j] == "{":
        got = _braced(text, j)
        return None if got is None else got[0]
    return None


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _slash_to_frac(s: str) -> str:
    """``a/b`` of two integers -> ``\\frac{a}{b}``."""
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _strip_units(s: str) -> str:
    """Drop trailing units text: ``5\\text{ cm}`` / ``5 \\mbox{ inches}`` / ``10\\text{cm}^2`` -> ``5``."""
    m = re.search(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}(\^\{?\d\}?)?\s*$", s)
    if m and s[: m.start()].strip():
        return s[: m.start()]
    return s


def normalize_latex(answer: str) -> str:
    """Canonical text of a MATH answer, so equal answers written differently compare equal."""
    s = answer.strip().replace("\n", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", " ")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _strip_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)  # \text{(A)} -> (A) once units are gone
    s = s.strip().rstrip(".").strip()
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" / "k=-2": keep the right-hand side when the left is a short variable name.
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _slash_to_frac(s)
    # Plain numbers compare by value ("3.0" == "3", "1,000" == "1000").
    num = parse_number(s) if re.fullmatch(r"-?[\d,]*\.?\d+", s) else None
    if num is not None:
        s = format(num.normalize(), "f")
    return s


def math_is_correct(text: str, reference: str) -> bool:
    """Whether the last ``\\boxed{}`` of ``text`` equals ``reference`` (an answer, already unboxed) after normalisation."""
    got = last_boxed(text)
    return got is not None and normalize_latex(got) == normalize_latex(reference)
