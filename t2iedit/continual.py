"""Continual editing (issue 8; METHOD.md §6, AlphaEdit's sequential form): edit batches applied over
time on one base model, each solved so that it does not undo the earlier ones, each removable exactly.

Two objects, no globals:

- :class:`ContinualState` — the accumulated state as an artifact of its own: the base model's identity
  (id, revision and a sha256 of its editable weights), the ordered list of applied batches, and for each
  batch its ``ΔW`` per module (float64, an :class:`~t2iedit.edit.EditArtifact` folder), the keys ``K1``
  its solve saw at every edited layer (float64, ``(n_edits, d_in)``) and its facts. The accumulated
  keys of earlier batches, AlphaEdit's ``K_p`` per layer, are the concatenation of the applied batches'
  keys in order (:meth:`ContinualState.prior_keys`; ``K_p K_pᵀ`` is all the solve uses, but keeping the
  rows per batch makes removing one batch's keys exact and lets a superseded fact drop out).
  With a folder it is a store (layout below); without one it lives in memory (benchmarks, tests).
- :class:`ContinualEditor` — a loaded model bound to a state: it keeps exact copies of the base weights
  of every module a batch touches and *materialises* the live weights as
  ``W = cast(W0 + Σ_b ΔW_b)`` (the sum in float64, in batch order), so the weights are always a
  function of the base and the applied batches, never of the history of additions and removals.

Semantics of :meth:`ContinualEditor.apply_batch`: target values ``z`` are given (computed by the
caller, usually on the current edited model); the multi-layer edit (MEMIT residual spreading) runs on
the current edited model with the solver ``Δ = R K1ᵀ P (K1 K1ᵀ P + K_p K_pᵀ P + β I)⁻¹`` where ``K_p``
holds the keys of every applied batch at that layer, so ``‖Δ P K_p‖`` is penalised like the fit itself
and earlier edits are kept. A row of ``K_p`` whose source prompt is edited again by the new batch is
left out (the fact is superseded; protecting its old key would pull the new edit back halfway).

Semantics of :meth:`ContinualEditor.revert` (exact removal of one batch ``A``):

- ``A``'s ``ΔW`` is removed and its keys leave ``K_p``; every other batch keeps its ``ΔW`` unchanged.
  The weights become exactly ``cast(W0 + Σ_{b ≠ A} ΔW_b)`` (float64 bookkeeping, one rounding);
  reverting the last batch restores bit-for-bit the weights before it was applied, reverting every
  batch restores the base weights bit-for-bit.
- Later batches are *not* recomputed: a batch ``B`` applied after ``A`` computed its residuals on a
  model containing ``ΔA``, so removing ``A`` moves ``B``'s outputs at its own keys by ``−ΔA K_B``.
  :meth:`revert` measures this per later batch and layer as ``‖ΔA K_B‖ / ‖ΔB K_B‖`` (the
  :class:`RevertReport`), from the stored keys, without running the model. Re-apply ``B``'s facts
  if it is large.
- Future batches no longer protect ``A``'s keys.

Store layout (``folder``)::

    state.json                      base model, settings, ordered batch list with sha256 of each file
    batches/<edit_id>/manifest.json EditManifest (+ "continual" facts in extra)
    batches/<edit_id>/deltas.safetensors   ΔW per "<component>:<module>" (float64; EditArtifact.load)
    batches/<edit_id>/keys.safetensors     K1 per edited layer ("layer.<l>", float64)
    batches/<edit_id>/requests.json        the batch's facts (edit id, source, target, entity spans)
    batches/<edit_id>/sha256.json          sha256 of the files above (written last)
    reverted/<edit_id>/...          reverted batches, kept for the record
    stats/<hash>.safetensors        cached preserved-key statistics (C0, P) of the base model
    interrupted/<name>              what recovery could not use (incomplete or inconsistent), kept

Crash safety. Every file is written atomically (:mod:`t2iedit.storage`); a batch is written into
``batches/.<edit_id>.tmp`` and renamed into place whole, then listed in ``state.json``; a revert first
unlists the batch, then moves its folder to ``reverted/``. A process killed at any of these writes
(:data:`WRITE_STEPS`) leaves a store that :meth:`ContinualState.open` recovers (:meth:`recover`):
a half-written ``.tmp`` folder is deleted; a complete unlisted batch whose files match its
``sha256.json`` and which is the next batch in sequence (``seq == next_seq``: its ``state.json`` update
was lost) is adopted; an unlisted batch from earlier in the sequence (a revert whose move was lost)
goes to ``reverted/``; anything else moves to ``interrupted/``. Each action is reported
(:attr:`ContinualState.recovered`). ``T2IEDIT_FAULT_AT=<step>`` SIGKILLs the process at that write
step (tests kill a store at every step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from t2iedit.edit import (DELTAS_FILE, MANIFEST_FILE, EditArtifact, EditManifest, LayerSolver,
                          NullSpaceSolver, compute_multilayer_edit, find_module, split_key)
from t2iedit.storage import (file_sha256, load_meta, load_tensors, read_json, save_tensors, sidecar_path,
                             stable_hash, write_json)
from t2iedit.keys import collect_second_moment
from t2iedit.models import TextEncoderAdapter
from t2iedit.projector import null_space_projector
from t2iedit.prompts import DEFAULT_TEMPLATES, EditRequest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.json"
BATCHES_DIR = "batches"
REVERTED_DIR = "reverted"
STATS_DIR = "stats"
KEYS_FILE = "keys.safetensors"
REQUESTS_FILE = "requests.json"
HASHES_FILE = "sha256.json"
INTERRUPTED_DIR = "interrupted"
FAULT_ENV = "T2IEDIT_FAULT_AT"

#: Every point of the store's write path, in order, at which a kill leaves a distinct on-disk state:
#: ``add`` (a new batch) after each file of its temporary folder, after the rename, after state.json;
#: ``revert`` after state.json (unlisted) and after the move to reverted/; ``create``.
WRITE_STEPS = ("create:state", "add:tmp", "add:deltas", "add:manifest", "add:keys", "add:requests",
               "add:hashes", "add:renamed", "add:state", "revert:state", "revert:moved")


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) until the block is done, then raise the KeyboardInterrupt: a store's
    multi-file update is never cut halfway by Ctrl-C. Only the main thread receives signals; elsewhere
    (and with a non-default handler installed) this does nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def fault_point(step: str) -> None:
    """Kill this process (SIGKILL: no cleanup, no finally) if ``T2IEDIT_FAULT_AT`` names ``step``.

    The store's crash-safety tests use it to stop a write at every step of :data:`WRITE_STEPS`."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class StoreError(ValueError):
    """A store folder that is missing, corrupt or asked for something it does not hold."""


