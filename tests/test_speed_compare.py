"""experiments/speed_compare.py: alternating rounds and ratios of medians (fake workers, no compiling)."""

import argparse

from experiments import speed_compare as sc


class FakeWorker:
    """Work per second: a fixed speed per (checkout, measure), scaled by a machine-wide drift that changes
    with every call, so only alternation keeps the ratio exact."""

    calls: list = []
    speeds = {
        "base": {"distill": 2.0, "poe": 100.0, "standard": 150.0, "train": 1.0},
        "ours": {"distill": 3.0, "poe": 180.0, "standard": 300.0, "train": 1.2},
    }

    def __init__(self, label, checkout, args):
        self.label = label

    def wait_ready(self):
        pass

    def time(self, name):
        FakeWorker.calls.append((self.label, name))
        drift = 1.0 + 0.1 * (len(FakeWorker.calls) % 3)
        per_s = self.speeds[self.label][name] * drift
        return {"name": name, "seconds": 1.0, "per_s": per_s, "per_cpu_s": per_s / 2}

    def close(self):
        pass


def test_compare_alternates_and_reports_ratios_of_medians(monkeypatch, tmp_path):
    monkeypatch.setattr(sc, "Worker", FakeWorker)
    FakeWorker.calls = []
    args = argparse.Namespace(base=str(tmp_path), config="default", rounds=4, distill_steps=10, overrides=[])
    report = sc.compare(args)
    # Each round times every measure on both checkouts, in the order A B then B A.
    assert FakeWorker.calls[:2] == [("base", "distill"), ("ours", "distill")]
    assert FakeWorker.calls[8:10] == [("ours", "distill"), ("base", "distill")]
    assert len(FakeWorker.calls) == 4 * 4 * 2
    for key, name in zip(sc.MEASURES, sc.NAMES):
        want = FakeWorker.speeds["ours"][name] / FakeWorker.speeds["base"][name]
        m = report[key]
        assert len(m["rounds_base"]) == len(m["rounds_ours"]) == 4
        assert abs(m["ratio"] - want) < 0.15 * want  # drift is shared, not cancelled exactly per round
        assert abs(m["cpu_ratio"] - m["ours_per_cpu_s"] / m["base_per_cpu_s"]) < 1e-12
    text = sc.format_report(report)
    assert "distillation steps/s" in text and "PoE decode tokens/s" in text
