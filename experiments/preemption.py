"""Preemption: SIGTERM (Cloud TPU's preemption notice) asks the run to checkpoint and stop.

The CLI installs the handler (`watch_sigterm`); long loops that can save (training, the
game solver) run inside `checkpointed()`, call `stop_requested()` at each step boundary,
save a checkpoint at that step and raise `Preempted`; the CLI prints how to resume and
exits 0. SIGTERM outside such a loop terminates the process as usual. With several processes every
process must take the same decision at the same step (the save is collective), so the
local flags are combined with a tiny all-gather: a process that has not yet received
its SIGTERM still stops with the others.
"""

from __future__ import annotations

import contextlib
import os
import signal

import numpy as np

_requested = False
_listening = 0  # depth of loops that can checkpoint and stop (see `checkpointed`)


class Preempted(Exception):
    """Raised after the checkpoint of a preempted loop is saved; the message says where."""


def _on_sigterm(signum, frame) -> None:
    global _requested
    if _listening:
        _requested = True
        return
    # Outside a loop that can checkpoint (e.g. a protocol stage, which resumes per stage):
    # terminate as SIGTERM always did.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def checkpointed():
    """Mark a loop that calls `stop_requested()` and saves before stopping; SIGTERM
    elsewhere terminates the process at once, as without this module."""
    global _listening
    _listening += 1
    try:
        yield
    finally:
        _listening -= 1


@contextlib.contextmanager
def watch_sigterm():
    """Turn SIGTERM into a stop request for the duration of the block (then restore the old handler)."""
    global _requested
    _requested = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested = False


def request_stop() -> None:
    """What the SIGTERM handler does (for callers that learn of preemption another way)."""
    global _requested
    _requested = True


def stop_requested() -> bool:
    """True on every process once any process got SIGTERM. Call it at the same points on all
    processes (it is a collective when there are several)."""
    import jax

    if jax.process_count() == 1:
        return _requested
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(_requested, np.int32))
    return bool(np.any(flags))
