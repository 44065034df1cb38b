"""Edits as data: computing a multi-layer edit, saving it, applying and reverting it exactly.

An :class:`EditArtifact` holds only the changed weights, ``ΔW`` per module, keyed
``"<component>:<module path>"`` (e.g. ``"text_encoder:text_model.encoder.layers.3.mlp.fc2"``,
``"unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"``), plus a manifest naming the base
model it was computed on. Computing an edit (:func:`compute_multilayer_edit`) and applying it
(:func:`apply_edit`) are separate steps; :func:`revert_edit` restores the saved pre-edit weights, so
apply-then-revert is bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Protocol, Sequence

import torch
from torch import nn

from t2iedit.storage import load_tensors, read_json, save_tensors, stable_hash, write_json
from t2iedit.keys import compute_hidden, compute_keys
from t2iedit.models import TextEncoderAdapter
from t2iedit.prompts import DEFAULT_TEMPLATES, EditRequest, fill
from t2iedit.solve import memit_update, null_space_update, without_directions

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DELTAS_FILE = "deltas.safetensors"
MANIFEST_FILE = "manifest.json"


# --------------------------------------------------------------------------------------------------
# The artifact
# --------------------------------------------------------------------------------------------------
def module_key(component: str, module: str) -> str:
    """Artifact key of a module's weight update: ``"text_encoder:encoder.layers.3.mlp.fc2"``."""
    if ":" in component or not component or not module:
        raise ValueError(f"bad component/module name {component!r} / {module!r}")
    return f"{component}:{module}"


def split_key(key: str) -> tuple[str, str]:
    component, sep, module = key.partition(":")
    if not sep or not component or not module:
        raise ValueError(f"artifact key {key!r} is not '<component>:<module path>'")
    return component, module


@dataclass(frozen=True)
class EditManifest:
    """What an edit is and which base model it belongs to (saved as JSON beside the ΔW tensors)."""

    method: str
    base_model_id: str
    base_revision: str | None
    config_hash: str
    layers: tuple[int, ...]
    n_edits: int
    # None in pipeline artifacts: a wall-clock time would change the edit artifact's hash on every rerun
    # (DVC output, issue 18 item 4); the continual store stamps when a batch was applied
    created_at: str | None = None
    extra: dict = field(default_factory=dict)  # method-specific facts (value layer, per-layer stats, ...)
    format_version: int = FORMAT_VERSION


@dataclass
class EditArtifact:
    """``deltas``: ΔW per module key, shape (d_out, d_in) of the module's weight."""

    deltas: dict[str, torch.Tensor]
    manifest: EditManifest

    def __post_init__(self):
        for key in self.deltas:
            split_key(key)

    def save(self, folder: str | Path) -> Path:
        """``folder/deltas.safetensors`` (+ sidecar; float32) and ``folder/manifest.json``, atomic."""
        folder = Path(folder)
        save_tensors(folder / DELTAS_FILE, {k: v.to(torch.float32) for k, v in self.deltas.items()},
                     meta={"config_hash": self.manifest.config_hash})
        manifest = asdict(self.manifest)
        manifest["modules"] = {k: list(v.shape) for k, v in self.deltas.items()}
        write_json(folder / MANIFEST_FILE, manifest)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EditArtifact":
        folder = Path(folder)
        raw = read_json(folder / MANIFEST_FILE)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: edit format {raw.get('format_version')}, expected {FORMAT_VERSION}")
        raw.pop("modules", None)
        raw["layers"] = tuple(raw["layers"])
        return cls(load_tensors(folder / DELTAS_FILE), EditManifest(**raw))


# --------------------------------------------------------------------------------------------------
# Applying and reverting
# --------------------------------------------------------------------------------------------------
def find_module(root: nn.Module, name: str) -> nn.Module:
    """``root``'s submodule ``name``, tolerating a leading prefix present on one side only
    (transformers 5 drops ``text_model.`` from CLIPTextModel's module names)."""
    modules = dict(root.named_modules())
    if name in modules:
        return modules[name]
    hits = [n for n in modules if n and (name.endswith("." + n) or n.endswith("." + name))]
    if len(hits) != 1:
        raise KeyError(f"module {name!r} matches {len(hits)} modules of {type(root).__name__}: {hits}")
    return modules[hits[0]]


