"""Tokenizers for real text, behind the interface of :class:`experiments.tasks.tokenizer.Tokenizer`.

Every tokenizer here offers what the protocol, training, evaluation and the sampler use:
``pad_id``, ``bos_id``, ``eos_id`` (ints), ``vocab_size`` (model embedding rows; ids are
``0 .. vocab_size-1``), ``encode(text) -> list[int]`` (no BOS/EOS added) and
``decode(ids) -> str`` (stops at the first EOS, skips PAD and BOS).

- :class:`ByteTokenizer`: UTF-8 bytes, no download. ``pad=0, bos=1, eos=2``, byte ``b`` is id
  ``b + 3``; ``vocab_size`` is 264 (259 rounded up to a multiple of 8, so the vocab axis splits over
  up to 8 tensor shards; ids 259..263 are never produced by ``encode`` and ``decode`` skips them).
- :class:`HFTokenizer`: a local ``tokenizer.json`` through the ``tokenizers`` package.
- :class:`SentencePieceTokenizer`: a local SentencePiece ``.model`` through ``sentencepiece``.

:func:`load_tokenizer` maps a config string (``word | byte | <path>``) to one of them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

BYTE_OFFSET = 3  # ids 0, 1, 2 are pad, bos, eos


class TokenizerError(ValueError):
    """A tokenizer spec or file that cannot be used; the config layer reports it as one line."""


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: any text round-trips, nothing to download."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    vocab_size = 264

    def encode(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for raw in ids:
            idx = int(raw)
            if idx == self.eos_id:
                break
            if BYTE_OFFSET <= idx < BYTE_OFFSET + 256:
                out.append(idx - BYTE_OFFSET)
        # A model may emit a truncated multi-byte character; show it as U+FFFD rather than fail.
        return out.decode("utf-8", errors="replace")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash("ByteTokenizer")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# Names used for the special tokens by common tokenizer.json / SentencePiece vocabularies, in order of preference.
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
BOS_NAMES = ("<bos>", "<s>", "[CLS]", "<|begin_of_text|>", "<|startoftext|>", "<|im_start|>", "<|endoftext|>")
EOS_NAMES = ("<eos>", "</s>", "[SEP]", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


def _first_id(lookup, names: tuple[str, ...]) -> int | None:
    for name in names:
        idx = lookup(name)
        if idx is not None:
            return int(idx)
    return None


class _SubwordTokenizer:
    """Shared special-id resolution and decode loop for file-backed tokenizers.

    EOS is required. A missing BOS falls back to EOS (GPT-2 style), a missing PAD to EOS: PAD
    positions are always masked out of losses and the sampler only reads PAD inside prompts.
    """

    def _resolve_specials(self, lookup, where: str) -> None:
        eos = _first_id(lookup, EOS_NAMES)
        if eos is None:
            raise TokenizerError(
                f"tokenizer {where!r} has no end-of-sequence token (looked for {', '.join(EOS_NAMES)})"
            )
        bos = _first_id(lookup, BOS_NAMES)
        pad = _first_id(lookup, PAD_NAMES)
        self.eos_id = eos
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad

    def _decode_ids(self, ids: Iterable[int]) -> list[int]:
        kept = []
        for raw in ids:
            idx = int(raw)
            if idx == self.eos_id:
                break
            if idx in (self.pad_id, self.bos_id) or not 0 <= idx < self.vocab_size:
                continue
            kept.append(idx)
        return kept


class HFTokenizer(_SubwordTokenizer):
    """A HuggingFace ``tokenizer.json`` loaded with the ``tokenizers`` package (no network)."""

    def __init__(self, path: str | pathlib.Path):
        from tokenizers import Tokenizer as _HF

        self.path = str(path)
        try:
            if "://" in self.path:  # gs://BUCKET/.../tokenizer.json, read through etils.epath
                from etils import epath

                self._tok = _HF.from_str(epath.Path(self.path).read_text())
            else:
                self._tok = _HF.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read tokenizer file {self.path!r}: {e}") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._resolve_specials(self._tok.token_to_id, self.path)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(self._decode_ids(ids), skip_special_tokens=False)

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        """token -> id, as `tokenizers` gives it (the PoE/ADS vocabulary checks compare these)."""
        return self._tok.get_vocab(with_added_tokens=with_added_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(_SubwordTokenizer):
    """A SentencePiece ``.model`` file loaded with the ``sentencepiece`` package."""

    def __init__(self, path: str | pathlib.Path):
        import sentencepiece as spm

        self.path = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on bad files
            raise TokenizerError(f"cannot read SentencePiece model {self.path!r}: {e}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        unk = self._sp.unk_id()

        def lookup(name):
            idx = self._sp.piece_to_id(name)
            return None if idx == unk and name != self._sp.id_to_piece(unk) else idx

        # SentencePiece stores its own special ids (-1 = absent); prefer them, else the common piece names.
        if self._sp.eos_id() < 0:
            self._resolve_specials(lookup, self.path)
        else:
            self.eos_id = self._sp.eos_id()
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(self._decode_ids(ids))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str):
    """The tokenizer named by ``spec``.

    - ``"word"``: the built-in arithmetic task's word tokenizer;
    - ``"byte"``: :class:`ByteTokenizer`;
    - a path to a ``tokenizer.json`` file (or a directory holding one): :class:`HFTokenizer`;
    - a path to a SentencePiece ``.model`` file: :class:`SentencePieceTokenizer`.

    Raises :class:`TokenizerError` (one line) when the spec is neither a known name nor a readable file.
    """
    if spec == "word":
        from experiments.tasks.tokenizer import build_tokenizer

        return build_tokenizer()
    if spec == "byte":
        return ByteTokenizer()
    if "://" in spec:  # a remote tokenizer.json (e.g. the teacher's, next to its checkpoint in a bucket)
        return HFTokenizer(spec.rstrip("/") + ("" if spec.endswith(".json") else "/tokenizer.json"))
    path = pathlib.Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {spec!r} is neither 'word', 'byte' nor an existing tokenizer.json / SentencePiece .model file"
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise TokenizerError(f"tokenizer file {str(path)!r}: expected a tokenizer.json or a SentencePiece .model file")
