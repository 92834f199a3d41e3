"""Batched decoding of test prompts and exact-answer accuracy, for any combiner."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from experiments.tasks.arithmetic import Problem, encode_prompts, is_correct
from experiments.tasks.tokenizer import Tokenizer
from models.sampling import Combiner, ExpertSpec, Single, generate
from models.sharding import batch_divisor, batch_sharding, put_global, to_host

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
    """Decode every problem's prompt in fixed-size batches (the last one padded), sharded over the batch axes."""
    combiner = combiner or Single()
    rng = jax.random.key(0) if rng is None else rng
    div = batch_divisor(mesh)
    batch_size = max(div, batch_size // div * div)
    prompts_np, lens_np = encode_prompts(problems, tokenizer, None)
    n = len(problems)
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        prompts_bp, lens_b = prompts_np[start : start + batch_size], lens_np[start : start + batch_size]
        carry = None if carry_b is None else carry_b[start : start + batch_size]
        real = len(lens_b)
        if real < batch_size:  # pad with copies of the first prompt so shapes (and compiles) stay fixed
            fill = batch_size - real
            prompts_bp = np.concatenate([prompts_bp, np.repeat(prompts_bp[:1], fill, 0)])
            lens_b = np.concatenate([lens_b, np.repeat(lens_b[:1], fill, 0)])
            carry = None if carry is None else np.concatenate([carry, np.repeat(carry[:1], fill, 0)])
        out = generate(
            specs,
            params,
            put_global(prompts_bp, batch_sharding(mesh, 2)),  # every process holds the same prompts
            put_global(lens_b, batch_sharding(mesh, 1)),
            jax.random.fold_in(rng, start),
            combiner=combiner,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            greedy=greedy,
            top_p=top_p,
            expose_k=expose_k,
            tangents=tangents,
            carry=None if carry is None else put_global(carry, batch_sharding(mesh, carry.ndim)),
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
