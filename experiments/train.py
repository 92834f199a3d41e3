"""Training one role's model: AdamW with warmup + cosine, sharded jit step, orbax resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from experiments.config import Config, ConfigError, RoleConfig, TrainConfig
from experiments.evaluate import single_model_accuracy
from experiments.tasks.arithmetic import encode_problems, make_split
from experiments.tasks.tokenizer import Tokenizer, build_tokenizer
from models import sharding as shd
from models import transformer as tfm
from models.checkpoint import Checkpointer, abstract_like
from models.sampling import ExpertSpec


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=min(tc.warmup_steps, tc.steps - 1),
        decay_steps=tc.steps,
        end_value=tc.lr * tc.end_lr_fraction,
    )
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    return optax.chain(*parts, optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay))


def masked_nll(graphdef, params, tokens_bt, loss_mask_bt) -> jax.Array:
    """Mean next-token NLL over the masked target tokens of the whole (global) batch."""
    logp_bt = tfm.token_logprobs(graphdef, params, tokens_bt)
    mask_bt = loss_mask_bt[:, :-1]
    return -jnp.sum(logp_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def opt_state_shardings(tx, params, param_shardings, replicated):
    """Optimizer moments take their parameter's sharding; counters and other scalars are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract, param_shardings, transform_non_params=lambda _: replicated
    )


@dataclasses.dataclass
class RoleModel:
    """A role's model on the mesh: static graph, sharded params and their shardings."""

    cfg: tfm.ModelConfig
    graphdef: Any
    params: Any
    param_shardings: Any

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.graphdef, self.cfg)


