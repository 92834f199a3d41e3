"""LoRA as a pure-dict adapter over our parameter tree.

`init_adapters` makes, for each targeted weight W of each targeted block, a pair
`a [in, r]` (small random) and `b [r, out]` (zeros); `merge` returns the tree with
`W + (alpha / r) * (a @ b)` reshaped to W's layout. At init b = 0, so the merged model
is exactly the base model; training differentiates through `merge` with respect to the
adapters only, so the base weights never change. Being plain functions on pytrees,
adapters compose with `forward`, `jax.jvp` (example values) and `vmap` over seeds.

Adapters are small (rank r), so they are replicated; the merged weight takes the base
weight's sharding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from models.transformer import ModelConfig, Params

# Our projection names -> how many leading dims are the input (the rest are the output).
PROJECTIONS = {"wq_dnh": 1, "wk_dkh": 1, "wv_dkh": 1, "wo_nhd": 2, "w_gate_df": 1, "w_up_df": 1, "w_down_fd": 1}
_MODULE = {
    "wq_dnh": "attn",
    "wk_dkh": "attn",
    "wv_dkh": "attn",
    "wo_nhd": "attn",
    "w_gate_df": "mlp",
    "w_up_df": "mlp",
    "w_down_fd": "mlp",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = dataclasses.field(default=8, metadata={"help": "adapter rank r"})
    alpha: float = dataclasses.field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    targets: tuple[str, ...] = dataclasses.field(
        default=("wq_dnh", "wk_dkh", "wv_dkh", "wo_nhd"),
        metadata={"help": f"projections that get adapters: any of {', '.join(PROJECTIONS)}"},
    )
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "block indices with adapters (empty = all)"}
    )

    def validate(self, n_layers: int | None, where: str = "lora") -> None:
        """`n_layers=None` checks everything but the block indices (the model may not be known yet)."""
        if self.rank < 1:
            raise ValueError(f"{where}.rank={self.rank} must be >= 1")
        if not self.targets:
            raise ValueError(f"{where}.targets is empty; name at least one of {', '.join(PROJECTIONS)}")
        for t in self.targets:
            if t not in PROJECTIONS:
                raise ValueError(f"{where}.targets: unknown projection {t!r}; choose from {', '.join(PROJECTIONS)}")
        for i in self.layers:
            if i < 0 or (n_layers is not None and i >= n_layers):
                raise ValueError(f"{where}.layers: block {i} does not exist (the model has {n_layers})")

    def blocks(self, n_layers: int) -> tuple[int, ...]:
        return self.layers or tuple(range(n_layers))


def init_adapters(params: Params, model_cfg: ModelConfig, cfg: LoraConfig, key: jax.Array) -> Params:
    """{"block_i": {"wq_dnh": {"a": [in, r], "b": [r, out]}, ...}}, float32; b = 0 so the update starts at 0."""
    adapters: Params = {}
    for i in cfg.blocks(model_cfg.n_layers):
        for t in cfg.targets:
            w = params[f"block_{i}"][_MODULE[t]][t]
            n_in = math.prod(w.shape[: PROJECTIONS[t]])
            n_out = math.prod(w.shape[PROJECTIONS[t] :])
            key, sub = jax.random.split(key)
            adapters.setdefault(f"block_{i}", {})[t] = {
                "a": jax.random.normal(sub, (n_in, cfg.rank), jnp.float32) * n_in**-0.5,
                "b": jnp.zeros((cfg.rank, n_out), jnp.float32),
            }
    return adapters


def merge(params: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """The base tree with every adapted weight replaced by W + (alpha/r) a b (other leaves shared, not copied)."""
    scale = cfg.alpha / cfg.rank
    out = dict(params)
    for block, targets in adapters.items():
        out[block] = {**params[block], "attn": dict(params[block]["attn"]), "mlp": dict(params[block]["mlp"])}
        for t, ab in targets.items():
            w = params[block][_MODULE[t]][t]
            out[block][_MODULE[t]][t] = w + (scale * (ab["a"] @ ab["b"])).reshape(w.shape).astype(w.dtype)
    return out
