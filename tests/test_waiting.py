"""tests/waiting.py tells a hung subprocess (it sleeps) from a slow one (it computes) and stops a runaway."""

import subprocess
import sys
import time

import pytest
from waiting import communicate, cpu_seconds

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\nprint('done')"


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_working_process_runs_past_the_stall_window():
    """3 CPU-seconds of work outlast a 1.5 s window: it is working, so it is not stopped."""
    proc = _python(BUSY.format(3.0))
    [(out, _)] = communicate([proc], cpu_budget_s=60, stall_s=1.5, poll_s=0.1)
    assert proc.returncode == 0 and out.strip() == "done"


def test_a_sleeping_process_is_hung():
    proc = _python("import time; time.sleep(120)")
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"hung: 0\.0\d CPU-seconds used in the last 2s"):
        communicate([proc], cpu_budget_s=60, stall_s=2.0, poll_s=0.1)
    assert time.monotonic() - start < 60 and proc.poll() is not None  # stopped, and killed


def test_a_runaway_is_stopped_at_its_cpu_budget():
    proc = _python(BUSY.format(120.0))
    with pytest.raises(AssertionError, match="runaway: .* over the budget of 1"):
        communicate([proc], cpu_budget_s=1.0, poll_s=0.1)
    assert proc.poll() is not None


def test_cpu_seconds_of_this_process():
    import os

    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    assert cpu_seconds(os.getpid()) >= 0.3 and cpu_seconds(2**22 + 12345) is None
