"""Stamps: the record that an output is finished and current, a Prefect cache policy on it, resumable items.

One fingerprint decides whether an output is current, for DVC and Prefect alike:

    fingerprint = sha256(stage name, the params subset the stage reads,
                         content hashes of its input files/folders,
                         source hashes of the library modules it imports)

When a task finishes an output it writes a *stamp* beside it (atomically, after the output itself):
the fingerprint plus the sha256 of every output file. An output is reusable only if its stamp carries
the current fingerprint and every recorded file still exists with the recorded hash. DVC deletes a
stage's outputs before rerunning it and may restore them from its cache; Prefect's result store may
remember a Path whose file is gone — the stamp check is what keeps both honest.

Stamps hold no timestamps, so a stage's outputs stay byte-for-byte reproducible for DVC.

Typical task (see docs/ARCHITECTURE.md, "Adding a stage")::

    @task(cache_policy=STAMP_CACHE)
    def compute_moment(out: Path, fingerprint: str, layer: int) -> Path:
        if is_done(out, fingerprint):
            return out
        ...write out through t2iedit.storage...
        return finish(out, fingerprint)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from t2iedit.storage import file_sha256, read_json, stable_hash, write_json
from tasks.fingerprints import PathLike

STAMP_SUFFIX = ".stamp"  # file output  x.parquet -> x.parquet.stamp (sibling)
DIR_STAMP_NAME = "_dir.stamp"  # folder output  out/ -> out/_dir.stamp (inside, travels with DVC outs)
# (not *.json: a consumer globbing "*.json" must never pick up a stamp)


def stamp_for(out: PathLike) -> Path:
    """Where the stamp of ``out`` lives: inside a folder output, beside a file output.

    Call it before the output exists too: a path with a suffix is a file, one without is a folder.
    """
    out = Path(out)
    if out.is_dir() or (not out.exists() and out.suffix == ""):
        return out / DIR_STAMP_NAME
    return out.with_name(out.name + STAMP_SUFFIX)


def _is_stamp(path: Path) -> bool:
    return path.name == DIR_STAMP_NAME or path.name.endswith(STAMP_SUFFIX)


def output_hashes(outputs: Iterable[PathLike], base: PathLike) -> dict[str, str]:
    """sha256 of every file in ``outputs`` (folders expanded, stamps skipped), keyed relative to ``base``."""
    base = Path(base)
    hashes: dict[str, str] = {}
    for o in outputs:
        o = Path(o)
        if not o.exists():
            raise FileNotFoundError(f"output {o} was not written")
        files = [o] if o.is_file() else sorted(p for p in o.rglob("*") if p.is_file())
        for f in files:
            if not _is_stamp(f):
                hashes[os.path.relpath(f, base)] = file_sha256(f)
    return hashes


def write_stamp(stamp: PathLike, fingerprint: str, outputs: Iterable[PathLike]) -> Path:
    """Record ``fingerprint`` and the hashes of ``outputs`` in ``stamp`` (atomic). Call it last."""
    stamp = Path(stamp)
    return write_json(stamp, {
        "fingerprint": fingerprint,
        "outputs": output_hashes(outputs, stamp.parent),
    })


def read_stamp(stamp: PathLike) -> dict[str, Any] | None:
    try:
        data = read_json(stamp)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) and "fingerprint" in data else None


def stamp_problem(stamp: PathLike, fingerprint: str) -> str | None:
    """Why the outputs recorded in ``stamp`` are not reusable for ``fingerprint`` (None: they are)."""
    stamp = Path(stamp)
    data = read_stamp(stamp)
    if data is None:
        return f"no stamp at {stamp}"
    if data["fingerprint"] != fingerprint:
        return f"{stamp} was written for another fingerprint"
    outputs = data.get("outputs") or {}
    if not outputs:
        return f"{stamp} records no outputs"
    for rel, digest in outputs.items():
        path = stamp.parent / rel
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != digest:
            return f"{path} was modified"
    return None


def outputs_valid(stamp: PathLike, fingerprint: str) -> bool:
    """True iff ``stamp`` carries ``fingerprint`` and every file it records exists unchanged."""
    return stamp_problem(stamp, fingerprint) is None


def is_done(out: PathLike, fingerprint: str) -> bool:
    """``outputs_valid`` for the conventional stamp of ``out`` (see ``stamp_for``)."""
    return outputs_valid(stamp_for(out), fingerprint)


def finish(out: PathLike, fingerprint: str, also: Iterable[PathLike] = ()) -> Path:
    """Stamp ``out`` (plus sibling outputs ``also``, e.g. a safetensors JSON sidecar); return ``out``."""
    out = Path(out)
    write_stamp(stamp_for(out), fingerprint, [out, *also])
    return out


def run_once(out: PathLike, fingerprint: str, produce: Callable[[Path], Any],
             also: Iterable[PathLike] = ()) -> Path:
    """Return ``out`` if it is done for ``fingerprint``; else ``produce(out)``, stamp it, return it."""
    out = Path(out)
    if is_done(out, fingerprint):
        return out
    stale = stamp_for(out)
    if stale.exists():  # a stamp for other inputs must not survive a failed rewrite
        stale.unlink()
    produce(out)
    return finish(out, fingerprint, also)


def prune(folder: PathLike, keep: Iterable[PathLike]) -> list[Path]:
    """Delete files under ``folder`` that are not in ``keep`` (with their stamps and ``.json``
    sidecars, or inside a kept folder); return what was deleted.

    For item folders kept across runs (DVC ``persist: true``): items of an older fingerprint go away
    once the stage has finished, so the folder holds exactly this run's outputs.
    """
    kept_files: set[Path] = set()
    kept_dirs: list[Path] = []
    for k in map(Path, keep):
        if k.is_dir():
            kept_dirs.append(k.resolve())
        else:
            kept_files |= {k.resolve(), stamp_for(k).resolve(), Path(f"{k}.json").resolve()}
    removed = []
    for p in sorted(Path(folder).rglob("*")):
        r = p.resolve()
        if p.is_file() and p.name != DIR_STAMP_NAME and r not in kept_files \
                and not any(r.is_relative_to(d) for d in kept_dirs):
            p.unlink()
            removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------------
# Prefect cache policy
# --------------------------------------------------------------------------------------------------
@dataclass
class StampCache(CachePolicy):
    """Prefect cache key = the task's ``fingerprint`` argument — but only while its outputs are valid.

    The task must take the output path (``out``) and its fingerprint (``fingerprint``) as arguments;
    other arguments are ignored by the key (the fingerprint covers them), so pass models and other
    heavy objects freely. If the stamp of ``out`` is missing or stale (DVC deleted the outputs, a
    file was edited, a run was killed before the stamp), no key is returned: Prefect neither reads
    nor writes its cache and the task body runs (and should use ``run_once``/``is_done``). So the run
    right after a recompute still executes the task body (which returns at once: the stamp is valid)
    and stores the record that later runs are served from ("Cached").
    """

    out_param: str = "out"
    fingerprint_param: str = "fingerprint"

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        try:
            out, fp = inputs[self.out_param], inputs[self.fingerprint_param]
        except KeyError as err:
            raise TypeError(f"StampCache needs task arguments {self.out_param!r} and "
                            f"{self.fingerprint_param!r}") from err
        if not is_done(out, fp):
            return None
        fn = task_ctx.task.fn
        return stable_hash({"task": f"{fn.__module__}.{fn.__qualname__}", "fingerprint": fp,
                            "out": Path(out).resolve().as_posix()})


STAMP_CACHE = StampCache()
