"""The tokenizer of an HF checkpoint directory (``tokenizer.json``, through the ``tokenizers`` package), its
vocabulary size, and the check that two models share one vocabulary (PoE and ADS mix logits id by id)."""

from __future__ import annotations

import os

from etils import epath

from models.hf_config import HFLoadError


def load_tokenizer(directory: str | os.PathLike):
    """The `tokenizers.Tokenizer` of `directory/tokenizer.json`."""
    from tokenizers import Tokenizer  # light, but only needed here

    path = epath.Path(directory) / "tokenizer.json"
    if not path.exists():
        raise HFLoadError(f"{path}: missing (the checkpoint directory needs tokenizer.json)")
    try:
        return Tokenizer.from_str(path.read_text())
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise HFLoadError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def tokenizer_vocab_size(tokenizer) -> int:
    """Ids 0..n-1 the tokenizer can emit (added/special tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def check_shared_vocabulary(tok_a, tok_b, names: tuple[str, str] = ("teacher", "proxy")) -> None:
    """PoE/ADS mix two models' logits id by id: refuse tokenizers that map any token to a different id."""
    va, vb = tok_a.get_vocab(with_added_tokens=True), tok_b.get_vocab(with_added_tokens=True)
    if va != vb:
        only_a = sorted(set(va.items()) - set(vb.items()))[:3]
        only_b = sorted(set(vb.items()) - set(va.items()))[:3]
        raise HFLoadError(
            f"{names[0]} and {names[1]} tokenizers differ ({len(va)} vs {len(vb)} tokens; e.g. {names[0]} has "
            f"{only_a}, {names[1]} has {only_b}); PoE and ADS need one shared vocabulary"
        )
