"""Known Cloud TPU slices: accelerator type -> hosts, chips per host, runtime version, topology.

One JAX device per chip on every generation listed (v4 and v5p run their two
TensorCores per chip as one "megacore" device), so a config's mesh must
multiply to `chips`. `topology` is the name `jax.experimental.topologies`
understands, used by the compile-only check. Sources: the Cloud TPU docs'
accelerator-type and runtime-version tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from experiments.config import ConfigError


class LaunchError(ConfigError):
    """A user mistake in launcher input; printed as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str  # the name gcloud takes, e.g. "v5litepod-8"
    generation: str  # "v4", "v5e", "v5p", "v6e"
    hosts: int
    chips_per_host: int
    runtime_version: str  # default --version / --runtime-version
    topology: str  # jax.experimental.topologies name, e.g. "v5e:2x4"
    hbm_gib: float  # HBM per chip

    @property
    def chips(self) -> int:
        return self.hosts * self.chips_per_host

    @property
    def chip_config_name(self) -> str:
        return "megacore" if self.generation in ("v4", "v5p") else "default"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """How one host's chips sit in the topology grid (what libtpu needs to split it into processes)."""
        if self.hosts > 1:
            return (2, 2, 1)
        dims = [int(d) for d in self.topology.split(":")[1].split("x")]
        return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


# generation: (runtime version, HBM GiB per chip, topology prefix for jax, single-host chips per host)
_GENERATIONS = {
    "v4": ("tpu-ubuntu2204-base", 32.0, "v4", 4),
    "v5e": ("v2-alpha-tpuv5-lite", 16.0, "v5e", 8),
    "v5p": ("v2-alpha-tpuv5", 95.0, "v5", 4),
    "v6e": ("v2-alpha-tpuv6e", 32.0, "v6e", 8),
}


def _table() -> dict[str, Slice]:
    rows = {
        # v4 and v5p names count TensorCores (2 per chip); multi-host slices have 4 chips per host.
        "v4": [("v4-8", "2x2x1"), ("v4-16", "2x2x2"), ("v4-32", "2x2x4"), ("v4-64", "2x4x4"), ("v4-128", "4x4x4")],
        "v5p": [
            ("v5p-8", "2x2x1"),
            ("v5p-16", "2x2x2"),
            ("v5p-32", "2x2x4"),
            ("v5p-64", "2x4x4"),
            ("v5p-128", "4x4x4"),
        ],
        # v5e and v6e names count chips; up to 8 chips on one host, 4 per host beyond that.
        "v5e": [
            ("v5litepod-1", "1x1"),
            ("v5litepod-4", "2x2"),
            ("v5litepod-8", "2x4"),
            ("v5litepod-16", "4x4"),
            ("v5litepod-32", "4x8"),
            ("v5litepod-64", "8x8"),
            ("v5litepod-128", "8x16"),
            ("v5litepod-256", "16x16"),
        ],
        "v6e": [
            ("v6e-1", "1x1"),
            ("v6e-4", "2x2"),
            ("v6e-8", "2x4"),
            ("v6e-16", "4x4"),
            ("v6e-32", "4x8"),
            ("v6e-64", "8x8"),
            ("v6e-128", "8x16"),
            ("v6e-256", "16x16"),
        ],
    }
    table = {}
    for gen, entries in rows.items():
        runtime, hbm, prefix, single_host_max = _GENERATIONS[gen]
        for name, topo in entries:
            chips = math.prod(int(d) for d in topo.split("x"))
            per_host = chips if chips <= single_host_max else 4
            table[name] = Slice(name, gen, chips // per_host, per_host, runtime, f"{prefix}:{topo}", hbm)
    return table


ACCELERATORS: dict[str, Slice] = _table()
# Common spellings users type for v5e slices.
ALIASES = {f"v5e-{s.chips}": name for name, s in ACCELERATORS.items() if s.generation == "v5e"}


def lookup(accelerator_type: str) -> Slice:
    name = ALIASES.get(accelerator_type, accelerator_type)
    if name in ACCELERATORS:
        return ACCELERATORS[name]
    close = difflib.get_close_matches(accelerator_type, [*ACCELERATORS, *ALIASES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise LaunchError(f"unknown accelerator type {accelerator_type!r}{hint}; known: {', '.join(ACCELERATORS)}")


def by_topology(topology: str) -> Slice:
    """The slice for a jax topology name ("v5e:2x4") or an accelerator type ("v5litepod-8")."""
    for s in ACCELERATORS.values():
        if s.topology == topology:
            return s
    if ":" not in topology:
        return lookup(topology)
    known = ", ".join(s.topology for s in ACCELERATORS.values())
    raise LaunchError(f"unknown TPU topology {topology!r}; known: {known} (or an accelerator type such as v5litepod-8)")


def check_mesh_fits(mesh, slice_: Slice, where: str = "mesh") -> tuple[int, int, int]:
    """The config's (data, fsdp, tensor) on this slice; LaunchError if it does not multiply to the chip count."""
    try:
        return mesh.shape(slice_.chips)
    except ValueError as e:
        raise LaunchError(
            f"{where} data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor} does not fit "
            f"{slice_.accelerator_type} ({slice_.chips} chips = {slice_.hosts} hosts x {slice_.chips_per_host}): {e}"
        ) from None
