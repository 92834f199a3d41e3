"""Defenses wired to the trained models: the sampler's experts, the cost table, cached expert outputs.

What a defense *is* lives in game/registry.py (its experts, combiner, strength range, cost model); this
module only knows how to build each expert kind from the roles' models and the proxy's held-out gradient g_P.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from experiments.bench import median_seconds
from game import registry
from models import transformer as tfm
from models.sampling import ExpertSpec, generate


def _shifted(params, g_P, step: float):
    return jax.tree.map(lambda w, g: w + step * g, params, g_P)


def _expert(kind: str, models: dict, g_P: Any, d: Any) -> tuple:
    """(spec, params, tangent) of one expert kind (registry.EXPERTS)."""
    m = models[registry.EXPERTS[kind].role]
    if kind == "proxy_tangent":
        return ExpertSpec(m.graphdef, m.cfg, tangent=True), m.params, g_P
    if kind == "proxy_plus":
        return m.spec, _shifted(m.params, g_P, d.eps), None
    if kind == "proxy_minus":
        return m.spec, jax.tree.map(lambda w, g: w - d.eps * g, m.params, g_P), None
    return m.spec, m.params, None


def experts_setup(defense: registry.Defense, models: dict, g_P: Any, d: Any = None) -> tuple:
    """(expert specs, params, tangents) for the sampler; tangents None when no expert has one."""
    built = [_expert(kind, models, g_P, d) for kind in defense.experts]
    specs, params, tangents = (tuple(x) for x in zip(*built))
    return specs, params, (tangents if any(t is not None for t in tangents) else None)


def defense_setup(d: Any, models: dict, g_P: Any, tau: float):
    """(combiner, expert specs, params, tangents) for one defense setting (experiments.config.DefenseSetting)."""
    defense = registry.get(d.name)
    return (defense.make_combiner(d, tau), *experts_setup(defense, models, g_P, d))


def per_row_setup(name: str, models: dict, g_P: Any, tau: float):
    """Like `defense_setup`, with the strength as data (the sampler's carry_b: one strength per row)."""
    defense = registry.get(name)
    return (defense.per_row_combiner(tau), *experts_setup(defense, models, g_P))


def needs_proxy_gradient(name: str) -> bool:
    """Whether a defense's experts read g_P (the proxy's held-out NLL gradient)."""
    return any(k in ("proxy_tangent", "proxy_plus", "proxy_minus") for k in registry.get(name).experts)


def cost_model(d: Any, models: dict, context: int) -> dict:
    """Forward passes and model FLOPs per generated token, relative to standard decoding."""
    vocab = models["teacher"].params["embed_vd"].shape[0]
    f_t = tfm.flops_per_token(models["teacher"].cfg, vocab, context)
    f_p = tfm.flops_per_token(models["proxy"].cfg, vocab, context)
    passes, flops = registry.get(d.name).forward_cost({"teacher": f_t, "proxy": f_p})
    return {
        "forward_passes_per_token": passes,
        "flops_per_token": flops,
        "flops_ratio": flops / f_t,
        "poe_wallclock_bound": 1.10 * (1 + f_p / f_t),
    }


def decode_seconds(
    d: Any, models: dict, g_P: Any, tau: float, prompts, lens, max_new_tokens: int, pad_id: int
) -> float:
    """Median seconds of three decodes of `prompts` under defense setting d, full length (no early EOS), after
    one to compile."""
    combiner, specs, params, tangents = defense_setup(d, models, g_P, tau)

    def run():
        return generate(
            specs,
            params,
            prompts,
            lens,
            jax.random.key(0),
            combiner=combiner,
            max_new_tokens=max_new_tokens,
            eos_id=-1,
            pad_id=pad_id,
            greedy=False,
            tangents=tangents,
        )["tokens_bn"]

    return median_seconds(run, iters=3)


# ---------------------------------------------------------------------------
# Expert outputs on fixed sequences (the equilibrium's cached logits)
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logits(graphdef, params, tokens_bt):
    return tfm.forward(graphdef, params, tokens_bt[:, :-1])[0]


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logits_jvp(graphdef, params, tangent, tokens_bt):
    return jax.jvp(lambda p: tfm.forward(graphdef, p, tokens_bt[:, :-1])[0], (params,), (tangent,))


def logits_on(model, tokens_bt):
    """A model's next-token logits on fixed sequences [B, T-1, V] (compiled once per model and shape)."""
    return _next_token_logits(model.graphdef, model.params, tokens_bt)


def expert_outputs(name: str, models: dict, g_P: Any, tokens_bt) -> tuple:
    """Every expert's output of defense `name` at the positions that predict tokens_bt[:, 1:], as the
    sampler passes them to the combiner: logits, or (logits, JVP along g_P) for a tangent expert."""
    outs = []
    for kind in registry.get(name).experts:
        m = models[registry.EXPERTS[kind].role]
        if kind == "proxy_tangent":
            g = jax.tree.map(lambda w, t: t.astype(w.dtype), m.params, g_P)
            outs.append(tuple(_next_token_logits_jvp(m.graphdef, m.params, g, tokens_bt)))
        elif kind in ("teacher", "proxy"):
            outs.append(logits_on(m, tokens_bt))
        else:
            raise ValueError(f"defense {name!r}: no cached output for its {kind!r} expert")
    return tuple(outs)
