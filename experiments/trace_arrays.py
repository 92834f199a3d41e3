"""Decoded traces -> the students' training arrays, the loss masks over them, and the teacher's entropy on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.evaluate import Decoded


def assemble(prompts_bp, lens_b, decoded: Decoded, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded [BOS+prompt+trace] rows; mask[t]=1 iff tokens[t+1] is a generated token.

    Exposed top-k log-probs (if any) are placed at the position that predicts their token.
    """
    b, p = prompts_bp.shape
    tokens = np.full((b, max_len), pad_id, np.int32)
    mask = np.zeros((b, max_len), np.float32)
    k = 0 if decoded.topk_ids_bnk is None else decoded.topk_ids_bnk.shape[-1]
    top_ids = np.zeros((b, max_len, max(k, 1)), np.int32)
    top_lp = np.zeros((b, max_len, max(k, 1)), np.float32)
    for i in range(b):
        prompt = prompts_bp[i, p - lens_b[i] :]
        n = min(int(decoded.lengths_b[i]), max_len - len(prompt))
        row = np.concatenate([prompt, decoded.tokens_bn[i, :n]])
        tokens[i, : len(row)] = row
        mask[i, len(prompt) - 1 : len(prompt) - 1 + n] = 1.0
        if k:
            top_ids[i, len(prompt) - 1 : len(prompt) - 1 + n] = decoded.topk_ids_bnk[i, :n]
            top_lp[i, len(prompt) - 1 : len(prompt) - 1 + n] = decoded.topk_logprob_bnk[i, :n]
    return {"tokens_bt": tokens, "loss_mask_bt": mask, "topk_ids_btk": top_ids, "topk_logprob_btk": top_lp}


def entropy_sums(logits_btv, mask_bt, top_below: float = 0.9):
    """(Σ entropy, Σ [top probability < top_below], Σ mask) over the masked positions; jittable, so a chunk's
    full-vocabulary logits never leave the device."""
    logp = jax.nn.log_softmax(jnp.asarray(logits_btv, jnp.float32), axis=-1)
    ent_bt = -(jnp.exp(logp) * logp).sum(-1)
    top_bt = jnp.exp(logp.max(-1))
    m = jnp.asarray(mask_bt, jnp.float32)
    return (ent_bt * m).sum(), ((top_bt < top_below) * m).sum(), m.sum()


def token_entropy_stats(logits_btv: np.ndarray, mask_bt: np.ndarray, top_below: float = 0.9) -> dict:
    """Mean entropy (nats) of softmax(logits) over the masked positions, and the share of them whose top
    probability is below `top_below`."""
    return entropy_summary(*(float(x) for x in entropy_sums(logits_btv, mask_bt, top_below)), top_below)


def entropy_summary(ent: float, below: float, n: float, top_below: float = 0.9) -> dict:
    """The sums of :func:`entropy_sums` as means over the positions (nan when there are none)."""

    def mean(x):
        return x / n if n else float("nan")

    return {"entropy_nats": mean(ent), f"share_top_below_{top_below:g}": mean(below), "positions": int(n)}


def mask_traces(train: dict[str, np.ndarray], kept_sb: np.ndarray) -> dict[str, np.ndarray]:
    """`train` with the loss of every trace outside `kept_sb` [seeds, n] masked out; rows and data order stay.
    The degeneracy filter keeps the non-degenerate traces; the learnability control keeps only the correct ones,
    and since seed s of every defense shares the data order and sampling keys, a paired gap between defenses
    that survives that mask is about the correct texts, not wrong answers."""
    return {**train, "loss_mask_bt": train["loss_mask_bt"] * kept_sb[..., None]}
