"""Fingerprints: what identifies a stage's (or one item's) output, for DVC and Prefect alike.

    fingerprint = sha256(stage name, the params subset the stage reads,
                         content hashes of its input files/folders,
                         source hashes of the library modules it imports)

tasks.stamps records a fingerprint beside each finished output; an output is reusable only while its
stamp carries the current fingerprint (see that module).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from t2iedit.storage import file_sha256, stable_hash, tree_sha256

FINGERPRINT_VERSION = 1  # bump when the fingerprint recipe itself changes

PathLike = str | os.PathLike


def code_sha256(modules: Iterable[str]) -> str:
    """Hash the source of importable modules by name, without importing them.

    A package (e.g. ``t2iedit.methods``) hashes every ``.py`` file under its folder. Listing the
    modules a task calls makes a fix to the math invalidate its cache (Prefect's TASK_SOURCE hashes
    only the task body).
    """
    entries: dict[str, str] = {}
    for name in sorted(set(modules)):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"cannot hash source of module {name!r}: not found")
        origin = Path(spec.origin)
        if spec.submodule_search_locations:  # a package: all of its Python source
            folder = origin.parent
            files = sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
            entries[name] = stable_hash({p.relative_to(folder).as_posix(): file_sha256(p) for p in files})
        else:
            entries[name] = file_sha256(origin)
    return stable_hash(entries)


def inputs_sha256(paths: Iterable[PathLike]) -> dict[str, str]:
    """Content hash of each input file or folder, keyed by its path as given."""
    out: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"fingerprint input {path} does not exist (run its stage first)")
        out[path.as_posix()] = tree_sha256(path)
    return out


def params_payload(params: Any) -> Any:
    """JSON form of a params subset: a pydantic model, a mapping, or None."""
    if params is None:
        return None
    if hasattr(params, "model_dump"):
        return params.model_dump(mode="json")
    if isinstance(params, Mapping):
        return {k: params_payload(v) if hasattr(v, "model_dump") else v for k, v in params.items()}
    raise TypeError(f"params must be a pydantic model or a mapping, not {type(params).__name__}")


def fingerprint(stage: str, params: Any = None, inputs: Iterable[PathLike] = (),
                code: Iterable[str] = (), extra: Any = None) -> str:
    """The stage fingerprint: sha256 of (stage, params subset, input contents, library source, extra).

    ``params``: exactly the params the stage reads (its pydantic section model, or a mapping of them).
    ``inputs``: files/folders it reads (outputs of upstream stages, raw data); hashed by content.
    ``code``: module names whose source determines the result (``t2iedit.keys``, ``tasks.key_statistics``).
    ``extra``: anything else JSON-serialisable that changes the result (e.g. a model id + revision).
    """
    return stable_hash({
        "version": FINGERPRINT_VERSION,
        "stage": stage,
        "params": params_payload(params),
        "inputs": inputs_sha256(inputs),
        "code": code_sha256(code),
        "extra": extra,
    })


def item_fingerprint(stage_fingerprint: str, item: Any) -> str:
    """Fingerprint of one unit of work (a batch, an edit, a layer) inside a stage."""
    return stable_hash({"stage": stage_fingerprint, "item": item})
