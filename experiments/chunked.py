"""Memory-bounded passes for paper-scale models: many sequences through a large vocabulary.

At the paper's sizes (a 152k-token vocabulary, 1280-token rows) the full-vocabulary float32 logits of a few
hundred rows do not fit a chip. These helpers keep one chunk of rows alive at a time, split over the mesh's
batch axes: the proxy's held-out gradient g_P and the teacher's entropy are accumulated chunk by chunk, and a
distillation batch is placed with its rows sharded instead of replicated on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments.train import masked_nll
from models import sharding as shd


def seed_rows_sharded(arrays: dict[str, np.ndarray], mesh) -> dict:
    """[seeds, rows, ...] host arrays with their rows split over the mesh's batch axes (as a train step's batch),
    when the rows divide; otherwise as they are (replicated). At paper scale a replicated distillation batch would
    put every seed's full-vocabulary logits on every device."""
    if mesh is None:
        return arrays
    div = shd.batch_divisor(mesh)
    if div == 1 or any(v.shape[1] % div for v in arrays.values()):
        return arrays

    def spec(v):
        return NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES, *([None] * (v.ndim - 2))))

    return {k: shd.put_global(v, spec(v)) for k, v in arrays.items()}


def row_chunks(n: int, chunk: int, mesh):
    """Slices of `n` rows, `chunk` at a time rounded to a multiple of the mesh's batch divisor (>= it), and the
    chunk size: memory-bounded passes over many sequences (g_P, the teacher's entropy)."""
    div = shd.batch_divisor(mesh)
    size = max(div, chunk // div * div)
    return [slice(s, min(s + size, n)) for s in range(0, n, size)], size


def padded(rows: np.ndarray, size: int, fill=None) -> np.ndarray:
    """`rows` padded to `size` rows with copies of the first (or `fill`), so every chunk has one shape."""
    if len(rows) == size:
        return rows
    extra = np.repeat(rows[:1] if fill is None else np.full_like(rows[:1], fill), size - len(rows), 0)
    return np.concatenate([rows, extra])


def mean_nll_grad(graphdef, params, tokens_bt: np.ndarray, mask_bt: np.ndarray, mesh, chunk: int):
    """∇ of the mean next-token NLL over every masked token of `tokens_bt`, accumulated over row chunks sharded
    over the batch axes, so memory is that of one chunk: with m_c the masked tokens of chunk c and M their total,
    Σ_c (m_c / M) ∇ mean_c = ∇ mean exactly. Accumulated in float32, returned in the params' dtypes."""
    grad_fn = jax.jit(jax.grad(lambda p, t, m: masked_nll(graphdef, p, t, m)))
    slices, size = row_chunks(len(tokens_bt), chunk, mesh)
    counts = [float(mask_bt[s, :-1].sum()) for s in slices]
    total = max(sum(counts), 1.0)

    def zeros(p):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p)

    acc = jax.jit(zeros, out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)  # on the params' shards
    add = jax.jit(lambda acc, g, w: jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), acc, g))
    for s, m in zip(slices, counts):
        if m == 0:
            continue
        t, k = padded(tokens_bt[s], size), padded(mask_bt[s], size, fill=0)
        g = grad_fn(params, shd.put_global(t, shd.batch_sharding(mesh)), shd.put_global(k, shd.batch_sharding(mesh)))
        acc = add(acc, g, jnp.float32(m / total))
    return jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
