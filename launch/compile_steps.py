"""The programs `distgame compile-check` compiles, each lowered on abstract, sharded state (nothing is allocated):
a from-scratch role's train step, and for a role loaded from Hugging Face the step the protocol runs with it
instead: the teacher's defended decoding, the proxy's held-out gradient g_P and the student's distillation step.
An HF role's architecture comes from its config.json, or from the published copy in models/hf_configs/
(`models.hf_config.architecture`). Each returns the compiled program with its parameter count (and, for the HF
steps, what it is and its batch shape); launch/compile_check.py reads the memory and cost analyses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments.config import Config
from experiments.tasks.tokenizer import build_tokenizer
from experiments.train import (
    RoleModel,
    abstract_role_model,
    hf_overrides,
    make_optimizer,
    make_train_step,
    masked_nll,
    train_state_shardings,
)
from launch.accelerators import LaunchError
from models import hf_config, lora
from models import sharding as shd
from models import transformer as tfm


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def task_vocab_size(cfg: Config) -> int:
    """Rows of a from-scratch role's embedding: the task tokenizer's vocabulary."""
    if not cfg.task.is_text:
        return build_tokenizer().vocab_size
    from experiments.tasks.text_tokenizers import load_tokenizer

    return load_tokenizer(cfg.task.tokenizer).vocab_size


def hf_architecture(cfg: Config, role: str) -> tuple[tfm.ModelConfig, int, str]:
    """(ModelConfig, vocabulary rows, where it came from) of an HF role, without its weights."""
    try:
        model_cfg, source = hf_config.architecture(cfg.role(role).hf_dir, **hf_overrides(cfg.role(role)))
    except hf_config.HFLoadError as e:
        raise LaunchError(f"{role}.hf_dir: {e}") from None
    return model_cfg, model_cfg.vocab_rows, source


def _abstract_model(cfg: Config, role: str, mesh) -> tuple[RoleModel, int]:
    rc = cfg.role(role)
    if rc.hf_dir:
        model_cfg, vocab, _ = hf_architecture(cfg, role)
        rc = dataclasses.replace(rc, model=model_cfg)
    else:
        vocab = task_vocab_size(cfg)
    return abstract_role_model(rc, vocab, mesh, cfg.rules, rc.train.seed), vocab


def _batch(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_train_step(cfg: Config, role: str, mesh):
    """Lower and compile `role`'s train step on abstract, sharded state (nothing is allocated)."""
    rc = cfg.role(role)
    if rc.train.batch_size % shd.batch_divisor(mesh):
        raise LaunchError(
            f"{role}.train.batch_size={rc.train.batch_size} is not divisible by mesh data*fsdp = {shd.batch_divisor(mesh)}"
        )
    model, vocab = _abstract_model(cfg, role, mesh)
    graphdef, params, param_shardings = model.graphdef, model.params, model.param_shardings
    tx = make_optimizer(rc.train)
    state_shardings = train_state_shardings(tx, params, param_shardings, mesh)
    state = {
        "params": _abstract(params, param_shardings),
        "opt_state": _abstract(jax.eval_shape(tx.init, params), state_shardings["opt_state"]),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=state_shardings["step"]),
    }
    # Rows as Trainer.training_data makes them: int32 tokens and a float32 loss mask, task.max_len wide.
    shape = (rc.train.batch_size, cfg.task.max_len)
    batch = {
        "tokens_bt": _batch(shape, np.int32, shd.batch_sharding(mesh)),
        "loss_mask_bt": _batch(shape, np.float32, shd.batch_sharding(mesh)),
    }
    step = make_train_step(graphdef, tx, state_shardings, mesh)
    return step.lower(state, batch).compile(), tfm.param_count(params), vocab


_DECODE_COST = {"standard": 0, "poe": 1, "strategic_poe": 1, "ads_fd": 2, "ads": 3, "strategic_ads": 3}


