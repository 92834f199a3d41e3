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
from typing import Any, NamedTuple, Protocol

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

    def f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    (logits_btv, cache), (dlogits_btv, dcache) = jax.jvp(f, (f32(params), cache), (f32(tangent), dcache))
    return (logits_btv[:, -1], dlogits_btv[:, -1]), cache, dcache


class SamplerState(NamedTuple):
    """The decoding loop's state (a pytree: `jax.lax.while_loop` carries it)."""

    step: jax.Array  # () int32: tokens emitted so far (n ≤ max_new_tokens)
    outs: tuple  # per expert: next-token logits (batch, vocab) float, or (z, dz) for a tangent expert
    caches: tuple  # per expert: KV cache, per layer k/v (batch, kv_heads, max_len, head_dim)
    dcaches: tuple  # per expert: tangent of its cache (same shapes, float32), or None
    carry: Any  # the combiner's per-sequence state, e.g. () or (batch,) float32
    done_b: jax.Array  # (batch,) bool: EOS emitted
    tokens_bn: jax.Array  # (batch, max_new_tokens) int32: emitted tokens, pad_id after EOS
    logprob_bn: jax.Array  # (batch, max_new_tokens) float32: log-prob of each emitted token
    topv_bnk: jax.Array  # (batch, max_new_tokens, expose_k) float32: top-k log-probs per step
    topi_bnk: jax.Array  # (batch, max_new_tokens, expose_k) int32: their token ids


class _Layout(NamedTuple):
    """Where each row's tokens sit in the caches (prompts left-padded to `prompt_len`)."""

    prompt_len: int  # p: static width of the padded prompts; slot p + i holds generated token i
    lens_b: jax.Array  # (batch,) int32: real prompt tokens per row
    key_valid_bs: jax.Array  # (batch, max_len) bool: slot holds a real token, not left padding


@dataclasses.dataclass(frozen=True)
class _Rules:
    """The static decoding settings of one `generate` call."""

    combiner: Combiner
    max_new_tokens: int
    eos_id: int
    pad_id: int
    greedy: bool
    top_p: float
    expose_k: int


def _run_experts(specs, params, tangents, caches, dcaches, tokens_bt, positions_bt, mask_bts, index):
    """`_run_expert` for every expert on the same tokens; returns (outs, caches, dcaches) as tuples."""
    outs, new_caches, new_dcaches = [], [], []
    for spec, prm, tan, cache, dcache in zip(specs, params, tangents, caches, dcaches):
        out, cache, dcache = _run_expert(spec, prm, tan, cache, dcache, tokens_bt, positions_bt, mask_bts, index)
        outs.append(out), new_caches.append(cache), new_dcaches.append(dcache)
    return tuple(outs), tuple(new_caches), tuple(new_dcaches)


def _empty_caches(spec: ExpertSpec, batch: int, max_len: int):
    """(cache, dcache) before the prompt: a tangent expert's cache in float32 with a zero tangent."""
    cache = init_cache(spec.cfg, batch, max_len)
    if not spec.tangent:
        return cache, None
    dcache = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), cache)
    return jax.tree.map(lambda x: x.astype(jnp.float32), cache), dcache


def _prefill(specs, params, tangents, prompts_bp, layout: _Layout):
    """Every expert on the shared prompt; returns (outs, caches, dcaches) at the last prompt slot."""
    b, p = prompts_bp.shape
    slots_s = jnp.arange(layout.key_valid_bs.shape[1])
    pad_b = p - layout.lens_b
    prompt_pos_bp = jnp.maximum(jnp.arange(p)[None, :] - pad_b[:, None], 0)
    prefill_mask_bps = layout.key_valid_bs[:, None, :] & (slots_s[None, None, :] <= jnp.arange(p)[None, :, None])
    empty = [_empty_caches(spec, b, len(slots_s)) for spec in specs]
    caches, dcaches = tuple(c for c, _ in empty), tuple(d for _, d in empty)
    return _run_experts(specs, params, tangents, caches, dcaches, prompts_bp, prompt_pos_bp, prefill_mask_bps, 0)


def _initial_state(outs, caches, dcaches, carry, batch: int, rules: _Rules) -> SamplerState:
    n, k = rules.max_new_tokens, rules.expose_k
    return SamplerState(
        step=jnp.int32(0),
        outs=outs,
        caches=caches,
        dcaches=dcaches,
        carry=carry,
        done_b=jnp.zeros((batch,), bool),
        tokens_bn=jnp.full((batch, n), rules.pad_id, jnp.int32),
        logprob_bn=jnp.zeros((batch, n), jnp.float32),
        topv_bnk=jnp.zeros((batch, n, k), jnp.float32),
        topi_bnk=jnp.zeros((batch, n, k), jnp.int32),
    )


