"""The defense registry: everything the rest of the code knows about a defense, in one declaration.

A :class:`Defense` says

* ``name``: the key in configs (``protocol.defenses[i].name``, ``equilibrium.defense``);
* ``experts``: which models the teacher runs at every decoding step, as kinds of :data:`EXPERTS`
  (``teacher``, ``proxy``, ``proxy_tangent``, ...); experiments/defense_wiring.py turns each kind into the
  sampler's (spec, params, tangent);
* ``logits(outs, strength, tau)``: the combiner, expert outputs (as the sampler passes them, any leading
  axes) -> logits to sample from, differentiable in ``strength``; and/or ``combiner(setting, tau)`` building
  the sampler's combiner object (game/defenses.py) — needed when the defense is more than a function of one
  strength (strategic variants carry a running sum, ads_fd's experts depend on its step); without it the
  sampler runs ``logits`` at the setting's strength (:class:`FixedStrength`);
* ``strength``: its strength's config key ``strength`` with symbol (γ, λ) and valid :class:`Range`; None for
  a defense without one (standard decoding); ``params``: other :class:`DefenseSetting` fields it reads
  (eta, max_strength, eps) and their ranges;
* ``differentiable``: the equilibrium sweep (game/solver.py) can play its strength: ``logits`` is a smooth
  function of the strength on cached expert outputs and strength 0 is standard decoding (the budget is
  measured from it);
* the cost model: forward passes and FLOPs per generated token, by default the sum of its experts' costs
  (:data:`EXPERTS`); ``cost`` overrides it.

Adding a defense is one declaration passed to :func:`register` (at the bottom of this file, with its logits
function if its maths is new) and its test: nothing else names defenses. tests/test_defense_registry.py registers
a throw-away defense from the test file and runs the ci protocol with it. Pure: no I/O, no experiment code; the
settings handed to ``combiner``/``label`` are any object with the fields ``name``, ``strength`` and those in
``params`` (experiments/config.py's DefenseSetting).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

from game import defenses as dfn

__all__ = [
    "Range",
    "Param",
    "Expert",
    "EXPERTS",
    "Defense",
    "aligned",
    "FixedStrength",
    "PerRowStrength",
    "register",
    "unregister",
    "get",
    "check",
    "unknown",
    "names",
    "differentiable_names",
    "STANDARD",
    "POE",
]


@dataclasses.dataclass(frozen=True)
class Range:
    """A real interval; ``what`` names the quantity in errors ("a PoE gamma")."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    what: str = ""

    def __contains__(self, x: Any) -> bool:
        try:
            x = float(x)
        except (TypeError, ValueError):
            return False
        lo = x > self.low if self.low_open else x >= self.low
        hi = x < self.high if self.high_open else x <= self.high
        return bool(lo and hi and math.isfinite(x))

    def describe(self, named: bool = True) -> str:
        """'a PoE gamma in [0, 1)', 'an ADS lambda >= 0', 'finite' (without the quantity's name: 'in [0, 1)')."""
        if math.isinf(self.low) and math.isinf(self.high):
            text = "finite"
        elif math.isinf(self.high):
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif math.isinf(self.low):
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"{self.what} {text}" if self.what and named else text


@dataclasses.dataclass(frozen=True)
class Param:
    """A numeric field of the defense's setting: its valid range and, if it shows in the label, its symbol."""

    range: Range
    symbol: str = ""


@dataclasses.dataclass(frozen=True)
class Expert:
    """One kind of sampler expert: the model it runs and its cost in forward passes of that model."""

    role: str  # "teacher" or "proxy"
    flops: int = 1  # forward-pass FLOPs per token, in multiples of the role's forward pass
    doc: str = ""


EXPERTS: dict[str, Expert] = {
    "teacher": Expert("teacher", 1, "the teacher's logits z_T"),
    "proxy": Expert("proxy", 1, "the proxy's logits z_P"),
    # A JVP evaluates each matmul on the primal and twice for the tangent (x dW + dx W): 3x the proxy.
    "proxy_tangent": Expert("proxy", 3, "(z_P, dz_P): the proxy and its JVP along g_P, its held-out NLL gradient"),
    "proxy_plus": Expert("proxy", 1, "the proxy's logits at θ_P + ε g_P"),
    "proxy_minus": Expert("proxy", 1, "the proxy's logits at θ_P − ε g_P"),
}
"""Expert kinds a defense may ask for (experiments/defense_wiring.py builds each one)."""

Logits = Callable[[tuple, Any, Any], jax.Array]  # (outs, strength, tau) -> logits