@dataclass
class AppliedEdit:
    """The pre-edit weights of every touched module (exact copies), for :func:`revert_edit`."""

    originals: dict[str, torch.Tensor]
    manifest: EditManifest


def _check_base(manifest: EditManifest, base_model_id: str, base_revision: str | None) -> None:
    if (manifest.base_model_id, manifest.base_revision) != (base_model_id, base_revision):
        raise ValueError(
            f"edit was computed on base model {manifest.base_model_id!r} @ {manifest.base_revision!r}, "
            f"refusing to apply it to {base_model_id!r} @ {base_revision!r}")


def _weight(components: Mapping[str, nn.Module], key: str) -> torch.Tensor:
    component, module = split_key(key)
    if component not in components:
        raise KeyError(f"edit touches component {component!r}; got components {sorted(components)}")
    mod = find_module(components[component], module)
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"{key} is {type(mod).__name__}, not nn.Linear")
    return mod.weight


def apply_edit(components: Mapping[str, nn.Module], artifact: EditArtifact, base_model_id: str,
               base_revision: str | None) -> AppliedEdit:
    """Add each ΔW to its module's weight in place (``W ← cast(W + ΔW)``, the sum in float64).

    ``components``: e.g. ``{"text_encoder": pipe.text_encoder, "unet": pipe.unet}``. Refuses to apply
    an edit computed on another base model. Returns the exact pre-edit weights for :func:`revert_edit`.
    """
    _check_base(artifact.manifest, base_model_id, base_revision)
    weights = {key: _weight(components, key) for key in artifact.deltas}
    for key, w in weights.items():  # validate everything before touching anything
        if tuple(w.shape) != tuple(artifact.deltas[key].shape):
            raise ValueError(f"{key}: ΔW shape {tuple(artifact.deltas[key].shape)} != weight {tuple(w.shape)}")
    originals = {}
    with torch.no_grad():
        for key, w in weights.items():
            originals[key] = w.detach().clone()
            w.copy_((w.double() + artifact.deltas[key].to(w.device, torch.float64)).to(w.dtype))
    return AppliedEdit(originals, artifact.manifest)


def revert_edit(components: Mapping[str, nn.Module], applied: AppliedEdit) -> None:
    """Restore the weights saved by :func:`apply_edit` (bit-exact)."""
    with torch.no_grad():
        for key, original in applied.originals.items():
            _weight(components, key).copy_(original)


@contextlib.contextmanager
def edited(components: Mapping[str, nn.Module], artifact: EditArtifact, base_model_id: str,
           base_revision: str | None) -> Iterator[AppliedEdit]:
    """Apply ``artifact`` for the duration of the block; the weights are restored on exit, even on error."""
    applied = apply_edit(components, artifact, base_model_id, base_revision)
    try:
        yield applied
    finally:
        revert_edit(components, applied)