def _choose(logits_bv: jax.Array, done_b: jax.Array, rng: jax.Array, i: jax.Array, rules: _Rules) -> jax.Array:
    """Token i of every row, int32 (batch,): argmax or a (top-p) sample; pad_id for finished rows."""
    if rules.greedy:
        token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    else:
        filtered_bv = _top_p_filter(logits_bv, rules.top_p)
        token_b = jax.random.categorical(jax.random.fold_in(rng, i), filtered_bv).astype(jnp.int32)
    return jnp.where(done_b, rules.pad_id, token_b)


def _record(st: SamplerState, token_b: jax.Array, logp_bv: jax.Array, rules: _Rules) -> SamplerState:
    """Write token i, its log-prob and (expose_k > 0) the top-k of the distribution into the outputs."""
    i = st.step
    picked_b = jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0]
    st = st._replace(
        tokens_bn=st.tokens_bn.at[:, i].set(token_b),
        logprob_bn=st.logprob_bn.at[:, i].set(jnp.where(st.done_b, 0.0, picked_b)),
    )
    if rules.expose_k:
        top_v, top_i = jax.lax.top_k(logp_bv, rules.expose_k)
        st = st._replace(
            topv_bnk=st.topv_bnk.at[:, i].set(top_v),
            topi_bnk=st.topi_bnk.at[:, i].set(top_i.astype(jnp.int32)),
        )
    return st


def _step(specs, params, tangents, layout: _Layout, rng, rules: _Rules, st: SamplerState) -> SamplerState:
    """One decoding step: combine, choose token i, record it, feed it to every expert at slot p + i."""
    i, p = st.step, layout.prompt_len
    logits_bv = rules.combiner.logits(st.outs, st.carry).astype(jnp.float32)
    logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    token_b = _choose(logits_bv, st.done_b, rng, i, rules)
    st = _record(st, token_b, logp_bv, rules)
    carry = rules.combiner.update(st.outs, st.carry, token_b)
    done_b = st.done_b | (token_b == rules.eos_id)
    pos_b1 = (layout.lens_b + i)[:, None]
    slots_s = jnp.arange(layout.key_valid_bs.shape[1])
    mask_b1s = (layout.key_valid_bs & (slots_s[None, :] <= p + i))[:, None, :]
    outs, caches, dcaches = _run_experts(
        specs, params, tangents, st.caches, st.dcaches, token_b[:, None], pos_b1, mask_b1s, p + i
    )
    return st._replace(step=i + 1, outs=outs, caches=caches, dcaches=dcaches, carry=carry, done_b=done_b)


def _result(final: SamplerState, rules: _Rules) -> dict[str, jax.Array]:
    tokens_bn = final.tokens_bn
    is_eos_bn = tokens_bn == rules.eos_id
    lengths_b = jnp.where(is_eos_bn.any(-1), jnp.argmax(is_eos_bn, -1) + 1, jnp.sum(tokens_bn != rules.pad_id, -1))
    result = dict(tokens_bn=tokens_bn, lengths_b=lengths_b.astype(jnp.int32), logprob_bn=final.logprob_bn)
    if rules.expose_k:
        result["topk_logprob_bnk"], result["topk_ids_bnk"] = final.topv_bnk, final.topi_bnk
    return result


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
    rules = _Rules(combiner, max_new_tokens, eos_id, pad_id, greedy, top_p, expose_k)
    b, p = prompts_bp.shape
    tangents = tangents if tangents is not None else (None,) * len(specs)
    key_valid_bs = jnp.arange(p + max_new_tokens)[None, :] >= (p - lens_b)[:, None]
    layout = _Layout(p, lens_b, key_valid_bs)
    outs, caches, dcaches = _prefill(specs, params, tangents, prompts_bp, layout)
    carry0 = combiner.init(b) if carry is None else carry
    state = _initial_state(outs, caches, dcaches, carry0, b, rules)
    final = jax.lax.while_loop(
        lambda st: (st.step < max_new_tokens) & ~jnp.all(st.done_b),
        functools.partial(_step, specs, params, tangents, layout, rng, rules),
        state,
    )
    return _result(final, rules)


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