class BaseModelMismatch(ValueError):
    """Edits made on one base model offered to another."""


# --------------------------------------------------------------------------------------------------
# Base model identity
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseModel:
    """Which weights a state's edits belong to. ``weights_sha256`` hashes the editable modules'
    base weights (every layer of ``template``), so a store refuses a model that shares the id but not
    the weights (e.g. another tiny seed) as well as a model with another id/revision."""

    model_id: str
    revision: str | None
    weights_sha256: str
    template: str
    num_layers: int
    component: str = "text_encoder"

    def describe(self) -> str:
        return f"{self.model_id!r} @ {self.revision!r} (weights sha256 {self.weights_sha256[:12]})"


def weights_sha256(adapter: TextEncoderAdapter) -> str:
    """sha256 over (module name, dtype, shape, bytes) of every editable layer's weight."""
    h = hashlib.sha256()
    for layer in range(adapter.num_layers):
        w = adapter.layer(layer).weight.detach().contiguous().cpu()
        h.update(f"{adapter.module_name(layer)}|{w.dtype}|{tuple(w.shape)}".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.dtype != torch.bfloat16
                 else w.float().numpy().tobytes())
    return h.hexdigest()


def base_model_of(adapter: TextEncoderAdapter, model_id: str, revision: str | None,
                  component: str = "text_encoder") -> BaseModel:
    """The identity of the (unedited) model ``adapter`` wraps."""
    return BaseModel(model_id, revision, weights_sha256(adapter), adapter.template, adapter.num_layers,
                     component)


