"""Joining several processes (hosts) into one JAX program with `jax.distributed`.

Where the settings come from, highest priority first:
1. environment: DISTGAME_COORDINATOR ("host:port"), DISTGAME_NUM_PROCESSES, DISTGAME_PROCESS_ID;
2. the config section `distributed:` (coordinator_address, num_processes, process_id, ...);
3. on a Cloud TPU VM with neither: `jax.distributed.initialize()` with no arguments
   (JAX reads the slice's workers from the TPU metadata).
Nothing set and no TPU: one process, no initialisation.

`initialize_distributed` must run before anything touches a jax backend (jax.devices(),
any computation); the CLI calls it right after loading the config.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

from experiments.fields import documented as _help

ENV_COORDINATOR = "DISTGAME_COORDINATOR"
ENV_NUM_PROCESSES = "DISTGAME_NUM_PROCESSES"
ENV_PROCESS_ID = "DISTGAME_PROCESS_ID"
CPU_COLLECTIVES = ("gloo", "mpi", "none")


class CoordinatorError(RuntimeError):
    """The coordinator could not be reached, or the settings are inconsistent (the CLI exits 2)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) settings; env DISTGAME_COORDINATOR / DISTGAME_NUM_PROCESSES /
    DISTGAME_PROCESS_ID override the first three."""

    mode: str = _help(
        "'auto': join when a coordinator is configured (here or in the environment) or on a Cloud TPU VM, "
        "else run as one process; 'off': never call jax.distributed",
        "auto",
    )
    coordinator_address: str = _help("host:port of process 0's coordinator (empty = not set)", "")
    num_processes: int = _help("number of processes in the job (0 = not set)", 0)
    process_id: int = _help("this process's id in [0, num_processes) (-1 = not set)", -1)
    initialization_timeout: int = _help("seconds to wait for the coordinator and the other processes", 300)
    cpu_collectives: str = _help(
        "cross-process collectives on CPU: 'gloo', 'mpi' or 'none' (TPU/GPU ignore this)", "gloo"
    )

    def validate(self) -> None:
        if self.mode not in ("auto", "off"):
            raise ValueError(f"distributed.mode={self.mode!r} must be 'auto' or 'off'")
        if self.initialization_timeout < 1:
            raise ValueError(f"distributed.initialization_timeout={self.initialization_timeout} must be >= 1 second")
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise ValueError(
                f"distributed.cpu_collectives={self.cpu_collectives!r} must be one of {', '.join(CPU_COLLECTIVES)}"
            )


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What will be passed to jax.distributed.initialize (None = let JAX detect it)."""

    kind: str  # "single", "explicit" or "tpu"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _env_int(env, name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise CoordinatorError(f"environment {name}={raw!r} must be an integer") from None


def on_cloud_tpu_vm(env=os.environ) -> bool:
    """TPU chips on this VM's PCI bus (JAX's own check, which reads sysfs and starts no
    backend), or the TPU runtime's environment variables."""
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_ACCELERATOR_TYPE"):
        return True
    try:
        from jax._src import hardware_utils  # private, hence the fallback

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:
        return os.path.exists("/dev/accel0")


def keep_off_absent_tpu(env=os.environ) -> bool:
    """With libtpu installed (the `test` extra) on a machine without TPU chips, JAX would try
    the TPU first and print libtpu's initialisation warnings on every command: use the CPU
    instead, unless the user chose platforms (JAX_PLATFORMS) or a GPU plugin is installed.
    compile-check still finds the TPU compiler (topologies do not need the TPU backend).
    Returns whether it switched."""
    import importlib.util

    if "JAX_PLATFORMS" in env or importlib.util.find_spec("libtpu") is None or on_cloud_tpu_vm(env):
        return False
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")):
        return False
    import jax

    jax.config.update("jax_platforms", "cpu")
    return True


ENV_CPU_DEVICES = "DISTGAME_CPU_DEVICES"


