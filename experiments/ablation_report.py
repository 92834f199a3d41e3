"""The attacker ablation's rows and its results: which rows exist and what each one is (``ABLATION_ROWS``,
``ABLATION_HELP``), ``results.json["ablation"]`` (per defense setting, every row's accuracy and its paired change
against the passive student, mean ± SE over seeds, in points), its compact form for the CLI's last line, and the
RESULTS.md section. The rows are trained by ``experiments.attacker.ablation_students``."""

from __future__ import annotations

import numpy as np

ABLATION_ROWS = (
    "passive_token",
    "passive_sequence",
    "design",
    "design_shuffled",
    "design_once",
    "tuned",
    "filter",
    "reference",
    "reference_shuffled",
    "reference_design_sign",
    "reference_token",
)
ABLATION_HELP = {
    "passive_token": "passive, loss averaged per token (the table's passive student; the baseline)",
    "passive_sequence": "passive, loss averaged per example (the reference recipe's averaging, no weights)",
    "design": "the table's adaptive student (the configured recipe: by default exact fp32 JVP values of each batch at the current student)",
    "design_shuffled": "control: the design student's weights on randomly permuted examples",
    "design_once": "the design student with values computed once, at the student base, for every trace (value_refresh=0)",
    "tuned": "the configured recipe with β chosen per seed on the attacker's validation split (grid includes 0 = passive)",
    "filter": "one-sided filter: w = min(1, exp(β v)), only down-weights",
    "reference": "the paper's public code: -v by bf16 finite difference (ε=0.01), clamp ±10, no cap, mean 1 over all traces, once at the base, per-example averaging, β=0.5",
    "reference_shuffled": "control: the reference weights on randomly permuted traces",
    "reference_design_sign": "the reference recipe with the design's sign (+v)",
    "reference_token": "the reference recipe with per-token averaging",
}


def _paired(values, base) -> tuple[float, float]:
    diff = 100 * (np.asarray(values, float) - np.asarray(base, float))
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se


def ablation_summary(rows: list[dict]) -> dict:
    """results.json["ablation"]: per ablation defense (its label), the Done-when keys (points,
    paired per seed vs the passive student) and every row's accuracy, paired change and ESS."""
    out = {}
    for r in rows:
        ab = r.get("ablation_students")
        if not ab or "passive_token" not in ab:
            continue
        base = ab["passive_token"]["accuracy"]
        entry: dict = {"rows": {}}
        for name, rec in ab.items():
            acc = np.asarray(rec["accuracy"], float)
            diff, se = _paired(acc, base)
            ess = rec.get("ess_fraction")
            entry["rows"][name] = {
                "accuracy": float(100 * acc.mean()),
                "accuracy_se": float(100 * acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else float("nan"),
                "minus_passive": diff,
                "minus_passive_se": se,
                "ess_fraction": float(np.mean(ess)) if ess is not None else None,
                "beta": rec.get("beta"),
            }
        for key, name in (("tuned", "tuned"), ("reference", "reference")):
            if name in entry["rows"]:
                entry[f"{key}_minus_passive"] = entry["rows"][name]["minus_passive"]
                entry[f"{key}_minus_passive_se"] = entry["rows"][name]["minus_passive_se"]
        if "design" in entry["rows"]:
            entry["ess_fraction"] = entry["rows"]["design"]["ess_fraction"]
        if "tuned" in ab:
            entry["tuned_betas_chosen"] = ab["tuned"]["beta"]
        entry["beats_passive_by_2se"] = [
            n
            for n, x in entry["rows"].items()
            if n != "passive_token"
            and np.isfinite(x["minus_passive_se"])
            and x["minus_passive"] >= 2 * x["minus_passive_se"]
            and x["minus_passive"] > 0
        ]
        out[r["label"]] = entry
    return out


def compact(ablation: dict) -> dict:
    """The ablation object without per-row detail (the CLI's last-line JSON)."""
    return {label: {k: v for k, v in e.items() if k != "rows"} for label, e in ablation.items()}


def _cell(mean, se, signed=False) -> str:
    if mean is None:
        return "–"
    m = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return m + ("" if se is None or not np.isfinite(se) else f" ± {se:.1f}")


def ablation_markdown(results: dict) -> str:
    ab = results.get("ablation")
    if not ab:
        return ""
    labels = list(ab)
    names = [n for n in ABLATION_ROWS if any(n in ab[lab]["rows"] for lab in labels)]
    head = ["student"] + [
        h for lab in labels for h in (f"{lab}: acc (%)", f"{lab}: − passive (pts, paired)", f"{lab}: ESS")
    ]
    lines = [
        "",
        "## Attacker ablation: where an adaptive gain comes from",
        "",
        "Each student of a seed trains on that seed's traces in the same data order as the passive (token-averaged) "
        'student; "− passive" is the per-seed difference, mean ± SE over seeds. ESS = mean effective sample size '
        "(Σw)²/(n·Σw²) of the weights actually used. A shuffled row gives the same weights to randomly permuted "
        "examples: what selection adds beyond the lost sample size.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n in names:
        cells = [n]
        for lab in labels:
            x = ab[lab]["rows"].get(n)
            if x is None:
                cells += ["–"] * 3
                continue
            beta = x.get("beta")
            tag = (
                ""
                if beta is None or n.startswith("passive")
                else (
                    f" (β={beta:g})" if isinstance(beta, (int, float)) else f" (β={'/'.join(f'{b:g}' for b in beta)})"
                )
            )
            cells += [
                _cell(x["accuracy"], x["accuracy_se"]) + tag,
                _cell(x["minus_passive"], x["minus_passive_se"], True),
                "–" if x["ess_fraction"] is None else f"{x['ess_fraction']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        lines.append(f"- `{n}`: {ABLATION_HELP[n]}")
    lines.append("")
    for lab in labels:
        win = ab[lab]["beats_passive_by_2se"]
        lines.append(
            f"{lab}: "
            + (
                f"beats passive by ≥ 2 paired SE: {', '.join(win)}."
                if win
                else "no recipe beats passive by ≥ 2 paired SE."
            )
        )
    return "\n".join(lines) + "\n"
