"""Training one role's model: AdamW with warmup + cosine, sharded jit step, orbax resume."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from experiments import io as rio
from experiments import preemption
from experiments.config import Config, ConfigError, RoleConfig, TrainConfig
from experiments.distributed import is_main_process
from experiments.evaluate import single_model_accuracy
from experiments.progress import tqdm  # tqdm's bar on a terminal, a line per 10% in a log file
from experiments.tasks.batches import RowSource, local_batch, trim_columns
from experiments.tasks.registry import Task, build_task
from models import hf_loader
from models import sharding as shd
from models import transformer as tfm
from models.checkpoint import Checkpointer, abstract_like
from models.sampling import ExpertSpec


def float32_moments(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` run in float32 whatever the parameters' dtype: its state (AdamW's moments) is created from float32
    copies of the params, gradients and params are cast to float32 before the update and the updates back to
    the gradients' dtype. For float32 params every cast is a no-op, so the state tree and the checkpoints are
    those of `tx` itself. Why: a bfloat16 second moment loses the small (1 - b2) increments it averages."""

    def to32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if hasattr(x, "astype") else x, tree)

    def update(grads, state, params=None):
        updates, state = tx.update(to32(grads), state, None if params is None else to32(params))
        return jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads), state

    return optax.GradientTransformation(lambda params: tx.init(to32(params)), update)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=min(tc.warmup_steps, tc.steps - 1),
        decay_steps=tc.steps,
        end_value=tc.lr * tc.end_lr_fraction,
    )
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    return float32_moments(optax.chain(*parts, optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay)))


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
    tokenizer: Any = None  # only when the role's tokenizer is not the task's (an HF student: experiments/retokenize.py)

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.graphdef, self.cfg)


def make_mesh(cfg: Config, devices=None) -> Mesh:
    try:
        return shd.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def abstract_role_model(rc: RoleConfig, vocab_size: int, mesh: Mesh, rules: dict, seed: int) -> RoleModel:
    """The model traced abstractly: params are ShapeDtypeStructs carrying the shardings of the rule table."""
    abstract_model = nnx.eval_shape(lambda: tfm.build(rc.model, vocab_size, seed))
    graphdef, abstract_params = tfm.split_params(abstract_model)
    try:
        shardings = shd.param_shardings(tfm.logical_axes(abstract_model), abstract_params, rules, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract_params, shardings)
    return RoleModel(rc.model, graphdef, params, shardings)


def init_role_model(rc: RoleConfig, vocab_size: int, mesh: Mesh, rules: dict, seed: int) -> RoleModel:
    """Build the model abstractly, derive shardings from the rule table, then init each shard in place."""
    model = abstract_role_model(rc, vocab_size, mesh, rules, seed)
    model.params = shd.create_sharded(
        lambda: tfm.split_params(tfm.build(rc.model, vocab_size, seed))[1], model.param_shardings
    )
    return model


def train_state_shardings(tx, params, param_shardings, mesh: Mesh) -> dict:
    """Shardings of the train state {params, opt_state, step}; `params` may be abstract."""
    rep = shd.replicated(mesh)
    return {"params": param_shardings, "opt_state": opt_state_shardings(tx, params, param_shardings, rep), "step": rep}


