"""The protocol's own throughput, two checkouts side by side: distillation steps/s and defended decode tokens/s.

    python -m experiments.speed_compare --base /path/to/other/checkout [--config default] [--rounds 6] [--json]

One worker process per checkout (its code on PYTHONPATH), each compiled once, then driven round by round,
alternating A / B / B / A ..., so drift in a shared machine's speed hits both alike; the result is the ratio
of the medians. What each round times, on the config's default shapes with random weights (throughput does not
depend on the values):
- distillation: `distillation.distil` of the passive student, all `protocol.seeds` seeds under vmap, batch
  `protocol.distill.batch_size` rows of `task.max_len` tokens, host-side batch gathering included;
- defended decoding: the protocol's sampler (`models.sampling.generate`) for `sample.batch_size` test prompts,
  `sample.max_new_tokens` tokens each (no early EOS), PoE at the config's strongest `poe` setting (γ = 0.5 when it
  has none), and standard decoding;
- the teacher's training step (`Trainer.step_fn`, batch `teacher.train.batch_size` x `task.max_len`), 3 steps a call.
The worker uses only APIs that the compared checkouts share (`distil`, `defense_setup`, `generate`, `Trainer`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

NAMES = ("distill", "poe", "standard", "train")
MEASURES = (
    "distill_steps_per_s",
    "poe_decode_tokens_per_s",
    "standard_decode_tokens_per_s",
    "teacher_train_steps_per_s",
)


# ---------------------------------------------------------------------------
# Worker: one checkout's code, compiled once, timed on request
# ---------------------------------------------------------------------------


def _worker(config: str, overrides: list[str], distill_steps: int, train_steps: int = 3) -> None:
    import dataclasses

    import jax

    from experiments import protocol as P
    from experiments.config import DefenseSetting, load_config

    try:
        from experiments.tasks.encoding import encode_prompts
    except ImportError:  # checkouts before 2026-12-02 kept it in the arithmetic task
        from experiments.tasks.arithmetic import encode_prompts
    from experiments.tasks.registry import build_task
    from experiments.train import init_role_model, make_mesh
    from models.sampling import generate

    cfg = load_config(config, overrides)
    mesh = make_mesh(cfg)
    task = build_task(cfg.task)
    tok = task.tokenizer
    vocab = tok.vocab_size
    models = {
        r: init_role_model(cfg.role(r), vocab, mesh, cfg.rules, i)
        for i, r in enumerate(("teacher", "proxy", "student"))
    }
    pc = cfg.protocol
    dc = dataclasses.replace(pc.distill, steps=distill_steps)
    seeds, n, t = pc.seeds, min(pc.n_traces, 1024), cfg.task.max_len
    rng = np.random.default_rng(1)
    traces = {
        "tokens_bt": rng.integers(3, vocab, (seeds, n, t), dtype=np.int32),
        "loss_mask_bt": np.ones((seeds, n, t), np.float32),
        "topk_ids_btk": np.zeros((seeds, n, t, 1), np.int32),
        "topk_logprob_btk": np.zeros((seeds, n, t, 1), np.float32),
    }
    heldout = {
        "tokens_bt": rng.integers(3, vocab, (256, t), dtype=np.int32),
        "loss_mask_bt": np.ones((256, t), np.float32),
    }

    def distill():
        return P.distil(
            models["student"],
            traces,
            heldout,
            dc,
            "passive",
            0.0,
            seeds,
            models["proxy"],
            0.0,
            pc.temperature,
            progress=False,
        )

    strengths = [d.strength for d in pc.defenses if d.name == "poe"]
    poe = DefenseSetting("poe", strength=max(strengths) if strengths else 0.5)
    problems = task.problems("test", cfg.seed, cfg.sample.batch_size)
    prompts, lens = encode_prompts(problems, tok, None)
    new_tokens = cfg.sample.max_new_tokens

    def decoder(setting):
        combiner, specs, params, tangents = P.defense_setup(setting, models, None, pc.temperature)
        return lambda: generate(
            specs,
            params,
            prompts,
            lens,
            jax.random.key(0),
            combiner=combiner,
            max_new_tokens=new_tokens,
            eos_id=-1,
            pad_id=tok.pad_id,
            greedy=False,
            tangents=tangents,
        )["tokens_bn"]

    from experiments.train import Trainer
    from models import sharding as shd

    trainer = Trainer(cfg, "teacher", mesh, task=task)  # the teacher's own training step (make run trains it first)
    batch = shd.shard_batch(
        {
            "tokens_bt": rng.integers(3, vocab, (cfg.teacher.train.batch_size, t), dtype=np.int32),
            "loss_mask_bt": np.ones((cfg.teacher.train.batch_size, t), np.float32),
        },
        mesh,
    )

    def train():
        for _ in range(train_steps):
            trainer.state, metrics = trainer.step_fn(trainer.state, batch)
        return metrics["loss"]

    fns = {"distill": distill, "poe": decoder(poe), "standard": decoder(DefenseSetting("standard")), "train": train}
    for fn in fns.values():  # compile + warm up
        jax.block_until_ready(fn())
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(fns[name]())
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        work = {"distill": distill_steps, "train": train_steps}.get(name, len(problems) * new_tokens)
        print(
            json.dumps(
                {"name": name, "seconds": seconds, "per_s": work / seconds, "per_cpu_s": work / cpu}, allow_nan=False
            ),
            flush=True,
        )


# ---------------------------------------------------------------------------
# Coordinator
# ---------------------------------------------------------------------------


class Worker:
    def __init__(self, label: str, checkout: pathlib.Path, args):
        env = dict(os.environ, PYTHONPATH=str(checkout))
        cmd = [
            sys.executable,
            str(pathlib.Path(__file__).resolve()),
            "--worker",
            "--config",
            args.config,
            "--distill-steps",
            str(args.distill_steps),
            *args.overrides,
        ]
        self.label = label
        self.proc = subprocess.Popen(
            cmd, cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def wait_ready(self):
        for line in self.proc.stdout:
            if line.strip() == "ready":
                return
        raise RuntimeError(f"{self.label}: worker exited before it was ready (code {self.proc.wait()})")

    def time(self, name: str) -> dict:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.label}: worker exited (code {self.proc.wait()})")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def compare(args) -> dict:
    ours = pathlib.Path(__file__).resolve().parents[1]
    workers = {"base": Worker("base", pathlib.Path(args.base).resolve(), args), "ours": Worker("ours", ours, args)}
    try:
        for w in workers.values():  # one at a time: compiling both at once would slow the other's warm-up only
            w.wait_ready()
        samples: dict[str, dict[str, list[dict]]] = {k: {m: [] for m in NAMES} for k in workers}
        for r in range(args.rounds):
            order = ("base", "ours") if r % 2 == 0 else ("ours", "base")  # A B, B A, ...: drift hits both alike
            for name in NAMES:
                for label in order:
                    samples[label][name].append(workers[label].time(name))
    finally:
        for w in workers.values():
            w.close()

    def med(label, m, field):
        return float(np.median([x[field] for x in samples[label][m]]))

    keys = dict(zip(NAMES, MEASURES))
    report = {
        "base": str(pathlib.Path(args.base).resolve()),
        "ours": str(ours),
        "rounds": args.rounds,
        "config": args.config,
    }
    for m, key in keys.items():
        base, mine = med("base", m, "per_s"), med("ours", m, "per_s")
        base_cpu, mine_cpu = med("base", m, "per_cpu_s"), med("ours", m, "per_cpu_s")
        report[key] = {
            "base": base,
            "ours": mine,
            "ratio": mine / base,
            # work per CPU-second: the figure least disturbed by other jobs on a shared machine
            "base_per_cpu_s": base_cpu,
            "ours_per_cpu_s": mine_cpu,
            "cpu_ratio": mine_cpu / base_cpu,
            "rounds_base": [x["per_s"] for x in samples["base"][m]],
            "rounds_ours": [x["per_s"] for x in samples["ours"][m]],
        }
    return report


def format_report(r: dict) -> str:
    lines = [
        f"speed_compare: {r['ours']} (ours) vs {r['base']} (base), config {r['config']}, medians of {r['rounds']} "
        "alternating rounds"
    ]
    units = {
        "distill_steps_per_s": "distillation steps/s (all seeds)",
        "poe_decode_tokens_per_s": "PoE decode tokens/s",
        "standard_decode_tokens_per_s": "standard decode tokens/s",
        "teacher_train_steps_per_s": "teacher train steps/s",
    }
    for key, label in units.items():
        m = r[key]
        lines.append(
            f"  {label:34s} base {m['base']:>10,.2f}  ours {m['ours']:>10,.2f}  -> {m['ratio']:.2f}x  "
            f"(per CPU-second: {m['cpu_ratio']:.2f}x)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the other checkout (e.g. `git worktree add /tmp/base main`)")
    p.add_argument("--config", default="default")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--distill-steps", type=int, default=10, help="distillation steps per timed call")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.config, args.overrides, args.distill_steps)
        return 0
    if not args.base:
        p.error("--base is required")
    report = compare(args)
    print(format_report(report))
    if args.json:
        print(json.dumps(report, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