# --------------------------------------------------------------------------------------------------
# One applied batch
# --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """An applied edit batch: ``artifact.deltas`` ΔW (float64, (d_out, d_in)) per module key,
    ``keys`` the K1 its solve saw per edited layer ((n_edits, d_in), float64, rows aligned with
    ``requests``), ``layer_modules`` layer → module key of that layer's ΔW."""

    edit_id: str
    seq: int
    artifact: EditArtifact
    keys: dict[int, torch.Tensor]
    requests: list[EditRequest]
    layer_modules: dict[int, str]

    @property
    def manifest(self) -> EditManifest:
        return self.artifact.manifest

    @property
    def n_edits(self) -> int:
        return len(self.requests)

    def save(self, folder: Path) -> dict[str, str]:
        """Write the batch folder; returns the sha256 of each file (recorded in ``state.json``)."""
        folder.mkdir(parents=True, exist_ok=True)
        fault_point("add:tmp")
        # EditArtifact.save stores float32; the continual bookkeeping needs the exact float64 ΔW
        # (EditArtifact.load reads either, apply_edit adds in float64).
        save_tensors(folder / DELTAS_FILE, {k: v.to(torch.float64) for k, v in self.artifact.deltas.items()},
                     meta={"config_hash": self.manifest.config_hash})
        fault_point("add:deltas")
        manifest = dataclasses.asdict(self.manifest)
        manifest["modules"] = {k: list(v.shape) for k, v in self.artifact.deltas.items()}
        write_json(folder / MANIFEST_FILE, manifest)
        fault_point("add:manifest")
        save_tensors(folder / KEYS_FILE, {f"layer.{l}": k.to(torch.float64) for l, k in self.keys.items()},
                     meta={"layer_modules": {str(l): m for l, m in self.layer_modules.items()}})
        fault_point("add:keys")
        write_json(folder / REQUESTS_FILE, {"edit_id": self.edit_id, "seq": self.seq, "requests": [
            {"edit_id": r.edit_id, "source": r.source, "target": r.target,
             "entities": [list(s) for s in r.entities]} for r in self.requests]})
        fault_point("add:requests")
        # last: the batch's own record of its files, so a folder whose state.json entry was lost can
        # be checked before it is adopted
        write_json(folder / HASHES_FILE, _file_hashes(folder))
        fault_point("add:hashes")
        return _file_hashes(folder)

    @classmethod
    def load(cls, folder: Path) -> "Batch":
        raw = read_json(folder / REQUESTS_FILE)
        keys = {int(k.split(".")[1]): v for k, v in load_tensors(folder / KEYS_FILE).items()}
        modules = {int(l): m for l, m in load_meta(folder / KEYS_FILE)["layer_modules"].items()}
        requests = [EditRequest(r["edit_id"], r["source"], r["target"], tuple(tuple(s) for s in r["entities"]))
                    for r in raw["requests"]]
        return cls(raw["edit_id"], int(raw["seq"]), EditArtifact.load(folder), keys, requests, modules)


