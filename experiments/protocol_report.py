"""The protocol's results: paired deltas vs standard, the headline figures, RESULTS.md and the plots."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import attacker
from experiments import io as rio
from experiments.io import save_json
from experiments.plots import plot_learning_curve, plot_protocol
from experiments.stats import mean_stderr, pm
from game import registry

# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def add_paired_deltas(rows: list[dict]) -> None:
    """Each row's per-seed change vs the standard row, mean ± SE over seeds (`row["paired_delta"]`).

    Seed s of every defense distils the same student base with the same data order (and the
    teacher samples with the same keys), so the per-seed difference cancels the spread between
    seeds that the unpaired ± of each cell carries. Needs a standard row and >= 2 seeds."""
    base = next((r for r in rows if r["defense"] == registry.STANDARD), None)
    if base is None or len(base["teacher_accuracy"]["values"]) < 2:
        return
    for r in rows:
        deltas = {"teacher": np.subtract(r["teacher_accuracy"]["values"], base["teacher_accuracy"]["values"])}
        for kind in ("passive", "correct_only"):
            if kind in r["students"] and kind in base["students"]:
                deltas[kind] = np.subtract(r["students"][kind]["values"], base["students"][kind]["values"])
        r["paired_delta"] = {k: mean_stderr(v) for k, v in deltas.items()}


def headline(results: dict) -> dict:
    """The figures a reader looks for first (accuracies in percent points).

    The *informative* defense setting is the one whose passive student loses most (paired mean) among the
    settings whose teacher loses at most 5 points: the paper's regime, a teacher still useful to its users."""
    rows = results["rows"]
    base = next((r for r in rows if r["defense"] == registry.STANDARD), None)
    out: dict[str, Any] = {}
    if base is None:
        return out
    out["teacher_accuracy_standard"] = 100 * base["teacher_accuracy"]["mean"]
    out["passive_accuracy_standard"] = 100 * base["students"]["passive"]["mean"]
    if results.get("world"):
        out["teacher_entropy_nats"] = results["world"]["entropy_nats"]
    curve = base.get("learning_curve")
    if curve:
        steps = sorted(curve, key=int)
        one = str(results.get("distill_steps"))
        if one in curve and str(2 * int(one)) in curve:
            out["plateau_delta_points"] = 100 * (curve[str(2 * int(one))]["mean"] - curve[one]["mean"])
        out["learning_curve"] = {n: 100 * curve[n]["mean"] for n in steps}
    useful = [
        r
        for r in rows
        if r is not base
        and "paired_delta" in r
        and "passive" in r["paired_delta"]
        and r["paired_delta"]["teacher"]["mean"] >= -0.05
    ]
    if useful:
        r = min(useful, key=lambda r: r["paired_delta"]["passive"]["mean"])
        pd = r["paired_delta"]
        info = {
            "defense": r["label"],
            "delta_teacher": 100 * pd["teacher"]["mean"],
            "delta_passive": 100 * pd["passive"]["mean"],
            "delta_passive_se": 100 * pd["passive"]["stderr"],
        }
        if "correct_only" in pd:
            info.update(
                delta_passive_correct_only=100 * pd["correct_only"]["mean"],
                delta_passive_correct_only_se=100 * pd["correct_only"]["stderr"],
            )
        out["informative"] = info
    return out


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


TEXT_COLUMNS = {
    "valid": "valid reasoning (%)",
    "checks": "checks/trace",
    "fused": "fused lines/trace",
    "times": "× lines/trace",
}
"""Per-trace text features of the reasoning task (:func:`experiments.tasks.reasoning.text_features`) and their column."""


