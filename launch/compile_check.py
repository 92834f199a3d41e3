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

The compiled programs themselves are in launch/compile_steps.py.
"""

from __future__ import annotations

import importlib.util
import re

import jax

from experiments import device_peaks
from experiments.config import ROLES, Config
from experiments.train import make_mesh
from launch.accelerators import LaunchError, Slice, by_topology, check_mesh_fits
from launch.compile_steps import (
    compile_decode,
    compile_distill_step,
    compile_proxy_gradient,
    compile_train_step,
)
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