def aligned(strength: Any, logits: jax.Array) -> jax.Array:
    """A scalar or per-row strength ([B], the sampler's per-row carry) as float32, shaped to broadcast against
    ``logits`` along its leading axes: a ``logits`` function must accept both."""
    return dfn._lead(strength, jax.numpy.ndim(logits))


@dataclasses.dataclass(frozen=True, eq=False)
class Defense:
    """One defense, as the config, the protocol, the cost table and the equilibrium sweep see it."""

    name: str
    experts: tuple[str, ...]
    logits: Logits | None = None
    combiner: Callable[[Any, float], Any] | None = None
    per_row: Callable[[float], Any] | None = None
    """tau -> the sampler combiner with the strength as data (carry = strength_b); None = from ``logits``"""
    strength: Param | None = None
    params: dict[str, Param] = dataclasses.field(default_factory=dict)
    differentiable: bool = False
    invertible: bool = False
    """the poe_inversion attack undoes it knowing its strength and the proxy (logits (1-s) z_T + s z_P)"""
    title: str = ""
    """its name in prose (EQUILIBRIUM.md): 'PoE'; default the name"""
    cost: Callable[[dict], tuple[int, float]] | None = None
    """{role: forward FLOPs per token} -> (forward passes, FLOPs) per generated token; None = sum of the experts"""

    def __post_init__(self):
        unknown = [e for e in self.experts if e not in EXPERTS]
        if not self.experts or unknown:
            raise ValueError(f"defense {self.name!r}: experts {unknown or '()'} must be among {', '.join(EXPERTS)}")
        if self.logits is None and self.combiner is None:
            raise ValueError(f"defense {self.name!r}: give logits= or combiner= (or both)")
        if self.differentiable and (self.logits is None or self.strength is None):
            raise ValueError(f"defense {self.name!r}: a differentiable strength needs logits= and strength=")

    def make_combiner(self, setting: Any, tau: float):
        """The sampler's combiner for one setting (game/defenses.py's interface)."""
        if self.combiner is not None:
            return self.combiner(setting, tau)
        return FixedStrength(self.logits, float(setting.strength) if self.strength else 0.0, tau)

    def per_row_combiner(self, tau: float):
        """A combiner whose strength is data: carry = strength_b [B], seeded through the sampler's carry
        argument (one compiled sampler for every strength; the equilibrium resamples at each state's)."""
        if not self.differentiable:
            raise ValueError(f"defense {self.name!r}: its strength is not differentiable")
        return self.per_row(tau) if self.per_row is not None else PerRowStrength(self.logits, tau)

    def logprobs(self, outs: tuple, strength: Any, tau: Any) -> jax.Array:
        """log_softmax of ``logits`` over the last axis (the game's defended teacher on cached outputs)."""
        return jax.nn.log_softmax(self.logits(outs, strength, tau), axis=-1)

    def forward_cost(self, flops_by_role: dict) -> tuple[int, float]:
        """(forward passes, FLOPs) per generated token."""
        if self.cost is not None:
            return self.cost(flops_by_role)
        flops = [EXPERTS[e].flops * flops_by_role[EXPERTS[e].role] for e in self.experts]
        return len(self.experts), sum(flops[1:], flops[0])

    def check(self, setting: Any, where: str) -> None:
        """Raise ValueError naming ``where.KEY`` for the first field of ``setting`` out of its range."""
        fields = ({"strength": self.strength} if self.strength else {}) | self.params
        for key, p in fields.items():
            value = getattr(setting, key)
            if value not in p.range:
                raise ValueError(f"{where}.{key}={value} must be {p.range.describe()}")

    def label(self, setting: Any) -> str:
        """'standard', 'poe γ=0.5', 'strategic_poe γ=0.3, η=0.1'."""
        if self.strength is None:
            return self.name
        extra = "".join(f", {p.symbol}={getattr(setting, k):g}" for k, p in self.params.items() if p.symbol)
        return f"{self.name} {self.strength.symbol}={setting.strength:g}{extra}"


@dfn._static_dataclass  # the sampler combiners' convention (game/defenses.py): static, frozen
class FixedStrength:
    """The sampler combiner of a stateless defense at one strength: ``logits_fn(outs, strength, τ)``."""

    logits_fn: Logits
    strength: float
    temperature: float = 1.0

    def init(self, batch_size: int):
        return ()

    def logits(self, outs, carry):
        return self.logits_fn(outs, self.strength, self.temperature)

    def update(self, outs, carry, token_b):
        return carry


