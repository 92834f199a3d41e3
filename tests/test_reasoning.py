"""The reasoning task: many valid solution texts per problem, one checked answer."""

import random

import numpy as np
import pytest

from experiments.tasks import arithmetic as ar
from experiments.tasks import reasoning as rs
from experiments.tasks.registry import build_task
from experiments.tasks.task_config import TaskConfig

CFG = TaskConfig(name="reasoning", min_steps=2, max_steps=3, max_len=88)
STEPS = [(7, "+", 5, 12), (12, "-", 3, 9), (9, "*", 2, 18), (18, "+", 4, 22)]


@pytest.fixture(scope="module")
def task():
    return build_task(CFG.validate())


def test_every_style_and_choice_gives_the_same_checked_answer(task):
    problems = task.problems("train", 0, 400, style="canonical")
    always = rs.Style(connective=1.0, commute=1.0, fuse=1.0, check=1.0, spell=1.0)
    half = rs.Style(connective=0.5, commute=0.5, fuse=0.5, check=0.5, spell=0.5)
    for p in problems:
        steps = _steps_of(p.solution)
        texts = {
            rs.write_solution(steps, random.Random(i), style)
            for i in range(8)
            for style in (*rs.STYLES.values(), always, half)
        }
        for text in texts:
            assert ar.extract_answer(text) == p.answer, text
            assert rs.reasoning_is_valid(text), text
            assert len(task.tokenizer.encode(text)) + 1 <= rs.max_solution_tokens(CFG)
            assert task.tokenizer.decode(task.tokenizer.encode(text)) == text


def test_mixed_style_has_many_texts_per_problem():
    texts = {rs.write_solution(STEPS, random.Random(i), rs.STYLES["mixed"]) for i in range(300)}
    assert len(texts) > 50
    terse = [rs.write_solution(STEPS, random.Random(i), rs.STYLES["terse"]) for i in range(300)]
    assert sum(rs.text_features(t)["fused"] for t in terse) / len(terse) > 0.5
    assert {rs.write_solution(STEPS, random.Random(i), rs.STYLES["canonical"]) for i in range(20)} == {
        "7 + 5 = 12 . 12 - 3 = 9 . 9 * 2 = 18 . 18 + 4 = 22 . #### 22"
    }


def test_connectives_nearly_uniform_and_parsed():
    """connective=0.8 over five words: each of the six openings of a later line (nothing or a word) has
    probability ~1/6, the entropy the default world relies on (ln 6 nats per line)."""
    style = rs.Style(connective=0.8, commute=0.0, fuse=0.0, check=0.0)
    counts = dict.fromkeys(("",) + rs.CONNECTIVES, 0)
    for i in range(3000):
        text = rs.write_solution(STEPS, random.Random(i), style)
        assert rs.reasoning_is_valid(text), text
        for line in text.split(" . ")[1:-1]:
            first = line.split()[0]
            counts[first if first in rs.CONNECTIVES else ""] += 1
    shares = np.array(list(counts.values())) / sum(counts.values())
    assert np.allclose(shares, [0.2] + [0.16] * 5, atol=0.015), counts
    assert rs.reasoning_is_valid("first 7 + 5 = 12 . thus 12 - 3 = 9 . next 9 * 2 = 18 . #### 18")
    assert not rs.reasoning_is_valid("first 7 + 5 = 12 . hence 12 - 3 = 9 . #### 9")  # not a connective


def test_variants_spelled_out():
    fused = rs.Style(connective=0.0, commute=0.0, fuse=1.0, check=0.0)
    assert rs.write_solution(STEPS, random.Random(0), fused) == "7 + 5 - 3 = 9 . 9 * 2 = 18 . 18 + 4 = 22 . #### 22"
    checked = rs.Style(connective=0.0, commute=1.0, fuse=0.0, check=1.0)
    text = rs.write_solution(STEPS, random.Random(0), checked)
    assert text.startswith("5 + 7 = 12 . ") and "12 + 3 = 9" not in text
    for check in ("12 - 7 = 5", "9 + 3 = 12", "9 + 9 = 18", "22 - 18 = 4"):
        assert check in text
    assert rs.text_features("7 + 5 - 3 = 9 . check 9 + 3 = 12 . so 9 * 2 = 18 . #### 18") == {
        "valid": 1.0,
        "checks": 1.0,
        "fused": 1.0,
        "times": 1.0,
    }


