"""Files under a run directory, local or `gs://` (through `etils.epath`): one place for every writer.

Results, RESULTS.md, plots, CSVs, stage files, summaries and logs all go through these helpers, so a
`run_dir=gs://BUCKET/...` works for them as it does for the orbax checkpoints. A local file is written to
a unique temporary name in its directory and renamed over the target (atomic on POSIX); an object store
(`gs://`, any `scheme://`) gets the content in one upload, which is atomic there (a reader sees the old
object or the whole new one), so no rename (a copy + delete on GCS) is needed. `gs://` needs gcsfs
(the `tpu` extra installs it); tests register an in-memory fsspec filesystem for the `gs` protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Callable

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path | pathlib.Path:
    """`p` as a path object: an epath.Path for `scheme://` paths, a plain pathlib.Path for local ones (so local
    files behave exactly as before, e.g. `open(newline="")`); both offer the pathlib API used here."""
    if isinstance(p, epath.Path) and not is_remote(p):
        return pathlib.Path(os.fspath(p))
    return epath.Path(p) if is_remote(p) else pathlib.Path(p)


def is_remote(p: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...): written as whole objects, never renamed or appended."""
    return "://" in os.fspath(p)


def atomic_write(target: PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes a local temporary file; it then becomes `target` in one step (rename locally, one
    upload to an object store). A failed `write` leaves `target` as it was."""
    target = path(target)
    if not is_remote(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.", suffix=".tmp")
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if is_remote(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "rb") as f:
                target.write_bytes(f.read())
        else:
            os.replace(tmp, os.fspath(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(target: PathLike, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(target, write)


def write_text(target: PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def read_text(source: PathLike) -> str:
    return path(source).read_text()


def exists(p: PathLike) -> bool:
    return path(p).exists()


def makedirs(p: PathLike) -> epath.Path:
    out = path(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, recursively through dicts, lists and
    tuples. Strict JSON has no NaN or Infinity (jq, JavaScript and most parsers reject Python's `NaN`), so a
    standard error of one seed (NaN in memory) is written as `null`, as JavaScript's JSON.stringify does."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def to_json(obj: Any, **kwargs) -> str:
    """`obj` as strict JSON text (non-finite floats -> null); every JSON the project writes goes through here."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def save_json(target: PathLike, obj: Any) -> None:
    write_text(target, to_json(obj, indent=2))


def load_json(source: PathLike) -> Any:
    return json.loads(read_text(source))


def fingerprint(**parts: Any) -> str:
    """A short stable hash of the settings a stage file depends on (part of its name: changed settings, new file)."""
    blob = json.dumps(
        parts, sort_keys=True, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def save_npz(target: PathLike, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(target, buf.getvalue())


def load_npz(source: PathLike) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, read into memory (a remote file is fetched in one read)."""
    with np.load(io.BytesIO(path(source).read_bytes())) as data:
        return {k: data[k] for k in data.files}


def save_figure(fig, target: PathLike, **savefig_kwargs) -> None:
    """A matplotlib figure as an image file (format from the suffix), written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path(target).suffix.lstrip(".") or "png", **savefig_kwargs)
    write_bytes(target, buf.getvalue())


class JsonlLog:
    """An append-only JSON-lines log (metrics.jsonl, solver_log.jsonl).

    Local files are appended to and flushed line by line. Object stores cannot append, so a remote log keeps
    its lines (those already there when `append=True`, then the new ones) and rewrites the whole object on
    every `flush()`: a reader always sees a complete prefix of the log."""

    def __init__(self, target: PathLike, append: bool = True):
        self.target = path(target)
        self.remote = is_remote(self.target)
        if self.remote:
            self.lines = self.target.read_text().splitlines(keepends=True) if append and self.target.exists() else []
            self.dirty = False
            self.file = None
        else:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(os.fspath(self.target), "a" if append else "w")

    def write(self, record: dict) -> None:
        line = to_json(record) + "\n"
        if self.file is not None:
            self.file.write(line)
        else:
            self.lines.append(line)
            self.dirty = True

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        elif self.dirty:
            write_text(self.target, "".join(self.lines))
            self.dirty = False

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
