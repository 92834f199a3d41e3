"""Problems -> token arrays, for every task: right-padded training rows with their next-token loss mask
(:func:`encode_problems`, :func:`answer_mask` for the final answer only) and left-padded sampling prompts
(:func:`encode_prompts`). A problem is anything with
``prompt``, ``solution`` and ``answer`` (an arithmetic :class:`experiments.tasks.arithmetic.Problem`, a text
task's problem); text tasks truncate long rows instead (:func:`experiments.tasks.text_task.encode_truncated`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from experiments.tasks.arithmetic import Problem


class Encoder(Protocol):
    """What encoding a problem needs of a tokenizer: experiments.tasks.tokenizer.Tokenizer is one, the text
    tokenizers (experiments.tasks.text_tokenizers) are others."""

    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def encode_problems(
    problems: Sequence[Problem],
    tokenizer: Encoder,
    max_len: int,
    *,
    with_solution: bool = True,
) -> dict[str, np.ndarray]:
    """Right-padded training arrays.

    Returns a dict with:

    - ``tokens_bt`` int32 [N, max_len]: ``BOS + prompt + solution + EOS``, then PAD
      (``with_solution=False``: ``BOS + prompt + EOS``, then PAD).
    - ``loss_mask_bt`` float32 [N, max_len], aligned with next-token prediction:
      ``loss_mask_bt[b, t] == 1`` iff ``tokens_bt[b, t + 1]`` is a target token,
      i.e. the logits the model emits at position ``t`` (having seen
      ``tokens_bt[b, :t+1]``) are scored against ``tokens_bt[b, t + 1]``. Targets
      are the solution tokens and the EOS (``with_solution=False``: the prompt
      tokens after BOS and the EOS). The last column is always 0. Typical use::

          logits = model(tokens_bt[:, :-1])           # [N, max_len-1, V]
          nll = cross_entropy(logits, tokens_bt[:, 1:])
          loss = (nll * loss_mask_bt[:, :-1]).sum() / loss_mask_bt.sum()

      or, on full-length logits ``model(tokens_bt)``, weight position ``t`` by
      ``loss_mask_bt[:, t]`` against ``jnp.roll(tokens_bt, -1, axis=1)``.
    - ``prompt_lens_b`` int32 [N]: number of ``BOS + prompt`` tokens.
    - ``lens_b`` int32 [N]: number of non-PAD tokens.
    - ``answers_b`` int32 [N]: the final answers.

    Raises ``ValueError`` naming the problem if a sequence exceeds ``max_len``.
    """
    n = len(problems)
    tokens = np.full((n, max_len), tokenizer.pad_id, dtype=np.int32)
    mask = np.zeros((n, max_len), dtype=np.float32)
    prompt_lens = np.zeros((n,), dtype=np.int32)
    lens = np.zeros((n,), dtype=np.int32)
    answers = np.zeros((n,), dtype=np.int32)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    for i, p in enumerate(problems):
        prompt_ids = [bos] + tokenizer.encode(p.prompt)
        target_ids = (tokenizer.encode(p.solution) if with_solution else []) + [eos]
        seq = prompt_ids + target_ids
        s, pl = len(seq), len(prompt_ids)
        if s > max_len:
            raise ValueError(f"problem {i} ({p.prompt!r}) needs {s} tokens > max_len={max_len}")
        tokens[i, :s] = seq
        # Target positions are [pl, s) (solution) or [1, s) (prompt); mask is shifted by one.
        mask[i, (pl - 1 if with_solution else 0) : s - 1] = 1.0
        prompt_lens[i], lens[i], answers[i] = pl, s, p.answer
    return {
        "tokens_bt": tokens,
        "loss_mask_bt": mask,
        "prompt_lens_b": prompt_lens,
        "lens_b": lens,
        "answers_b": answers,
    }


def encode_prompts(
    problems: Sequence[Problem],
    tokenizer: Encoder,
    max_prompt_len: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded sampling prompts.

    Returns ``(tokens_bp, lens_b)``: ``tokens_bp`` int32 [N, P] holds
    ``BOS + encode(prompt)`` right-aligned (PAD on the left), so every row's last
    column is the prompt's final token and generation continues at column P;
    ``lens_b`` int32 [N] is the number of real (non-PAD) tokens. ``P`` is
    ``max_prompt_len`` (or the longest prompt when None; see
    :func:`max_prompt_tokens` for a config-wide bound). Raises ``ValueError`` naming
    the problem if a prompt does not fit.
    """
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p.prompt) for p in problems]
    if max_prompt_len is None:
        max_prompt_len = max((len(e) for e in encoded), default=1)
    tokens = np.full((len(problems), max_prompt_len), tokenizer.pad_id, dtype=np.int32)
    lens = np.zeros((len(problems),), dtype=np.int32)
    for i, ids in enumerate(encoded):
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"problem {i} ({problems[i].prompt!r}) needs {len(ids)} prompt tokens > max_prompt_len={max_prompt_len}"
            )
        tokens[i, max_prompt_len - len(ids) :] = ids
        lens[i] = len(ids)
    return tokens, lens


def answer_mask(problems, tokenizer, data) -> np.ndarray:
    """loss_mask_bt restricted to the final answer's tokens and the EOS (the last
    len(encode(str(answer))) + 1 targets of each row)."""
    mask = np.zeros_like(data["loss_mask_bt"])
    for i, p in enumerate(problems):
        targets = np.nonzero(data["loss_mask_bt"][i])[0]
        k = min(len(tokenizer.encode(str(p.answer))) + 1, len(targets))
        mask[i, targets[-k:]] = 1.0
    return mask