def compile_decode(cfg: Config, mesh):
    """The teacher's defended decoding as the protocol runs it (the costliest defense of protocol.defenses)."""
    from experiments.protocol import defense_setup
    from models.sampling import generate

    models = {r: _abstract_model(cfg, r, mesh)[0] for r in ("teacher", "proxy")}
    d = max(cfg.protocol.defenses, key=lambda d: _DECODE_COST[d.name])
    if d.name == "ads_fd":  # same experts as PoE plus one more proxy copy; its params need real arithmetic
        d = dataclasses.replace(d, name="poe", strength=0.5)
    combiner, specs, params, tangents = defense_setup(d, models, models["proxy"].params, cfg.protocol.temperature)
    b = max(shd.batch_divisor(mesh), cfg.sample.batch_size // shd.batch_divisor(mesh) * shd.batch_divisor(mesh))
    p = max(1, cfg.task.max_len - cfg.sample.max_new_tokens)  # the prompt budget of a row
    rng = jax.eval_shape(lambda: jax.random.key(0))
    compiled = generate.lower(
        specs,
        params,
        _batch((b, p), np.int32, shd.batch_sharding(mesh, 2)),
        _batch((b,), np.int32, shd.batch_sharding(mesh, 1)),
        _batch(rng.shape, rng.dtype, shd.replicated(mesh)),
        combiner=combiner,
        max_new_tokens=cfg.sample.max_new_tokens,
        eos_id=0,
        pad_id=0,
        greedy=False,
        top_p=cfg.sample.top_p,
        expose_k=cfg.protocol.expose_k,
        tangents=tangents,
    ).compile()
    n_params = sum(tfm.param_count(m.params) for m in models.values())
    return (
        compiled,
        n_params,
        f"{d.label} decode, {b} prompts x ({p} + {cfg.sample.max_new_tokens}) tokens",
        (b, p + cfg.sample.max_new_tokens),
    )


def compile_proxy_gradient(cfg: Config, mesh):
    """One chunk of the proxy's held-out gradient g_P, as `protocol.mean_nll_grad` computes it (rows sharded over
    the batch axes, protocol.distill.heldout_batch at a time)."""
    from experiments.chunked import row_chunks

    proxy, _ = _abstract_model(cfg, "proxy", mesh)
    _, n = row_chunks(cfg.task.n_heldout, cfg.protocol.distill.heldout_batch, mesh)
    shape = (n, cfg.task.max_len)
    rows = _batch(shape, np.int32, shd.batch_sharding(mesh)), _batch(shape, np.float32, shd.batch_sharding(mesh))
    grad = jax.jit(jax.grad(lambda p, t, m: masked_nll(proxy.graphdef, p, t, m)))
    compiled = grad.lower(proxy.params, *rows).compile()
    return compiled, tfm.param_count(proxy.params), f"g_P chunk of {n} held-out traces", shape


def compile_distill_step(cfg: Config, mesh):
    """One step of the protocol's student distillation (all protocol.seeds under vmap; LoRA or full)."""
    from experiments.distillation import distill_optimizer, make_distill_step

    dc, seeds = cfg.protocol.distill, cfg.protocol.seeds
    student, _ = _abstract_model(cfg, "student", mesh)
    kind = "adaptive" if dc.betas else "passive"
    step = make_distill_step(student.graphdef, None, dc, kind, cfg.protocol.temperature)
    rep = shd.replicated(mesh)
    if dc.finetune == "lora":
        trained = jax.eval_shape(
            lambda: jax.vmap(lambda k: lora.init_adapters(student.params, student.cfg, dc.lora, k))(
                jax.random.split(jax.random.key(0), seeds)
            )
        )
        trained = jax.tree.map(lambda x: _batch(x.shape, x.dtype, rep), trained)  # adapters are small: replicated
        frozen = student.params
    else:  # every seed's copy of the student, sharded like the student
        trained = jax.tree.map(
            lambda x: _batch((seeds, *x.shape), x.dtype, NamedSharding(mesh, PartitionSpec(None, *x.sharding.spec))),
            student.params,
        )
        frozen = None
    opt = jax.eval_shape(jax.vmap(distill_optimizer(dc).init), trained)
    opt = jax.tree.map(lambda x, s=None: _batch(x.shape, x.dtype, rep), opt)
    t = cfg.task.max_len  # the widest a batch gets (tasks.batches.trim_columns cuts unused columns)

    # placed as distillation.distil places them (protocol.seed_rows_sharded: rows over the batch axes when they divide)
    def rows(n):
        return {k: _batch((seeds, n, t), dt, rep) for k, dt in (("tokens_bt", np.int32), ("loss_mask_bt", np.float32))}

    div = shd.batch_divisor(mesh)

    def sharded(d):
        return (
            d
            if div == 1 or any(v.shape[1] % div for v in d.values())
            else {
                k: _batch(
                    v.shape,
                    v.dtype,
                    NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES, *([None] * (len(v.shape) - 2)))),
                )
                for k, v in d.items()
            }
        )

    batch = rows(dc.batch_size) | {
        "topk_ids_btk": _batch((seeds, dc.batch_size, t, 1), np.int32, rep),
        "topk_logprob_btk": _batch((seeds, dc.batch_size, t, 1), np.float32, rep),
    }
    batch, held = sharded(batch), sharded(rows(dc.heldout_batch))
    scalar = _batch((), np.float32, rep)
    compiled = step.lower(trained, opt, frozen, batch, scalar, held, None, scalar).compile()
    n_trained = tfm.param_count(jax.tree.map(lambda x: x, trained)) // seeds
    what = (
        f"{kind} distillation step ({dc.finetune}{f' r={dc.lora.rank}' if dc.finetune == 'lora' else ''}, "
        f"{n_trained:,} trained params per seed), {seeds} seeds x {dc.batch_size} x {t}"
    )
    return compiled, tfm.param_count(student.params), what, (dc.batch_size, t)