# --------------------------------------------------------------------------------------------------
# Per-layer solvers and the multi-layer edit (MEMIT / EMCID residual spreading)
# --------------------------------------------------------------------------------------------------
class LayerSolver(Protocol):
    """``(layer, K1 (n, d_in), R (n, d_out)) -> ΔW (d_out, d_in)``, all float64."""

    def __call__(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor: ...


PreserveForm = Literal["nullspace", "sequential"]


@dataclass(frozen=True)
class NullSpaceSolver:
    """Ours (paper eq. 7) with a projector per layer; AlphaEdit's sequential form when ``prior_keys``
    (earlier batches' K1 per layer, (n_p, d_in)) is given. ``projectors=None``: P = I (the
    no-projector ablation).

    ``preserved`` (layer → keys (n_e, d_in), e.g. the entity keys of ``edit.entity_keys: preserve``)
    are kept by ``preserve_form``: ``nullspace`` removes their directions from the null space
    (:func:`t2iedit.solve.without_directions`: ``Δ k = 0`` exactly), ``sequential`` adds them to
    AlphaEdit's ``K_p`` (the soft penalty ``‖Δ P K_p‖²``).
    """

    projectors: Mapping[int, torch.Tensor] | None
    beta: float = 1.0
    prior_keys: Mapping[int, torch.Tensor] | None = None
    preserved: Mapping[int, torch.Tensor] | None = None
    preserve_form: PreserveForm = "sequential"

    def __post_init__(self):
        if self.preserve_form not in ("nullspace", "sequential"):
            raise ValueError(f"preserve_form must be 'nullspace' or 'sequential', got {self.preserve_form!r}")

    def __call__(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        d = keys.shape[1]
        P = (torch.eye(d, dtype=torch.float64) if self.projectors is None
             else self.projectors[layer])  # (d_in, d_in)
        Kp = None if self.prior_keys is None else self.prior_keys.get(layer)
        Ke = None if self.preserved is None else self.preserved.get(layer)
        if Ke is not None and len(Ke):
            if self.preserve_form == "nullspace":
                P, _ = without_directions(P, Ke)
            else:
                Ke = Ke.detach().to(torch.float64)
                Kp = Ke if Kp is None else torch.cat([Kp.detach().to(torch.float64), Ke])
        return null_space_update(keys, residual, P, Kp=Kp, beta=self.beta)


@dataclass(frozen=True)
class MemitSolver:
    """MEMIT/EMCID: ``Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹`` with the preserved second moment per layer."""

    moments: Mapping[int, torch.Tensor]
    lam: float

    def __call__(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return memit_update(keys, residual, self.moments[layer], self.lam)


def entity_prompts(requests: Sequence[EditRequest], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """The standalone prompts of every request's entities: each entity alone and in each template
    ("the United States", "A photo of the United States", ...), in order, without repeats."""
    out: dict[str, None] = {}
    for r in requests:
        for a, b in r.entities:
            ent = r.source[a:b].strip()
            if ent:
                for t in ("{}", *templates):
                    out.setdefault(fill(t, ent)[0], None)
    return list(out)


def prompt_token_keys(adapter: TextEncoderAdapter, tokenizer, texts: Sequence[str], layer: int,
                      batch_size: int = 64) -> torch.Tensor:
    """``(n_tokens, d_in)`` float64: the input of ``layer``'s edited linear at every non-padding token
    of ``texts`` (BOS/EOS included, as the preserved keys K0 of METHOD.md §2) on the current model."""
    device = next(adapter.model.parameters()).device
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[s:s + batch_size]), padding="longest", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            with adapter.capture([layer], keys=True, values=False, stop_after=layer) as rec:
                adapter.run(**enc)
            out.append(rec["keys"][layer][enc["attention_mask"].bool()].double().cpu())
    return torch.cat(out) if out else torch.zeros(0, adapter.layer(layer).in_features, dtype=torch.float64)


def compute_multilayer_edit(adapter: TextEncoderAdapter, tokenizer, requests: Sequence[EditRequest],
                            targets_z: torch.Tensor, layers: Sequence[int], value_layer: int,
                            solver: LayerSolver, templates: Sequence[str] = DEFAULT_TEMPLATES, *,
                            method: str, base_model_id: str, base_revision: str | None,
                            config: Any = None, component: str = "text_encoder",
                            preserve_prompts: Sequence[str] = ()) -> EditArtifact:
    """Spread the residual ``z − h`` over ``layers`` (MEMIT / EMCID, METHOD.md §6) and return the edit.

    ``targets_z (n_edits, d_model)``: desired residual-stream output of block ``value_layer`` at the
    edit token (template ``"{}"``). For each layer ``l_i`` in ascending order: recompute K1 on the
    partially edited model (mean over ``templates``), ``R = (z − h_current) / (L − i)`` (the desired
    change of that layer's output at the edit token), ``ΔW = solver(l_i, K1, R)``, apply ΔW to the live
    model and continue.

    ``preserve_prompts`` (e.g. :func:`entity_prompts`, ``edit.entity_keys: preserve``): the keys of
    every token of these prompts at ``l_i``, recomputed on the partially edited model like K1, are
    handed to the solver as preserved keys (a :class:`NullSpaceSolver`; others refuse); the manifest
    records their count and the relative shift ``‖ΔW Ke‖ / ‖W Ke‖`` per layer.

    Invariant: the model is unchanged when this returns (the touched weights are restored bit-exactly,
    also on error); the returned artifact holds the accumulated ΔW per layer.
    """
    if preserve_prompts and not hasattr(solver, "preserved"):
        raise TypeError(f"{type(solver).__name__} cannot preserve keys; use NullSpaceSolver")
    layers = sorted(layers)
    if len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"layers must be distinct and non-empty, got {layers}")
    if layers[-1] > value_layer:
        raise ValueError(f"edited layer {layers[-1]} is after the value layer {value_layer}")
    z = targets_z.detach().to(torch.float64).cpu()  # (n, d_model)
    h0 = compute_hidden(adapter, tokenizer, requests, value_layer)  # (n, d_model)
    if z.shape != h0.shape:
        raise ValueError(f"targets_z must be (n_edits, d_model) = {tuple(h0.shape)}, got {tuple(z.shape)}")
    originals = {layer: adapter.layer(layer).weight.detach().clone() for layer in layers}
    deltas: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    try:
        for i, layer in enumerate(layers):
            h = h0 if i == 0 else compute_hidden(adapter, tokenizer, requests, value_layer)
            K1 = compute_keys(adapter, tokenizer, requests, layer, templates)  # (n, d_in)
            R = (z - h) / (len(layers) - i)  # (n, d_model)
            Ke = None
            if preserve_prompts:
                Ke = prompt_token_keys(adapter, tokenizer, preserve_prompts, layer)  # (n_e, d_in)
                preserved = {**(solver.preserved or {}), layer: Ke}
                delta = dataclasses.replace(solver, preserved=preserved)(layer, K1, R)
            else:
                delta = solver(layer, K1, R)  # (d_out, d_in) float64
            w = adapter.layer(layer).weight
            with torch.no_grad():
                w.copy_((w.double() + delta.to(w.device)).to(w.dtype))
            deltas[module_key(component, adapter.module_name(layer))] = delta
            stats[str(layer)] = {"residual_norm": float((z - h).norm(dim=1).mean()),
                                 "delta_norm": float(delta.norm()),
                                 "fit_error": float((K1 @ delta.T - R).norm() / R.norm().clamp_min(1e-30))}
            if Ke is not None:
                w0 = originals[layer].double().cpu()
                stats[str(layer)].update(preserved_keys=int(Ke.shape[0]), preserved_key_shift=float(
                    (Ke @ delta.T).norm() / (Ke @ w0.T).norm().clamp_min(1e-30)))
            logger.info("layer %d: mean ‖z − h‖ %.4g, ‖ΔW‖ %.4g", layer,
                        stats[str(layer)]["residual_norm"], stats[str(layer)]["delta_norm"])
        h_final = compute_hidden(adapter, tokenizer, requests, value_layer)
    finally:
        with torch.no_grad():
            for layer, w0 in originals.items():
                adapter.layer(layer).weight.copy_(w0)
    gap0, gap = (z - h0).norm(dim=1), (z - h_final).norm(dim=1)
    extra = {"value_layer": value_layer, "templates": list(templates), "layer_stats": stats,
             "edit_ids": [r.edit_id for r in requests],
             "relative_residual_after": float((gap / gap0.clamp_min(1e-30)).mean())}
    manifest = EditManifest(method=method, base_model_id=base_model_id, base_revision=base_revision,
                            config_hash=stable_hash(config), layers=tuple(layers), n_edits=len(requests),
                            extra=extra)
    return EditArtifact(deltas, manifest)
