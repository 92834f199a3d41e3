"""Dense bf16 peaks and memory bandwidths of known accelerators, looked up by JAX's `device_kind`.

Used by `distgame bench` (MFU = achieved model FLOP/s over the device's bf16 peak) and by
`distgame compile-check` (the roofline bound of a step: the larger of FLOPs / peak and
bytes / bandwidth). Figures are the vendors' dense (no sparsity) bf16 numbers per JAX device:
one TPU chip (v4 and v5p: both TensorCores as one megacore device) or one GPU.
"""

from __future__ import annotations

import dataclasses

TFLOPS, TBPS = 1e12, 1e12


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str
    bf16_flops_per_s: float  # dense
    hbm_bytes_per_s: float

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which a program is compute-bound on this device."""
        return self.bf16_flops_per_s / self.hbm_bytes_per_s


# device_kind (as jax reports it, lower-cased) -> peak. Longest matching key wins, so
# "tpu v5 lite" (v5e) is not taken for "tpu v5" (v5p), nor "h100 pcie" for "h100".
_PEAKS = {
    "tpu v4": DevicePeak("TPU v4", 275 * TFLOPS, 1.228 * TBPS),
    "tpu v5 lite": DevicePeak("TPU v5e", 197 * TFLOPS, 0.819 * TBPS),
    "tpu v5e": DevicePeak("TPU v5e", 197 * TFLOPS, 0.819 * TBPS),
    "tpu v5": DevicePeak("TPU v5p", 459 * TFLOPS, 2.765 * TBPS),
    "tpu v5p": DevicePeak("TPU v5p", 459 * TFLOPS, 2.765 * TBPS),
    "tpu v6 lite": DevicePeak("TPU v6e", 918 * TFLOPS, 1.64 * TBPS),
    "tpu v6e": DevicePeak("TPU v6e", 918 * TFLOPS, 1.64 * TBPS),
    "a100": DevicePeak("NVIDIA A100 (SXM, 80GB)", 312 * TFLOPS, 2.039 * TBPS),
    "a100-sxm4-40gb": DevicePeak("NVIDIA A100 (SXM, 40GB)", 312 * TFLOPS, 1.555 * TBPS),
    "a100-pcie-40gb": DevicePeak("NVIDIA A100 (PCIe, 40GB)", 312 * TFLOPS, 1.555 * TBPS),
    "a100 80gb pcie": DevicePeak("NVIDIA A100 (PCIe, 80GB)", 312 * TFLOPS, 1.935 * TBPS),
    "h100": DevicePeak("NVIDIA H100 (SXM)", 989 * TFLOPS, 3.35 * TBPS),
    "h100 pcie": DevicePeak("NVIDIA H100 (PCIe)", 756 * TFLOPS, 2.0 * TBPS),
    "h100 nvl": DevicePeak("NVIDIA H100 NVL", 835 * TFLOPS, 3.9 * TBPS),
    "h200": DevicePeak("NVIDIA H200", 989 * TFLOPS, 4.8 * TBPS),
    "gh200": DevicePeak("NVIDIA GH200", 989 * TFLOPS, 4.0 * TBPS),
    "b200": DevicePeak("NVIDIA B200", 2250 * TFLOPS, 8.0 * TBPS),
    "l4": DevicePeak("NVIDIA L4", 121 * TFLOPS, 0.3 * TBPS),
    "l40s": DevicePeak("NVIDIA L40S", 362 * TFLOPS, 0.864 * TBPS),
}


def lookup(device_kind: str) -> DevicePeak | None:
    """The peak of a device kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...); None if unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    matches = [k for k in _PEAKS if k in kind and _word_match(kind, k)]
    return _PEAKS[max(matches, key=len)] if matches else None


def _word_match(kind: str, key: str) -> bool:
    """`key` occurs in `kind` as whole words ("l4" must not match inside "tpu v4 l40")."""
    i = kind.find(key)
    while i >= 0:
        before = kind[i - 1] if i else " "
        after = kind[i + len(key)] if i + len(key) < len(kind) else " "
        if not before.isalnum() and not after.isalnum():
            return True
        i = kind.find(key, i + 1)
    return False


def roofline(flops: float, bytes_accessed: float | None, peak: DevicePeak) -> dict:
    """Lower bound on a program's time from its FLOPs and HBM traffic: max(FLOPs/peak, bytes/bandwidth)."""
    compute_s = flops / peak.bf16_flops_per_s
    memory_s = (bytes_accessed or 0.0) / peak.hbm_bytes_per_s
    bound_s = max(compute_s, memory_s)
    return {
        "device": peak.name,
        "peak_bf16_flops_per_s": peak.bf16_flops_per_s,
        "hbm_bytes_per_s": peak.hbm_bytes_per_s,
        "compute_bound_s": compute_s,
        "memory_bound_s": memory_s,
        "roofline_bound_s": bound_s,
        "bound_by": "compute" if compute_s >= memory_s else "memory",
        "arithmetic_intensity": flops / bytes_accessed if bytes_accessed else None,
        "ridge_flops_per_byte": peak.ridge_flops_per_byte,
        # The best utilisation this step can reach: its FLOPs at the roofline bound, over the peak.
        "max_utilisation": compute_s / bound_s if bound_s > 0 else None,
    }