def results_markdown(results: dict) -> str:
    rows = results["rows"]
    kinds = []
    for r in rows:
        kinds += [k for k in r["students"] if k not in kinds]
    paired = any("paired_delta" in r for r in rows)
    paired_kinds = [
        k for k in ("teacher", "passive", "correct_only") if any(k in r.get("paired_delta", {}) for r in rows)
    ]
    texts = [k for k in TEXT_COLUMNS if all(f"trace_{k}" in r for r in rows)]
    head = (
        ["defense", "teacher acc (%)"]
        + [f"{k} (%)" for k in kinds]
        + [f"Δ {k}, paired (pts)" for k in paired_kinds]
        + [
            "rel. gain",
            "fwd passes/token",
            "FLOPs ratio",
            "wall-clock ratio",
            "trace acc (%)",
            "trace len",
            "degenerate (%)",
        ]
        + ([TEXT_COLUMNS[k] for k in texts])
    )
    lines = [
        "# Results: passive vs adaptive students under antidistillation defenses",
        "",
        f"Config `{results['config']}`; {results['seeds']} seed(s), mean ± standard error over seeds; "
        f"{results['n_test']} test problems; {results['n_traces']} training traces per seed sampled at "
        f"τ={results['temperature']:g}. Accuracies are exact final answers; the teacher is decoded with the "
        "same defended sampler as the traces, students greedily. Relative gain = (adaptive − passive) / passive."
        + (
            " Δ paired = per-seed change vs standard (seed s of every defense shares the student's data order "
            "and the sampling keys), mean ± SE over seeds."
            if paired
            else ""
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        c = r["cost"]
        gain = r.get("relative_gain")
        delta = r.get("paired_delta", {})
        cells = (
            [r["label"], pm(r["teacher_accuracy"])]
            + [pm(r["students"].get(k)) for k in kinds]
            + [pm(delta.get(k), signed=True) for k in paired_kinds]
            + [
                "–" if gain is None or not np.isfinite(gain) else f"{100 * gain:+.0f}%",
                str(c["forward_passes_per_token"]),
                f"{c['flops_ratio']:.2f}×",
                f"{c['wallclock_ratio']:.2f}×",
                "–" if "trace_accuracy" not in r else f"{100 * r['trace_accuracy']:.1f}",
                f"{r['mean_trace_length']:.1f}",
                f"{100 * r['degeneracy_rate']:.1f}",
            ]
            + [f"{100 * r['trace_valid']:.1f}" if k == "valid" else f"{r[f'trace_{k}']:.2f}" for k in texts]
        )
        lines.append("| " + " | ".join(cells) + " |")
    poe = [r for r in rows if r["defense"] == registry.POE]
    if poe:
        bound = poe[0]["cost"]["poe_wallclock_bound"]
        worst = max(r["cost"]["wallclock_ratio"] for r in poe)
        lines += [
            "",
            f"PoE wall-clock ratio {worst:.2f}× vs the bound 1.10 × (1 + proxy/teacher FLOPs) = {bound:.2f}× "
            f"({'within' if worst <= bound else 'ABOVE'} bound).",
        ]
    world, head_ = results.get("world"), results.get("headline", {})
    if world:
        lines += [
            "",
            f"The world: the standard teacher's next-token entropy at τ=1 on its own traces is {world['entropy_nats']:.3f} "
            f"nats per token; {100 * world['share_top_below_0.9']:.1f}% of positions have a top probability below 0.9.",
        ]
    if "learning_curve" in head_:
        curve = ", ".join(f"{n} steps {v:.1f}%" for n, v in head_["learning_curve"].items())
        lines += [
            "",
            f"Passive student under standard decoding, one run: {curve}"
            + (
                f" (2× the table's steps changes it by {head_['plateau_delta_points']:+.1f} points)."
                if "plateau_delta_points" in head_
                else "."
            )
            + " Plot: `learning_curve.png`.",
        ]
    info = head_.get("informative")
    if info:
        text = (
            f"Informative setting (largest paired passive loss with the teacher losing ≤ 5 points): {info['defense']}: "
            f"teacher {info['delta_teacher']:+.1f}, passive {info['delta_passive']:+.1f} ± {info['delta_passive_se']:.1f} points"
        )
        if "delta_passive_correct_only" in info:
            text += (
                f", passive on correct traces only {info['delta_passive_correct_only']:+.1f} ± "
                f"{info['delta_passive_correct_only_se']:.1f} (the same traces with the wrong ones masked out: what is "
                f"left is the learnability of the correct texts)"
            )
        lines += ["", text + "."]
    lines += ["", f"Finished in {results['seconds']:.0f}s. Plot: `teacher_vs_student.png`."]
    return "\n".join(lines) + "\n" + attacker.ablation_markdown(results)


def write_results(run_dir, results: dict) -> list:
    """results.json, RESULTS.md and the plots into `run_dir` (local or gs://); their paths."""
    run_dir = rio.path(run_dir)
    save_json(run_dir / "results.json", results)
    rio.write_text(run_dir / "RESULTS.md", results_markdown(results))
    paths = [run_dir / "results.json", run_dir / "RESULTS.md"]
    return paths + plot_protocol(results, run_dir) + plot_learning_curve(results, run_dir)
