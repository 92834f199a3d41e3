"""`distgame bench`: throughput and FLOPs utilisation, all measured side by side in one run.

- train step: tokens/s of the sharded, jitted AdamW step at bench.batch_size x task.max_len;
- decoding: tokens/s of the cached sampler (sampling, τ=1) vs full uncached forward passes;
- PoE decoding: teacher + proxy in one jitted sampler, its time over standard decoding
  (`poe_cost_ratio`) next to the FLOPs bound 1 + proxy FLOPs / teacher FLOPs (`poe_flop_bound`);
- the protocol's distillation step (`distillation.distil`: passive and adaptive students, all
  `protocol.seeds` seeds under vmap, host-side batch gathering included): steps/s;
- model FLOPs per token (2 per multiply-add; training = 3x forward) and achieved FLOP/s as a
  fraction of a dense float32 matmul peak measured on the same devices in the same run, and of
  the device's bf16 peak where it is a known GPU/TPU (`experiments/device_peaks.py`);
- `--compare-hf`: the same shapes in PyTorch + transformers (`experiments/bench_hf.py`), timed in
  the same run, alternating ours / theirs round by round; ratios of the medians.

Absolute figures on a shared CPU drift from run to run; the ratios within one run are the result.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import device_peaks
from experiments.config import ROLES, Config, ConfigError
from experiments.train import Trainer, hf_overrides, init_role_model, make_mesh
from game import defenses as dfn
from models import hf_config
from models import sharding as shd
from models import transformer as tfm
from models.sampling import Single, generate, greedy_uncached


def median_seconds(fn: Callable[[], object], iters: int, warmup: bool = True) -> float:
    """Median seconds per call of a jax function (results blocked on)."""
    if warmup:
        jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak_flops(mesh, n: int = 1024, iters: int = 10) -> float:
    """Dense float32 matmul FLOP/s over all mesh devices (each device multiplies its own n x n block)."""
    devices = mesh.devices.size
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.MESH_AXES))
    a = jax.device_put(jnp.ones((devices * n, n), jnp.float32), sharding)
    b = jax.device_put(jnp.ones((devices * n, n), jnp.float32), sharding)
    f = jax.jit(lambda a, b: jnp.einsum("xij,xjk->xik", a.reshape(devices, n, n), b.reshape(devices, n, n)))
    seconds = median_seconds(lambda: f(a, b), iters)
    return 2 * devices * n**3 / seconds


def _distill_runner(cfg: Config, models, vocab: int, kind: str, steps: int):
    """A call of `distillation.distil` (what the protocol runs per student) on random traces; returns (fn, steps)."""
    from experiments.distillation import distil

    pc = cfg.protocol
    dc = dataclasses.replace(pc.distill, steps=steps)
    seeds, n, t, k = pc.seeds, min(pc.n_traces, 1024), cfg.task.max_len, max(pc.expose_k, 1)
    rng = np.random.default_rng(1)
    traces = {
        "tokens_bt": rng.integers(3, vocab, (seeds, n, t), dtype=np.int32),
        "loss_mask_bt": np.ones((seeds, n, t), np.float32),
        "topk_ids_btk": rng.integers(3, vocab, (seeds, n, t, k), dtype=np.int32),
        "topk_logprob_btk": np.log(np.full((seeds, n, t, k), 1.0 / k, np.float32)),
    }
    heldout = {
        "tokens_bt": rng.integers(3, vocab, (256, t), dtype=np.int32),
        "loss_mask_bt": np.ones((256, t), np.float32),
    }
    return lambda: distil(
        models["student"], traces, heldout, dc, kind, 1.0, seeds, models["proxy"], 0.5, pc.temperature, progress=False
    )


def with_hf_architectures(cfg: Config) -> Config:
    """Roles with `hf_dir` benchmarked at their checkpoint's architecture (its config.json, or the published
    copy in models/hf_configs/) and dtypes, with random weights: throughput does not depend on the values."""
    try:
        roles = {
            r: dataclasses.replace(
                cfg.role(r), model=hf_config.architecture(cfg.role(r).hf_dir, **hf_overrides(cfg.role(r)))[0]
            )
            for r in ROLES
            if cfg.role(r).hf_dir
        }
    except hf_config.HFLoadError as e:
        raise ConfigError(f"bench: {e}") from None
    return dataclasses.replace(cfg, **roles)


def run_bench(cfg: Config, compare_hf: bool = False) -> dict:
    cfg = with_hf_architectures(cfg)
    bc = cfg.bench
    mesh = make_mesh(cfg)
    trainer = Trainer(cfg, bc.role, mesh)  # random weights: throughput does not depend on training
    rc, vocab = cfg.role(bc.role), trainer.tokenizer.vocab_size
    seq = cfg.task.max_len
    rng = np.random.default_rng(0)
    batch = {
        "tokens_bt": rng.integers(3, vocab, (bc.batch_size, seq), dtype=np.int32),
        "loss_mask_bt": np.ones((bc.batch_size, seq), np.float32),
    }
    sharded = shd.shard_batch(batch, mesh)
    state = {"s": trainer.state}

    def train_step():
        state["s"], metrics = trainer.step_fn(state["s"], sharded)
        return metrics["loss"]

    n_params = tfm.param_count(trainer.model.params)
    models = {r: init_role_model(cfg.role(r), vocab, mesh, cfg.rules, 0) for r in ("proxy", "student")}
    spec = trainer.model.spec
    prompts_np = rng.integers(3, vocab, (bc.batch_size, bc.prompt_len), dtype=np.int32)
    prompts = jax.device_put(prompts_np, shd.batch_sharding(mesh))
    lens = jax.device_put(np.full((bc.batch_size,), bc.prompt_len, np.int32), shd.batch_sharding(mesh, 1))
    no_eos = -1  # decode the full length every time
    sample = dict(max_new_tokens=bc.gen_len, eos_id=no_eos, pad_id=0, greedy=False)
    key = jax.random.key(0)

    def cached():
        return generate((spec,), (state["s"]["params"],), prompts, lens, key, combiner=Single(), **sample)["tokens_bn"]

    p_model = models["proxy"]

    def poe():
        return generate(
            (spec, p_model.spec),
            (state["s"]["params"], p_model.params),
            prompts,
            lens,
            key,
            combiner=dfn.PoE(0.5, 1.0),
            **sample,
        )["tokens_bn"]

    def uncached():
        return greedy_uncached(
            spec, state["s"]["params"], prompts, lens, max_new_tokens=bc.gen_len, eos_id=no_eos, pad_id=0
        )

    distill = {kind: _distill_runner(cfg, models, vocab, kind, bc.distill_steps) for kind in ("passive", "adaptive")}

    hf = None
    if compare_hf:
        from experiments import bench_hf

        hf_teacher = bench_hf.llama(rc.model, vocab, seq + bc.gen_len + bc.prompt_len)
        hf_proxy = bench_hf.llama(cfg.proxy.model, vocab, seq + bc.gen_len + bc.prompt_len, seed=1)
        hf = {
            "train": bench_hf.HFTrainStep(hf_teacher, batch["tokens_bt"], lr=rc.train.lr, clip=rc.train.grad_clip),
            "decode": bench_hf.HFDecode(hf_teacher, prompts_np, bc.gen_len),
            "poe": bench_hf.HFDecode(hf_teacher, prompts_np, bc.gen_len, proxy=hf_proxy, gamma=0.5),
        }
        for fn in hf.values():  # warm-up
            fn()

    ours = {"train": train_step, "decode": cached, "poe": poe}
    for fn in ours.values():  # compile + warm-up
        jax.block_until_ready(fn())
    for fn in distill.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {}
    # Rounds alternate ours / theirs (and standard / PoE) so that drift in machine speed hits both alike.
    for _ in range(bc.rounds):
        for name, fn in ours.items():
            times.setdefault(name, []).append(median_seconds(fn, bc.iters, warmup=False))
            if hf:
                times.setdefault(f"hf_{name}", []).append(_hf_time(hf[name], bc.iters))
        for kind, fn in distill.items():
            times.setdefault(f"distill_{kind}", []).append(median_seconds(fn, 1, warmup=False))
    t = {k: float(np.median(v)) for k, v in times.items()}
    uncached_s = median_seconds(uncached, max(1, bc.iters // 2))

    train_tokens = bc.batch_size * seq
    train_flops = 3 * tfm.flops_per_token(rc.model, vocab, seq // 2) * train_tokens
    gen_tokens = bc.batch_size * bc.gen_len
    context = bc.prompt_len + bc.gen_len // 2
    f_t = tfm.flops_per_token(rc.model, vocab, context)
    f_p = tfm.flops_per_token(cfg.proxy.model, vocab, context)
    decode_flops = f_t * gen_tokens
    pc = cfg.protocol
    distill_tokens = pc.seeds * pc.distill.batch_size * seq

    peak = matmul_peak_flops(mesh)
    device_kind = mesh.devices.flat[0].device_kind
    known = device_peaks.lookup(device_kind)
    report = {
        "role": bc.role,
        "devices": int(mesh.devices.size),
        "device_kind": device_kind,
        "mesh": dict(mesh.shape),
        "params": n_params,
        "model_flops_per_token_forward": f_t,
        "train_tokens_per_s": train_tokens / t["train"],
        "train_flops_per_s": train_flops / t["train"],
        "decode_cached_tokens_per_s": gen_tokens / t["decode"],
        "decode_uncached_tokens_per_s": gen_tokens / uncached_s,
        "decode_cache_speedup": uncached_s / t["decode"],
        "decode_cached_flops_per_s": decode_flops / t["decode"],
        "poe_decode_tokens_per_s": gen_tokens / t["poe"],
        "poe_cost_ratio": t["poe"] / t["decode"],
        "poe_flop_bound": 1 + f_p / f_t,
        "distill_seeds": pc.seeds,
        "distill_batch": pc.distill.batch_size,
        "distill_passive_steps_per_s": bc.distill_steps / t["distill_passive"],
        "distill_adaptive_steps_per_s": bc.distill_steps / t["distill_adaptive"],
        "distill_passive_tokens_per_s": bc.distill_steps * distill_tokens / t["distill_passive"],
        "matmul_peak_flops_per_s": peak,
        "train_utilisation": train_flops / t["train"] / peak,
        "decode_utilisation": decode_flops / t["decode"] / peak,
        "device_bf16_peak_flops_per_s": known.bf16_flops_per_s * mesh.devices.size if known else None,
        "train_mfu": train_flops / t["train"] / (known.bf16_flops_per_s * mesh.devices.size) if known else None,
        "decode_mfu": decode_flops / t["decode"] / (known.bf16_flops_per_s * mesh.devices.size) if known else None,
        "batch_size": bc.batch_size,
        "seq_len": seq,
        "prompt_len": bc.prompt_len,
        "gen_len": bc.gen_len,
        "rounds": bc.rounds,
    }
    if hf:
        import torch

        report.update(
            hf_versions={"torch": torch.__version__, "transformers": __import__("transformers").__version__},
            hf_threads=torch.get_num_threads(),
            hf_train_tokens_per_s=train_tokens / t["hf_train"],
            hf_decode_tokens_per_s=gen_tokens / t["hf_decode"],
            hf_poe_decode_tokens_per_s=gen_tokens / t["hf_poe"],
            hf_poe_cost_ratio=t["hf_poe"] / t["hf_decode"],
            train_speedup_vs_hf=t["hf_train"] / t["train"],
            decode_speedup_vs_hf=t["hf_decode"] / t["decode"],
            poe_decode_speedup_vs_hf=t["hf_poe"] / t["poe"],
            rounds_train_s={"ours": times["train"], "hf": times["hf_train"]},
            rounds_decode_s={"ours": times["decode"], "hf": times["hf_decode"]},
        )
    return report


def _hf_time(fn, iters: int) -> float:
    from experiments.bench_hf import time_call

    return time_call(fn, iters)


def format_report(r: dict) -> str:
    g = 1e9
    lines = [
        f"bench: {r['role']} ({r['params']:,} params) on {r['devices']} x {r['device_kind']}, mesh {r['mesh']}; "
        f"medians of {r['rounds']} round(s)",
        f"  train step      {r['train_tokens_per_s']:>12,.0f} tokens/s  {r['train_flops_per_s'] / g:8.2f} GFLOP/s  "
        f"({r['train_utilisation']:.1%} of matmul peak)  batch {r['batch_size']} x {r['seq_len']}",
        f"  decode (cache)  {r['decode_cached_tokens_per_s']:>12,.0f} tokens/s  {r['decode_cached_flops_per_s'] / g:8.2f} GFLOP/s  "
        f"({r['decode_utilisation']:.1%} of peak)  batch {r['batch_size']}, prompt {r['prompt_len']}, +{r['gen_len']} tokens, sampled",
        f"  decode (no cache) {r['decode_uncached_tokens_per_s']:>10,.0f} tokens/s  -> KV cache speed-up {r['decode_cache_speedup']:.1f}x",
        f"  PoE decode      {r['poe_decode_tokens_per_s']:>12,.0f} tokens/s  cost {r['poe_cost_ratio']:.2f}x standard "
        f"(FLOPs bound 1 + proxy/teacher = {r['poe_flop_bound']:.2f}x)",
        f"  distillation    {r['distill_passive_steps_per_s']:>12.2f} steps/s passive, {r['distill_adaptive_steps_per_s']:.2f} adaptive "
        f"({r['distill_seeds']} seeds x batch {r['distill_batch']} under vmap; {r['distill_passive_tokens_per_s']:,.0f} tokens/s passive)",
        f"  model FLOPs/token (forward) {r['model_flops_per_token_forward']:,.0f}; dense matmul peak {r['matmul_peak_flops_per_s'] / g:.1f} GFLOP/s",
    ]
    if r.get("train_mfu") is not None:
        lines.append(
            f"  MFU vs {r['device_kind']} bf16 peak ({r['device_bf16_peak_flops_per_s'] / 1e12:,.0f} TFLOP/s): "
            f"train {r['train_mfu']:.1%}, decode {r['decode_mfu']:.1%}"
        )
    if "train_speedup_vs_hf" in r:
        lines += [
            f"  PyTorch {r['hf_versions']['torch']} + transformers {r['hf_versions']['transformers']} ({r['hf_threads']} threads), same shapes:",
            f"    train step  {r['hf_train_tokens_per_s']:>12,.0f} tokens/s  -> ours {r['train_speedup_vs_hf']:.2f}x",
            f"    decode      {r['hf_decode_tokens_per_s']:>12,.0f} tokens/s  -> ours {r['decode_speedup_vs_hf']:.2f}x",
            f"    PoE decode  {r['hf_poe_decode_tokens_per_s']:>12,.0f} tokens/s  (cost {r['hf_poe_cost_ratio']:.2f}x their standard) "
            f"-> ours {r['poe_decode_speedup_vs_hf']:.2f}x",
        ]
    return "\n".join(lines)
