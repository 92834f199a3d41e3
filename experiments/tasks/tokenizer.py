"""A small word-level tokenizer shared by every model role (teacher, proxy, student).

Text is split on whitespace. Words are looked up in a fixed vocabulary; numbers
are split into single digits, one token per digit ("12" -> "1", "2"), so the
vocabulary stays tiny while any non-negative integer can be written. Decoding
re-joins consecutive digit tokens into one number, which makes
``decode(encode(s)) == s`` for *canonical* text: single spaces between words and
never two numbers next to each other (the task's text satisfies both).

Special ids are fixed: ``pad_id=0``, ``bos_id=1``, ``eos_id=2``. Teacher and
proxy must share a vocabulary (PoE mixes their logits), which is why everything
builds its tokenizer with :func:`build_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from experiments.tasks.arithmetic import vocabulary_words

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
DIGITS: tuple[str, ...] = tuple("0123456789")


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary.

    Vocabulary order (deterministic): the specials ``<pad> <bos> <eos>`` (ids
    0, 1, 2), the digits ``0``-``9`` (ids 3-12), then ``words`` in the given
    order (duplicates and special tokens skipped; numbers are rejected since
    they are spelt with digit tokens).
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2

    def __init__(self, words: Sequence[str]):
        tokens: list[str] = list(SPECIAL_TOKENS) + list(DIGITS)
        seen = set(tokens)
        for w in words:
            if not w or any(c.isspace() for c in w):
                raise ValueError(f"vocabulary word {w!r} is empty or contains whitespace")
            if w.isdigit():
                raise ValueError(f"vocabulary word {w!r} is a number; numbers are spelt with digit tokens")
            if w not in seen:
                seen.add(w)
                tokens.append(w)
        self._id_to_token: tuple[str, ...] = tuple(tokens)
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self._digit_id = {d: self._token_to_id[d] for d in DIGITS}
        self._digit_ids = frozenset(self._digit_id.values())

    # -- vocabulary ---------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, specials included (ids are ``0 .. vocab_size-1``)."""
        return len(self._id_to_token)

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens, indexed by id."""
        return self._id_to_token

    @property
    def digit_ids(self) -> frozenset[int]:
        """Ids of the ten digit tokens."""
        return self._digit_ids

    def token_to_id(self, token: str) -> int:
        try:
            return self._token_to_id[token]
        except KeyError:
            raise ValueError(f"unknown token {token!r}") from None

    def id_to_token(self, idx: int) -> str:
        idx = int(idx)
        if not 0 <= idx < self.vocab_size:
            raise ValueError(f"token id {idx} outside vocabulary of size {self.vocab_size}")
        return self._id_to_token[idx]

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self._id_to_token == other._id_to_token

    def __hash__(self) -> int:
        return hash(self._id_to_token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # -- encode / decode ----------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Whitespace-split ``text``; numbers become one token per digit.

        No BOS/EOS is added. Raises ``ValueError`` naming the first unknown word.
        """
        ids: list[int] = []
        lookup = self._token_to_id
        digit = self._digit_id
        for word in text.split():
            idx = lookup.get(word)
            if idx is not None and word not in SPECIAL_TOKENS:
                ids.append(idx)
            elif word.isascii() and word.isdigit():
                ids.extend(digit[c] for c in word)
            else:
                raise ValueError(f"unknown word {word!r} in text {text!r}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode` for canonical text.

        Stops at the first EOS, skips PAD and BOS, and joins consecutive digit
        tokens into one number. Accepts any iterable of ints (lists, numpy rows).
        """
        words: list[str] = []
        prev_digit = False
        for raw in ids:
            idx = int(raw)
            if idx == self.eos_id:
                break
            if idx == self.pad_id or idx == self.bos_id:
                continue
            tok = self.id_to_token(idx)
            is_digit = idx in self._digit_ids
            if is_digit and prev_digit:
                words[-1] += tok
            else:
                words.append(tok)
            prev_digit = is_digit
        return " ".join(words)


def build_tokenizer() -> Tokenizer:
    """The tokenizer of the built-in arithmetic task (vocabulary < 128 tokens)."""
    return Tokenizer(vocabulary_words())