def cpu_device_count(env=os.environ, cores: int | None = None) -> int | None:
    """How many CPU devices `cpu_devices_per_core` gives JAX: $DISTGAME_CPU_DEVICES, else the largest power of
    two <= min(cores, 8); None when the user already chose (XLA_FLAGS' --xla_force_host_platform_device_count,
    or JAX_NUM_CPU_DEVICES)."""
    if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "") or "JAX_NUM_CPU_DEVICES" in env:
        return None
    count = _env_int(env, ENV_CPU_DEVICES)
    if count is not None:
        if count < 1:
            raise CoordinatorError(f"environment {ENV_CPU_DEVICES}={count} must be >= 1 (1 = one CPU device)")
        return count
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 << (min(cores, 8).bit_length() - 1)


def cpu_devices_per_core(env=os.environ) -> int | None:
    """Give JAX one CPU device per core (`cpu_device_count`) instead of one device whose every op is split over
    all cores. The mesh's `data: -1` then runs the batch's shards side by side: decoding, a long chain of small
    matmuls where handing each op to the thread pool costs as much as the op, ran 1.6-1.8x faster on a 2-core
    machine (`distgame bench`, runs alternating 1 and 2 devices); a power of two so that the configs' batch
    sizes divide. Must run before anything touches a jax backend; no effect on GPU/TPU devices. Returns the
    count it set, or None."""
    count = cpu_device_count(env)
    if count is not None:
        import jax

        jax.config.update("jax_num_cpu_devices", count)
    return count


def resolve(dc: DistributedConfig, env=os.environ, tpu: bool | None = None) -> Resolved:
    """Merge config and environment (environment wins) and check them."""
    if dc.mode == "off":
        return Resolved("single")
    address = env.get(ENV_COORDINATOR) or dc.coordinator_address or None
    num = _env_int(env, ENV_NUM_PROCESSES)
    num = num if num is not None else (dc.num_processes or None)
    pid = _env_int(env, ENV_PROCESS_ID)
    pid = pid if pid is not None else (dc.process_id if dc.process_id >= 0 else None)
    if address is None and num is None and pid is None:
        on_tpu = on_cloud_tpu_vm(env) if tpu is None else tpu
        return Resolved("tpu") if on_tpu else Resolved("single")
    missing = [
        name
        for name, v in (
            (f"coordinator_address ({ENV_COORDINATOR})", address),
            (f"num_processes ({ENV_NUM_PROCESSES})", num),
            (f"process_id ({ENV_PROCESS_ID})", pid),
        )
        if v is None
    ]
    if missing:
        raise CoordinatorError(f"distributed: {', '.join(missing)} not set; a multi-process run needs all three")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CoordinatorError(f"distributed: coordinator address {address!r} must look like host:port")
    if num < 1 or not 0 <= pid < num:
        raise CoordinatorError(f"distributed: process_id={pid} must lie in [0, num_processes={num})")
    return Resolved("explicit", address, num, pid)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Process i > 0 checks that process 0's coordinator accepts connections before handing
    over to JAX, whose own timeout aborts the whole process (SIGABRT, C++ stack trace)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise CoordinatorError(
                    f"distributed: coordinator {address} did not answer within {timeout:g}s "
                    "(distributed.initialization_timeout); start process 0 first or check the address and port"
                ) from None
            time.sleep(0.2)


def initialize_distributed(dc: DistributedConfig, env=os.environ) -> Resolved:
    """Join the job described by config + environment; a no-op for a single process."""
    import jax

    resolved = resolve(dc, env)
    if resolved.kind == "single" or jax.distributed.is_initialized():
        return resolved
    if resolved.kind == "tpu":
        jax.distributed.initialize(initialization_timeout=dc.initialization_timeout)
        return resolved
    if dc.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", dc.cpu_collectives)
    if resolved.process_id != 0:
        _wait_for_coordinator(resolved.coordinator_address, dc.initialization_timeout)
    print(
        f"distgame: process {resolved.process_id}/{resolved.num_processes} joining {resolved.coordinator_address}",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(
        coordinator_address=resolved.coordinator_address,
        num_processes=resolved.num_processes,
        process_id=resolved.process_id,
        initialization_timeout=dc.initialization_timeout,
    )
    return resolved


def is_main_process() -> bool:
    """Process 0 alone writes results, metrics, summaries and logs and shows progress bars."""
    import jax

    return jax.process_index() == 0
