"""`distgame compile-check`: compile the sharded train step for a TPU slice without the hardware.

With libtpu installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies`
describes the devices of a named TPU topology on any machine; the train step that
`Trainer` runs (experiments/train.py: `make_train_step`) is lowered on abstract
state over a mesh of those devices and compiled by the TPU compiler. XLA's
memory analysis then says how many bytes each device needs, and its cost
analysis how many FLOPs one step takes. `--topology local` compiles for this
machine's own devices instead (what CI can run).

No step time is measured here, so no utilisation is claimed: for a device whose peak is known
(`experiments/device_peaks.py`) the report gives FLOPs and HBM bytes per step and the roofline
bound max(FLOPs / bf16 peak, bytes / bandwidth), the least time the step can take there.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

from experiments import device_peaks
from experiments.config import ROLES, Config
from experiments.tasks.arithmetic import encode_problems, make_split
from experiments.tasks.tokenizer import build_tokenizer
from experiments.train import abstract_role_model, make_mesh, make_optimizer, make_train_step, train_state_shardings
from launch.accelerators import LaunchError, Slice, by_topology, check_mesh_fits
from models import sharding as shd
from models import transformer as tfm

GIB = 2**30


def libtpu_missing_message() -> str | None:
    if importlib.util.find_spec("libtpu") is not None:
        return None
    return (f"compile-check for a TPU topology needs libtpu (about 0.7 GB installed), which is not installed: "
            f"pip install -e '.[tpu]' (jax[tpu]=={jax.__version__}); it runs on a CPU-only machine, "
            "or use --topology local for this machine's devices")


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
        raise LaunchError("libtpu is in use by another process (/tmp/libtpu_lockfile); wait for it to finish, or, on a "
                          "machine without TPUs, set ALLOW_MULTIPLE_LIBTPU_LOAD=1") from None
    return list(desc.devices)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_train_step(cfg: Config, role: str, mesh):
    """Lower and compile `role`'s train step on abstract, sharded state (nothing is allocated)."""
    rc, tokenizer = cfg.role(role), build_tokenizer()
    if rc.train.batch_size % shd.batch_divisor(mesh):
        raise LaunchError(f"{role}.train.batch_size={rc.train.batch_size} is not divisible by mesh data*fsdp = {shd.batch_divisor(mesh)}")
    model = abstract_role_model(rc, tokenizer.vocab_size, mesh, cfg.rules, rc.train.seed)
    graphdef, params, param_shardings = model.graphdef, model.params, model.param_shardings
    tx = make_optimizer(rc.train)
    state_shardings = train_state_shardings(tx, params, param_shardings, mesh)
    state = {
        "params": _abstract(params, param_shardings),
        "opt_state": _abstract(jax.eval_shape(tx.init, params), state_shardings["opt_state"]),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=state_shardings["step"]),
    }
    # One real encoded example fixes the batch's dtypes and sequence length, as Trainer.training_data makes them.
    example = encode_problems(make_split(cfg.task, "train", cfg.seed, 1), tokenizer, cfg.task.max_len, with_solution=True)
    batch = {
        k: jax.ShapeDtypeStruct((rc.train.batch_size, *example[k].shape[1:]), example[k].dtype, sharding=shd.batch_sharding(mesh))
        for k in ("tokens_bt", "loss_mask_bt")
    }
    step = make_train_step(graphdef, tx, state_shardings, mesh)
    return step.lower(state, batch).compile(), tfm.param_count(params), tokenizer.vocab_size


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


def role_report(cfg: Config, role: str, mesh) -> dict:
    compiled, n_params, vocab = compile_train_step(cfg, role, mesh)
    mem = compiled.memory_analysis()
    args, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    rc, seq = cfg.role(role), cfg.task.max_len
    model_flops = 3 * tfm.flops_per_token(rc.model, vocab, seq // 2) * rc.train.batch_size * seq / mesh.devices.size
    xla_flops, xla_bytes = _flops(compiled), _cost(compiled, "bytes accessed")
    peak = device_peaks.lookup(mesh.devices.flat[0].device_kind)
    roof = device_peaks.roofline(xla_flops or model_flops, xla_bytes, peak) if peak else None
    if roof:  # the model's own FLOPs at that bound, over the peak: the most MFU this step can show there
        roof["max_mfu"] = model_flops / roof["roofline_bound_s"] / peak.bf16_flops_per_s
    return {
        "role": role,
        "params": n_params,
        "batch_size": rc.train.batch_size,
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
        "roles": [role_report(cfg, role, mesh) for role in roles],
    }


def format_report(r: dict) -> str:
    where = f"{r['accelerator']} ({r['topology']})" if r["accelerator"] else "local devices"
    lines = [f"compile-check: config {r['config']} on {where}: {r['devices']} x {r['device_kind']}, "
             f"{r['hosts']} host(s), mesh {r['mesh']}"]
    hbm = r["hbm_bytes_per_device"]
    for x in r["roles"]:
        fit = ""
        if hbm:
            fit = f" = {x['peak_bytes_estimate'] / hbm:.0%} of {hbm / GIB:g} GiB HBM" + (" (DOES NOT FIT)" if x["peak_bytes_estimate"] > hbm else "")
        flops = f"{x['xla_flops_per_device'] / 1e9:,.1f}" if x["xla_flops_per_device"] is not None else "n/a"
        lines.append(
            f"  {x['role']:<8} {x['params']:>13,} params, batch {x['batch_size']} x {x['seq_len']}: per device "
            f"args {x['argument_bytes'] / GIB:.3f} GiB, temp {x['temp_bytes'] / GIB:.3f} GiB, "
            f"peak ~{x['peak_bytes_estimate'] / GIB:.3f} GiB{fit}; "
            f"GFLOPs/step/device XLA {flops}, model {x['model_flops_per_device'] / 1e9:,.1f}"
        )
        roof = x.get("roofline")
        if roof:
            traffic = x["xla_bytes_accessed_per_device"]
            hbm_part = "n/a" if traffic is None else f"{traffic / GIB:.2f} GiB = {roof['memory_bound_s'] * 1e3:,.2f} ms"
            lines.append(
                f"           roofline on {roof['device']} ({roof['peak_bf16_flops_per_s'] / 1e12:g} TFLOP/s bf16, "
                f"{roof['hbm_bytes_per_s'] / 1e12:g} TB/s): step >= {roof['roofline_bound_s'] * 1e3:,.2f} ms "
                f"({roof['bound_by']}-bound; compute {roof['compute_bound_s'] * 1e3:,.2f} ms, HBM {hbm_part}); "
                f"MFU <= {roof['max_mfu']:.0%}"
            )
    return "\n".join(lines)