def make_mesh(cfg: Config, devices=None) -> Mesh:
    try:
        return shd.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def abstract_role_model(rc: RoleConfig, vocab_size: int, mesh: Mesh, rules: dict, seed: int):
    """(graphdef, abstract params, param shardings) from the rule table, allocating nothing."""
    abstract_model = nnx.eval_shape(lambda: tfm.build(rc.model, vocab_size, seed))
    graphdef, abstract_params = tfm.split_params(abstract_model)
    try:
        shardings = shd.param_shardings(tfm.logical_axes(abstract_model), abstract_params, rules, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return graphdef, abstract_params, shardings


def init_role_model(rc: RoleConfig, vocab_size: int, mesh: Mesh, rules: dict, seed: int) -> RoleModel:
    """Build the model abstractly, derive shardings from the rule table, then init each shard in place."""
    graphdef, _, shardings = abstract_role_model(rc, vocab_size, mesh, rules, seed)
    params = shd.create_sharded(lambda: tfm.split_params(tfm.build(rc.model, vocab_size, seed))[1], shardings)
    return RoleModel(rc.model, graphdef, params, shardings)


def train_state_shardings(tx, params, param_shardings, mesh: Mesh) -> dict:
    """Shardings of the train state {params, opt_state, step}; `params` may be abstract."""
    rep = shd.replicated(mesh)
    return {"params": param_shardings, "opt_state": opt_state_shardings(tx, params, param_shardings, rep), "step": rep}


def make_train_step(graphdef, tx, state_shardings: dict, mesh: Mesh):
    """The jitted sharded step (state, batch) -> (state, metrics), state donated; Trainer and compile-check share it."""
    batch_sh = {"tokens_bt": shd.batch_sharding(mesh), "loss_mask_bt": shd.batch_sharding(mesh)}

    def train_step(state, batch):
        loss, grads = jax.value_and_grad(masked_nll, argnums=1)(
            graphdef, state["params"], batch["tokens_bt"], batch["loss_mask_bt"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )


class Trainer:
    """Owns one role's train state, its jitted sharded step, and its checkpoints."""

    def __init__(self, cfg: Config, role: str, mesh: Mesh, tokenizer: Tokenizer | None = None):
        self.cfg, self.role, self.mesh = cfg, role, mesh
        self.rc = cfg.role(role)
        self.tc = self.rc.train
        if self.tc.batch_size % shd.batch_divisor(mesh):
            raise ConfigError(
                f"{role}.train.batch_size={self.tc.batch_size} is not divisible by mesh data*fsdp = "
                f"{shd.batch_divisor(mesh)}"
            )
        self.tokenizer = tokenizer or build_tokenizer()
        self.model = init_role_model(self.rc, self.tokenizer.vocab_size, mesh, cfg.rules, self.tc.seed)
        self.tx = make_optimizer(self.tc)
        self.state_shardings = train_state_shardings(self.tx, self.model.params, self.model.param_shardings, mesh)
        self.state = {
            "params": self.model.params,
            "opt_state": jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(self.model.params),
            "step": jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"]),
        }
        self.step_fn = make_train_step(self.model.graphdef, self.tx, self.state_shardings, mesh)
        self.role_dir = pathlib.Path(cfg.run_dir) / role
        self.ckpt_dir = self.role_dir / "checkpoints"

    # -- data ---------------------------------------------------------------
    def training_data(self) -> dict[str, np.ndarray]:
        task, tc = self.cfg.task, self.tc
        n = tc.n_examples or task.n_train
        steps = {"min_steps": 1, "max_steps": self.cfg.easy_max_steps} if tc.data == "easy" else {}
        problems = make_split(task, "train", self.cfg.seed, n, **steps)
        data = encode_problems(problems, self.tokenizer, task.max_len, with_solution=tc.data != "prompts")
        return {"tokens_bt": data["tokens_bt"], "loss_mask_bt": data["loss_mask_bt"]}

    def batch_at(self, data: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """Deterministic in (seed, step), so a resumed run sees exactly the same batches."""
        n, bs = len(data["tokens_bt"]), self.tc.batch_size
        per_epoch = max(n // bs, 1)
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([self.tc.seed, epoch]).permutation(n)
        idx = order[offset * bs : offset * bs + bs]
        if len(idx) < bs:
            idx = np.resize(order, bs)
        return {k: v[idx] for k, v in data.items()}

    # -- evaluation -----------------------------------------------------------
    def test_accuracy(self, n: int) -> float:
        problems = make_split(self.cfg.task, "test", self.cfg.seed, n)
        return single_model_accuracy(
            problems,
            self.tokenizer,
            self.model.spec,
            self.state["params"],
            self.mesh,
            max_new_tokens=self.cfg.sample.max_new_tokens,
            batch_size=self.cfg.sample.batch_size,
        )

    # -- the loop -------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        start = time.perf_counter()
        ckpt = Checkpointer(self.ckpt_dir, keep=self.tc.keep_checkpoints)
        step = 0
        if ckpt.latest_step() is not None:
            self.state, _ = ckpt.restore(abstract_like(self.state))
            step = int(self.state["step"])
        data = self.training_data()
        self.role_dir.mkdir(parents=True, exist_ok=True)
        log = (self.role_dir / "metrics.jsonl").open("a")
        bar = tqdm(total=self.tc.steps, initial=step, desc=f"train {self.role}", disable=not progress, leave=False)
        tokens_since, t_last = 0, time.perf_counter()
        try:
            while step < self.tc.steps:
                batch = self.batch_at(data, step)
                self.state, metrics = self.step_fn(self.state, shd.shard_batch(batch, self.mesh))
                step += 1
                tokens_since += int(np.sum(batch["tokens_bt"] != self.tokenizer.pad_id))
                if step % 25 == 0 or step == self.tc.steps:
                    loss = float(metrics["loss"])
                    now = time.perf_counter()
                    tok_s = tokens_since / (now - t_last)
                    tokens_since, t_last = 0, now
                    if not np.isfinite(loss):
                        raise FloatingPointError(f"{self.role}: loss became {loss} at step {step}; lower train.lr")
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
                    log.write(json.dumps({"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tok_s}) + "\n")
                bar.update(1)
                if self.tc.eval_every and step % self.tc.eval_every == 0 and step < self.tc.steps:
                    acc = self.test_accuracy(self.tc.eval_size)
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", acc=f"{acc:.3f}")
                    log.write(json.dumps({"step": step, "test_accuracy": acc, "n": self.tc.eval_size}) + "\n")
                if step == self.tc.steps or (self.tc.checkpoint_every and step % self.tc.checkpoint_every == 0):
                    ckpt.save(step, self.state, {"role": self.role, "step": step})
                log.flush()
        finally:
            bar.close()
            log.close()
            ckpt.close()
        train_seconds = time.perf_counter() - start
        acc = self.test_accuracy(self.cfg.task.n_test)
        summary = {
            "role": self.role,
            "test_accuracy": acc,
            "n_test": self.cfg.task.n_test,
            "steps": step,
            "seconds": round(time.perf_counter() - start, 2),
            "train_seconds": round(train_seconds, 2),
            "params": tfm.param_count(self.state["params"]),
            "checkpoint": str(self.ckpt_dir.absolute()),
        }
        (self.role_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def load_role_params(cfg: Config, role: str, mesh: Mesh, vocab_size: int) -> RoleModel:
    """Restore a trained role's params (only) onto the mesh from its latest checkpoint."""
    rc = cfg.role(role)
    model = init_role_model(rc, vocab_size, mesh, cfg.rules, rc.train.seed)
    tx = make_optimizer(rc.train)
    rep = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, model.params)
    opt_shardings = opt_state_shardings(tx, model.params, model.param_shardings, rep)
    target = {
        "params": abstract_like(model.params),
        "opt_state": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, opt_shardings),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    }
    ckpt = Checkpointer(pathlib.Path(cfg.run_dir) / role / "checkpoints", create=False)
    try:
        state, _ = ckpt.restore(target)
    finally:
        ckpt.close()
    model.params = state["params"]
    return model
