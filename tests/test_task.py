"""Tests for the built-in arithmetic task, its encoding into arrays and its tokenizer (pure Python + numpy)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from experiments.tasks import arithmetic as ar
from experiments.tasks.arithmetic import (
    ArithmeticTaskConfig,
    Problem,
    extract_answer,
    is_correct,
    make_split,
)
from experiments.tasks.encoding import encode_problems, encode_prompts
from experiments.tasks.tokenizer import Tokenizer, build_tokenizer

CFG = ArithmeticTaskConfig()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer()


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Problem]]:
    return {
        "train": make_split(CFG, "train", seed=0, n=3000),
        "heldout": make_split(CFG, "heldout", seed=0, n=400),
        "test": make_split(CFG, "test", seed=0, n=400),
    }


# --- an independent re-derivation of a problem from its prompt ---------------

_ADD = {"buys", "finds", "gets"}
_SUB = {"sells", "loses", "drops"}
_MUL = {"doubles": 2, "triples": 3}
_STEP_RE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")


def _check_problem(p: Problem, cfg: ArithmeticTaskConfig, min_steps: int, max_steps: int) -> None:
    sentences = [s.strip() for s in p.prompt.split(" . ")]
    assert p.prompt.endswith(" . how many ?"), p.prompt
    assert sentences[-1] == "how many ?"
    first = sentences[0].split()
    assert len(first) == 4 and first[1] == "has", p.prompt
    name, start, item = first[0], int(first[2]), first[3]
    pronoun = dict(ar.NAMES)[name]
    assert item in ar.ITEMS
    assert 1 <= start <= cfg.max_start

    # Expected chain, from the prompt alone.
    expected = []
    a = start
    for s in sentences[1:-1]:
        w = s.split()
        assert len(w) == 3 and w[0] == pronoun, (s, p.prompt)
        if w[1] in _ADD:
            op, b = "+", int(w[2])
            c = a + b
        elif w[1] in _SUB:
            op, b = "-", int(w[2])
            c = a - b
        else:
            assert w[2] == "them" and w[1] in _MUL, (s, p.prompt)
            op, b = "*", _MUL[w[1]]
            c = a * b
        if op != "*":
            assert 1 <= b <= cfg.max_operand
        assert 0 <= c <= cfg.max_value, p
        expected.append((a, op, b, c))
        a = c
    assert min_steps <= len(expected) <= max_steps, p

    # The solution: "a op b = c ." per step, then "#### answer".
    body, marker, tail = p.solution.rpartition(" . #### ")
    assert marker, p.solution
    steps = [s.strip() for s in body.split(" . ")]
    got = []
    for s in steps:
        m = _STEP_RE.match(s)
        assert m, (s, p.solution)
        x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
        assert z == {"+": x + y, "-": x - y, "*": x * y}[op], s  # the arithmetic is right
        got.append((x, op, y, z))
    assert got == expected, (p.prompt, p.solution)
    assert got[0][0] == start
    for (_, _, _, c), (x, _, _, _) in zip(got, got[1:]):
        assert x == c  # each step starts from the previous result
    assert int(tail) == p.answer == got[-1][3]
    assert p.num_steps == len(got)
    assert extract_answer(p.solution) == p.answer


# --- generation --------------------------------------------------------------


def test_determinism():
    a = make_split(CFG, "train", seed=3, n=200)
    b = make_split(CFG, "train", seed=3, n=200)
    c = make_split(CFG, "train", seed=4, n=200)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert len({p.prompt for p in a} & {p.prompt for p in c}) < 20
    # Prefix-stable: asking for fewer gives the first ones.
    assert make_split(CFG, "train", seed=3, n=50) == a[:50]


def test_default_sizes_and_unknown_split():
    small = dataclasses.replace(CFG, n_train=30, n_heldout=7, n_test=5)
    assert [len(make_split(small, s, seed=0)) for s in ar.SPLITS] == [30, 7, 5]
    with pytest.raises(ValueError, match="validation"):
        make_split(CFG, "validation", seed=0, n=3)


def test_splits_disjoint(splits):
    prompts = {k: {p.prompt for p in v} for k, v in splits.items()}
    for k, v in splits.items():
        assert len(prompts[k]) == len(v), f"duplicates in {k}"
        assert all(ar.split_of(p.prompt) == k for p in v)
    assert not prompts["train"] & prompts["heldout"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["heldout"] & prompts["test"]
    # Also across seeds: membership depends only on the prompt.
    other = {p.prompt for p in make_split(CFG, "test", seed=1, n=400)}
    assert not other & prompts["train"]


def test_solutions_are_correct(splits):
    for v in splits.values():
        for p in v:
            _check_problem(p, CFG, CFG.min_steps, CFG.max_steps)


def test_step_counts_and_values():
    cfg = ArithmeticTaskConfig(min_steps=1, max_steps=3, max_start=5, max_operand=4, max_value=12, max_len=64)
    probs = make_split(cfg, "train", seed=0, n=500)
    counts = {p.num_steps for p in probs}
    assert counts == {1, 2, 3}
    for p in probs:
        _check_problem(p, cfg, 1, 3)
    ops = {op for p in probs for op in re.findall(r" ([-+*]) ", p.solution)}
    assert ops == {"+", "-", "*"}


def test_step_overrides():
    easy = make_split(CFG, "test", seed=0, n=300, min_steps=1, max_steps=1)
    assert all(p.num_steps == 1 for p in easy)
    for p in easy:
        _check_problem(p, CFG, 1, 1)
    hard = make_split(CFG, "test", seed=0, n=50, min_steps=4)
    assert all(p.num_steps == 4 for p in hard)


def test_space_too_small_raises():
    tiny = ArithmeticTaskConfig(min_steps=1, max_steps=1, max_start=1, max_operand=1, max_value=2, max_len=64)
    with pytest.raises(ValueError, match="too small"):
        make_split(tiny, "test", seed=0, n=1000)


def test_lengths_fit_bounds(tok, splits):
    enc = encode_problems(splits["train"], tok, CFG.max_len)
    assert enc["lens_b"].max() <= ar.max_sequence_tokens(CFG) <= CFG.max_len
    assert enc["prompt_lens_b"].max() <= ar.max_prompt_tokens(CFG)
    assert (enc["lens_b"] - enc["prompt_lens_b"]).max() <= ar.max_solution_tokens(CFG)


# --- tokenizer ---------------------------------------------------------------


def test_tokenizer_basics(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size < 128
    assert tok.vocab_size == len(tok.tokens) == len(set(tok.tokens))
    assert build_tokenizer() == tok  # deterministic vocabulary
    ids = tok.encode("ann has 12 apples")
    assert len(ids) == 5
    assert [tok.id_to_token(i) for i in ids] == ["ann", "has", "1", "2", "apples"]
    with pytest.raises(ValueError, match="zebras"):
        tok.encode("ann has 3 zebras")
    with pytest.raises(ValueError, match="<eos>"):
        tok.encode("ann <eos>")


def test_tokenizer_round_trip(tok, splits):
    for p in splits["heldout"]:
        for text in (p.prompt, p.solution, f"{p.prompt} {p.solution}"):
            assert tok.decode(tok.encode(text)) == text
    s = "7 + 5 = 12 . 12 * 3 = 36 . #### 36"
    ids = [tok.bos_id] + tok.encode(s) + [tok.eos_id, 5, 6, tok.pad_id]
    assert tok.decode(ids) == s  # skips BOS, stops at EOS
    assert tok.decode(np.array([tok.pad_id, tok.bos_id] + tok.encode("100"))) == "100"


# --- answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 + 5 = 12 . #### 12", 12),
        ("#### 3 . #### 18", 18),
        ("#### 0", 0),
        ("####  42 .", 42),
        ("7 + 5 = 12 .", None),
        ("#### ", None),
        ("#### x", None),
        ("#### 1x", None),
        ("12 #### . 5", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("1 + 1 = 2 . #### 2", 2)
    assert not is_correct("1 + 1 = 2 . #### 3", 2)
    assert not is_correct("1 + 1 = 2 .", 2)


# --- encoding ----------------------------------------------------------------


def test_encode_problems_mask_alignment(tok, splits):
    probs = splits["test"][:64]
    enc = encode_problems(probs, tok, CFG.max_len)
    toks, mask = enc["tokens_bt"], enc["loss_mask_bt"]
    assert toks.shape == mask.shape == (64, CFG.max_len)
    assert toks.dtype == np.int32 and mask.dtype == np.float32
    assert np.all(mask[:, -1] == 0)
    for i, p in enumerate(probs):
        prompt_ids = [tok.bos_id] + tok.encode(p.prompt)
        target_ids = tok.encode(p.solution) + [tok.eos_id]
        seq = prompt_ids + target_ids
        assert toks[i, : len(seq)].tolist() == seq
        assert np.all(toks[i, len(seq) :] == tok.pad_id)
        # The masked next-token targets are exactly solution + EOS.
        targets = toks[i, 1:][mask[i, :-1] == 1].tolist()
        assert targets == target_ids
        assert mask[i].sum() == len(target_ids)
        assert enc["prompt_lens_b"][i] == len(prompt_ids)
        assert enc["lens_b"][i] == len(seq)
        assert enc["answers_b"][i] == p.answer
        assert tok.decode(toks[i, 1:][mask[i, :-1] == 1]) == p.solution


def test_encode_problems_language_only(tok, splits):
    probs = splits["test"][:16]
    enc = encode_problems(probs, tok, CFG.max_len, with_solution=False)
    toks, mask = enc["tokens_bt"], enc["loss_mask_bt"]
    for i, p in enumerate(probs):
        prompt_ids = tok.encode(p.prompt)
        assert toks[i, : len(prompt_ids) + 2].tolist() == [tok.bos_id] + prompt_ids + [tok.eos_id]
        assert toks[i, 1:][mask[i, :-1] == 1].tolist() == prompt_ids + [tok.eos_id]


def test_encode_problems_too_long(tok, splits):
    p = splits["test"][0]
    with pytest.raises(ValueError, match="problem 1"):
        encode_problems([Problem("how many ?", "#### 1", 1), p], tok, 10)


def test_encode_prompts_left_padding(tok, splits):
    probs = splits["heldout"][:32]
    P = ar.max_prompt_tokens(CFG)
    toks, lens = encode_prompts(probs, tok, P)
    assert toks.shape == (32, P) and toks.dtype == np.int32 and lens.dtype == np.int32
    for i, p in enumerate(probs):
        ids = [tok.bos_id] + tok.encode(p.prompt)
        assert lens[i] == len(ids)
        assert toks[i, P - len(ids) :].tolist() == ids
        assert np.all(toks[i, : P - len(ids)] == tok.pad_id)
    assert len(set(lens.tolist())) > 1  # some rows actually padded
    suffix = tok.encode(ar.PROMPT_SUFFIX)
    assert np.all(toks[:, -len(suffix) :] == np.array(suffix))  # fixed prompt ending
    toks2, _ = encode_prompts(probs, tok, None)
    assert toks2.shape[1] == lens.max()
    with pytest.raises(ValueError, match="problem 0"):
        encode_prompts(probs, tok, 5)


# --- config validation -------------------------------------------------------


def test_config_help_metadata():
    for f in dataclasses.fields(ArithmeticTaskConfig):
        assert f.metadata.get("help"), f.name
    assert CFG.validate() is CFG


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"min_steps": 0}, "task.min_steps"),
        ({"min_steps": 3, "max_steps": 2}, "task.max_steps"),
        ({"max_start": 0}, "task.max_start"),
        ({"max_operand": -1}, "task.max_operand"),
        ({"max_value": 10}, "task.max_value"),
        ({"n_train": 0}, "task.n_train"),
        ({"n_heldout": 0}, "task.n_heldout"),
        ({"n_test": 0}, "task.n_test"),
        ({"max_len": 40}, "task.max_len"),
        ({"max_steps": 6}, "task.max_len"),
        ({"min_steps": 1.5}, "task.min_steps"),
    ],
)
def test_validation_names_field(overrides, field):
    cfg = dataclasses.replace(CFG, **overrides)
    with pytest.raises(ValueError, match=re.escape(field)):
        cfg.validate()
    with pytest.raises(ValueError, match=re.escape(field)):
        make_split(cfg, "train", seed=0, n=1)
