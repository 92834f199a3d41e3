"""Answer extraction and checking for GSM8K (numeric) and MATH (normalised LaTeX), on hand-written cases."""

from decimal import Decimal

import pytest

from experiments.tasks.answers import (
    extract_gsm8k_answer,
    gsm8k_is_correct,
    last_boxed,
    math_is_correct,
    normalize_latex,
    parse_number,
)
from experiments.tasks.tfds_builders import gsm8k_final_answer

# --- GSM8K -------------------------------------------------------------------

REAL_GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    "text, want",
    [
        (REAL_GSM8K_SOLUTION, Decimal(72)),
        ("so the total is #### 1,234", Decimal(1234)),
        ("#### -5", Decimal(-5)),
        ("#### 0.75", Decimal("0.75")),
        ("#### $18.", Decimal(18)),
        ("#### 18 dollars", Decimal(18)),
        ("#### 3 then #### 4", Decimal(4)),  # the last marker wins
        ("#### .5", Decimal("0.5")),
        ("The answer is 72", None),  # no marker
        ("#### seventy", None),
        ("#### the answer is 7", None),  # number must follow the marker
        ("", None),
    ],
)
def test_extract_gsm8k_answer(text, want):
    assert extract_gsm8k_answer(text) == want


@pytest.mark.parametrize(
    "text, reference, ok",
    [
        (REAL_GSM8K_SOLUTION, "72", True),
        ("#### 72.0", "72", True),
        ("#### 1,000", "1000", True),
        ("#### 1000", "1,000", True),
        ("#### -3", "-3", True),
        ("#### 3", "-3", False),
        ("#### 0.5", "0.50", True),
        ("#### 71", "72", False),
        ("72", "72", False),  # an answer without the marker does not count
    ],
)
def test_gsm8k_is_correct(text, reference, ok):
    assert gsm8k_is_correct(text, reference) is ok


def test_gsm8k_reference_answer_and_number_parsing():
    assert gsm8k_final_answer(REAL_GSM8K_SOLUTION) == "72"
    assert gsm8k_final_answer("a\n#### 1,200") == "1200"
    assert parse_number(" -1,234.50 ") == Decimal("-1234.5")
    assert parse_number("abc") is None and parse_number("--3") is None


# --- MATH --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed 5$", "5"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("no box here", None),
        ("\\boxed{unbalanced", None),
    ],
)
def test_last_boxed(text, want):
    assert last_boxed(text) == want


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("0.5", "\\frac12"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("5.", "5"),
        ("10\\text{ cm}", "10"),
        ("10 \\mbox{ inches}", "10"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("\\$5", "5"),
        ("x = 3", "3"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("3.0", "3"),
        ("1,000", "1000"),
        ("\\text{(A)}", "(A)"),
        ("2 \\sqrt{2}", "2\\sqrt{2}"),
    ],
)
def test_equal_answers_written_differently_normalise_alike(a, b):
    assert normalize_latex(a) == normalize_latex(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\frac{1}{2}", "\\frac{1}{3}"),
        ("(3, 4)", "[3, 4]"),
        ("-2", "2"),
        ("\\sqrt{2}", "\\sqrt{3}"),
        ("x^2", "x^3"),
    ],
)
def test_different_answers_stay_different(a, b):
    assert normalize_latex(a) != normalize_latex(b)


def test_math_is_correct_on_solution_text():
    reference = "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math_is_correct("We get $\\boxed{(3,\\dfrac{\\pi}{2})}$.", reference)
    assert not math_is_correct("We get $\\boxed{(3,\\dfrac{\\pi}{3})}$.", reference)
    assert not math_is_correct("We get (3, pi/2).", reference)  # unboxed answers do not count
