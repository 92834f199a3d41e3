"""Waiting for the suite's subprocesses by the work they do, not by the wall clock.

A wall-clock timeout that fits a quiet machine fails on a loaded one (a multi-process test ran out of its
150 s beside another CPU-heavy job), and one that fits every load no longer catches a hang in reasonable
time. What tells a hang from a slow run is whether the processes still use the CPU: a process blocked in a
collective that a peer never joins, or waiting for a coordinator, sleeps (measured: 0.01 CPU-seconds in
30 s), while a slow one keeps computing, however little of the CPU it gets. So `communicate` fails
  - a hang: while one is still running, the processes together used under MIN_CPU_SHARE of one core over
    the last `stall_s` seconds;
  - a runaway: they used more than `cpu_budget_s` CPU-seconds in all (a budget in work, not time).
Reads /proc (Linux); elsewhere it falls back to a wall-clock limit of `cpu_budget_s` (plus STALL_S).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import threading
import time
from collections.abc import Callable

STALL_S = 180.0
"""The window over which a hang is judged."""
MIN_CPU_SHARE = 0.005
"""The share of one core the processes must use together over a window to count as working. A hang uses
~0.0003 (0.01 CPU-seconds in 30 s, measured: a process waiting for a peer); a niced test process beside two
CPU-bound jobs on 2 cores still gets ~0.03."""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process (all its threads), or None if /proc does not show it."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


class Watch:
    """CPU use of a group of processes, sampled by `check()`: a failure message on a hang or a runaway, else None."""

    def __init__(self, procs: list[subprocess.Popen], cpu_budget_s: float, stall_s: float = STALL_S):
        self.procs, self.cpu_budget_s, self.stall_s = procs, cpu_budget_s, stall_s
        self.used = {p.pid: 0.0 for p in procs}  # the last CPU time seen per process (kept once it has exited)
        self.have_proc = pathlib.Path("/proc/self/stat").exists()
        self.start = time.monotonic()
        self.history = [(self.start, 0.0)]  # (time, CPU-seconds used so far)

    @property
    def total(self) -> float:
        return sum(self.used.values())

    def check(self) -> str | None:
        now = time.monotonic()
        for p in self.procs:
            seconds = cpu_seconds(p.pid) if p.returncode is None else None  # a reaped pid may be reused
            if seconds is not None:
                self.used[p.pid] = max(self.used[p.pid], seconds)
        total = self.total
        self.history.append((now, total))
        then = [cpu for t, cpu in self.history if t <= now - self.stall_s]
        if not self.have_proc:
            if now - self.start > self.cpu_budget_s + self.stall_s:
                return f"still running after {now - self.start:.0f}s (no /proc to measure their work)"
        elif total > self.cpu_budget_s:
            return f"runaway: {total:.0f} CPU-seconds used, over the budget of {self.cpu_budget_s:.0f}"
        elif then and total - then[-1] < MIN_CPU_SHARE * self.stall_s and any(p.returncode is None for p in self.procs):
            return (
                f"hung: {total - then[-1]:.2f} CPU-seconds used in the last {self.stall_s:.0f}s "
                f"({total:.1f} CPU-seconds in {now - self.start:.0f}s in all)"
            )
        return None


def communicate(
    procs: list[subprocess.Popen], cpu_budget_s: float, stall_s: float = STALL_S, poll_s: float = 1.0
) -> list[tuple[str, str]]:
    """(stdout, stderr) of every process once all have exited; kills them all and fails on a hang or a runaway
    (see the module docstring). `cpu_budget_s`: a generous multiple of the CPU time the job takes."""
    outputs: list = [("", "")] * len(procs)

    def read(i, p):  # one reader per process: a chatty process never blocks on a full pipe
        outputs[i] = p.communicate()

    readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    watch, failure = Watch(procs, cpu_budget_s, stall_s), None
    try:
        while failure is None and any(r.is_alive() for r in readers):
            time.sleep(poll_s)
            failure = watch.check()
    finally:  # also on an error or an interrupt here: no process outlives the test
        for p in procs:
            if p.poll() is None:
                p.kill()
        for r in readers:
            r.join(timeout=30)
    if failure:
        raise AssertionError(
            failure + "".join(f"\n--- process {i} stderr:\n{err[-2000:]}" for i, (_, err) in enumerate(outputs) if err)
        )
    print(f"subprocesses: {watch.total:.1f} CPU-seconds in {time.monotonic() - watch.start:.0f}s")
    return outputs


def wait_until(
    done: Callable[[], bool],
    proc: subprocess.Popen,
    cpu_budget_s: float,
    stall_s: float = STALL_S,
    poll_s: float = 0.01,
) -> None:
    """Poll `done()` while `proc` runs; fail (and kill it) if it ends first, hangs or runs away."""
    watch = Watch([proc], cpu_budget_s, stall_s)
    last = 0.0
    while not done():
        if proc.poll() is not None:
            raise AssertionError(
                f"the process ended first (exit {proc.returncode}): {proc.stderr.read()[-2000:] if proc.stderr else ''}"
            )
        if time.monotonic() - last >= 1.0:  # /proc once a second, `done()` as often as asked
            last = time.monotonic()
            failure = watch.check()
            if failure:
                proc.kill()
                raise AssertionError(failure)
        time.sleep(poll_s)
