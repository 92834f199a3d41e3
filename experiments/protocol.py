"""`distgame protocol`: defended traces -> distilled students -> results table.

Stages (each output written atomically under <run_dir>/protocol/, keyed by a
fingerprint of the settings it depends on, so a killed run restarts where it stopped):
  1. restore teacher, proxy and student base (training any that is missing; experiments/role_models.py);
  2. clean teacher traces on held-out prompts -> the proxy's held-out gradient g_P;
  3. each defense setting's decoding time over standard decoding's, measured side by side (one file);
     per defense setting: training traces (all seeds in one batch) and the defended
     teacher's test accuracy under the same sampler;
  4. per defense setting and student kind: distil the student base, all seeds
     vectorised with `vmap`, then evaluate each student greedily on the test prompts;
  5. results.json, RESULTS.md and the teacher-vs-student plot (experiments/protocol_report.py).

With several processes every process computes every stage (decoded arrays are gathered to
each host) and writes the stage files to its run_dir (same content, unique temporary
names), so each host can resume from its own disk; process 0 alone writes and prints the
results, the plot and the progress bars.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from experiments import attacker
from experiments import io as rio
from experiments import retokenize as retok
from experiments.chunked import mean_nll_grad, padded, row_chunks
from experiments.config import Config, DefenseSetting
from experiments.defense_wiring import cost_model, decode_seconds, defense_setup  # speed_compare: .defense_setup
from experiments.distillation import distil  # protocol.distil: speed_compare's API
from experiments.distributed import is_main_process
from experiments.evaluate import Decoded, correct_mask, decode_problems
from experiments.io import fingerprint, save_json, save_npz
from experiments.progress import tqdm  # tqdm's bar on a terminal, a line per 10% in a log file
from experiments.protocol_report import TEXT_COLUMNS, add_paired_deltas, headline, write_results
from experiments.protocol_report import results_markdown as results_markdown  # re-exported (run.py, tests)
from experiments.role_models import check_task_vocabulary as check_task_vocabulary  # re-exported (tests)
from experiments.role_models import ensure_models
from experiments.stats import mean_stderr
from experiments.tasks.encoding import encode_problems, encode_prompts
from experiments.tasks.registry import build_task
from experiments.tasks.text_task import encode_truncated
from experiments.trace_arrays import assemble, entropy_summary, entropy_sums, mask_traces
from experiments.trace_arrays import token_entropy_stats as token_entropy_stats  # re-exported (tests)
from experiments.train import make_mesh
from game import registry
from game import students as stu
from models import sharding as shd
from models import transformer as tfm

# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


class Protocol:
    def __init__(self, cfg: Config, progress: bool = True, seeds: int | None = None):
        self.cfg, self.pc, self.progress = cfg, cfg.protocol, progress and is_main_process()
        self.seeds = seeds or self.pc.seeds
        self.dir = rio.path(cfg.run_dir) / "protocol"
        self.task = build_task(cfg.task)
        self.tokenizer = self.task.tokenizer
        self.mesh = make_mesh(cfg)
        # the world every stage depends on: task, models and the API's sampler (top-p, length) besides τ
        self.task_fp = fingerprint(
            task=cfg.task.identity(),
            seed=cfg.seed,
            models={r: dataclasses.asdict(cfg.role(r)) for r in ("teacher", "proxy", "student")},
            sample=(cfg.sample.top_p, cfg.sample.max_new_tokens),
        )
        self.validation_problems, self.heldout_tag = None, ""  # set by attacker_heldout when the attacker tunes β
        self.student_tokenizer = None  # set by run() for an HF student with its own tokenizer (retokenize.py)

    # -- helpers --------------------------------------------------------------
    def _decode(self, problems, d_setup, rng, greedy=False, expose_k=0, carry_b=None) -> Decoded:
        combiner, specs, params, tangents = d_setup
        return decode_problems(
            problems,
            self.tokenizer,
            specs,
            params,
            self.mesh,
            combiner=combiner,
            max_new_tokens=self.cfg.sample.max_new_tokens,
            batch_size=self.cfg.sample.batch_size,
            greedy=greedy,
            top_p=self.cfg.sample.top_p,
            rng=rng,
            expose_k=expose_k,
            tangents=tangents,
            carry_b=carry_b,
        )

    def _student_arrays(self, models, problems, decoded: Decoded) -> dict[str, np.ndarray]:
        """For a student with its own tokenizer: the same traces as text, re-encoded with it (`student_*` keys)."""
        tok = models["student"].tokenizer
        if tok is None:
            return {}
        ended = retok.ended_with_eos(decoded.tokens_bn, decoded.lengths_b, self.tokenizer.eos_id)
        rows = retok.encode_traces(problems, decoded.texts(self.tokenizer), ended, tok, self.cfg.task.max_len)
        return {retok.PREFIX + k: v for k, v in rows.items()}

    def _train_arrays(self, problems, decoded: Decoded) -> dict[str, np.ndarray]:
        prompts, lens = encode_prompts(problems, self.tokenizer, None)
        return assemble(prompts, lens, decoded, self.cfg.task.max_len, self.tokenizer.pad_id)

    # -- stages ---------------------------------------------------------------
    def heldout_traces(self, models) -> dict[str, np.ndarray]:
        path = self.dir / f"heldout_traces-{fingerprint(t=self.task_fp, tau=self.pc.temperature)}.npz"
        if path.exists():
            return rio.load_npz(path)
        problems = self.task.problems("heldout", self.cfg.seed)
        setup = defense_setup(DefenseSetting(registry.STANDARD), models, None, self.pc.temperature)
        decoded = self._decode(problems, setup, jax.random.key(1234))
        arrays = self._train_arrays(problems, decoded)
        arrays.update(self._student_arrays(models, problems, decoded))
        save_npz(path, **arrays)
        return arrays

    def teacher_entropy(self, models, traces: dict[str, np.ndarray], n: int = 512) -> dict:
        """The world's entropy: the teacher's next-token distribution at τ=1 on its own (standard-decoded) traces,
        over the first `n` traces of seed 0. Mean entropy (nats) and the share of positions whose top probability
        is below 0.9."""
        t = models["teacher"]
        tokens, mask = traces["tokens_bt"][0, :n], traces["loss_mask_bt"][0, :n, :-1]
        sums = jax.jit(lambda p, x, m: entropy_sums(tfm.forward(t.graphdef, p, x)[0], m))
        total = np.zeros(3)  # in chunks of rows, reduced on device: [n, T, V] logits would not fit at paper scale
        slices, size = row_chunks(len(tokens), self.pc.distill.heldout_batch, self.mesh)
        for s in slices:
            x, m = padded(tokens[s, :-1], size), padded(mask[s], size, fill=0)
            out = sums(
                t.params,
                shd.put_global(x, shd.batch_sharding(self.mesh)),
                shd.put_global(m, shd.batch_sharding(self.mesh)),
            )
            total += np.array([float(shd.to_host(v)) for v in out])
        return entropy_summary(*total)

    def proxy_gradient(self, models, heldout):
        """g_P: the gradient of the proxy's mean NLL on the clean held-out traces (in chunks of
        protocol.distill.heldout_batch rows, so a 3B proxy's full-vocabulary logits never exist for all at once)."""
        proxy = models["proxy"]
        return mean_nll_grad(
            proxy.graphdef,
            proxy.params,
            heldout["tokens_bt"],
            heldout["loss_mask_bt"],
            self.mesh,
            self.pc.distill.heldout_batch,
        )

    def traces(self, d: DefenseSetting, models, g_P) -> dict:
        """Training traces for every seed and the defended teacher's test accuracy per seed."""
        path = (
            self.dir
            / f"traces-{d.key}-{fingerprint(t=self.task_fp, d=d, s=self.seeds, p=dataclasses.replace(self.pc, distill=None, defenses=()))}.npz"
        )
        if path.exists():
            return rio.load_npz(path)
        setup = defense_setup(d, models, g_P, self.pc.temperature)
        train_problems = self.task.problems("train", self.cfg.seed + 1, self.pc.n_traces)
        test_problems = self.task.problems("test", self.cfg.seed)
        # Seeds are vectorised by stacking them along the batch: one decode call serves all.
        dec = self._decode(train_problems * self.seeds, setup, jax.random.key(1), expose_k=self.pc.expose_k)
        arrays = self._train_arrays(train_problems * self.seeds, dec)
        test = self._decode(test_problems * self.seeds, setup, jax.random.key(2))
        correct = correct_mask(test_problems * self.seeds, test.texts(self.tokenizer), self.task.is_correct).reshape(
            self.seeds, -1
        )
        lens = dec.lengths_b.reshape(self.seeds, -1)
        keep = np.asarray(stu.degenerate_mask(dec.tokens_bn, dec.lengths_b)).reshape(self.seeds, -1)
        texts = dec.texts(self.tokenizer)
        train_correct = correct_mask(train_problems * self.seeds, texts, self.task.is_correct).reshape(self.seeds, -1)
        arrays.update(self._student_arrays(models, train_problems * self.seeds, dec))
        out = {k: v.reshape((self.seeds, -1) + v.shape[1:]) for k, v in arrays.items()}
        out.update(teacher_correct=correct, trace_lengths=lens, keep=keep, trace_correct=train_correct)
        feats = [self.task.text_features(t) for t in texts]  # what the texts are made of ({} for most tasks)
        for name in feats[0]:
            out[f"trace_{name}"] = np.array([f[name] for f in feats], np.float32).reshape(self.seeds, -1)
        save_npz(path, **out)
        return out

    def wallclock_ratios(self, models, g_P) -> dict:
        """Decoding seconds of each defense setting over standard decoding's, for a batch of `cost_batch` test
        prompts: measured side by side in one run (the machine's speed drifts between runs) and kept as a
        stage, so a re-run reports the same ratios."""
        fp = fingerprint(t=self.task_fp, d=self.pc.defenses, b=self.pc.cost_batch, tau=self.pc.temperature)
        path = self.dir / f"wallclock-{fp}.json"
        if path.exists():
            return rio.load_json(path)
        prompts, lens = encode_prompts(
            self.task.problems("test", self.cfg.seed, self.pc.cost_batch), self.tokenizer, None
        )
        args = (models, g_P, self.pc.temperature, prompts, lens, self.cfg.sample.max_new_tokens, self.tokenizer.pad_id)
        standard = decode_seconds(DefenseSetting(registry.STANDARD), *args)
        ratios = {
            d.key: 1.0 if d.name == registry.STANDARD else decode_seconds(d, *args) / standard for d in self.pc.defenses
        }
        save_json(path, ratios)
        return ratios

    def student(self, d: DefenseSetting, kind: str, beta: float, models, traces, heldout) -> list[float]:
        return self.student_record(d, kind, beta, models, traces, heldout)["accuracy"]

    def student_record(self, d: DefenseSetting, kind, beta: float, models, traces, heldout) -> dict:
        """Distil (or load) one student kind for every seed: its per-seed test `accuracy`,
        `ess_fraction` of its weights and, while the attacker keeps a validation split,
        `validation_accuracy`; + `curve` for the standard passive student (step count -> per-seed accuracy
        along one run, protocol.distill.curve) and `correct_traces` (per seed) for correct_only. `kind` may be a
        `game.students.Recipe` (attacker.py)."""
        dc = self.pc.distill
        with_curve = kind == "passive" and d.name == registry.STANDARD and bool(dc.curve)
        # Recipe kinds are keyed by their resolved recipe, so attacker settings invalidate only the students they change.
        dc_key = dataclasses.replace(
            dc,
            betas=(),
            attacks=(),
            attack_defenses=(),
            attacker=attacker.AttackerConfig(),
            curve=dc.curve if with_curve else (),
            correct_only=False,  # the kind is in the key
        )
        path = (
            self.dir
            / f"student-{d.key}-{attacker.kind_label(kind)}-b{beta:g}-{fingerprint(t=self.task_fp, d=d, dc=dc_key, r=attacker.recipe_of(kind, dc), h=self.heldout_tag, s=self.seeds, p=dataclasses.replace(self.pc, distill=None, defenses=()))}.json"
        )
        if path.exists():
            return rio.load_json(path)
        # the teacher's rows, or their re-encoding for a student with its own tokenizer
        train = retok.student_rows(traces)
        if dc.degeneracy_filter:
            train = mask_traces(train, traces["keep"])
        gamma = d.strength + dc.inversion_gamma_error if kind == "poe_inversion" else 0.0
        record = {"defense": d.label, "kind": kind if isinstance(kind, str) else dataclasses.asdict(kind), "beta": beta}
        if kind == "correct_only":
            right_sb = traces["trace_correct"] & traces["keep"]
            train, record["correct_traces"] = mask_traces(train, right_sb), right_sb.sum(-1).tolist()
        snapshots = tuple(sorted({max(1, round(f * dc.steps)) for f in dc.curve})) if with_curve else ()
        stats: dict = {}
        params = distil(
            models["student"],
            train,
            heldout,
            dc,
            "passive" if kind == "correct_only" else kind,
            beta,
            self.seeds,
            models["proxy"],
            gamma,
            self.pc.temperature,
            self.progress,
            desc=f"distill {attacker.kind_label(kind)} on {d.label}",
            snapshots=snapshots,
            stats=stats,
        )
        test_problems = self.task.problems("test", self.cfg.seed)
        if with_curve:
            record["curve"] = {str(n): self._accuracies(models, p, test_problems) for n, p in zip(snapshots, params)}
            params = params[snapshots.index(dc.steps)]
            record["accuracy"] = record["curve"][str(dc.steps)]
        else:
            record["accuracy"] = self._accuracies(models, params, test_problems)
        record.update(stats)
        if self.validation_problems:  # the attacker's own validation split (tuned β); never the test set
            record["validation_accuracy"] = self._accuracies(models, params, self.validation_problems)
        save_json(path, record)
        return record

    def _accuracies(self, models, params, problems) -> list[float]:
        """Greedy accuracy of each seed's student (params with a leading seed axis) on `problems`."""
        spec, tok = models["student"].spec, models["student"].tokenizer or self.tokenizer
        accs = []
        for s in range(self.seeds):
            p_s = jax.tree.map(lambda x: x[s], params)
            dec = decode_problems(
                problems,
                tok,
                (spec,),
                (p_s,),
                self.mesh,
                max_new_tokens=self.cfg.sample.max_new_tokens,
                batch_size=self.cfg.sample.batch_size,
            )
            accs.append(float(correct_mask(problems, dec.texts(tok), self.task.is_correct).mean()))
        return accs

    def attacker_heldout(self, clean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The attacker's held-out set for g_S; while it tunes β (attacker.py) a validation split of
        its prompts is kept out of it (`self.validation_problems`)."""
        problems = self.task.problems("heldout", self.cfg.seed)
        if (
            self.pc.distill.heldout == "ground_truth" and self.student_tokenizer is not None
        ):  # its own tokens, cut at max_len
            held = encode_truncated(problems, self.student_tokenizer, self.cfg.task.max_len)
        elif self.pc.distill.heldout == "ground_truth":
            data = encode_problems(problems, self.tokenizer, self.cfg.task.max_len)
            held = {"tokens_bt": data["tokens_bt"], "loss_mask_bt": data["loss_mask_bt"]}
        else:
            held = {k: v for k, v in retok.student_rows(clean).items() if k in ("tokens_bt", "loss_mask_bt")}
        ac = self.pc.distill.attacker
        if ac.tunes and self.pc.distill.heldout != "none":
            fit, val = attacker.validation_split(len(problems), ac.validation_fraction, self.cfg.seed)
            self.validation_problems = [problems[i] for i in val]
            self.heldout_tag = f"val{ac.validation_fraction:g}"
            held = {k: v[fit] for k, v in held.items()}
        return held

    def student_kinds(self, d: DefenseSetting) -> list[tuple[str, str, float]]:
        dc = self.pc.distill
        kinds = [("passive", "passive", 0.0)] + [(f"adaptive(beta={b:g})", "adaptive", b) for b in dc.betas]
        if dc.correct_only:
            kinds.append(("correct_only", "correct_only", 0.0))
        if d.name not in dc.attack_defenses:
            return kinds
        if "soft_topk" in dc.attacks:
            kinds.append(("soft_topk", "soft_topk", 0.0))
        if "poe_inversion" in dc.attacks and registry.get(d.name).invertible:
            kinds.append(("poe_inversion", "poe_inversion", 0.0))
        return kinds

    def run(self) -> dict:
        start = time.perf_counter()
        models = ensure_models(self.cfg, self.mesh, self.progress, self.task)
        self.student_tokenizer = models["student"].tokenizer
        clean = self.heldout_traces(models)
        g_P = self.proxy_gradient(models, clean)
        heldout = self.attacker_heldout(clean)
        rows, world = [], None
        wallclock_ratios = self.wallclock_ratios(models, g_P)
        context = encode_prompts(self.task.problems("test", self.cfg.seed, 64), self.tokenizer, None)[1].mean()
        for d in tqdm(self.pc.defenses, desc="defenses", disable=not self.progress):
            tr = self.traces(d, models, g_P)
            row = {"label": d.label, "defense": d.name, "strength": d.strength, "setting": dataclasses.asdict(d)}
            row["teacher_accuracy"] = mean_stderr(tr["teacher_correct"].mean(-1))
            row["students"] = {}
            for name, kind, beta in self.student_kinds(d):
                record = self.student_record(d, kind, beta, models, tr, heldout)
                row["students"][name] = mean_stderr(record["accuracy"])
                if kind == "adaptive" and "ess_fraction" in record:
                    row.setdefault("ess_fraction", {})[name] = mean_stderr(record["ess_fraction"])
                if "curve" in record:
                    row["learning_curve"] = {n: mean_stderr(v) for n, v in record["curve"].items()}
                if "correct_traces" in record:
                    row["correct_traces"] = record["correct_traces"]
            if attacker.runs_ablation(d, self.pc.distill.attacker):
                row["ablation_students"] = attacker.ablation_students(self, d, models, tr, heldout)
            row["adaptive_key"] = next((k for k in row["students"] if k.startswith("adaptive")), None)
            if row["adaptive_key"]:
                p, a = row["students"]["passive"]["mean"], row["students"][row["adaptive_key"]]["mean"]
                row["relative_gain"] = (a - p) / p if p > 0 else float("nan")
            cost = cost_model(d, models, int(context + self.cfg.sample.max_new_tokens // 2))
            cost["wallclock_ratio"] = wallclock_ratios[d.key]
            row["cost"] = cost
            row["mean_trace_length"] = float(tr["trace_lengths"].mean())
            row["degeneracy_rate"] = float(1 - tr["keep"].mean())
            row["trace_accuracy"] = float(tr["trace_correct"].mean())
            for name in TEXT_COLUMNS:  # tasks with text features (the reasoning task)
                if f"trace_{name}" in tr:
                    row[f"trace_{name}"] = float(tr[f"trace_{name}"].mean())
            if d.name == registry.STANDARD:
                world = self.teacher_entropy(models, tr)
            rows.append(row)
        results = {
            "config": self.cfg.name,
            "world": world,
            "seeds": self.seeds,
            "n_test": len(self.task.problems("test", self.cfg.seed)),
            "n_traces": self.pc.n_traces,
            "distill_steps": self.pc.distill.steps,
            "temperature": self.pc.temperature,
            "rows": rows,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if self.cfg.task.is_text:
            results["task"] = self.cfg.task.name
        add_paired_deltas(rows)
        if any("ablation_students" in r for r in rows):
            results["ablation"] = attacker.ablation_summary(rows)
        results["headline"] = headline(results)
        if is_main_process():  # every process holds the same results; one writes them
            write_results(self.dir.parent, results)
        return results
