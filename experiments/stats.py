"""Statistics over seeds shared by the protocol, the calibration and the equilibrium sweep."""

from __future__ import annotations

import numpy as np


def mean_stderr(values) -> dict:
    """Mean and standard error of the mean (ddof=1) of per-seed values, and the values themselves.
    With one value the standard error is undefined: NaN in memory, `null` in the JSON files
    (experiments.io.to_json)."""
    v = np.asarray(values, float)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "stderr": se, "values": [float(x) for x in v]}


def pm(stat: dict | None, signed: bool = False) -> str:
    """A fraction as percent (points when `signed`) ± its standard error."""
    if not stat:
        return "–"
    se = stat["stderr"]
    mean = f"{100 * stat['mean']:+.1f}" if signed else f"{100 * stat['mean']:.1f}"
    return mean + ("" if se is None or not np.isfinite(se) else f" ± {100 * se:.1f}")