@dataclass(frozen=True)
class RevertReport:
    """What a revert did: the removed batch, and for each later batch and layer the relative shift
    ``‖ΔA K_B‖ / ‖ΔB K_B‖`` of its written outputs caused by removing ``ΔA``."""

    removed: Batch
    later_shift: dict[str, dict[int, float]]

    def max_shift(self) -> float:
        return max((v for d in self.later_shift.values() for v in d.values()), default=0.0)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _complete_batch(folder: Path) -> Batch | None:
    """The batch in ``folder`` if it is whole (its files match its ``sha256.json`` and it loads)."""
    try:
        recorded = read_json(folder / HASHES_FILE)
        found = _file_hashes(folder)
        found.pop(HASHES_FILE, None)
        if found != recorded:
            return None
        return Batch.load(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _move_aside(src: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest, i = dest_dir / src.name.lstrip("."), 1
    while dest.exists():
        dest, i = dest_dir / f"{src.name.lstrip('.')}.{i}", i + 1
    src.rename(dest)
    return dest


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------------------------------
# The accumulated state
# --------------------------------------------------------------------------------------------------
@dataclass
class ContinualState:
    """The base model, the ordered applied batches and (optionally) the store folder holding them.

    ``settings``: whatever the creator wants remembered with the store (preset, source, layers, ...).
    Use :meth:`create` / :meth:`open` for a store, :meth:`in_memory` for a transient state.
    """

    base: BaseModel
    batches: list[Batch] = field(default_factory=list)
    folder: Path | None = None
    settings: dict = field(default_factory=dict)
    next_seq: int = 1

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def in_memory(cls, base: BaseModel, settings: Mapping | None = None) -> "ContinualState":
        return cls(base, settings=dict(settings or {}))

    @classmethod
    def create(cls, folder: str | Path, base: BaseModel, settings: Mapping | None = None) -> "ContinualState":
        folder = Path(folder)
        if (folder / STATE_FILE).exists():
            raise StoreError(f"{folder}: a continual-editing store already exists here")
        state = cls(base, folder=folder, settings=dict(settings or {}))
        with interrupts_deferred():
            state._write()
            fault_point("create:state")
        return state

    @classmethod
    def open(cls, folder: str | Path) -> "ContinualState":
        """Read a store, verifying every batch file against the sha256 recorded in ``state.json``."""
        folder = Path(folder)
        path = folder / STATE_FILE
        if not path.exists():
            raise StoreError(f"{folder}: no continual-editing store ({STATE_FILE} missing); "
                             f"run `t2iedit edit` first or pass --store")
        with interrupts_deferred():
            recovered = cls.recover(folder)
        try:
            raw = read_json(path)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: not a readable store file ({e}); refusing to use this store") from None
        if raw.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format {raw.get('format_version')}, expected {FORMAT_VERSION}")
        batches = []
        for entry in raw["batches"]:
            bfolder = folder / BATCHES_DIR / entry["edit_id"]
            if not bfolder.is_dir():
                raise StoreError(f"{path}: batch {entry['edit_id']!r} is listed but {bfolder} is missing")
            found = _file_hashes(bfolder)
            for name, sha in entry["files"].items():
                if found.get(name) != sha:
                    raise StoreError(f"{bfolder / name}: sha256 differs from the one recorded in {path} "
                                     f"(file changed or missing); refusing to use this store")
            batches.append(Batch.load(bfolder))
        state = cls(BaseModel(**raw["base"]), batches, folder, raw.get("settings", {}), int(raw["next_seq"]))
        state.recovered = recovered
        return state

    @classmethod
    def recover(cls, folder: str | Path) -> list[str]:
        """Bring a store killed at any write step back to a consistent state; returns what was done
        (one sentence per action, also logged). See the module docstring for the rules."""
        folder = Path(folder)
        path = folder / STATE_FILE
        done: list[str] = []
        for stray in sorted(folder.glob(f".{STATE_FILE}.*.tmp")):  # an interrupted atomic write
            stray.unlink()
        bdir = folder / BATCHES_DIR
        if not path.exists() or not bdir.is_dir():
            return done
        raw = read_json(path)
        listed = {e["edit_id"] for e in raw.get("batches", [])}
        for tmp in sorted(p for p in bdir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")):
            shutil.rmtree(tmp)
            done.append(f"removed the half-written batch folder {tmp.name} (a run was interrupted before "
                        f"the batch was complete; nothing of it was applied)")
        for sub in sorted(p for p in bdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name in listed:
                continue
            batch = _complete_batch(sub)
            seq = int(raw["next_seq"])
            if batch is not None and batch.edit_id == sub.name and batch.seq == seq:
                raw["batches"].append({"edit_id": batch.edit_id, "seq": batch.seq,
                                       "method": batch.manifest.method, "n_edits": batch.n_edits,
                                       "files": _file_hashes(sub)})
                raw["next_seq"] = seq + 1
                write_json(path, raw)
                done.append(f"adopted batch {batch.edit_id} ({batch.n_edits} facts): it was written whole "
                            f"but the run was interrupted before listing it; `t2iedit revert "
                            f"{batch.edit_id}` removes it")
            elif batch is not None and batch.edit_id == sub.name and batch.seq < seq \
                    and not (folder / REVERTED_DIR / sub.name).exists():
                (folder / REVERTED_DIR).mkdir(parents=True, exist_ok=True)
                sub.rename(folder / REVERTED_DIR / sub.name)
                done.append(f"finished reverting batch {sub.name} (the run was interrupted after unlisting it)")
            else:
                dest = _move_aside(sub, folder / INTERRUPTED_DIR)
                done.append(f"moved {sub} to {dest}: an unlisted batch folder that is incomplete or out of "
                            f"sequence (not applied)")
        for line in done:
            logger.warning("%s: %s", folder, line)
        return done

    def _write(self) -> None:
        if self.folder is None:
            return
        entries = [{"edit_id": b.edit_id, "seq": b.seq, "method": b.manifest.method,
                    "n_edits": b.n_edits, "files": self._hashes[b.edit_id]} for b in self.batches]
        write_json(self.folder / STATE_FILE, {
            "format_version": FORMAT_VERSION, "base": dataclasses.asdict(self.base),
            "settings": self.settings, "next_seq": self.next_seq, "batches": entries})

    def __post_init__(self):
        self.recovered: list[str] = []  # what ContinualState.open had to repair (see recover)
        self._hashes: dict[str, dict[str, str]] = {}
        if self.folder is not None:
            for b in self.batches:
                self._hashes[b.edit_id] = _file_hashes(self.folder / BATCHES_DIR / b.edit_id)

    # ---- queries ---------------------------------------------------------------------------------
    def check_base(self, base: BaseModel) -> None:
        """Raise :class:`BaseModelMismatch` unless ``base`` is this state's base model."""
        mine = (self.base.model_id, self.base.revision, self.base.weights_sha256, self.base.template)
        theirs = (base.model_id, base.revision, base.weights_sha256, base.template)
        if mine != theirs:
            where = f" in {self.folder}" if self.folder else ""
            raise BaseModelMismatch(
                f"the edits{where} were made on base model {self.base.describe()}, "
                f"refusing to use them with {base.describe()}")

    def batch(self, edit_id: str) -> Batch:
        """The applied batch ``edit_id`` (or the one whose id starts with it, if unique)."""
        exact = [b for b in self.batches if b.edit_id == edit_id]
        hits = exact or [b for b in self.batches if b.edit_id.startswith(edit_id)]
        if len(hits) != 1:
            have = [b.edit_id for b in self.batches]
            what = "no applied edit" if not hits else f"{len(hits)} applied edits"
            raise StoreError(f"{what} matches {edit_id!r}; applied: {have or 'none'}")
        return hits[0]

    def prior_keys(self, exclude_sources: Sequence[str] = ()) -> dict[int, torch.Tensor]:
        """AlphaEdit's ``K_p`` per layer: the keys of every applied batch, in order, (n_p, d_in) float64.

        Rows of requests whose source (case/space-insensitive) is in ``exclude_sources`` are left out
        (facts superseded by a new batch).
        """
        drop = {_norm(s) for s in exclude_sources}
        parts: dict[int, list[torch.Tensor]] = {}
        for b in self.batches:
            keep = torch.tensor([_norm(r.source) not in drop for r in b.requests])
            for layer, K in b.keys.items():
                if keep.any():
                    parts.setdefault(layer, []).append(K[keep])
        return {layer: torch.cat(ks) for layer, ks in parts.items()}

    def key_counts(self) -> dict[int, int]:
        """Number of accumulated keys per layer (rows of ``K_p``)."""
        return {layer: int(K.shape[0]) for layer, K in self.prior_keys().items()}

    def files(self, edit_id: str) -> dict[str, str]:
        """sha256 of each file of an applied batch's folder (empty for an in-memory state)."""
        return dict(self._hashes.get(self.batch(edit_id).edit_id, {}))

    def module_keys(self) -> list[str]:
        return sorted({k for b in self.batches for k in b.artifact.deltas})

    def total_delta(self, key: str) -> torch.Tensor | None:
        """``Σ_b ΔW_b`` of one module in batch order (float64), or ``None`` if no batch touches it."""
        total = None
        for b in self.batches:
            if key in b.artifact.deltas:
                d = b.artifact.deltas[key].to(torch.float64)
                total = d.clone() if total is None else total + d
        return total

    # ---- mutation (persisted when there is a folder) --------------------------------------------
    def new_edit_id(self, name: str = "batch") -> str:
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "batch"
        return f"{self.next_seq:03d}-{slug}"

    def add(self, batch: Batch) -> None:
        with interrupts_deferred():
            self._add(batch)

    def _add(self, batch: Batch) -> None:
        if any(b.edit_id == batch.edit_id for b in self.batches):
            raise StoreError(f"an applied edit is already called {batch.edit_id!r}")
        if self.folder is not None:
            target = self.folder / BATCHES_DIR / batch.edit_id
            if target.exists() or (self.folder / REVERTED_DIR / batch.edit_id).exists():
                raise StoreError(f"{target}: an edit with this id exists in the store")
            tmp = self.folder / BATCHES_DIR / f".{batch.edit_id}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            hashes = batch.save(tmp)
            tmp.rename(target)  # the batch appears whole or not at all
            fault_point("add:renamed")
            self._hashes[batch.edit_id] = hashes
        self.batches.append(batch)
        self.next_seq = max(self.next_seq, batch.seq) + 1
        self._write()
        fault_point("add:state")

    def remove(self, edit_id: str) -> Batch:
        with interrupts_deferred():
            return self._remove(edit_id)

    def _remove(self, edit_id: str) -> Batch:
        batch = self.batch(edit_id)
        self.batches = [b for b in self.batches if b is not batch]
        if self.folder is not None:
            self._hashes.pop(batch.edit_id, None)
            self._write()  # the list first: a crash here leaves an unlisted folder, never a dangling entry
            fault_point("revert:state")
            dest = self.folder / REVERTED_DIR / batch.edit_id
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.folder / BATCHES_DIR / batch.edit_id).rename(dest)
            fault_point("revert:moved")
        return batch

    def revert(self, edit_id: str) -> RevertReport:
        """Remove one batch and its keys (:meth:`remove`), measuring first how much removing its ΔW
        shifts each later batch's written outputs, ``‖ΔA K_B‖ / ‖ΔB K_B‖`` per layer, from the stored
        keys (no model needed). The weights of a bound :class:`ContinualEditor` must then be
        re-materialised (:meth:`ContinualEditor.revert` does both)."""
        target = self.batch(edit_id)
        shift: dict[str, dict[int, float]] = {}
        for b in self.batches[self.batches.index(target) + 1:]:
            per_layer = {}
            for layer, K in b.keys.items():
                key = b.layer_modules[layer]
                if key not in target.artifact.deltas:
                    continue
                own = (K @ b.artifact.deltas[key].to(torch.float64).T).norm()  # ‖ΔB K_B‖
                lost = (K @ target.artifact.deltas[key].to(torch.float64).T).norm()  # ‖ΔA K_B‖
                per_layer[layer] = float(lost / own.clamp_min(1e-30))
            shift[b.edit_id] = per_layer
        return RevertReport(self.remove(target.edit_id), shift)


# --------------------------------------------------------------------------------------------------
# A loaded model bound to a state
# --------------------------------------------------------------------------------------------------
class _RecordingSolver:
    """Wraps a :class:`~t2iedit.edit.LayerSolver`, keeping the keys K1 each layer's solve saw."""

    def __init__(self, inner: LayerSolver):
        self.inner = inner
        self.keys: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self.keys[layer] = keys.detach().to(torch.float64).cpu().clone()  # (n, d_in)
        return self.inner(layer, keys, residual)


SolverFactory = Callable[[Mapping[int, torch.Tensor]], LayerSolver]


class ContinualEditor:
    """``state`` applied to a loaded model (``components``: e.g. ``{"text_encoder": te}``).

    On construction the model must be the state's unedited base (checked by hash); the editor keeps
    exact copies of the base weights of every touched module and materialises ``W0 + Σ ΔW``.
    """

    def __init__(self, state: ContinualState, adapter: TextEncoderAdapter,
                 components: Mapping[str, nn.Module] | None = None):
        self.state = state
        self.adapter = adapter
        self.components = dict(components or {state.base.component: adapter.model})
        found = base_model_of(adapter, state.base.model_id, state.base.revision, state.base.component)
        state.check_base(found)
        self._base: dict[str, torch.Tensor] = {}
        self.materialise()

    def _module(self, key: str) -> nn.Linear:
        component, module = split_key(key)
        if component not in self.components:
            raise KeyError(f"edit touches component {component!r}; bound components {sorted(self.components)}")
        mod = find_module(self.components[component], module)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{key} is {type(mod).__name__}, not nn.Linear")
        return mod

    def _snapshot(self, keys) -> None:
        for key in keys:
            if key not in self._base:  # untouched so far: the live weight is the base weight
                self._base[key] = self._module(key).weight.detach().clone()

    def base_weight(self, key: str) -> torch.Tensor:
        self._snapshot([key])
        return self._base[key]

    def expected_weight(self, key: str) -> torch.Tensor:
        """``cast(W0 + Σ ΔW)`` of one module: what the live weight must equal."""
        w0 = self.base_weight(key)
        total = self.state.total_delta(key)
        return w0.clone() if total is None else (w0.to(torch.float64) + total.to(w0.device)).to(w0.dtype)

    @torch.no_grad()
    def materialise(self) -> None:
        """Set every touched module to ``cast(W0 + Σ_b ΔW_b)`` (modules no batch touches any more go
        back to ``W0`` exactly)."""
        self._snapshot(self.state.module_keys())
        for key in self._base:
            self._module(key).weight.copy_(self.expected_weight(key))

    @contextlib.contextmanager
    def at_base(self) -> Iterator[None]:
        """The unedited base weights for the duration of the block (e.g. to collect preserved keys)."""
        self._snapshot(self.state.module_keys())
        with torch.no_grad():
            for key, w0 in self._base.items():
                self._module(key).weight.copy_(w0)
        try:
            yield
        finally:
            self.materialise()

    def apply_batch(self, requests: Sequence[EditRequest], targets_z: torch.Tensor, tokenizer, *,
                    layers: Sequence[int], value_layer: int,
                    projectors: Mapping[int, torch.Tensor] | None, beta: float = 1.0,
                    solver: SolverFactory | None = None, sequential: bool = True,
                    templates: Sequence[str] = DEFAULT_TEMPLATES, method: str = "ours",
                    config: Mapping | None = None, name: str = "batch",
                    extra: Mapping | None = None) -> Batch:
        """Compute a batch on the current edited model, apply it and append its keys to ``K_p``.

        Default solver: ``NullSpaceSolver(projectors, beta, prior_keys=K_p)`` — AlphaEdit's sequential
        update (``projectors=None``: P = I). ``solver``: a factory ``K_p -> LayerSolver`` for other
        solves (e.g. MEMIT's, which ignores K_p). ``sequential=False`` passes no ``K_p`` (the plain
        eq. 7 solve on the edited model; the reference the sequential form is measured against).
        Returns the stored :class:`Batch`; the live weights then equal ``cast(W0 + Σ ΔW)``.
        """
        if not requests:
            raise ValueError("an edit batch needs at least one request")
        Kp = self.state.prior_keys(exclude_sources=[r.source for r in requests]) if sequential else {}
        superseded = [r.edit_id for b in self.state.batches for r in b.requests
                      if _norm(r.source) in {_norm(q.source) for q in requests}]
        prior = {layer: Kp[layer] for layer in layers if layer in Kp}
        inner = (solver(prior) if solver is not None
                 else NullSpaceSolver(projectors=projectors, beta=beta, prior_keys=prior or None))
        recorder = _RecordingSolver(inner)
        edit_id = self.state.new_edit_id(name)
        artifact = compute_multilayer_edit(
            self.adapter, tokenizer, requests, targets_z, layers, value_layer, recorder, templates,
            method=method, base_model_id=self.state.base.model_id, base_revision=self.state.base.revision,
            config=dict(config or {}), component=self.state.base.component)
        layer_modules = {layer: f"{self.state.base.component}:{self.adapter.module_name(layer)}"
                         for layer in layers}
        continual = {"edit_id": edit_id, "position": len(self.state.batches) + 1,
                     "prior_batches": [b.edit_id for b in self.state.batches],
                     "prior_key_counts": {str(l): int(k.shape[0]) for l, k in prior.items()},
                     "sequential": bool(sequential), "superseded": superseded,
                     "base_weights_sha256": self.state.base.weights_sha256}
        manifest = dataclasses.replace(  # the store records when each batch was applied (`t2iedit list`)
            artifact.manifest, extra={**artifact.manifest.extra, **dict(extra or {}), "continual": continual},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        batch = Batch(edit_id, self.state.next_seq, EditArtifact(artifact.deltas, manifest),
                      recorder.keys, list(requests), layer_modules)
        self.state.add(batch)
        self.materialise()
        logger.info("applied batch %s: %d edits over layers %s (K_p rows %s)", edit_id, len(requests),
                    list(layers), {l: int(k.shape[0]) for l, k in prior.items()})
        return batch

    def revert(self, edit_id: str) -> RevertReport:
        """Remove one batch exactly (see the module docstring for what this means for later batches)."""
        report = self.state.revert(edit_id)
        self.materialise()
        return report


# --------------------------------------------------------------------------------------------------
# Preserved-key statistics of the base model, cached in a store
# --------------------------------------------------------------------------------------------------
@dataclass
class PreservedStats:
    """C0 (only when asked for) and the null-space projector P per layer, with projector metrics."""

    moments: dict[int, torch.Tensor]
    projectors: dict[int, torch.Tensor]
    metrics: dict[str, dict]
    cached: bool = False


def preserved_stats(editor: ContinualEditor, tokenizer, texts: Sequence[str], layers: Sequence[int], *,
                    mode: str, value: float, moments: bool = False,
                    cache_dir: str | Path | None = None, batch_size: int = 64) -> PreservedStats:
    """C0 of the *base* model over ``texts`` and its null-space projector per layer (METHOD.md §2-3),
    by the rule ``mode``/``value`` (no default: the CLI passes the preset's calibrated one,
    ``t2iedit.projector.calibrated_rule``, unless told otherwise).

    Computed under :meth:`ContinualEditor.at_base` (the projector protects the base model's knowledge,
    whatever batches are applied). With ``cache_dir`` the result is cached as
    ``<hash>.safetensors`` keyed by the texts, layers, projector rule and base weights.
    """
    layers = sorted(set(layers))
    key = stable_hash({"texts": hashlib.sha256("\n".join(texts).encode()).hexdigest(), "layers": layers,
                       "mode": mode, "value": value, "moments": moments,
                       "base": editor.state.base.weights_sha256})
    path = None if cache_dir is None else Path(cache_dir) / f"{key[:24]}.safetensors"
    if path is not None and path.exists() and sidecar_path(path).exists():
        # the sidecar is written after the tensors: a process killed between the two leaves tensors
        # without one, which is recomputed (and rewritten) here instead of failing every later run
        try:
            t, meta = load_tensors(path), load_meta(path)
            return PreservedStats({l: t[f"C0.{l}"] for l in layers if f"C0.{l}" in t},
                                  {l: t[f"P.{l}"] for l in layers}, meta["projectors"], cached=True)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: unreadable cached statistics (%s); recomputing", path, e)
    with editor.at_base():
        collected = collect_second_moment(editor.adapter, tokenizer, texts, layers, batch_size=batch_size,
                                          progress=False)
    C0s, Ps, metrics = {}, {}, {}
    for layer, m in collected.items():
        C0 = m.moment()
        proj = null_space_projector(C0, mode, value)
        Ps[layer] = proj.P
        metrics[str(layer)] = {**proj.metrics(), "tokens": m.count}
        if moments:
            C0s[layer] = C0
    if path is not None:
        tensors = {f"P.{l}": p for l, p in Ps.items()} | {f"C0.{l}": c for l, c in C0s.items()}
        save_tensors(path, tensors, meta={"projectors": metrics, "n_texts": len(texts), "layers": layers,
                                          "mode": mode, "value": value})
    return PreservedStats(C0s, Ps, metrics)
