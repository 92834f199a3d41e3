"""`distgame equilibrium`: the defense game (equilibrium.defense: PoE γ by default, ADS λ,
any registered defense with a differentiable strength; called γ throughout) on the trained
models for a grid of utility budgets δ and student tilts β_s, then each equilibrium γ*
checked empirically (defended traces, distilled students, real accuracies).

The game (docs/design.md, "The differentiable game", assembled in game/poe_game.py from the
student's forward function), wired to real models:
- student batch: a pool of prefixes sampled from the defense at γ, with the defense's expert
  outputs on them cached (soft targets; with method 'solver' L_D also carries the sampling
  channel, score function, unless equilibrium.estimator='soft');
- the student's response: `horizon` steps (default: the protocol's distillation steps) of the
  protocol's optimizer from the student's base, minibatches drawn from the pool in a fixed order;
- J(θ): the student's NLL of reference solutions of test prompts (whole solution, or
  the final answer only: equilibrium.capability);
- U(γ): the teacher's mean log-likelihood per token of reference solutions of
  held-out prompts under the defense at γ (cached expert outputs, τ=1).

γ*(δ) = argmax J s.t. U(0) − U(γ) ≤ δ, found by (equilibrium.method):
- 'frontier' (default): exact feasible bounds from U, J(γ) on a grid through the horizon
  (experiments/equilibrium_curve.py, game/frontier.py);
- 'solver': the gradient min-max solver, every budget from γ_0 ∈ {0, γ_max/2, γ_max} at once
  (multi-start); the best feasible objective is reported with whether the starts agree, and a
  budget whose every start ends infeasible gets γ* = NaN (no equilibrium found), not its iterate.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import defense_wiring as wiring
from experiments import io as rio
from experiments import preemption
from experiments import retokenize as retok
from experiments.config import Config, DefenseSetting, to_dict
from experiments.distributed import is_main_process
from experiments.equilibrium_curve import frontier_points
from experiments.equilibrium_plots import plot_equilibrium
from experiments.equilibrium_report import equilibrium_markdown, summary_metrics
from experiments.game_wiring import make_game, solver_setup
from experiments.io import save_json
from experiments.progress import tqdm  # tqdm's bar on a terminal, a line per 10% in a log file
from experiments.protocol import Protocol, ensure_models
from experiments.solver_run import SolverCheckpoint, resumable_solve
from experiments.stats import mean_stderr
from experiments.tasks.batches import trim_columns
from experiments.tasks.encoding import answer_mask, encode_problems
from game import registry
from game import solver as sv


class EquilibriumSweep:
    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.ec, self.progress = cfg, cfg.equilibrium, progress
        self.dir = rio.path(cfg.run_dir) / "equilibrium"
        self.protocol = Protocol(cfg, progress=progress, seeds=self.ec.check_seeds)
        self.tokenizer = self.protocol.tokenizer
        self.g_P = None  # the proxy's held-out gradient, for defenses whose experts read it (ADS): set_models

    def set_models(self, models, clean) -> None:
        """g_P from the clean held-out traces when equilibrium.defense needs it (ADS's tangent expert)."""
        if wiring.needs_proxy_gradient(self.ec.defense):
            self.g_P = self.protocol.proxy_gradient(models, clean)

    def reference(self, split: str, n: int, models, seed_offset: int = 0, capability: str = "solution") -> dict:
        """Reference solutions of `split` problems with cached teacher/proxy logits; the mask
        scores the whole solution or (capability='answer') the final answer."""
        problems = self.protocol.task.problems(split, self.cfg.seed + seed_offset, n)
        data = encode_problems(problems, self.tokenizer, self.cfg.task.max_len)
        if capability == "answer":
            data["loss_mask_bt"] = answer_mask(problems, self.tokenizer, data)
        data = trim_columns({k: data[k] for k in ("tokens_bt", "loss_mask_bt")})
        batch = {k: jnp.asarray(v) for k, v in data.items()}
        batch["outs"] = wiring.expert_outputs(self.ec.defense, models, self.g_P, batch["tokens_bt"])
        return batch

    def prefixes(
        self, models, gammas: np.ndarray, round_: int, heldout, steps: int, pool_seed: int | None = None
    ) -> dict:
        """A pool of prefixes from the defense at γ_j for every state j, fresh problems per round (or, with
        `pool_seed`, problems generated from their own seed), with cached teacher/proxy logits,
        the sampling γ and the horizon's minibatch order: leaves [n_states, ...] (cached expert outputs)."""
        n = self.ec.prefixes or self.cfg.protocol.n_traces
        if pool_seed is None:
            problems = self.protocol.task.problems("train", self.cfg.seed + 2, n * (round_ + 1))[n * round_ :]
        else:
            problems = self.protocol.task.problems("train", self.cfg.seed + 1000 + pool_seed, n)
        nb = len(gammas)
        setup = wiring.per_row_setup(self.ec.defense, models, self.g_P, self.cfg.protocol.temperature)
        dec = self.protocol._decode(
            problems * nb, setup, jax.random.key(round_), carry_b=np.repeat(gammas.astype(np.float32), n)
        )
        arrays = self.protocol._train_arrays(problems * nb, dec)
        tokens = jnp.asarray(arrays["tokens_bt"])
        batch = {
            "tokens_bt": tokens,
            "loss_mask_bt": jnp.asarray(arrays["loss_mask_bt"]),
            "outs": wiring.expert_outputs(self.ec.defense, models, self.g_P, tokens),
        }
        batch = jax.tree.map(lambda x: x.reshape((nb, n) + x.shape[1:]), batch)
        batch["gamma_sample"] = jnp.asarray(gammas, jnp.float32)
        rng = np.random.default_rng([round_, 17])
        b = min(self.ec.horizon_batch or self.cfg.protocol.distill.batch_size, n)
        idx = rng.integers(0, n, (steps, b)).astype(np.int32)
        batch["minibatch_idx"] = jnp.asarray(np.broadcast_to(idx, (nb,) + idx.shape))
        idx = rng.integers(0, len(heldout["tokens_bt"]), self.ec.heldout_batch)
        batch["heldout"] = {k: jnp.asarray(np.broadcast_to(v[idx], (nb,) + v[idx].shape)) for k, v in heldout.items()}
        return batch

    def checkpoint_dir(self, beta: float):
        """One solver checkpoint per tilt, keyed by everything the solve depends on, so a
        changed config never resumes a stale solve."""
        key = json.dumps(
            [
                beta,
                to_dict(self.ec),
                self.cfg.protocol.temperature,
                to_dict(self.cfg.protocol.distill),
                self.cfg.seed,
                self.cfg.protocol.n_traces,
            ],
            sort_keys=True,
            default=str,
        )
        return self.dir / "checkpoints" / f"beta{beta:g}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    def solve_beta(self, beta: float, models, eval_batch, util_batch, heldout, log) -> dict:
        scfg, optimizers = solver_setup(self.cfg)
        dc, tau = self.cfg.protocol.distill, self.cfg.protocol.temperature
        game = make_game(models["student"], beta, dc, tau, self.ec.estimator, self.ec.defense)
        starts = sv.start_gammas(scfg) if self.ec.multi_start else (scfg.gamma_init,)
        deltas, gamma0 = sv.multi_start(scfg, self.ec.budgets, starts)
        ns = len(starts)
        state = sv.init_state(
            game,
            scfg,
            models["student"].params,
            util_batch,
            delta=jnp.asarray(deltas, jnp.float32),
            optimizers=optimizers,
            gamma_init=jnp.asarray(gamma0, jnp.float32),
        )
        bar = tqdm(
            total=scfg.max_iters,
            desc=f"solve β={beta:g}",
            leave=False,
            disable=not (self.progress and is_main_process()),
        )
        last = [time.perf_counter()]
        steps = scfg.unroll_steps if scfg.unroll_from == "base" else 1

        def batch_for(i, state, meta, previous):
            round_, fresh = divmod(i, self.ec.resample_every)
            if fresh == 0:  # resample: defended prefixes at the current γ of each state
                meta["round_gammas"] = np.asarray(sv.state_gamma(state, scfg)).tolist()
            elif previous is not None:
                return previous
            # (after a resume mid-round the round's prefixes are rebuilt from the saved γ)
            gammas = np.asarray(meta["round_gammas"], np.float32)
            return self.prefixes(models, gammas, round_, heldout, steps), eval_batch, util_batch

        def on_iteration(i, diag, meta):
            meta.setdefault("trajectory", {"gamma": [], "mu": []})
            meta["trajectory"]["gamma"].append(diag["gamma"].tolist())
            meta["trajectory"]["mu"].append(diag["mu"].tolist())
            now = time.perf_counter()  # solving time summed over every (resumed) run
            meta["seconds"], last[0] = meta.get("seconds", 0.0) + now - last[0], now
            if log is not None:
                for j, (delta, g0) in enumerate(zip(deltas, gamma0)):
                    log.write(
                        {
                            "beta": beta,
                            "delta": float(delta),
                            "gamma0": float(g0),
                            **{k: float(v[j]) for k, v in diag.items()},
                        }
                    )
                log.flush()
            bar.n = i + 1
            bar.set_postfix(gamma=np.array2string(diag["gamma"], precision=3), viol=f"{diag['violation'].max():.1e}")

        ckpt = SolverCheckpoint(self.checkpoint_dir(beta))
        try:
            res = resumable_solve(
                game, scfg, state, batch_for, on_iteration, ckpt, optimizers, per_state_student_batch=True
            )
        except sv.SolverDivergedError as e:
            if log is not None:
                log.write({"beta": beta, "iteration": e.iteration, "error": f"non-finite {e.quantity}"})
            raise
        finally:
            bar.close()
            ckpt.close()
        meta = res.meta
        diag = {k: np.asarray(v) for k, v in meta["diag"].items()}
        iters = int(meta["iteration"])
        return {
            "diag": diag,
            "best": sv.best_of_starts(diag, ns, scfg),
            "n_starts": ns,
            "starts": list(starts),
            "iterations": iters,
            "seconds_per_iteration": meta.get("seconds", 0.0) / max(iters, 1),
            "converged": bool(meta["converged"]),
            "trajectory": meta.get("trajectory", {"gamma": [], "mu": []}),
            "gamma_max": scfg.gamma_max,
            "horizon": steps,
        }

    def solver_points(self, models, eval_batch, util_batch, heldout) -> tuple[list, list, dict]:
        """(points, trajectories, info) of the gradient solver, one solve per tilt (method 'solver')."""
        points, trajectories, info = [], [], {}
        main = is_main_process()  # only process 0 writes the log
        resuming = any(self.checkpoint_dir(beta).exists() for beta in self.ec.betas)
        # SIGTERM from here on (the log file's creation included): checkpoint after the iteration, then stop
        open_log = functools.partial(rio.JsonlLog, self.dir / "solver_log.jsonl", resuming) if main else None
        with preemption.checkpointed(), (open_log or contextlib.nullcontext)() as log:
            for beta in self.ec.betas:
                res = self.solve_beta(beta, models, eval_batch, util_batch, heldout, log)
                d, best, ns = res["diag"], res["best"], res["n_starts"]
                info = {"gamma_max": res["gamma_max"], "horizon": res["horizon"]}
                for j, delta in enumerate(self.ec.budgets):
                    k = j * ns + int(best["best_start"][j])  # the state of the best start
                    feasible = bool(d["violation"][k] <= self.ec.solver.tol_violation)
                    points.append(
                        {
                            "beta": beta,
                            "delta": delta,
                            "gamma_star": float(best["gamma"][j]) if feasible else float("nan"),
                            "feasible": feasible,
                            "gamma_last": float(best["gamma"][j]),
                            "converged": bool(best["converged"][j]),
                            "iterations": res["iterations"],
                            "seconds_per_iteration": res["seconds_per_iteration"],
                            "J": float(d["J"][k]),
                            "U": float(d["U"][k]),
                            "violation": float(d["violation"][k]),
                            "mu": float(d["mu"][k]),
                            "solver_converged_all": res["converged"],
                            "starts": res["starts"],
                            "gamma_by_start": best["gamma_by_start"][j].tolist(),
                            "starts_agree": bool(best["starts_agree"][j]),
                            "best_start": int(best["best_start"][j]),
                        }
                    )
                    trajectories.append(
                        {
                            "beta": beta,
                            "delta": delta,
                            "gamma": [g[k] for g in res["trajectory"]["gamma"]],
                            "mu": [m[k] for m in res["trajectory"]["mu"]],
                        }
                    )
        return points, trajectories, info

    def run(self) -> dict:
        start = time.perf_counter()
        models = ensure_models(self.cfg, self.protocol.mesh, self.progress, self.protocol.task)
        retok.require_shared_vocabulary(
            models, self.protocol.tokenizer, "distgame equilibrium (soft targets on teacher prefixes)"
        )
        clean = self.protocol.heldout_traces(models)
        self.set_models(models, clean)
        heldout = self.protocol.attacker_heldout(clean)
        eval_batch = self.reference("test", self.ec.n_eval, models, capability=self.ec.capability)
        eval_batch = {k: eval_batch[k] for k in ("tokens_bt", "loss_mask_bt")}
        util_batch = self.reference("heldout", self.ec.n_utility, models)
        main = is_main_process()  # only process 0 writes the log, results and plots
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
        eq = {"config": self.cfg.name, "defense": self.ec.defense, "method": self.ec.method}
        eq.update(budgets=list(self.ec.budgets), betas=list(self.ec.betas), gamma_max=self.ec.solver.gamma_max)
        eq.update(estimator=self.ec.estimator, capability=self.ec.capability)
        if self.ec.method == "frontier":
            points, curves, info = frontier_points(self, models, eval_batch, util_batch, heldout, self.progress)
            eq.update(info, estimator="soft (J evaluated, not differentiated)", points=points, curves=curves)
            eq["trajectories"] = []
        else:
            points, trajectories, info = self.solver_points(models, eval_batch, util_batch, heldout)
            game0 = make_game(models["student"], 0.0, self.cfg.protocol.distill, 1.0, defense=self.ec.defense)
            eq.update(info, utility_ref=float(game0.utility(0.0, util_batch)), points=points)
            eq["trajectories"] = trajectories
        if self.ec.empirical_check:
            if self.ec.check_points == "all":
                self.check(points, models, heldout, clean)
            eq["check"] = self.check_largest_budget(points, models, heldout)
        eq.update(summary_metrics(eq))
        eq["seconds"] = round(time.perf_counter() - start, 1)
        eq["plots"] = []
        if main:
            save_json(self.dir / "equilibrium.json", eq)
            plots = plot_equilibrium(eq, self.cfg.run_dir)
            rio.write_text(self.dir / "EQUILIBRIUM.md", equilibrium_markdown(eq))
            eq["plots"] = [str(p) for p in plots if p.suffix == ".png"]
        return eq

    def check(self, points, models, heldout, clean) -> None:
        """Sample defended traces at γ* and distil the matching student at every equilibrium."""
        found = [pt for pt in points if np.isfinite(pt["gamma_star"])]  # no check where no equilibrium was found
        for pt in tqdm(found, desc="empirical check", leave=False, disable=not self.progress):
            d = setting_for(pt["gamma_star"], self.ec.defense)
            traces = self.protocol.traces(d, models, self.g_P)
            kind = "passive" if pt["beta"] == 0 else "adaptive"
            accs = self.protocol.student(d, kind, pt["beta"], models, traces, heldout)
            pt["teacher_accuracy"] = mean_stderr(traces["teacher_correct"].mean(-1))
            pt["student_accuracy"] = mean_stderr(accs)
            pt["student_accuracy_values"] = list(accs)
            pt["teacher_accuracy_values"] = traces["teacher_correct"].mean(-1).tolist()

    def check_largest_budget(self, points, models, heldout) -> dict:
        """The passive student at γ* of the largest budget vs γ = 0, paired by seed (same base,
        same data order, same sampling keys), and the teacher's measured utility change."""
        passive = [p for p in points if p["beta"] == 0]
        if not passive:
            return {}
        top = max(passive, key=lambda p: p["delta"])
        if not np.isfinite(top["gamma_star"]):
            return {"delta": top["delta"], "gamma_star": top["gamma_star"]}
        d0, d = DefenseSetting(registry.STANDARD), setting_for(top["gamma_star"], self.ec.defense)
        tr0 = self.protocol.traces(d0, models, None)
        acc0 = np.asarray(self.protocol.student(d0, "passive", 0.0, models, tr0, heldout))
        tr = self.protocol.traces(d, models, self.g_P)
        acc = np.asarray(
            top.get("student_accuracy_values") or self.protocol.student(d, "passive", 0.0, models, tr, heldout)
        )
        teacher = tr["teacher_correct"].mean(-1) - tr0["teacher_correct"].mean(-1)
        top.setdefault("student_accuracy", mean_stderr(acc))  # check_points='largest': the one point checked
        top.setdefault("teacher_accuracy", mean_stderr(tr["teacher_correct"].mean(-1)))
        return {
            "delta": top["delta"],
            "gamma_star": top["gamma_star"],
            "passive_change": mean_stderr(acc - acc0),
            "teacher_change": mean_stderr(teacher),
            "utility": top["U"],
        }


def setting_for(gamma: float, defense: str = registry.POE) -> DefenseSetting:
    """The protocol's defense setting at an equilibrium strength γ (rounded to share stage files;
    a differentiable defense at strength 0 is standard decoding, pinned by tests)."""
    gamma = round(gamma, 2)
    return DefenseSetting(defense, gamma) if gamma > 0 else DefenseSetting(registry.STANDARD)
