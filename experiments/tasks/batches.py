"""Training batches read per process: each host fetches only its rows of every global batch.

The global batch at a step is a deterministic function of (seed, step) (so a resumed run sees the
same batches). Process ``i`` of ``n`` reads the contiguous slice ``[i*B/n, (i+1)*B/n)`` of it: the
contract with ``models.sharding.shard_batch`` on multi-host meshes, where the global array is
assembled from each process's local rows. With one process the slice is the whole batch, so
single-process behaviour is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from models.sharding import process_slice


class RowSource(Protocol):
    """Random-access training rows: ``rows(idx)`` returns arrays with a leading ``len(idx)`` axis."""

    def __len__(self) -> int: ...

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]: ...


class ArrayRows:
    """Rows already in memory (the arithmetic task encodes its whole training set up front)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.arrays.items()}


class LazyRows:
    """Rows encoded on demand by ``encode(indices) -> arrays``: a host never touches rows it does not train on."""

    def __init__(self, n: int, encode: Callable[[np.ndarray], dict[str, np.ndarray]]):
        self._n, self._encode = n, encode

    def __len__(self) -> int:
        return self._n

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return self._encode(np.asarray(idx))


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row ids of the global batch at ``step``: epochs are permutations seeded by ``(seed, epoch)``."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[offset * batch_size : offset * batch_size + batch_size]
    if len(idx) < batch_size:  # fewer rows than one batch: repeat the permutation
        idx = np.resize(order, batch_size)
    return idx


def local_batch(
    source: RowSource,
    batch_size: int,
    seed: int,
    step: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at ``step`` (read from ``source`` and nothing else)."""
    idx = global_batch_indices(len(source), batch_size, seed, step)
    return source.rows(idx[process_slice(batch_size, process_index, process_count)])


def trim_columns(arrays: dict[str, np.ndarray], multiple: int = 8) -> dict[str, np.ndarray]:
    """Drop the trailing columns no row uses (rounded up to `multiple` so few shapes compile): rows are
    padded to task.max_len, but most are much shorter, and a train or distillation step's cost grows with the
    width. Exact: a kept row's targets all stay (mask[t] = 1 iff tokens[t+1] is a target, so width = last
    masked t + 2), and causal attention never lets a kept position see a dropped one."""
    used = np.flatnonzero(arrays["loss_mask_bt"].reshape(-1, arrays["loss_mask_bt"].shape[-1]).any(0))
    width = min(arrays["tokens_bt"].shape[-1], -(-(int(used[-1]) + 2 if used.size else 2) // multiple) * multiple)
    time_axis = arrays["tokens_bt"].ndim - 1
    return {k: v[(slice(None),) * time_axis + (slice(0, width),)] for k, v in arrays.items()}
