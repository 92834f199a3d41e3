"""Evaluating a student at the average of its iterates rather than its last one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


class IterateAverage:
    """Bias-corrected exponential moving average of the student's iterates (protocol.distill.ema):
    avg_t = Σ_k (1-d) d^(t-k) θ_k / (1 - d^t), a weighted mean of the iterates only (the base does not
    leak in). decay 0 keeps the last iterate. The average is causal, so the first N steps of a longer
    run still give exactly the N-step student (the learning curve stays one run)."""

    def __init__(self, decay: float, tree):
        self.decay, self.t = decay, 0
        self.avg = jax.tree.map(lambda x: x.astype(jnp.float32) * 0, tree) if decay else None

    def update(self, tree) -> None:
        self.t += 1
        if self.decay:
            self.avg = _ema_step(self.avg, tree, jnp.float32(self.decay))

    def advanced(self, avg, steps: int) -> None:
        """Take the average that `steps` calls of `ema_update` inside a compiled loop produced."""
        self.avg, self.t = avg, self.t + steps

    def value(self, tree):
        if not self.decay:
            return tree
        scale = 1.0 / (1.0 - self.decay**self.t)
        return jax.tree.map(lambda a, x: (a * scale).astype(x.dtype), self.avg, tree)


def ema_update(avg, tree, decay):
    """One step of the (uncorrected) average, kept in float32; a pure function for compiled loops."""
    return jax.tree.map(lambda a, x: decay * a + (1 - decay) * x.astype(jnp.float32), avg, tree)


_ema_step = functools.partial(jax.jit, donate_argnums=0)(ema_update)
