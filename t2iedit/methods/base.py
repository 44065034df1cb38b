"""The one interface every editing method implements (see ``t2iedit.methods`` for the registry).

A method is a function ``(requests, stats, components, config) -> EditArtifact``:

- ``requests``: all edits of a dataset (large-scale mode: one artifact edits them all);
- ``stats`` (:class:`SharedStats`): what the pipeline computed once and every method may reuse —
  C0 per layer, null-space projectors per layer, source-image latents for the visual loss, and a memo
  of target values keyed by their exact inputs (so ``ours`` and ``ours-no-projector`` optimise once);
- ``components`` (:class:`Components`): the loaded pipeline, its text-encoder adapter, the base model's
  id/revision (recorded in the manifest) and the preset's default edit/value layers;
- ``config``: the method's frozen config dataclass (built from a params mapping by
  :func:`build_config`; unknown keys fail).

Invariant for every method: the models are unchanged when the method returns; the edit exists only
as the returned artifact (apply it with ``t2iedit.edit.apply_edit``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from t2iedit.edit import EditArtifact, EditManifest
from t2iedit.storage import stable_hash
from t2iedit.models import TextEncoderAdapter
from t2iedit.prompts import EditRequest


@dataclass
class SharedStats:
    """Statistics shared by all methods of one comparison (per edited text-encoder layer)."""

    moments: Mapping[int, torch.Tensor] = field(default_factory=dict)      # C0 (d_in, d_in)
    projectors: Mapping[int, torch.Tensor] = field(default_factory=dict)   # P (d_in, d_in)
    source_latents: torch.Tensor | None = None  # (n_edits, K, C, H, W), aligned with the requests
    values: dict[str, Any] = field(default_factory=dict)  # memo: value key -> ValueResult

    def moment(self, layer: int) -> torch.Tensor:
        if layer not in self.moments:
            raise KeyError(f"no second moment C0 for layer {layer}; have {sorted(self.moments)}")
        return self.moments[layer]

    def projector(self, layer: int) -> torch.Tensor:
        if layer not in self.projectors:
            raise KeyError(f"no null-space projector for layer {layer}; have {sorted(self.projectors)}")
        return self.projectors[layer]


@dataclass
class Components:
    """The loaded model a method edits. ``pipe``: a diffusers ``StableDiffusionPipeline``."""

    pipe: Any
    adapter: TextEncoderAdapter
    base_model_id: str
    base_revision: str | None
    edit_layers: tuple[int, ...]
    value_layer: int

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipe.text_encoder

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet


MethodFn = Callable[[Sequence[EditRequest], SharedStats, Components, Any], EditArtifact]


@dataclass(frozen=True)
class Method:
    """A registered method: its function, its config class and the fixed settings that define it
    (``fixed``: e.g. ``{"values": {"alpha": 0.0}}`` for the no-EATA ablation; a params mapping may
    not contradict them)."""

    name: str
    fn: MethodFn
    config_cls: type
    description: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    oracle_prompts: bool = False  # evaluation also runs the dataset's oracle prompts (Oracle row)
    needs_moments: bool = False
    needs_projectors: bool = False


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _check_fixed(fixed: Mapping[str, Any], given: Mapping[str, Any], path: str = "") -> None:
    for k, v in fixed.items():
        if k not in given:
            continue
        if isinstance(v, Mapping):
            _check_fixed(v, given[k] or {}, f"{path}{k}.")
        elif given[k] != v:
            raise ValueError(f"{path}{k} is fixed to {v!r} by this method, got {given[k]!r}")


def _build(cls: type, data: Mapping[str, Any]):
    """A (possibly nested) frozen dataclass from a mapping; unknown keys fail, lists become tuples."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; allowed {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, Mapping):
            v = _build(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def build_config(method: Method, params: Mapping[str, Any] | None = None):
    """The method's config: its ``defaults``, then ``params``, then its ``fixed`` settings."""
    params = dict(params or {})
    _check_fixed(method.fixed, params)
    return _build(method.config_cls, _deep_merge(_deep_merge(method.defaults, params), method.fixed))


def config_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def make_manifest(method: str, components: Components, config: Any, layers: Sequence[int],
                  n_edits: int, extra: Mapping[str, Any] | None = None) -> EditManifest:
    return EditManifest(method=method, base_model_id=components.base_model_id,
                        base_revision=components.base_revision,
                        config_hash=stable_hash(config_dict(config)), layers=tuple(layers),
                        n_edits=n_edits, extra=dict(extra or {}))
