"""Artifact I/O: atomic writes, safetensors with JSON sidecars, Parquet with explicit schemas, hashes.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted run never leaves a half-written artifact behind and never destroys a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch is imported where tensors are handled: the data-only stages never load it
    import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the artifact the permissions a plain open() would (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    torch_ = sys.modules.get("torch")  # a tensor exists only if torch was imported
    if torch_ is not None and isinstance(obj, torch_.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors plus ``<path>.json`` (shapes, dtypes and ``meta``); both atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    sidecar = {
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
        "meta": dict(meta or {}),
    }
    write_json(sidecar_path(path), sidecar)
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    return read_json(sidecar_path(path))["meta"]


def write_parquet(path: str | os.PathLike, table: pa.Table | Any, schema: pa.Schema | None = None) -> Path:
    """Write a pyarrow Table (or a pandas DataFrame, cast to ``schema``) atomically."""
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    elif schema is not None:
        table = table.cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    table = pq.read_table(path)
    if schema is not None:
        missing = [f.name for f in schema if f.name not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        table = table.select(schema.names).cast(schema)
    return table


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file or of every file under a folder (names and bytes, sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and "__pycache__" not in q.parts):
        h.update(p.relative_to(path).as_posix().encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (config hashes, cache keys)."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, default=_json_default).encode()
    ).hexdigest()
