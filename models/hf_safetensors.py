"""safetensors files, one tensor at a time: the header of each file (names, dtypes, shapes, byte ranges) and a
tensor as a numpy array, a read-only memory map locally or a ranged read remotely (``gs://`` through
etils.epath), so the host never holds a whole checkpoint. bf16 tensors are read through ml_dtypes (the
``safetensors`` package's numpy API cannot represent bf16)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np
from etils import epath

from models.hf_config import HFLoadError

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    path: epath.Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _read_header(path: epath.Path) -> dict[str, TensorInfo]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise HFLoadError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise HFLoadError(f"{path}: not a safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    return {
        key: TensorInfo(path, h["dtype"], tuple(h["shape"]), 8 + n + h["data_offsets"][0], 8 + n + h["data_offsets"][1])
        for key, h in header.items()
    }


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor as a numpy array: a read-only memory map for local files, a ranged read otherwise."""
    if info.dtype not in _DTYPES:
        raise HFLoadError(f"{info.path}: tensor dtype {info.dtype} is not supported")
    dtype = np.dtype(_DTYPES[info.dtype])
    local = os.fspath(info.path) if os.path.exists(os.fspath(info.path)) else None
    if local is not None:
        count = (info.stop - info.start) // dtype.itemsize
        return np.memmap(local, dtype=dtype, mode="r", offset=info.start, shape=(count,)).reshape(info.shape)
    with info.path.open("rb") as f:
        f.seek(info.start)
        return np.frombuffer(f.read(info.stop - info.start), dtype=dtype).reshape(info.shape)


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory, by HF name, from one or several safetensors files."""

    def __init__(self, directory: epath.Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise HFLoadError(f"{directory}: no *.safetensors files (expected model.safetensors or an index json)")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            if not (directory / name).exists():
                raise HFLoadError(f"{directory / name}: listed in model.safetensors.index.json but missing")
            self.tensors.update(_read_header(directory / name))

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise HFLoadError(f"tensor {key!r} is not in the checkpoint ({len(self.tensors)} tensors)")
        return self.tensors[key]
