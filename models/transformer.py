"""Decoder-only transformer in Flax NNX with a functional core.

Every parameter carries `logical_axes` metadata (e.g. ("vocab", "embed")) that the
rule table in `models.sharding` maps to mesh axes. Parameters are stored in `param_dtype`
(float32, or bfloat16 to halve a large model's memory); matmuls run in `compute_dtype`
(bfloat16 on TPU); RMSNorm, rotary angles, softmaxes and logits are float32.

The model is used through pure functions on a pure-dict parameter tree:
`graphdef, params = split_params(model)` once, then `forward(graphdef, params, ...)`
inside `jax.jit`. The KV cache is an explicit pytree argument, not module state, so
sampling, `jax.jvp` through the cache and `vmap` over seeds stay plain JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import attend, reverse_mode_only  # noqa: F401  (reverse_mode_only: tfm.reverse_mode_only)

Params = dict[str, Any]
Cache = dict[str, dict[str, jax.Array]]

# Logit of vocabulary rows beyond the tokenizer (padding): finite, so differences and
# products with zero probabilities stay NaN-free, yet exp() of it is exactly 0.
PADDED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Transformer sizes. One preset per role lives in the experiment config."""

    d_model: int = dataclasses.field(default=128, metadata={"help": "width of the residual stream"})
    n_layers: int = dataclasses.field(default=4, metadata={"help": "number of transformer blocks"})
    n_heads: int = dataclasses.field(default=4, metadata={"help": "query heads per attention layer"})
    n_kv_heads: int = dataclasses.field(
        default=4, metadata={"help": "key/value heads (< n_heads = grouped-query attention); must divide n_heads"}
    )
    d_ff: int = dataclasses.field(default=512, metadata={"help": "hidden width of the SwiGLU MLP"})
    tied_embeddings: bool = dataclasses.field(
        default=True, metadata={"help": "reuse the token embedding as the output projection"}
    )
    scale_tied_logits: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "tied head only: multiply logits by d_model^-1/2 (ours, trained from scratch); false = HF Llama/Qwen"
        },
    )
    head_size: int = dataclasses.field(
        default=0, metadata={"help": "width of one attention head (0 = d_model / n_heads)"}
    )
    qkv_bias: bool = dataclasses.field(default=False, metadata={"help": "biases on the q/k/v projections (Qwen2)"})
    rope_base: float = dataclasses.field(default=10000.0, metadata={"help": "rotary position embedding base"})
    rope_scaling_factor: float = dataclasses.field(
        default=0.0, metadata={"help": "Llama-3 RoPE scaling: context extension factor (0 = no scaling)"}
    )
    rope_low_freq_factor: float = dataclasses.field(
        default=1.0, metadata={"help": "Llama-3 RoPE scaling: low_freq_factor"}
    )
    rope_high_freq_factor: float = dataclasses.field(
        default=4.0, metadata={"help": "Llama-3 RoPE scaling: high_freq_factor"}
    )
    rope_original_max_len: int = dataclasses.field(
        default=8192, metadata={"help": "Llama-3 RoPE scaling: original_max_position_embeddings"}
    )
    norm_eps: float = dataclasses.field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    vocab_rows: int = dataclasses.field(
        default=0,
        metadata={
            "help": "embedding rows (0 = the tokenizer's vocabulary size); rows beyond the tokenizer are padding "
            "whose logits are masked so they are never sampled (HF checkpoints pad, e.g. Qwen2.5: 151936 rows)"
        },
    )
    compute_dtype: str = dataclasses.field(
        default="float32", metadata={"help": "dtype of matmuls: float32 or bfloat16 (parameters: param_dtype)"}
    )
    param_dtype: str = dataclasses.field(
        default="float32",
        metadata={
            "help": "dtype the parameters are stored in on device: float32, or bfloat16 (half the memory: a 7B model "
            "takes 15 GB instead of 30; initialised as the float32 values rounded). Roles that train keep their "
            "optimizer moments in float32 whatever this is (experiments.train.float32_moments); a bf16 weight still "
            "rounds each update, so full training from scratch should stay float32, while frozen weights (an HF "
            "teacher/proxy, a LoRA student's base) lose nothing that matters"
        },
    )

    def validate(self, where: str = "model") -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        if self.head_size < 0 or self.vocab_rows < 0:
            raise ValueError(f"{where}.head_size and {where}.vocab_rows must be >= 0 (0 = derived)")
        if not self.head_size and self.d_model % self.n_heads:
            raise ValueError(
                f"{where}.n_heads={self.n_heads} must divide {where}.d_model={self.d_model} (or set head_size)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{where}.n_kv_heads={self.n_kv_heads} must divide {where}.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{where}: head size {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling_factor < 0:
            raise ValueError(f"{where}.rope_scaling_factor={self.rope_scaling_factor} must be >= 0 (0 = off)")
        if self.rope_scaling_factor and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            raise ValueError(
                f"{where}: RoPE scaling needs rope_high_freq_factor > rope_low_freq_factor > 0, got "
                f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}"
            )
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{where}.{name}={getattr(self, name)!r} must be 'float32' or 'bfloat16'")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    def rows(self, vocab_size: int) -> int:
        """Embedding rows for a tokenizer of `vocab_size` tokens."""
        if self.vocab_rows and self.vocab_rows < vocab_size:
            raise ValueError(f"vocab_rows={self.vocab_rows} is smaller than the tokenizer's {vocab_size} tokens")
        return self.vocab_rows or vocab_size


