"""EMCID (Xiong et al., 2024): two-stage editing — target values optimised with EMCID's loss weighting
(noise-prediction loss 1, text loss 0.01, both mean squared errors; no entity term), then MEMIT's
solve per layer ``Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹`` over layers 0..10 (value at layer 10).

The residual each layer writes (``residual``, docs/BASELINES.md):

- ``emcid`` (default; SilentView/EMCID emcid/emcid_main.py:1004-1016, :1049): the target is the value
  layer's block output at the edit token of the *first* template plus δ (``source_init``,
  compute_z.py:363, :644), and layer ``l_i`` writes ``(z − o_i) / (L − i)`` where ``o_i`` is the output
  of *that layer's fc2* (``rewrite_module_tmp``) at the edit token, averaged over the templates
  (compute_z.py:2313, :2325), on the model with the earlier layers already edited;
- ``memit``: MEMIT's (kmeng01/memit memit/memit_main.py ``cur_zs`` at ``z_layer``): the target from the
  plain ``"{}"`` prompt and ``o_i`` the value layer's block output — ``t2iedit.edit.compute_multilayer_edit``,
  the same recipe as ``ours``.

λ is EMCID's preservation weight on the second moment: 4000 for TIMED, 6000 for RoAD
(``t2iedit.methods.per_dataset.dataset_defaults``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from t2iedit.edit import EditArtifact, EditManifest, MemitSolver, compute_multilayer_edit, module_key
from t2iedit.keys import compute_hidden, compute_keys
from t2iedit.methods.base import Components, SharedStats, config_dict
from t2iedit.methods.ours import resolve_layers, target_values
from t2iedit.models import TextEncoderAdapter
from t2iedit.prompts import EditRequest, fill, subject_last_token, tokenize_with_offsets
from t2iedit.storage import stable_hash
from t2iedit.values import ValueConfig, weighted_config

logger = logging.getLogger(__name__)

#: EMCID's value weighting (``values.WEIGHTINGS["emcid"]`` at λ = 0.01: text 0.01, noise 1) without the
#: entity-aware term.
EMCID_VALUES: ValueConfig = weighted_config("emcid", lam=0.01, alpha=0.0)


@dataclass(frozen=True)
class EmcidConfig:
    values: ValueConfig = field(default_factory=lambda: EMCID_VALUES)
    lam: float = 4000.0
    residual: Literal["emcid", "memit"] = "emcid"
    layers: tuple[int, ...] | None = None
    value_layer: int | None = None
    value_batch_size: int = 16
    latent_images: int = 1
    latent_seed: int = 0
    latent_steps: int | None = None

    def __post_init__(self):
        if self.residual not in ("emcid", "memit"):
            raise ValueError(f"residual must be 'emcid' or 'memit', not {self.residual!r}")


@torch.no_grad()
def fc2_outputs(adapter: TextEncoderAdapter, tokenizer, requests: Sequence[EditRequest], layer: int,
                templates: Sequence[str]) -> torch.Tensor:
    """``(n_edits, d_model)`` float64: output of the edited linear (fc2) of ``layer`` at the edit token,
    averaged over ``templates`` (EMCID's ``get_module_input_output_at_words(...)[1]``)."""
    device = next(adapter.model.parameters()).device
    total = torch.zeros(len(requests), adapter.layer(layer).out_features, dtype=torch.float64)
    for template in templates:
        filled = [fill(template, r.source) for r in requests]
        enc, offsets = tokenize_with_offsets(tokenizer, [text for text, _ in filled])
        pos = torch.tensor([subject_last_token(off, start, start + len(r.source))
                            for off, (_, start), r in zip(offsets, filled, requests)])
        with adapter.capture([layer], keys=False, values=True, stop_after=layer) as rec:
            adapter.run(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        out = rec["values"][layer]  # (n_edits, T, d_model)
        total += out[torch.arange(len(requests)), pos.to(out.device)].double().cpu()
    return total / len(templates)


def emcid_multilayer_edit(adapter: TextEncoderAdapter, tokenizer, requests: Sequence[EditRequest],
                          targets_z: torch.Tensor, layers: Sequence[int], solver: MemitSolver,
                          templates: Sequence[str], *, method: str, base_model_id: str,
                          base_revision: str | None, config=None) -> EditArtifact:
    """EMCID's spreading (emcid_main.py:981-1065): for each layer ``l_i`` in ascending order, K1 and the
    fc2 output ``o_i`` on the partially edited model (both averaged over ``templates``),
    ``R = (z − o_i) / (L − i)``, ``ΔW = solver(l_i, K1, R)``, applied before the next layer.

    Invariant: the model is unchanged when this returns (weights restored bit-exactly, also on error).
    """
    layers = sorted(layers)
    z = targets_z.detach().to(torch.float64).cpu()  # (n, d_model)
    originals = {layer: adapter.layer(layer).weight.detach().clone() for layer in layers}
    deltas: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    try:
        for i, layer in enumerate(layers):
            K1 = compute_keys(adapter, tokenizer, requests, layer, templates)  # (n, d_in)
            R = (z - fc2_outputs(adapter, tokenizer, requests, layer, templates)) / (len(layers) - i)
            delta = solver(layer, K1, R)  # (d_out, d_in) float64
            w = adapter.layer(layer).weight
            with torch.no_grad():
                w.copy_((w.double() + delta.to(w.device)).to(w.dtype))
            deltas[module_key("text_encoder", adapter.module_name(layer))] = delta
            stats[str(layer)] = {"residual_norm": float((R * (len(layers) - i)).norm(dim=1).mean()),
                                 "delta_norm": float(delta.norm())}
            logger.info("EMCID layer %d: mean ‖z − o‖ %.4g, ‖ΔW‖ %.4g", layer,
                        stats[str(layer)]["residual_norm"], stats[str(layer)]["delta_norm"])
    finally:
        with torch.no_grad():
            for layer, w0 in originals.items():
                adapter.layer(layer).weight.copy_(w0)
    extra = {"residual": "emcid", "templates": list(templates), "layer_stats": stats,
             "edit_ids": [r.edit_id for r in requests]}
    manifest = EditManifest(method=method, base_model_id=base_model_id, base_revision=base_revision,
                            config_hash=stable_hash(config), layers=tuple(layers), n_edits=len(requests),
                            extra=extra)
    return EditArtifact(deltas, manifest)


def compute_emcid(requests: Sequence[EditRequest], stats: SharedStats, components: Components,
                  config: EmcidConfig, *, method: str = "emcid") -> EditArtifact:
    layers, value_layer = resolve_layers(config, components)
    res = target_values(requests, stats, components, config.values, value_layer,
                        config.value_batch_size, config.latent_images, config.latent_seed,
                        config.latent_steps)
    solver = MemitSolver(moments={layer: stats.moment(layer) for layer in layers}, lam=config.lam)
    common = dict(method=method, base_model_id=components.base_model_id,
                  base_revision=components.base_revision, config=config_dict(config))
    if config.residual == "memit":
        return compute_multilayer_edit(components.adapter, components.tokenizer, requests, res.z, layers,
                                       value_layer, solver, config.values.templates, **common)
    # EMCID's target: the value layer's output for its first template plus δ (compute_z.py:363, :644)
    z0_first = compute_hidden(components.adapter, components.tokenizer, requests, value_layer,
                              config.values.templates[0])  # (n, d_model)
    return emcid_multilayer_edit(components.adapter, components.tokenizer, requests,
                                 z0_first + res.delta.double(), layers, solver, config.values.templates,
                                 **common)