def make_train_step(graphdef, tx, state_shardings: dict, mesh: Mesh):
    """The jitted sharded step (state, batch) -> (state, metrics), state donated; Trainer and compile-check share it."""
    batch_sh = {"tokens_bt": shd.batch_sharding(mesh), "loss_mask_bt": shd.batch_sharding(mesh)}

    def train_step(state, batch):
        with tfm.reverse_mode_only():  # a plain gradient: attention's hand-written backward
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

    def __init__(self, cfg: Config, role: str, mesh: Mesh, tokenizer=None, task: Task | None = None):
        self.cfg, self.role, self.mesh = cfg, role, mesh
        self.rc = cfg.role(role)
        self.tc = self.rc.train
        if self.tc.batch_size % shd.batch_divisor(mesh):
            raise ConfigError(
                f"{role}.train.batch_size={self.tc.batch_size} is not divisible by mesh data*fsdp = "
                f"{shd.batch_divisor(mesh)}"
            )
        self.task = task or build_task(cfg.task, tokenizer)
        self.tokenizer = self.task.tokenizer
        self.model = init_role_model(self.rc, self.tokenizer.vocab_size, mesh, cfg.rules, self.tc.seed)
        self.tx = make_optimizer(self.tc)
        self.state_shardings = train_state_shardings(self.tx, self.model.params, self.model.param_shardings, mesh)
        self.state = {
            "params": self.model.params,
            "opt_state": jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(self.model.params),
            "step": jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"]),
        }
        self.step_fn = make_train_step(self.model.graphdef, self.tx, self.state_shardings, mesh)
        self.role_dir = rio.path(cfg.run_dir) / role  # local or gs://
        self.ckpt_dir = self.role_dir / "checkpoints"

    # -- data ---------------------------------------------------------------
    def training_data(self) -> RowSource:
        tc = self.tc
        n = tc.n_examples or self.cfg.task.n_train
        easy = self.cfg.easy_max_steps if tc.data == "easy" else None
        return self.task.training_rows(
            self.cfg.seed, n, with_solution=tc.data != "prompts", easy_max_steps=easy, style=tc.style
        )

    def batch_at(self, data: RowSource, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at `step`; deterministic in (seed, step), so a
        resumed run sees exactly the same batches."""
        return local_batch(data, self.tc.batch_size, self.tc.seed, step)

    # -- evaluation -----------------------------------------------------------
    def test_accuracy(self, n: int) -> float:
        problems = self.task.problems("test", self.cfg.seed, n)
        return single_model_accuracy(
            problems,
            self.task,
            self.model.spec,
            self.state["params"],
            self.mesh,
            max_new_tokens=self.cfg.sample.max_new_tokens,
            batch_size=self.cfg.sample.batch_size,
        )

    # -- the loop -------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        """Train to tc.steps, resuming from the latest checkpoint. Every process runs this;
        only process 0 writes metrics, the summary and the progress bar, and all of them
        write the (collective) checkpoints. On SIGTERM: save at the current step, raise Preempted."""
        start = time.perf_counter()
        main = is_main_process()
        ckpt = Checkpointer(self.ckpt_dir, keep=self.tc.keep_checkpoints, label=self.role)
        step = 0
        if ckpt.latest_step() is not None:
            self.state, _ = ckpt.restore(abstract_like(self.state))
            step = int(self.state["step"])
        data = self.training_data()
        log = rio.JsonlLog(self.role_dir / "metrics.jsonl") if main else None
        write = log.write if main else (lambda record: None)
        bar = tqdm(
            total=self.tc.steps, initial=step, desc=f"train {self.role}", disable=not (progress and main), leave=False
        )
        tokens_since, t_last = 0, time.perf_counter()
        try:
            with preemption.checkpointed():  # SIGTERM: save at this step, then stop
                while step < self.tc.steps:
                    batch = self.batch_at(data, step)  # this process's rows of the global batch
                    if jax.process_count() == 1:  # processes would disagree on the width of their own rows
                        batch = trim_columns(batch)
                    self.state, metrics = self.step_fn(self.state, shd.shard_batch(batch, self.mesh))
                    step += 1
                    tokens_since += int(np.sum(batch["tokens_bt"] != self.tokenizer.pad_id))
                    if step % self.tc.log_every == 0 or step == self.tc.steps:
                        loss = float(metrics["loss"])
                        now = time.perf_counter()
                        tok_s = tokens_since / (now - t_last)
                        tokens_since, t_last = 0, now
                        if not np.isfinite(loss):
                            raise FloatingPointError(f"{self.role}: loss became {loss} at step {step}; lower train.lr")
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
                        write(
                            {
                                "step": step,
                                "loss": loss,
                                "grad_norm": float(metrics["grad_norm"]),
                                "tokens_per_s": tok_s,
                            }
                        )
                    bar.update(1)
                    if self.tc.eval_every and step % self.tc.eval_every == 0 and step < self.tc.steps:
                        acc = self.test_accuracy(self.tc.eval_size)
                        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", acc=f"{acc:.3f}")
                        write({"step": step, "test_accuracy": acc, "n": self.tc.eval_size})
                    preempted = (
                        step < self.tc.steps
                        and step % self.tc.preemption_check_every == 0
                        and preemption.stop_requested()
                    )  # same decision on every process
                    if (
                        preempted
                        or step == self.tc.steps
                        or (self.tc.checkpoint_every and step % self.tc.checkpoint_every == 0)
                    ):
                        ckpt.save(step, self.state, {"role": self.role, "step": step})
                    if log is not None:
                        log.flush()
                    if preempted:
                        raise preemption.Preempted(
                            f"{self.role}: preempted at step {step}/{self.tc.steps}; checkpoint saved in {self.ckpt_dir}"
                        )
        finally:
            bar.close()
            if log is not None:
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
            "checkpoint": str(self.ckpt_dir if rio.is_remote(self.ckpt_dir) else self.ckpt_dir.absolute()),
        }
        if main:
            rio.save_json(self.role_dir / "summary.json", summary)
        return summary


def load_role_params(cfg: Config, role: str, mesh: Mesh, vocab_size: int) -> RoleModel:
    """Restore a trained role's params (only) onto the mesh from its latest checkpoint."""
    rc = cfg.role(role)
    model = abstract_role_model(
        rc, vocab_size, mesh, cfg.rules, rc.train.seed
    )  # no init: the checkpoint has the values
    tx = make_optimizer(rc.train)
    rep = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, model.params)
    opt_shardings = opt_state_shardings(tx, model.params, model.param_shardings, rep)
    target = {
        "params": model.params,
        "opt_state": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, opt_shardings
        ),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    }
    ckpt = Checkpointer(rio.path(cfg.run_dir) / role / "checkpoints", create=False)
    try:
        state, _ = ckpt.restore(target)
    finally:
        ckpt.close()
    model.params = state["params"]
    return model


def hf_overrides(rc: RoleConfig) -> dict[str, Any]:
    """The ModelConfig fields a config sets on top of an HF role's config.json."""
    overrides: dict[str, Any] = {"compute_dtype": rc.model.compute_dtype, "param_dtype": rc.model.param_dtype}
    if rc.model.vocab_rows:
        overrides["vocab_rows"] = rc.model.vocab_rows
    return overrides


def load_hf_role(cfg: Config, role: str, mesh: Mesh) -> tuple[RoleModel, Any]:
    """A role whose `hf_dir` is set: its converted model on the mesh, and its `tokenizers.Tokenizer`."""
    rc = cfg.role(role)
    overrides = hf_overrides(rc)
    cache = rio.path(cfg.run_dir) / role / "hf_converted" if rc.hf_cache else None
    try:
        loaded = hf_loader.load_or_convert(rc.hf_dir, cache, mesh, cfg.rules, **overrides)
    except hf_loader.HFLoadError as e:
        raise hf_loader.HFLoadError(f"{role}.hf_dir: {e}") from None
    except ValueError as e:  # a parameter dim the mesh does not divide
        raise ConfigError(f"{role}.hf_dir={rc.hf_dir!r}: {e}") from None
    return RoleModel(loaded.cfg, loaded.graphdef, loaded.params, loaded.param_shardings), loaded.tokenizer
