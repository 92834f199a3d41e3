"""Batched decoding of test prompts and exact-answer accuracy, for any combiner."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from experiments.tasks.arithmetic import Problem, is_correct
from experiments.tasks.encoding import encode_prompts
from experiments.tasks.tokenizer import Tokenizer
from models.sampling import Combiner, ExpertSpec, Single, generate
from models.sharding import batch_divisor, process_slice, shard_batch, to_host

Checker = Callable[[str, Any], bool]
"""``is_correct(generated_text, reference_answer)`` of a task (arithmetic's by default)."""


@dataclasses.dataclass
class Decoded:
    """Outputs of decoding a list of prompts (numpy, one row per prompt)."""

    tokens_bn: np.ndarray
    lengths_b: np.ndarray
    logprob_bn: np.ndarray
    topk_logprob_bnk: np.ndarray | None = None
    topk_ids_bnk: np.ndarray | None = None

    def texts(self, tokenizer: Tokenizer) -> list[str]:
        return [tokenizer.decode(row) for row in self.tokens_bn]


def local_rows(
    start: int, batch_size: int, n: int, process_index: int | None = None, process_count: int | None = None
) -> np.ndarray:
    """Indices (into the list of `n` problems) of this process's rows of the decode batch that starts at `start`:
    its contiguous share `process_slice(batch_size)` of the batch (the rows its devices hold), where the padding
    rows of a short last batch repeat the batch's first problem."""
    share = process_slice(batch_size, process_index, process_count)
    idx = start + np.arange(share.start, share.stop)
    return np.where(idx < n, idx, start)


def _agreed_max(value: int) -> int:
    """The largest `value` over all processes (one tiny all-gather; the value itself with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int32))))


def decode_problems(
    problems: Sequence[Problem],
    tokenizer: Tokenizer,
    specs: tuple[ExpertSpec, ...],
    params: tuple,
    mesh: Mesh,
    *,
    combiner: Combiner | None = None,
    max_new_tokens: int,
    batch_size: int,
    greedy: bool = True,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    expose_k: int = 0,
    tangents: tuple | None = None,
    carry_b: np.ndarray | None = None,
) -> Decoded:
    """Decode every problem's prompt in fixed-size batches (the last one padded), sharded over the batch axes.

    Each process encodes only its own rows of every batch (`local_rows`: the rows its devices hold) and the
    global prompts are assembled from those shares; the prompt width is the longest prompt over all processes
    (agreed once), so every batch has one shape. The decoded outputs are gathered to every process."""
    combiner = combiner or Single()
    rng = jax.random.key(0) if rng is None else rng
    div = batch_divisor(mesh)
    batch_size = max(div, batch_size // div * div)
    n = len(problems)
    starts = list(range(0, n, batch_size))
    rows = {s: local_rows(s, batch_size, n) for s in starts}
    mine = np.unique(np.concatenate([rows[s] for s in starts])) if starts else np.zeros(0, int)
    width = _agreed_max(max((1 + len(tokenizer.encode(problems[i].prompt)) for i in mine), default=1))
    encoded = (
        dict(zip(mine.tolist(), zip(*encode_prompts([problems[i] for i in mine], tokenizer, width))))
        if len(mine)
        else {}
    )
    chunks: dict[str, list[np.ndarray]] = {}
    for start in starts:
        local = rows[start]
        prompts_bp = np.stack([encoded[i][0] for i in local.tolist()])
        lens_b = np.array([encoded[i][1] for i in local.tolist()], np.int32)
        carry = None if carry_b is None else carry_b[local]
        real = min(batch_size, n - start)
        global_in = shard_batch(
            {"prompts_bp": prompts_bp, "lens_b": lens_b} | ({} if carry is None else {"carry": carry}), mesh
        )
        out = generate(
            specs,
            params,
            global_in["prompts_bp"],  # this process's rows, assembled into the global batch
            global_in["lens_b"],
            jax.random.fold_in(rng, start),
            combiner=combiner,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            greedy=greedy,
            top_p=top_p,
            expose_k=expose_k,
            tangents=tangents,
            carry=global_in.get("carry"),
        )
        for key, value in out.items():
            chunks.setdefault(key, []).append(to_host(value)[:real])  # gathered from every process
    return Decoded(**{k: np.concatenate(v) for k, v in chunks.items()})


def accuracy(problems: Sequence[Problem], texts: Sequence[str], checker: Checker = is_correct) -> float:
    return float(np.mean([checker(t, p.answer) for p, t in zip(problems, texts)])) if problems else 0.0


def correct_mask(problems: Sequence[Problem], texts: Sequence[str], checker: Checker = is_correct) -> np.ndarray:
    return np.array([checker(t, p.answer) for p, t in zip(problems, texts)], bool)


def single_model_accuracy(
    problems, task, spec: ExpertSpec, params: Any, mesh: Mesh, *, max_new_tokens: int, batch_size: int
) -> float:
    """Greedy accuracy of one model; ``task`` supplies the tokenizer and the answer checker."""
    decoded = decode_problems(
        problems, task.tokenizer, (spec,), (params,), mesh, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return accuracy(problems, decoded.texts(task.tokenizer), task.is_correct)
