"""Jitted autoregressive sampler with KV caches, for one model or several experts.

The seam where defenses plug in: several *experts* (models sharing the prompt, each
with its own cache) produce next-token outputs at every step, and a *combiner*
turns them into the logits to sample from. Sampling itself (greedy, top-p,
categorical) is the same for every combiner.

Combiner protocol (structural; e.g. the defenses in `game.defenses`):
    init(batch_size) -> carry                      per-sequence state, e.g. ()
    logits(outs, carry) -> logits_bv               float32; temperature is applied here
    update(outs, carry, token_b) -> carry          after each token is chosen
`outs[i]` is expert i's output for the current position: raw logits `z_bv`, or for a
tangent expert `(z_bv, dz_bv)` with `dz_bv` = d/dε z(θ + ε·tangent) at ε = 0,
carried exactly through the cache with `jax.jvp`.

Prompts are LEFT-padded (right-aligned), so every row decodes at the same cache
slot; rotary positions count from each row's first real token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from models.transformer import ModelConfig, forward, init_cache


class Combiner(Protocol):
    def init(self, batch_size: int) -> Any: ...
    def logits(self, outs: tuple, carry: Any) -> jax.Array: ...
    def update(self, outs: tuple, carry: Any, token_b: jax.Array) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Single:
    """The plain combiner: sample from the first expert's logits at temperature τ."""

    temperature: float = 1.0

    def init(self, batch_size):
        return ()

    def logits(self, outs, carry):
        z = outs[0][0] if isinstance(outs[0], tuple) else outs[0]
        return z / self.temperature

    def update(self, outs, carry, token_b):
        return carry


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """Static description of one expert. `tangent=True` makes it return (z, dz)."""

    graphdef: nnx.GraphDef
    cfg: ModelConfig
    tangent: bool = False


def _top_p_filter(logits_bv: jax.Array, top_p: float) -> jax.Array:
    if top_p >= 1.0:
        return logits_bv
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_bv = mass_before_bv < top_p  # the most likely token is always kept
    threshold_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bv >= threshold_b, logits_bv, -jnp.inf)


def _run_expert(spec: ExpertSpec, params, tangent, cache, dcache, tokens_bt, positions_bt, mask_bts, index):
    """One forward chunk; returns (out, cache, dcache) with out = z or (z, dz) of the last position."""
    if not spec.tangent:
        logits_btv, cache = forward(spec.graphdef, params, tokens_bt, positions_bt, mask_bts, cache, index)
        return logits_btv[:, -1], cache, None

    def f(p, c):
        return forward(spec.graphdef, p, tokens_bt, positions_bt, mask_bts, c, index)

    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    (logits_btv, cache), (dlogits_btv, dcache) = jax.jvp(f, (f32(params), cache), (f32(tangent), dcache))
    return (logits_btv[:, -1], dlogits_btv[:, -1]), cache, dcache


