"""`distgame calibrate`: does the game rank the defenses as the protocol measures them?

On a grid of strengths γ of equilibrium.defense (PoE weights by default; equilibrium.calibration_gammas):

- predicted (the game alone): J(θ_T(γ)), the student's capability loss after the game's
  horizon from its base on the game's own PoE(γ) prefix pools (fresh problems per game seed,
  common random numbers across γ, not the protocol's traces), and dJ/dγ as the slope of that
  curve, mean ± SE over equilibrium.calibration_game_seeds;
- measured (the protocol's pieces: Protocol.traces, distil, the test-set decoding): the
  passive student's NLL of the same reference solutions and its test accuracy after the
  protocol's distillation on PoE(γ) traces, per seed; changes between adjacent γ are
  paired by seed (same base, data order and sampling keys).

The two share only the trained teacher, proxy and student base: the prediction never
reads the protocol's students or their results.

Outputs (run_dir/calibration/): calibration.json, calibration.csv, calibration.png, and
the last-line JSON of `--json` with `spearman` (rank correlation of predicted J and
measured NLL over the grid) and `sign_agreement` (share of adjacent γ pairs whose
measured NLL change exceeds 2 SE where the predicted slope has the same sign; NaN when
no pair does).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from experiments import io as rio
from experiments import retokenize as retok
from experiments.calibration_plot import plot_calibration
from experiments.config import Config, to_dict
from experiments.distillation import distil
from experiments.distributed import is_main_process
from experiments.equilibrium import EquilibriumSweep, setting_for
from experiments.equilibrium_curve import capability_curves
from experiments.evaluate import correct_mask, decode_problems
from experiments.io import fingerprint, save_json
from experiments.progress import tqdm  # tqdm's bar on a terminal, a line per 10% in a log file
from experiments.protocol import ensure_models
from experiments.stats import mean_stderr
from game.poe_game import masked_nll
from models import transformer as tfm


def rank(x) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float:
    """Spearman rank correlation (NaN if either side is constant)."""
    ra, rb = rank(a), rank(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def sign_agreement(pred_j, measured_bs) -> tuple[float, list[dict]]:
    """Share of adjacent grid pairs whose paired measured change (per seed, [seeds, grid])
    exceeds 2 SE and has the sign of the predicted change; NaN when no pair qualifies."""
    pairs = []
    m = np.asarray(measured_bs, float)
    for k in range(m.shape[1] - 1):
        delta = mean_stderr(m[:, k + 1] - m[:, k])
        pred = float(pred_j[k + 1] - pred_j[k])
        significant = bool(np.isfinite(delta["stderr"]) and abs(delta["mean"]) > 2 * delta["stderr"])
        pairs.append(
            {
                "k": k,
                "measured": delta,
                "predicted": pred,
                "significant": significant,
                "agree": bool(np.sign(pred) == np.sign(delta["mean"])),
            }
        )
    sig = [p for p in pairs if p["significant"]]
    return (float(np.mean([p["agree"] for p in sig])) if sig else float("nan")), pairs


class Calibration:
    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.ec, self.progress = cfg, cfg.equilibrium, progress and is_main_process()
        self.dir = rio.path(cfg.run_dir) / "calibration"
        self.sweep = EquilibriumSweep(
            dataclasses.replace(cfg, equilibrium=dataclasses.replace(self.ec, check_seeds=self.ec.calibration_seeds)),
            progress=progress,
        )
        self.protocol = self.sweep.protocol  # seeds = calibration_seeds

    # -- the game's prediction ----------------------------------------------------
    def predict(self, models, eval_batch, heldout) -> dict:
        """J(γ) on the grid from the game's own pools (experiments/equilibrium_curve.py: common random
        numbers across γ, pool seeds of their own) and dJ/dγ as the slope of each seed's curve
        (np.gradient). Not the exact derivative through the horizon: that one is chaotic at the
        protocol's horizon (game/frontier.py), the curve's slope is what ranks the defenses."""
        gammas = np.asarray(self.ec.calibration_gammas, np.float64)
        J = capability_curves(
            self.sweep, models, [0.0], gammas, heldout, eval_batch, self.ec.calibration_game_seeds, self.progress
        )[0.0]
        return {"J": J, "dJ": np.gradient(J, gammas, axis=1)}

    # -- the protocol's measurement -----------------------------------------------
    def measure(self, models, eval_batch, heldout) -> dict:
        """Passive students distilled as the protocol does, per seed: NLL of the reference
        solutions and test accuracy (cached in run_dir/calibration, keyed by everything
        they depend on)."""
        dc, seeds = self.cfg.protocol.distill, self.protocol.seeds
        key = fingerprint(
            t=self.protocol.task_fp,
            p=dataclasses.replace(self.cfg.protocol, defenses=()),
            g=list(self.ec.calibration_gammas),
            s=seeds,
            n=self.ec.n_eval,
            c=self.ec.capability,
        )
        path = self.dir / f"measured-{key}.json"
        if path.exists():
            return {k: np.asarray(v, float) for k, v in rio.load_json(path).items()}  # null (a NaN written) -> NaN
        test_problems = self.protocol.task.problems("test", self.cfg.seed)
        spec, gd = models["student"].spec, models["student"].graphdef
        nll_of = jax.jit(
            jax.vmap(
                lambda p: masked_nll(
                    lambda th, t: tfm.forward(gd, th, t)[0], p, eval_batch["tokens_bt"], eval_batch["loss_mask_bt"]
                )
            )
        )
        nll, acc = [], []
        for gamma in tqdm(self.ec.calibration_gammas, desc="protocol students", leave=False, disable=not self.progress):
            d = setting_for(gamma, self.ec.defense)
            traces = self.protocol.traces(d, models, self.sweep.g_P)
            train = {k: traces[k] for k in ("tokens_bt", "loss_mask_bt", "topk_ids_btk", "topk_logprob_btk")}
            if dc.degeneracy_filter:
                train["loss_mask_bt"] = train["loss_mask_bt"] * traces["keep"][..., None]
            params = distil(
                models["student"],
                train,
                heldout,
                dc,
                "passive",
                0.0,
                seeds,
                models["proxy"],
                0.0,
                self.cfg.protocol.temperature,
                False,
                desc=f"calibrate {d.label}",
            )
            nll.append(np.asarray(nll_of(params)))
            row = []
            for s in range(seeds):
                p_s = jax.tree.map(lambda x: x[s], params)
                dec = decode_problems(
                    test_problems,
                    self.protocol.tokenizer,
                    (spec,),
                    (p_s,),
                    self.protocol.mesh,
                    max_new_tokens=self.cfg.sample.max_new_tokens,
                    batch_size=self.cfg.sample.batch_size,
                )
                row.append(
                    float(
                        correct_mask(
                            test_problems, dec.texts(self.protocol.tokenizer), self.protocol.task.is_correct
                        ).mean()
                    )
                )
            acc.append(row)
        out = {"nll": np.stack(nll, 1), "accuracy": np.asarray(acc).T}  # [seeds, grid]
        if is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
            save_json(path, {k: v.tolist() for k, v in out.items()})
        return out

    def run(self) -> dict:
        start = time.perf_counter()
        models = ensure_models(self.cfg, self.protocol.mesh, self.progress, self.protocol.task)
        retok.require_shared_vocabulary(models, self.protocol.tokenizer, "distgame calibrate (the game's soft targets)")
        clean = self.protocol.heldout_traces(models)
        self.sweep.set_models(models, clean)
        heldout = self.protocol.attacker_heldout(clean)
        ref = self.sweep.reference("test", self.ec.n_eval, models, capability=self.ec.capability)
        eval_batch = {k: ref[k] for k in ("tokens_bt", "loss_mask_bt")}
        pred = self.predict(models, eval_batch, heldout)
        meas = self.measure(models, eval_batch, heldout)
        j_mean = pred["J"].mean(0)
        agree, pairs = sign_agreement(j_mean, meas["nll"])
        agree_acc, _ = sign_agreement(-j_mean, meas["accuracy"])
        gammas = list(self.ec.calibration_gammas)
        points = [
            {
                "gamma": g,
                "J": mean_stderr(pred["J"][:, k]),
                "dJ": mean_stderr(pred["dJ"][:, k]),
                "nll": mean_stderr(meas["nll"][:, k]),
                "accuracy": mean_stderr(meas["accuracy"][:, k]),
            }
            for k, g in enumerate(gammas)
        ]
        result = {
            "config": self.cfg.name,
            "gammas": gammas,
            "points": points,
            "pairs": pairs,
            "spearman": spearman(j_mean, meas["nll"].mean(0)),
            "spearman_accuracy": spearman(j_mean, -meas["accuracy"].mean(0)),
            "sign_agreement": agree,
            "sign_agreement_accuracy": agree_acc,
            "game_seeds": self.ec.calibration_game_seeds,
            "protocol_seeds": self.protocol.seeds,
            "estimator": self.ec.estimator,
            "capability": self.ec.capability,
            "settings": to_dict(self.ec),
        }
        result["seconds"] = round(time.perf_counter() - start, 1)
        if is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
            save_json(self.dir / "calibration.json", result)
            result["plots"] = [str(p) for p in plot_calibration(result, self.dir)]
        return result


def calibration_markdown(result: dict) -> str:
    lines = ["| γ | predicted J | predicted dJ/dγ | measured NLL | measured accuracy |", "|---|---|---|---|---|"]

    def f(s):
        return f"{s['mean']:.4f} ± {s['stderr']:.4f}"

    for p in result["points"]:
        lines.append(f"| {p['gamma']:g} | {f(p['J'])} | {f(p['dJ'])} | {f(p['nll'])} | {f(p['accuracy'])} |")
    lines.append(
        f"\nspearman(J, NLL) = {result['spearman']:.3f}, sign agreement = {result['sign_agreement']}, "
        f"spearman(J, −accuracy) = {result['spearman_accuracy']:.3f}"
    )
    return "\n".join(lines) + "\n"


__all__ = ["Calibration", "calibration_markdown", "spearman", "sign_agreement", "rank"]
