"""`distgame bench`: throughput and FLOPs utilisation, all measured side by side in one run.

- train step: tokens/s of the sharded, jitted AdamW step at bench.batch_size x task.max_len;
- decoding: tokens/s of the cached sampler vs full uncached forward passes (same prompts);
- model FLOPs per token (2 per multiply-add; training = 3x forward) and achieved FLOP/s as a
  fraction of a dense float32 matmul peak measured on the same devices in the same run.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import Config
from experiments.train import Trainer, make_mesh
from models import sharding as shd
from models import transformer as tfm
from models.sampling import Single, generate, greedy_uncached


def _time(fn: Callable[[], object], iters: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def matmul_peak_flops(mesh, n: int = 1024, iters: int = 10) -> float:
    """Dense float32 matmul FLOP/s over all mesh devices (each device multiplies its own n x n block)."""
    devices = mesh.devices.size
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.MESH_AXES))
    a = jax.device_put(jnp.ones((devices * n, n), jnp.float32), sharding)
    b = jax.device_put(jnp.ones((devices * n, n), jnp.float32), sharding)
    f = jax.jit(lambda a, b: jnp.einsum("xij,xjk->xik", a.reshape(devices, n, n), b.reshape(devices, n, n)))
    seconds = _time(lambda: f(a, b), iters)
    return 2 * devices * n**3 / seconds


def run_bench(cfg: Config) -> dict:
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

    def step():
        state["s"], metrics = trainer.step_fn(state["s"], sharded)
        return metrics["loss"]

    train_s = _time(step, bc.iters)
    train_tokens = bc.batch_size * seq
    train_flops = 3 * tfm.flops_per_token(rc.model, vocab, seq // 2) * train_tokens

    spec, params = trainer.model.spec, state["s"]["params"]
    prompts = jax.device_put(rng.integers(3, vocab, (bc.batch_size, bc.prompt_len), dtype=np.int32), shd.batch_sharding(mesh))
    lens = jax.device_put(np.full((bc.batch_size,), bc.prompt_len, np.int32), shd.batch_sharding(mesh, 1))
    no_eos = -1  # decode the full length every time
    cached = lambda: generate((spec,), (params,), prompts, lens, jax.random.key(0), combiner=Single(), max_new_tokens=bc.gen_len, eos_id=no_eos, pad_id=0)["tokens_bn"]
    uncached = lambda: greedy_uncached(spec, params, prompts, lens, max_new_tokens=bc.gen_len, eos_id=no_eos, pad_id=0)
    cached_s, uncached_s = _time(cached, bc.iters), _time(uncached, bc.iters)
    gen_tokens = bc.batch_size * bc.gen_len
    context = bc.prompt_len + bc.gen_len // 2
    decode_flops = tfm.flops_per_token(rc.model, vocab, context) * gen_tokens

    peak = matmul_peak_flops(mesh)
    return {
        "role": bc.role,
        "devices": int(mesh.devices.size),
        "mesh": dict(mesh.shape),
        "params": tfm.param_count(params),
        "model_flops_per_token_forward": tfm.flops_per_token(rc.model, vocab, context),
        "train_tokens_per_s": train_tokens / train_s,
        "train_flops_per_s": train_flops / train_s,
        "decode_cached_tokens_per_s": gen_tokens / cached_s,
        "decode_uncached_tokens_per_s": gen_tokens / uncached_s,
        "decode_cache_speedup": uncached_s / cached_s,
        "decode_cached_flops_per_s": decode_flops / cached_s,
        "matmul_peak_flops_per_s": peak,
        "train_utilisation": train_flops / train_s / peak,
        "decode_utilisation": decode_flops / cached_s / peak,
        "batch_size": bc.batch_size,
        "seq_len": seq,
        "prompt_len": bc.prompt_len,
        "gen_len": bc.gen_len,
    }


def format_report(r: dict) -> str:
    g = 1e9
    return "\n".join(
        [
            f"bench: {r['role']} ({r['params']:,} params) on {r['devices']} device(s), mesh {r['mesh']}",
            f"  train step      {r['train_tokens_per_s']:>12,.0f} tokens/s  {r['train_flops_per_s'] / g:8.2f} GFLOP/s  "
            f"({r['train_utilisation']:.1%} of matmul peak)  batch {r['batch_size']} x {r['seq_len']}",
            f"  decode (cache)  {r['decode_cached_tokens_per_s']:>12,.0f} tokens/s  {r['decode_cached_flops_per_s'] / g:8.2f} GFLOP/s  "
            f"({r['decode_utilisation']:.1%} of peak)  batch {r['batch_size']}, prompt {r['prompt_len']}, +{r['gen_len']} tokens",
            f"  decode (no cache) {r['decode_uncached_tokens_per_s']:>10,.0f} tokens/s  -> KV cache speed-up {r['decode_cache_speedup']:.1f}x",
            f"  model FLOPs/token (forward) {r['model_flops_per_token_forward']:,.0f}; dense matmul peak {r['matmul_peak_flops_per_s'] / g:.1f} GFLOP/s",
        ]
    )