@functools.partial(
    jax.jit,
    static_argnames=("specs", "combiner", "max_new_tokens", "eos_id", "pad_id", "greedy", "top_p", "expose_k"),
)
def generate(
    specs: tuple[ExpertSpec, ...],
    params: tuple,
    prompts_bp: jax.Array,
    lens_b: jax.Array,
    rng: jax.Array,
    *,
    combiner: Combiner,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    greedy: bool = True,
    top_p: float = 1.0,
    expose_k: int = 0,
    tangents: tuple | None = None,
    carry: Any = None,
) -> dict[str, jax.Array]:
    """Decode `max_new_tokens` after left-padded prompts.

    `carry` seeds the combiner's per-sequence state (default `combiner.init(B)`), so
    a defense strength can be traced data rather than a compile-time constant.

    Returns tokens_bn (PAD after EOS), lengths_b (generated tokens incl. EOS),
    logprob_bn (log-prob of each emitted token under the combined distribution) and,
    when expose_k > 0, the top-k log-probs and ids of that distribution per step
    (what a teacher API with logit exposure returns).
    """
    b, p = prompts_bp.shape
    n, s = max_new_tokens, p + max_new_tokens
    tangents = tangents if tangents is not None else (None,) * len(specs)
    pad_b = p - lens_b
    slots_s = jnp.arange(s)
    key_valid_bs = slots_s[None, :] >= pad_b[:, None]

    # Prefill every expert on the shared prompt.
    prompt_pos_bp = jnp.maximum(jnp.arange(p)[None, :] - pad_b[:, None], 0)
    prefill_mask_bps = key_valid_bs[:, None, :] & (slots_s[None, None, :] <= jnp.arange(p)[None, :, None])
    outs, caches, dcaches = [], [], []
    for spec, prm, tan in zip(specs, params, tangents):
        cache = init_cache(spec.cfg, b, s)
        dcache = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), cache) if spec.tangent else None
        if spec.tangent:
            cache = jax.tree.map(lambda x: x.astype(jnp.float32), cache)
        out, cache, dcache = _run_expert(spec, prm, tan, cache, dcache, prompts_bp, prompt_pos_bp, prefill_mask_bps, 0)
        outs.append(out), caches.append(cache), dcaches.append(dcache)

    carry0 = combiner.init(b) if carry is None else carry
    state = dict(
        i=jnp.int32(0),
        outs=tuple(outs),
        caches=tuple(caches),
        dcaches=tuple(dcaches),
        carry=carry0,
        done_b=jnp.zeros((b,), bool),
        tokens_bn=jnp.full((b, n), pad_id, jnp.int32),
        logprob_bn=jnp.zeros((b, n), jnp.float32),
        topv_bnk=jnp.zeros((b, n, expose_k), jnp.float32),
        topi_bnk=jnp.zeros((b, n, expose_k), jnp.int32),
    )

    def cond(st):
        return (st["i"] < n) & ~jnp.all(st["done_b"])

    def body(st):
        i = st["i"]
        logits_bv = combiner.logits(st["outs"], st["carry"]).astype(jnp.float32)
        logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
        if greedy:
            token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        else:
            token_b = jax.random.categorical(jax.random.fold_in(rng, i), _top_p_filter(logits_bv, top_p)).astype(jnp.int32)
        token_b = jnp.where(st["done_b"], pad_id, token_b)
        new = dict(st)
        new["tokens_bn"] = st["tokens_bn"].at[:, i].set(token_b)
        new["logprob_bn"] = st["logprob_bn"].at[:, i].set(
            jnp.where(st["done_b"], 0.0, jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0])
        )
        if expose_k:
            top_v, top_i = jax.lax.top_k(logp_bv, expose_k)
            new["topv_bnk"] = st["topv_bnk"].at[:, i].set(top_v)
            new["topi_bnk"] = st["topi_bnk"].at[:, i].set(top_i.astype(jnp.int32))
        new["carry"] = combiner.update(st["outs"], st["carry"], token_b)
        new["done_b"] = st["done_b"] | (token_b == eos_id)
        # Feed the chosen token to every expert at slot p + i.
        pos_b1 = (lens_b + i)[:, None]
        mask_b1s = (key_valid_bs & (slots_s[None, :] <= p + i))[:, None, :]
        outs, caches, dcaches = [], [], []
        for spec, prm, tan, cache, dcache in zip(specs, params, tangents, st["caches"], st["dcaches"]):
            out, cache, dcache = _run_expert(spec, prm, tan, cache, dcache, token_b[:, None], pos_b1, mask_b1s, p + i)
            outs.append(out), caches.append(cache), dcaches.append(dcache)
        new["outs"], new["caches"], new["dcaches"] = tuple(outs), tuple(caches), tuple(dcaches)
        new["i"] = i + 1
        return new

    final = jax.lax.while_loop(cond, body, state)
    tokens_bn = final["tokens_bn"]
    is_eos_bn = tokens_bn == eos_id
    lengths_b = jnp.where(is_eos_bn.any(-1), jnp.argmax(is_eos_bn, -1) + 1, jnp.sum(tokens_bn != pad_id, -1))
    result = dict(tokens_bn=tokens_bn, lengths_b=lengths_b.astype(jnp.int32), logprob_bn=final["logprob_bn"])
    if expose_k:
        result["topk_logprob_bnk"], result["topk_ids_bnk"] = final["topv_bnk"], final["topi_bnk"]
    return result


@functools.partial(jax.jit, static_argnames=("spec", "max_new_tokens", "eos_id", "pad_id"))
def greedy_uncached(spec: ExpertSpec, params, prompts_bp, lens_b, *, max_new_tokens: int, eos_id: int, pad_id: int):
    """Reference decoder: a full forward pass over the whole sequence for every new token.

    Used by tests and `bench` to check and time the cached sampler.
    """
    b, p = prompts_bp.shape
    s = p + max_new_tokens
    pad_b = p - lens_b
    seq_bs = jnp.concatenate([prompts_bp, jnp.full((b, max_new_tokens), pad_id, prompts_bp.dtype)], axis=1)
    slots_s = jnp.arange(s)
    pos_bs = jnp.maximum(slots_s[None, :] - pad_b[:, None], 0)
    mask_bss = (slots_s[None, None, :] >= pad_b[:, None, None]) & (slots_s[None, None, :] <= slots_s[None, :, None])

    def body(i, carry):
        seq_bs, done_b = carry
        logits_bsv, _ = forward(spec.graphdef, params, seq_bs, pos_bs, mask_bss)
        token_b = jnp.argmax(logits_bsv[:, p + i - 1], axis=-1).astype(seq_bs.dtype)
        token_b = jnp.where(done_b, pad_id, token_b)
        return seq_bs.at[:, p + i].set(token_b), done_b | (token_b == eos_id)

    seq_bs, _ = jax.lax.fori_loop(0, max_new_tokens, body, (seq_bs, jnp.zeros((b,), bool)))
    return seq_bs[:, p:]
