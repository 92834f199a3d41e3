"""`distgame compile-check`: compile the sharded train step for a TPU slice without the hardware.

With libtpu installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies`
describes the devices of a named TPU topology on any machine; the train step that
`Trainer` runs (experiments/train.py: `make_train_step`) is lowered on abstract
state over a mesh of those devices and compiled by the TPU compiler. XLA's
memory analysis then says how many bytes each device needs, and its cost
analysis how many FLOPs one step takes. `--topology local` compiles for this
machine's own devices instead (what CI can run).

A role loaded from Hugging Face (`ROLE.hf_dir`) is not trained by the protocol, so its report is the step
the protocol runs with it instead: the teacher's defended decoding (teacher + proxy, the costliest defense of
`protocol.defenses`, `sample.batch_size` prompts, `sample.max_new_tokens` new tokens), the proxy's held-out
gradient g_P (`task.n_heldout` rows), and the student's distillation step (`protocol.distill`, LoRA or full,
all seeds under vmap). Its architecture comes from `hf_dir/config.json`, or, when that cannot be read (a
placeholder bucket, no credentials), from the copy of the published config in `models/hf_configs/` named
like the directory, so the paper configs compile anywhere; `model.param_dtype` and friends apply on top.

No step time is measured here, so no utilisation is claimed: for a device whose peak is known
(`experiments/device_peaks.py`) the report gives FLOPs and HBM bytes per step and the roofline
bound max(FLOPs / bf16 peak, bytes / bandwidth), the least time the step can take there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments import device_peaks
from experiments.config import ROLES, Config
from experiments.tasks.tokenizer import build_tokenizer
from experiments.train import (
    RoleModel,
    abstract_role_model,
    hf_overrides,
    make_mesh,
    make_optimizer,
    make_train_step,
    masked_nll,
    train_state_shardings,
)
from launch.accelerators import LaunchError, Slice, by_topology, check_mesh_fits
from models import hf_config, lora
from models import sharding as shd
from models import transformer as tfm

GIB = 2**30


def libtpu_missing_message() -> str | None:
    if importlib.util.find_spec("libtpu") is not None:
        return None
    return (
        f"compile-check for a TPU topology needs libtpu (about 0.7 GB installed), which is not installed: "
        f"pip install -e '.[tpu]' (jax[tpu]=={jax.__version__}); it runs on a CPU-only machine, "
        "or use --topology local for this machine's devices"
    )


def topology_devices(slice_: Slice) -> list:
    """Device descriptions of a TPU slice, on a machine without TPUs (needs libtpu)."""
    message = libtpu_missing_message()
    if message:
        raise LaunchError(message)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=slice_.topology,
            chip_config_name=slice_.chip_config_name,
            chips_per_host_bounds=slice_.chips_per_host_bounds,
            num_slices=1,
        )
    except jax.errors.JaxRuntimeError as e:
        if "lockfile" not in str(e):
            raise
        raise LaunchError(
            "libtpu is in use by another process (/tmp/libtpu_lockfile); wait for it to finish, or, on a "
            "machine without TPUs, set ALLOW_MULTIPLE_LIBTPU_LOAD=1"
        ) from None
    return list(desc.devices)


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
    from experiments.protocol import distill_optimizer, make_distill_step

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
    t = cfg.task.max_len  # the widest a batch gets (protocol.trim_columns cuts unused columns)

    # placed as protocol.distil places them (protocol.seed_rows_sharded: rows over the batch axes when they divide)
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


def _cost(compiled, key: str) -> float | None:
    """One figure of XLA's cost analysis ("flops", "bytes accessed") per device, if the backend has it."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost[key]) if cost and key in cost else None


def _flops(compiled) -> float | None:
    return _cost(compiled, "flops")