@dfn._static_dataclass
class PerRowStrength:
    """``logits_fn(outs, strength_b, τ)`` with the strength as data: carry = strength_b [B]."""

    logits_fn: Logits
    temperature: float = 1.0

    def init(self, batch_size: int):
        return jax.numpy.zeros((batch_size,), jax.numpy.float32)

    def logits(self, outs, carry):
        return self.logits_fn(outs, carry, self.temperature)

    def update(self, outs, carry, token_b):
        return carry


_REGISTRY: dict[str, Defense] = {}


def register(defense: Defense, replace: bool = False) -> Defense:
    """Add ``defense`` (refusing a second one of the same name unless ``replace``); returns it."""
    if defense.name in _REGISTRY and not replace:
        raise ValueError(f"defense {defense.name!r} is already registered")
    _REGISTRY[defense.name] = defense
    return defense


def unregister(name: str) -> None:
    """Remove a defense (tests that register throw-away ones clean up with this)."""
    _REGISTRY.pop(name, None)


def unknown(name: str) -> str:
    """The error text for a name that is not registered."""
    return f"{name!r} is not a defense; choose one of {', '.join(names())}"


def get(name: str) -> Defense:
    if name not in _REGISTRY:
        raise KeyError(unknown(name))
    return _REGISTRY[name]


def check(setting: Any, where: str) -> None:
    """Raise ValueError naming ``where.KEY`` if ``setting`` (name, strength, ...) is not a valid defense setting."""
    if setting.name not in _REGISTRY:
        raise ValueError(f"{where}.name={unknown(setting.name)}")
    _REGISTRY[setting.name].check(setting, where)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def differentiable_names() -> tuple[str, ...]:
    """Defenses the equilibrium sweep can play."""
    return tuple(n for n, d in _REGISTRY.items() if d.differentiable)


# ---------------------------------------------------------------------------
# The built-in defenses (docs/design.md, "Defenses"; the maths in game/defenses.py)
# ---------------------------------------------------------------------------

STANDARD, POE = "standard", "poe"
"""Standard decoding is the undefended reference (paired deltas, the wall-clock ratio, the learning curve)."""

_GAMMA = Param(Range(0.0, 1.0, what="a PoE gamma"), "γ")
_LAMBDA = Param(Range(0.0, what="an ADS lambda"), "λ")
_ETA = Param(Range(), "η")


def _standard_logits(outs, strength, tau):
    return dfn.standard_logits(outs[0], tau)


def _poe_logits(outs, gamma, tau):
    z_T, z_P = outs
    return dfn.poe_logits(z_T, z_P, gamma, tau)


def _ads_logits(outs, lam, tau):
    z_T, (z_P, dz_P) = outs
    return dfn.ads_logits(z_T, dfn.ads_delta(z_P, dz_P), lam, tau)


register(Defense(STANDARD, ("teacher",), _standard_logits, combiner=lambda d, tau: dfn.Standard(tau)))
register(
    Defense(
        POE,
        ("teacher", "proxy"),
        _poe_logits,
        combiner=lambda d, tau: dfn.PoE(d.strength, tau),
        per_row=dfn.PoEPerRow,
        strength=_GAMMA,
        differentiable=True,
        invertible=True,
        title="PoE",
    )
)
register(
    Defense(
        "ads",
        ("teacher", "proxy_tangent"),
        _ads_logits,
        combiner=lambda d, tau: dfn.ADS(d.strength, tau),
        strength=_LAMBDA,
        differentiable=True,
        title="ADS",
    )
)
register(
    Defense(
        "ads_fd",
        ("teacher", "proxy_plus", "proxy_minus"),
        combiner=lambda d, tau: dfn.ADSFiniteDifference(d.strength, tau, d.eps),
        strength=_LAMBDA,
        params={"eps": Param(Range(0.0, low_open=True))},
    )
)
register(
    Defense(
        "strategic_poe",
        ("teacher", "proxy"),
        combiner=lambda d, tau: dfn.StrategicPoE(d.strength, d.eta, d.max_strength, tau),
        strength=_GAMMA,
        params={"eta": _ETA, "max_strength": Param(Range(0.0, 1.0, low_open=True))},
    )
)
register(
    Defense(
        "strategic_ads",
        ("teacher", "proxy_tangent"),
        combiner=lambda d, tau: dfn.StrategicADS(d.strength, d.eta, d.max_strength, tau),
        strength=_LAMBDA,
        params={"eta": _ETA, "max_strength": Param(Range(0.0))},
    )
)
