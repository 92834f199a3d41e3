"""Real-text tokenizers: byte-level (no download), tokenizer.json and SentencePiece files built in the test."""

import json

import numpy as np
import pytest

from experiments.tasks.text_tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)
from experiments.tasks.tokenizer import Tokenizer

TEXTS = ["Question: Tom has 1,234 apples.\nAnswer: #### 1234", "Préface — ∑ x² = \\boxed{\\frac{1}{2}} 🙂", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < 259 for i in ids)  # never a special id
    assert tok.decode(ids) == text
    assert tok.decode(np.array([tok.bos_id] + ids + [tok.eos_id, 65, 66])) == text  # BOS skipped, stops at EOS


def test_byte_tokenizer_special_ids_and_vocab():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.decode([tok.pad_id, ord("h") + 3, 260, ord("i") + 3]) == "hi"  # pad and unused ids skipped
    assert tok.decode([0xC3 + 3]) == "\ufffd"  # a cut multi-byte character decodes, it does not raise
    assert load_tokenizer("byte") == tok


def test_word_spec_is_the_arithmetic_tokenizer():
    assert isinstance(load_tokenizer("word"), Tokenizer)


def _train_tokenizer_json(path, specials):
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(TEXTS * 20 + ["Natalia sold 48 clips in April and half as many in May."] * 20, trainer)
    hf.save(str(path))
    return hf


def test_tokenizer_json_round_trip_and_special_ids(tmp_path):
    path = tmp_path / "tokenizer.json"
    hf = _train_tokenizer_json(path, ["<pad>", "<s>", "</s>", "<unk>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
        hf.token_to_id("<pad>"),
        hf.token_to_id("<s>"),
        hf.token_to_id("</s>"),
    )
    assert tok.vocab_size == hf.get_vocab_size()
    for text in TEXTS[:2]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids and tok.bos_id not in ids  # encode adds no specials
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + ids) == text
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # a directory holding tokenizer.json


def test_tokenizer_json_gpt2_style_specials_fall_back_to_eos(tmp_path):
    path = tmp_path / "tokenizer.json"
    hf = _train_tokenizer_json(path, ["<|endoftext|>"])
    tok = load_tokenizer(str(path))
    eot = hf.token_to_id("<|endoftext|>")
    assert tok.eos_id == tok.bos_id == tok.pad_id == eot


def test_tokenizer_json_without_eos_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    _train_tokenizer_json(path, ["<unk>"])
    with pytest.raises(TokenizerError, match="no end-of-sequence token"):
        load_tokenizer(str(path))


def test_sentencepiece_model_round_trip(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["Tom has 12 apples and buys 3 more.", "How many apples does Tom have?"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=30,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 30)
    text = "Tom has 12 apples."
    assert tok.decode([1] + tok.encode(text) + [2, 5, 6]) == text


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nope", "neither 'word', 'byte' nor an existing"),
        ("/does/not/exist/tokenizer.json", "neither 'word', 'byte' nor an existing"),
    ],
)
def test_bad_tokenizer_specs_are_refused(spec, match):
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(spec)


def test_malformed_tokenizer_files_are_refused(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        load_tokenizer(str(bad))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="expected a tokenizer.json or a SentencePiece .model"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


def test_hf_role_vocabulary_check_accepts_the_same_tokenizer_json_and_refuses_another(tmp_path):
    """The protocol's check that a text task's tokenizer is an HF role's tokenizer.json."""
    from tokenizers import Tokenizer as HF

    from experiments.config import ConfigError
    from experiments.protocol import check_task_vocabulary

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _train_tokenizer_json(tmp_path / "a" / "tokenizer.json", ["<pad>", "<s>", "</s>"])
    _train_tokenizer_json(tmp_path / "b" / "tokenizer.json", ["</s>", "<pad>", "<s>"])  # other ids
    task_tok = load_tokenizer(str(tmp_path / "a" / "tokenizer.json"))
    check_task_vocabulary(task_tok, HF.from_file(str(tmp_path / "a" / "tokenizer.json")), "teacher")
    with pytest.raises(ConfigError, match="teacher.hf_dir: its tokenizer.json"):
        check_task_vocabulary(task_tok, HF.from_file(str(tmp_path / "b" / "tokenizer.json")), "teacher")