def _out_of_memory(role: str, error: Exception) -> dict | None:
    """The TPU compiler refuses a program that cannot fit; that is a finding for the report, not a crash."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    need = re.search(r"\(([\d.]+)([KMGT])\)", text)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    first = next((line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line), text.splitlines()[0])
    return {
        "role": role,
        "fits": False,
        "error": first.strip()[:300],
        "temp_bytes_needed": None if need is None else int(float(need.group(1)) * scale[need.group(2)]),
    }


def role_report(cfg: Config, role: str, mesh) -> dict:
    rc = cfg.role(role)
    model_flops = None
    try:
        if rc.hf_dir and role == "teacher":
            compiled, n_params, what, (batch, seq) = compile_decode(cfg, mesh)
        elif rc.hf_dir and role == "proxy":
            compiled, n_params, what, (batch, seq) = compile_proxy_gradient(cfg, mesh)
        elif rc.hf_dir:
            compiled, n_params, what, (batch, seq) = compile_distill_step(cfg, mesh)
        else:
            compiled, n_params, vocab = compile_train_step(cfg, role, mesh)
            batch, seq, what = rc.train.batch_size, cfg.task.max_len, "train step (AdamW)"
            model_flops = 3 * tfm.flops_per_token(rc.model, vocab, seq // 2) * batch * seq / mesh.devices.size
    except jax.errors.JaxRuntimeError as e:
        report = _out_of_memory(role, e)
        if report is None:
            raise
        return report
    mem = compiled.memory_analysis()
    args, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    xla_flops, xla_bytes = _flops(compiled), _cost(compiled, "bytes accessed")
    peak = device_peaks.lookup(mesh.devices.flat[0].device_kind)
    roof = (
        device_peaks.roofline(xla_flops or model_flops, xla_bytes, peak)
        if peak and (xla_flops or model_flops)
        else None
    )
    if (
        roof and model_flops
    ):  # the model's own FLOPs at that bound, over the peak: the most MFU this step can show there
        roof["max_mfu"] = model_flops / roof["roofline_bound_s"] / peak.bf16_flops_per_s
    return {
        "role": role,
        "fits": None,  # set by run_compile_check against the slice's HBM
        "step": what,
        "params": n_params,
        "batch_size": batch,
        "seq_len": seq,
        "argument_bytes": args,
        "output_bytes": out,
        "alias_bytes": alias,  # donated state: outputs reuse the argument buffers
        "temp_bytes": temp,
        "peak_bytes_estimate": args + out - alias + temp,
        "xla_flops_per_device": xla_flops,
        "xla_bytes_accessed_per_device": xla_bytes,
        "model_flops_per_device": model_flops,
        "roofline": roof,
    }


def run_compile_check(cfg: Config, topology: str, roles: tuple[str, ...] = ROLES) -> dict:
    if topology == "local":
        slice_, devices = None, jax.devices()
        mesh = make_mesh(cfg, devices)
    else:
        slice_ = by_topology(topology)
        check_mesh_fits(cfg.mesh, slice_, where=f"config {cfg.name!r}: mesh")
        mesh = make_mesh(cfg, topology_devices(slice_))
    return {
        "config": cfg.name,
        "topology": topology if slice_ is None else slice_.topology,
        "accelerator": None if slice_ is None else slice_.accelerator_type,
        "device_kind": mesh.devices.flat[0].device_kind,
        "devices": int(mesh.devices.size),
        "hosts": 1 if slice_ is None else slice_.hosts,
        "mesh": dict(mesh.shape),
        "hbm_bytes_per_device": None if slice_ is None else int(slice_.hbm_gib * GIB),
        "roles": [
            _fits(role_report(cfg, role, mesh), None if slice_ is None else slice_.hbm_gib * GIB) for role in roles
        ],
    }


def _fits(report: dict, hbm: float | None) -> dict:
    if report.get("fits") is None:
        report["fits"] = None if hbm is None else report["peak_bytes_estimate"] <= hbm
    return report


def format_report(r: dict) -> str:
    where = f"{r['accelerator']} ({r['topology']})" if r["accelerator"] else "local devices"
    lines = [
        f"compile-check: config {r['config']} on {where}: {r['devices']} x {r['device_kind']}, "
        f"{r['hosts']} host(s), mesh {r['mesh']}"
    ]
    hbm = r["hbm_bytes_per_device"]
    for x in r["roles"]:
        if "error" in x:
            need = (
                ""
                if x["temp_bytes_needed"] is None
                else f": needs {x['temp_bytes_needed'] / GIB:,.1f} GiB of temporaries"
            )
            lines.append(f"  {x['role']:<8} DOES NOT FIT{need} ({x['error']})")
            continue
        fit = ""
        if hbm:
            fit = f" = {x['peak_bytes_estimate'] / hbm:.0%} of {hbm / GIB:g} GiB HBM" + (
                " (DOES NOT FIT)" if x["peak_bytes_estimate"] > hbm else ""
            )
        flops = f"{x['xla_flops_per_device'] / 1e9:,.1f}" if x["xla_flops_per_device"] is not None else "n/a"
        model = "" if x["model_flops_per_device"] is None else f", model {x['model_flops_per_device'] / 1e9:,.1f}"
        lines.append(
            f"  {x['role']:<8} {x['params']:>13,} params, {x.get('step', 'train step')}, batch {x['batch_size']} x "
            f"{x['seq_len']}: per device args {x['argument_bytes'] / GIB:.3f} GiB, temp {x['temp_bytes'] / GIB:.3f} GiB, "
            f"peak ~{x['peak_bytes_estimate'] / GIB:.3f} GiB{fit}; GFLOPs/step/device XLA {flops}{model}"
        )
        roof = x.get("roofline")
        if roof:
            traffic = x["xla_bytes_accessed_per_device"]
            hbm_part = "n/a" if traffic is None else f"{traffic / GIB:.2f} GiB = {roof['memory_bound_s'] * 1e3:,.2f} ms"
            lines.append(
                f"           roofline on {roof['device']} ({roof['peak_bf16_flops_per_s'] / 1e12:g} TFLOP/s bf16, "
                f"{roof['hbm_bytes_per_s'] / 1e12:g} TB/s): step >= {roof['roofline_bound_s'] * 1e3:,.2f} ms "
                f"({roof['bound_by']}-bound; compute {roof['compute_bound_s'] * 1e3:,.2f} ms, HBM {hbm_part})"
                + (f"; MFU <= {roof['max_mfu']:.0%}" if "max_mfu" in roof else "")
            )
    return "\n".join(lines)
