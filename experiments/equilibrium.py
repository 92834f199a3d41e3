"""`distgame equilibrium`: solve the PoE game on the trained models for a grid of
utility budgets δ (vectorised with vmap) and student tilts β_s, then check each
equilibrium γ* empirically (PoE traces, distilled students, real accuracies).

The game (DESIGN.md, "The differentiable game"), wired to real models:
- student batch: prefixes sampled from PoE(γ) of the current γ of each budget,
  resampled every `resample_every` iterations (stop-gradient), with the teacher's
  and proxy's logits on them cached, so `L_D(θ; γ)` is cheap and exact in γ;
- J(θ): the student's NLL of reference solutions of test prompts;
- U(γ): the teacher's mean log-likelihood per token of reference solutions of
  held-out prompts under PoE(γ) (cached logits, τ=1).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments.config import Config, DefenseSetting
from experiments.plots import plot_equilibrium
from experiments.protocol import Protocol, ensure_models, mean_stderr, pm, save_json
from experiments.tasks.arithmetic import encode_problems, make_split
from experiments.train import masked_nll
from game import defenses as dfn
from game import solver as sv
from game import students as stu
from models import transformer as tfm


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logits(graphdef, params, tokens_bt):
    return tfm.forward(graphdef, params, tokens_bt[:, :-1])[0]


def _logits(model, tokens_bt):
    """Cached teacher/proxy logits on fixed sequences (compiled once per model and shape)."""
    return _next_token_logits(model.graphdef, model.params, tokens_bt)


def make_game(student, beta: float, dc, tau: float) -> sv.Game:
    """The PoE game for one student tilt β_s (0 = passive)."""
    gd = student.graphdef

    def per_example_ce(theta, gamma, batch):
        logq_btv = jax.nn.log_softmax(tfm.forward(gd, theta, batch["tokens_bt"][:, :-1])[0], axis=-1)
        logp_btv = dfn.poe_logprobs(batch["z_teacher"], batch["z_proxy"], gamma, tau)
        ce_bt = -jnp.sum(jnp.exp(logp_btv) * logq_btv, axis=-1)
        mask_bt = batch["loss_mask_bt"][:, :-1]
        return jnp.sum(ce_bt * mask_bt, -1) / jnp.maximum(jnp.sum(mask_bt, -1), 1.0)

    def student_loss(theta, gamma, batch):
        ce_b = per_example_ce(theta, gamma, batch)
        if beta == 0.0:
            return jnp.mean(ce_b)
        held = batch["heldout"]
        g_S = jax.grad(lambda th: masked_nll(gd, th, held["tokens_bt"], held["loss_mask_bt"]))(theta)
        sg_gamma = jax.lax.stop_gradient(gamma)
        v_b = stu.example_values(lambda th: per_example_ce(th, sg_gamma, batch), theta, g_S)
        w_b = stu.adaptive_weights(v_b, beta, max_weight=dc.max_weight, standardize=dc.standardize_values)
        return jnp.mean(jax.lax.stop_gradient(w_b) * ce_b)

    def capability_loss(theta, batch):
        return masked_nll(gd, theta, batch["tokens_bt"], batch["loss_mask_bt"])

    def utility(gamma, batch):
        logp_btv = dfn.poe_logprobs(batch["z_teacher"], batch["z_proxy"], gamma, 1.0)
        logp_bt = jnp.take_along_axis(logp_btv, batch["tokens_bt"][:, 1:, None], axis=-1)[..., 0]
        mask_bt = batch["loss_mask_bt"][:, :-1]
        return jnp.sum(logp_bt * mask_bt) / jnp.sum(mask_bt)

    return sv.Game(student_loss, capability_loss, utility)


class EquilibriumSweep:
    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.ec, self.progress = cfg, cfg.equilibrium, progress
        self.dir = pathlib.Path(cfg.run_dir) / "equilibrium"
        self.protocol = Protocol(cfg, progress=progress, seeds=self.ec.check_seeds)
        self.tokenizer = self.protocol.tokenizer

    def _reference(self, split: str, n: int, models) -> dict:
        data = encode_problems(make_split(self.cfg.task, split, self.cfg.seed, n), self.tokenizer, self.cfg.task.max_len)
        batch = {"tokens_bt": jnp.asarray(data["tokens_bt"]), "loss_mask_bt": jnp.asarray(data["loss_mask_bt"])}
        batch["z_teacher"] = _logits(models["teacher"], batch["tokens_bt"])
        batch["z_proxy"] = _logits(models["proxy"], batch["tokens_bt"])
        return batch

    def _prefixes(self, models, gammas: np.ndarray, round_: int, heldout) -> dict:
        """PoE(γ_j) prefixes for every budget j, with cached teacher/proxy logits: leaves [n_budgets, B, ...]."""
        n = self.ec.prefixes
        problems = make_split(self.cfg.task, "train", self.cfg.seed + 2, n * (round_ + 1))[n * round_ :]
        nb = len(gammas)
        t, p = models["teacher"], models["proxy"]
        setup = (dfn.PoEPerRow(self.cfg.protocol.temperature), (t.spec, p.spec), (t.params, p.params), None)
        dec = self.protocol._decode(problems * nb, setup, jax.random.key(round_),
                                    carry_b=np.repeat(gammas.astype(np.float32), n))
        arrays = self.protocol._train_arrays(problems * nb, dec)
        tokens = jnp.asarray(arrays["tokens_bt"])
        batch = {
            "tokens_bt": tokens,
            "loss_mask_bt": jnp.asarray(arrays["loss_mask_bt"]),
            "z_teacher": _logits(t, tokens),
            "z_proxy": _logits(p, tokens),
        }
        batch = jax.tree.map(lambda x: x.reshape((nb, n) + x.shape[1:]), batch)
        idx = np.random.default_rng(round_).integers(0, len(heldout["tokens_bt"]), self.ec.heldout_batch)
        batch["heldout"] = {k: jnp.asarray(np.broadcast_to(v[idx], (nb,) + v[idx].shape)) for k, v in heldout.items()}
        return batch

    def solve_beta(self, beta: float, models, eval_batch, util_batch, heldout, log) -> dict:
        scfg = self.ec.solver
        game = make_game(models["student"], beta, self.cfg.protocol.distill, self.cfg.protocol.temperature)
        budgets = jnp.asarray(self.ec.budgets, jnp.float32)
        state = sv.init_state(game, scfg, models["student"].params, util_batch, delta=budgets)
        # vmap over budgets: each budget has its own state and its own PoE(γ) prefixes.
        step = jax.jit(jax.vmap(sv.make_step(game, scfg), in_axes=(0, 0, None, None)))
        traj = {"gamma": [], "mu": []}
        bar = tqdm(range(scfg.max_iters), desc=f"solve β={beta:g}", leave=False, disable=not self.progress)
        batch, diag, converged, start = None, {}, False, time.perf_counter()
        iters = 0
        for i in bar:
            if i % self.ec.resample_every == 0:
                gammas = np.asarray(sv.state_gamma(state, scfg))
                batch = self._prefixes(models, gammas, i // self.ec.resample_every, heldout)
            new_state, diag_dev = step(state, batch, eval_batch, util_batch)
            diag = {k: np.asarray(v) for k, v in jax.device_get(diag_dev).items()}
            bad = sv.first_nonfinite(diag)
            if bad is not None:
                log.write(json.dumps({"beta": beta, "iteration": i, "error": f"non-finite {bad}"}) + "\n")
                raise sv.SolverDivergedError(i, bad, diag[bad])
            state, iters = new_state, i + 1
            traj["gamma"].append(diag["gamma"].tolist())
            traj["mu"].append(diag["mu"].tolist())
            for j, delta in enumerate(self.ec.budgets):
                log.write(json.dumps({"beta": beta, "delta": delta, **{k: float(v[j]) for k, v in diag.items()}}) + "\n")
            bar.set_postfix(gamma=np.array2string(diag["gamma"], precision=3), viol=f"{diag['violation'].max():.1e}")
            if bool(np.all(diag["converged"])):
                converged = True
                break
        seconds = time.perf_counter() - start
        return {
            "state": state,
            "diag": diag,
            "iterations": iters,
            "seconds_per_iteration": seconds / max(iters, 1),
            "converged": converged,
            "trajectory": traj,
        }

    def run(self) -> dict:
        start = time.perf_counter()
        models = ensure_models(self.cfg, self.protocol.mesh, self.progress)
        clean = self.protocol.heldout_traces(models)
        heldout = self.protocol.attacker_heldout(clean)
        eval_batch = self._reference("test", self.ec.n_eval, models)
        eval_batch = {k: eval_batch[k] for k in ("tokens_bt", "loss_mask_bt")}
        util_batch = self._reference("heldout", self.ec.n_utility, models)
        self.dir.mkdir(parents=True, exist_ok=True)
        points, trajectories = [], []
        with (self.dir / "solver_log.jsonl").open("w") as log:
            for beta in self.ec.betas:
                res = self.solve_beta(beta, models, eval_batch, util_batch, heldout, log)
                d = res["diag"]
                for j, delta in enumerate(self.ec.budgets):
                    points.append({
                        "beta": beta, "delta": delta, "gamma_star": float(d["gamma"][j]),
                        "converged": bool(d["converged"][j]), "iterations": res["iterations"],
                        "seconds_per_iteration": res["seconds_per_iteration"],
                        "J": float(d["J"][j]), "U": float(d["U"][j]), "violation": float(d["violation"][j]),
                        "mu": float(d["mu"][j]), "solver_converged_all": res["converged"],
                    })
                    trajectories.append({
                        "beta": beta, "delta": delta,
                        "gamma": [g[j] for g in res["trajectory"]["gamma"]],
                        "mu": [m[j] for m in res["trajectory"]["mu"]],
                    })
        if self.ec.empirical_check:
            self.check(points, models, heldout, clean)
        eq = {
            "config": self.cfg.name, "budgets": list(self.ec.budgets), "betas": list(self.ec.betas),
            "utility_ref": float(make_game(models["student"], 0.0, self.cfg.protocol.distill, 1.0).utility(0.0, util_batch)),
            "points": points, "trajectories": trajectories, "seconds": round(time.perf_counter() - start, 1),
        }
        save_json(self.dir / "equilibrium.json", eq)
        plots = plot_equilibrium(eq, self.cfg.run_dir)
        md = equilibrium_markdown(eq)
        (self.dir / "EQUILIBRIUM.md").write_text(md)
        eq["plots"] = [str(p) for p in plots if p.suffix == ".png"]
        return eq

    def check(self, points, models, heldout, clean) -> None:
        """Sample PoE(γ*) traces and distil the matching student at every equilibrium."""
        for pt in tqdm(points, desc="empirical check", leave=False, disable=not self.progress):
            gamma = round(pt["gamma_star"], 2)
            # PoE at γ=0 is standard decoding (pinned by a test): share the protocol's stage files.
            d = DefenseSetting("poe", gamma) if gamma > 0 else DefenseSetting("standard")
            traces = self.protocol.traces(d, models, None)
            kind = "passive" if pt["beta"] == 0 else "adaptive"
            accs = self.protocol.student(d, kind, pt["beta"], models, traces, heldout)
            pt["teacher_accuracy"] = mean_stderr(traces["teacher_correct"].mean(-1))
            pt["student_accuracy"] = mean_stderr(accs)


def equilibrium_markdown(eq: dict) -> str:
    lines = [
        "# Equilibrium of the PoE game",
        "",
        f"U(0) = {eq['utility_ref']:.4f} nats/token. γ* solves max J(θ⁺(γ)) s.t. U(0) − U(γ) ≤ δ "
        "against a student that best-responds (β=0 passive, β>0 adaptive).",
        "",
        "| β | δ (nats/token) | γ* | converged | iterations | s/iter | J | U | teacher acc (%) | student acc (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in eq["points"]:
        lines.append(
            f"| {p['beta']:g} | {p['delta']:g} | {p['gamma_star']:.4f} | {'yes' if p['converged'] else 'NO'} | "
            f"{p['iterations']} | {p['seconds_per_iteration']:.3f} | {p['J']:.4f} | {p['U']:.4f} | {pm(p.get('teacher_accuracy'))} | {pm(p.get('student_accuracy'))} |"
        )
    lines += ["", "Plots: `gamma_star.png`, `frontier.png`, `gap.png`, `trajectories.png` (data in the matching CSVs)."]
    return "\n".join(lines) + "\n"