def test_multiplication_spelled_out_as_repeated_addition():
    spelled = rs.Style(connective=0.0, commute=0.0, fuse=0.0, check=0.0, spell=1.0)
    assert (
        rs.write_solution(STEPS, random.Random(0), spelled)
        == "7 + 5 = 12 . 12 - 3 = 9 . 9 + 9 = 18 . 18 + 4 = 22 . #### 22"
    )
    assert rs.write_solution([(4, "*", 3, 12), (12, "-", 5, 7)], random.Random(0), spelled) == (
        "4 + 4 = 8 . 8 + 4 = 12 . 12 - 5 = 7 . #### 7"
    )
    # a spelled line takes no check and no fused step; the plain line after it does
    everything = rs.Style(connective=0.0, commute=0.0, fuse=1.0, check=1.0, spell=1.0)
    text = rs.write_solution(STEPS, random.Random(0), everything)
    assert text == "7 + 5 - 3 = 9 . 9 + 9 = 18 . 18 + 4 = 22 . verify 22 - 4 = 18 . #### 22"
    assert rs.text_features(text) == {"valid": 1.0, "checks": 1.0, "fused": 1.0, "times": 0.0}


@pytest.mark.parametrize(
    "text",
    [
        "7 + 5 = 13 . #### 13",  # false line
        "7 + 5 = 12 . #### 13",  # answer is not the last result
        "7 + 5 = 12 . check 12 - 5 = 8 . #### 12",  # false check
        "7 + 5 = 12 #### 12",  # no full stop
        "so = 12 . #### 12",
        "#### 12",
    ],
)
def test_invalid_reasoning_is_caught(text):
    assert not rs.reasoning_is_valid(text)


def test_splits_disjoint_and_texts_reproducible(task):
    prompts = {s: {p.prompt for p in task.problems(s, 0, 300)} for s in ar.SPLITS}
    assert not (prompts["train"] & prompts["heldout"]) and not (prompts["train"] & prompts["test"])
    assert not (prompts["heldout"] & prompts["test"])
    a, b = task.problems("test", 0, 50), task.problems("test", 0, 50)
    assert a == b  # texts are a function of (style, seed, prompt)
    assert [p.prompt for p in task.problems("test", 0, 50, style="terse")] == [p.prompt for p in a]


def test_roles_learn_their_style(task):
    rows = {
        s: task.training_rows(0, 300, with_solution=True, style=s) for s in ("mixed", "careful", "terse", "schoolbook")
    }
    texts = {
        s: [task.tokenizer.decode(r).split("? ", 1)[1] for r in rows[s].rows(np.arange(300))["tokens_bt"]] for s in rows
    }
    feats = {
        s: {k: sum(rs.text_features(t)[k] for t in texts[s]) / 300 for k in ("fused", "checks", "times")} for s in texts
    }
    assert feats["mixed"]["times"] > 0 == feats["schoolbook"]["times"]  # the proxy spells out every multiplication
    assert feats["terse"]["fused"] > 2 * feats["mixed"]["fused"] > 0
    assert feats["careful"]["checks"] > 2 * feats["mixed"]["checks"] > 0
    assert not any(w in t.split() for t in texts["terse"] for w in rs.CONNECTIVES)


def test_max_len_too_small_names_the_field():
    with pytest.raises(ValueError, match="task.max_len=64"):
        TaskConfig(name="reasoning", min_steps=2, max_steps=3, max_len=64).validate()


def _steps_of(canonical: str):
    steps = []
    for line in canonical.split(" . ")[:-1]:
        lhs, c = line.split(" = ")
        a, op, b = lhs.split()
        steps.append((int(a), op, int(b), int(c)))
    return steps