def rows_matmul(x: jax.Array, w_in_out: jax.Array) -> jax.Array:
    """x[..., in] @ w[in, ...]: one 2-D matmul over the flattened rows of x and the flattened output dims of w.

    Same values as the einsum; on XLA:CPU the weight gradient of the 2-D form needs no transposed copies
    of the activations (a SwiGLU forward + backward at the default teacher's size: 1.35x faster)."""
    out_shape = w_in_out.shape[1:]
    y = x.reshape(-1, x.shape[-1]) @ w_in_out.reshape(w_in_out.shape[0], -1)
    return y.reshape(*x.shape[:-1], *out_shape)


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], fan_in: int, dtype=jnp.float32
) -> nnx.Param:
    # Drawn in float32 and rounded, so a bf16 model is exactly the rounded float32 model of the same seed.
    init = jax.nn.initializers.normal(stddev=fan_in**-0.5)
    return nnx.Param(init(rngs.params(), shape, jnp.float32).astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.scale_d = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale_d[...]).astype(x_btd.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [head_dim/2] (float32, as HF computes them), with Llama-3 scaling if set."""
    h = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_base) ** (np.arange(0, h, 2).astype(np.float32) / np.float32(h)))).astype(
        np.float32
    )
    if not cfg.rope_scaling_factor:
        return inv_freq
    # Llama-3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    factor, lo, hi, orig = (
        cfg.rope_scaling_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_len,
    )
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > orig / lo, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
    return np.where(medium, blended, scaled).astype(np.float32)


def _rotary_tables(positions_bt, inv_freq_h: np.ndarray):
    """sin and cos of the rotary angles, [B, T, 1, H/2] (float32)."""
    angle_bth = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h)
    return jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]


def rotary(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq_h: np.ndarray) -> jax.Array:
    """Rotate-half rotary embedding (HF Llama/Qwen layout) at absolute `positions_bt` (float32 angles)."""
    if isinstance(positions_bt, np.ndarray):
        # Static positions (a full-sequence forward): the sin/cos tables become constants, computed once by the
        # same XLA ops. Traced, XLA:CPU fuses them into their consumers and evaluates sin and cos once per
        # (head, feature) element of q and k, in the forward and again in the backward.
        with jax.ensure_compile_time_eval():
            sin, cos = _rotary_tables(jnp.asarray(positions_bt), inv_freq_h)
        sin, cos = np.asarray(sin), np.asarray(cos)
    else:
        sin, cos = _rotary_tables(positions_bt, inv_freq_h)
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.wq_dnh = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), d, pd)
        self.wk_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), d, pd)
        self.wv_dkh = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), d, pd)
        self.wo_nhd = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), n * h, pd)
        if cfg.qkv_bias:
            self.bq_nh = nnx.Param(jnp.zeros((n, h), pd), logical_axes=("heads", "head_dim"))
            self.bk_kh = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))
            self.bv_kh = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))

    def _project(self, x_btd, weight: str, bias: str):
        dt = x_btd.dtype
        out = rows_matmul(x_btd, getattr(self, weight)[...].astype(dt))
        return out + getattr(self, bias)[...].astype(dt) if self.cfg.qkv_bias else out

    def __call__(self, x_btd, positions_bt, mask_bts, cache, cache_index):
        cfg, dt = self.cfg, x_btd.dtype
        inv_freq_h = rope_inv_freq(cfg)
        q_btnh = rotary(self._project(x_btd, "wq_dnh", "bq_nh"), positions_bt, inv_freq_h)
        k_btkh = rotary(self._project(x_btd, "wk_dkh", "bk_kh"), positions_bt, inv_freq_h)
        v_btkh = self._project(x_btd, "wv_dkh", "bv_kh")
        b, t, n, h = q_btnh.shape
        # Keys/values live head-major ([B, K, S, H], the cache's layout): the score and value matmuls
        # then batch over (b, k) with their operands in place, and a decode step reads the cache
        # without transposing all of it.
        k_bksh, v_bksh = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)
        if cache is not None:  # write this chunk at slot `cache_index`, attend over the whole cache
            k_bksh = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_bksh.astype(cache["k"].dtype), cache_index, 2)
            v_bksh = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_bksh.astype(cache["v"].dtype), cache_index, 2)
            cache = {"k": k_bksh, "v": v_bksh}
        return rows_matmul(
            attend(q_btnh, k_bksh.astype(dt), v_bksh.astype(dt), mask_bts).reshape(b, t, n * h),
            self.wo_nhd[...].astype(dt).reshape(n * h, -1),
        ), cache


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
        self.w_gate_df = _param(rngs, (d, f), ("embed", "mlp"), d, pd)
        self.w_up_df = _param(rngs, (d, f), ("embed", "mlp"), d, pd)
        self.w_down_fd = _param(rngs, (f, d), ("mlp", "embed"), f, pd)

    def __call__(self, x_btd):
        dt = x_btd.dtype
        gate = jax.nn.silu(rows_matmul(x_btd, self.w_gate_df[...].astype(dt)))
        return rows_matmul(gate * rows_matmul(x_btd, self.w_up_df[...].astype(dt)), self.w_down_fd[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_btd, positions_bt, mask_bts, cache, cache_index):
        attn_btd, cache = self.attn(self.attn_norm(x_btd), positions_bt, mask_bts, cache, cache_index)
        x_btd = x_btd + attn_btd
        return x_btd + self.mlp(self.mlp_norm(x_btd)), cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, rngs: nnx.Rngs):
        rows = cfg.rows(vocab_size)
        self.cfg, self.vocab_size = cfg, vocab_size
        pd = jnp.dtype(cfg.param_dtype)
        self.embed_vd = nnx.Param(
            jax.random.normal(rngs.params(), (rows, cfg.d_model), jnp.float32).astype(pd),
            logical_axes=("vocab", "embed"),
        )
        # Named attributes rather than a list keep checkpoint keys plain strings.
        for i in range(cfg.n_layers):
            setattr(self, f"block_{i}", Block(cfg, rngs))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        if not cfg.tied_embeddings:
            self.unembed_dv = _param(rngs, (cfg.d_model, rows), ("embed", "vocab"), cfg.d_model, pd)

    def __call__(self, tokens_bt, positions_bt, mask_bts, cache: Cache | None = None, cache_index=0):
        dt = jnp.dtype(self.cfg.compute_dtype)
        x_btd = jnp.take(self.embed_vd[...], tokens_bt, axis=0).astype(dt)
        new_cache = {} if cache is not None else None
        for i in range(self.cfg.n_layers):
            name = f"block_{i}"
            layer_cache = cache[name] if cache is not None else None
            x_btd, layer_cache = getattr(self, name)(x_btd, positions_bt, mask_bts, layer_cache, cache_index)
            if cache is not None:
                new_cache[name] = layer_cache
        x_btd = self.final_norm(x_btd)
        if self.cfg.tied_embeddings:
            logits = rows_matmul(x_btd, self.embed_vd[...].astype(dt).T)
            if self.cfg.scale_tied_logits:
                # Scale so tied logits start O(1) like the untied projection (embedding has unit variance).
                logits = logits * self.cfg.d_model**-0.5
        else:
            logits = rows_matmul(x_btd, self.unembed_dv[...].astype(dt))
        logits = logits.astype(jnp.float32)
        rows = logits.shape[-1]
        if rows > self.vocab_size:  # padded rows are never sampled
            logits = jnp.where(jnp.arange(rows) < self.vocab_size, logits, PADDED_LOGIT)
        return logits, new_cache


# ---------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------


def build(cfg: ModelConfig, vocab_size: int, seed: int) -> Transformer:
    return Transformer(cfg, vocab_size, nnx.Rngs(params=seed))


def split_params(model: Transformer) -> tuple[nnx.GraphDef, Params]:
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def logical_axes(model: Transformer) -> Params:
    """The `logical_axes` of every parameter, as a tree shaped like the params."""
    _, state = nnx.split(model)
    nested: Params = {}
    for path, var in nnx.to_flat_state(state):
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(var.get_metadata()["logical_axes"])
    return nested


def causal_mask(valid_bt: jax.Array) -> jax.Array:
    """[B, T, T] mask: query t sees keys s <= t that are valid (not padding)."""
    t = valid_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), bool))
    return causal_ts[None] & valid_bt[:, None, :].astype(bool)


def forward(graphdef, params: Params, tokens_bt, positions_bt=None, mask_bts=None, cache=None, cache_index=0):
    """Logits [B, T, V] (float32) and the updated cache (None without one)."""
    # Without positions or mask (a full-sequence forward), both are static numpy constants of batch 1 that
    # broadcast over the rows: XLA then folds the rotary tables and the causal mask instead of recomputing them.
    if positions_bt is None:
        positions_bt = np.arange(tokens_bt.shape[1])[None, :]
    if mask_bts is None:
        mask_bts = np.tril(np.ones((tokens_bt.shape[1],) * 2, bool))[None]
    model = nnx.merge(graphdef, params)
    return model(tokens_bt, positions_bt, mask_bts, cache, cache_index)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
    """Per layer {"k", "v"} of shape [B, K, S, H] (head-major: see Attention)."""
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    dt = jnp.dtype(cfg.compute_dtype)
    return {f"block_{i}": {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for i in range(cfg.n_layers)}


def token_logprobs(graphdef, params: Params, tokens_bt) -> jax.Array:
    """log q(tokens[t+1] | tokens[<=t]) as [B, T-1]: the next-token log-likelihoods."""
    logits_btv, _ = forward(graphdef, params, tokens_bt[:, :-1])
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    return jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]


def param_count(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, vocab_size: int, context: int) -> float:
    """Forward-pass model FLOPs per token (2 per multiply-add): matmuls + attention at `context`."""
    d, f, n, k, h = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    per_layer = 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f) + 2 * 2 * n * h * context
    return float(cfg.n_layers * per_layer + 2 * d * vocab_size)
