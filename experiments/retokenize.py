"""Distillation across tokenizers: the teacher's traces reach a student with another vocabulary as text.

The paper's trio has a Qwen teacher and proxy (one vocabulary: PoE and ADS mix their logits id by id)
and a Llama student with its own tokenizer. The protocol then decodes every teacher trace with the
teacher's tokenizer and re-encodes prompt and trace with the student's (:func:`encode_traces`), in the
layout of the task's training rows, so the student trains on the same text; its test answers are decoded
with its own tokenizer and checked like the teacher's. What cannot cross: anything that uses the teacher's
per-token log-probabilities as targets for the student (the `soft_topk` and `poe_inversion` attacks, the
equilibrium game's soft targets); :func:`refuse_token_level` names the keys that ask for them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from experiments.config import Config, ConfigError
from experiments.tasks.text_tokenizers import HFTokenizer
from game import registry

PREFIX = "student_"  # stage-file keys of the re-encoded rows, next to the teacher's own


def wrap_hf_tokenizer(tok: Any, where: str) -> HFTokenizer:
    """A `tokenizers.Tokenizer` (as the HF loader returns it) behind the task-tokenizer interface
    (pad/bos/eos ids, vocab_size, encode, decode) of :class:`HFTokenizer`."""
    wrapped = HFTokenizer.__new__(HFTokenizer)
    wrapped.path, wrapped._tok = where, tok
    wrapped.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
    wrapped._resolve_specials(tok.token_to_id, where)
    return wrapped


def ended_with_eos(tokens_bn: np.ndarray, lengths_b: np.ndarray, eos_id: int) -> np.ndarray:
    """Whether each decoded row stopped on EOS (lengths count the EOS) rather than at the token budget."""
    last = np.take_along_axis(tokens_bn, np.maximum(lengths_b - 1, 0)[:, None], axis=1)[:, 0]
    return (lengths_b > 0) & (last == eos_id)


def encode_traces(
    problems: Sequence, texts: Sequence[str], ended_b: np.ndarray, tokenizer, max_len: int
) -> dict[str, np.ndarray]:
    """Right-padded ``[BOS + prompt + trace (+ EOS if the teacher stopped)]`` rows in `tokenizer`'s ids, cut at
    `max_len`; ``loss_mask_bt[t] = 1`` iff ``tokens_bt[t+1]`` is a trace token (the layout of
    ``protocol.assemble``). Prompt and trace are encoded separately, as the task encodes prompt and solution."""
    n = len(problems)
    tokens = np.full((n, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, max_len), np.float32)
    for i, (p, text) in enumerate(zip(problems, texts)):
        prompt = [tokenizer.bos_id] + tokenizer.encode(p.prompt)
        row = (prompt + tokenizer.encode(text) + ([tokenizer.eos_id] if ended_b[i] else []))[:max_len]
        tokens[i, : len(row)] = row
        mask[i, len(prompt) - 1 : len(row) - 1] = 1.0
    return {"tokens_bt": tokens, "loss_mask_bt": mask}


def student_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows the student trains on: the re-encoded ones (``student_*`` keys) when there are, else the
    teacher's; top-k targets (teacher ids) only in the second case (zeros otherwise, never read: refused)."""
    if PREFIX + "tokens_bt" not in arrays:
        return {k: arrays[k] for k in ("tokens_bt", "loss_mask_bt", "topk_ids_btk", "topk_logprob_btk") if k in arrays}
    rows = {k: arrays[PREFIX + k] for k in ("tokens_bt", "loss_mask_bt")}
    lead = rows["tokens_bt"].shape
    rows["topk_ids_btk"] = np.zeros(lead + (1,), np.int32)
    rows["topk_logprob_btk"] = np.zeros(lead + (1,), np.float32)
    return rows


def token_level_keys(cfg: Config) -> list[str]:
    """The settings that would give the student the teacher's per-token log-probs (as `key=value` strings)."""
    dc = cfg.protocol.distill
    defenses = {d.name for d in cfg.protocol.defenses}
    attacks = [
        a
        for a in dc.attacks
        if any(n in defenses for n in dc.attack_defenses)
        and (a != "poe_inversion" or any(registry.get(n).invertible for n in defenses & set(dc.attack_defenses)))
    ]
    return [f"protocol.distill.attacks={attacks}"] if attacks else []


def refuse_token_level(cfg: Config, student_vocab: int, teacher_vocab: int, what: str = "") -> None:
    """One line naming the keys when a run across vocabularies asks for token-level teacher targets; `what`
    names a whole command that needs them (the equilibrium game's soft targets)."""
    tail = (
        f": the student's tokenizer (student.hf_dir, {student_vocab} tokens) is not the teacher's ({teacher_vocab} "
        f"tokens), so traces reach it as text and per-token teacher log-probs mean nothing to it"
    )
    if what:
        raise ConfigError(f"{what} needs the student to share the teacher's vocabulary{tail}")
    keys = token_level_keys(cfg)
    if keys:
        raise ConfigError(
            f"{', '.join(keys)} need the teacher's per-token log-probs{tail}; set protocol.distill.attacks=[]"
        )


def require_shared_vocabulary(models: dict, task_tokenizer, what: str) -> None:
    """For commands whose student learns the teacher's per-token distributions (equilibrium, calibrate)."""
    tok = models["student"].tokenizer
    if tok is not None:
        refuse_token_level(None, tok.vocab_size, task_tokenizer.vocab_size, what)
