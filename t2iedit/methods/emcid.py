"""EMCID (Xiong et al., 2024): two-stage editing — target values optimised with EMCID's loss weighting
(noise-prediction loss 1, text loss 0.01, no entity term), then MEMIT's solve per layer
``Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹`` with the residual spread over layers 0..10 (value at layer 10).

λ is EMCID's preservation weight on the second moment: 4000 for TIMED, 6000 for RoAD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from t2iedit.edit import EditArtifact, MemitSolver, compute_multilayer_edit
from t2iedit.methods.base import Components, SharedStats, config_dict
from t2iedit.methods.ours import resolve_layers, target_values
from t2iedit.prompts import EditRequest
from t2iedit.values import ValueConfig, weighted_config

#: EMCID's value weighting (``values.WEIGHTINGS["emcid"]``) without the entity-aware term.
EMCID_VALUES: ValueConfig = weighted_config("emcid", alpha=0.0)


@dataclass(frozen=True)
class EmcidConfig:
    values: ValueConfig = field(default_factory=lambda: EMCID_VALUES)
    lam: float = 4000.0
    layers: tuple[int, ...] | None = None
    value_layer: int | None = None
    value_batch_size: int = 16
    latent_images: int = 1
    latent_seed: int = 0
    latent_steps: int | None = None


def compute_emcid(requests: Sequence[EditRequest], stats: SharedStats, components: Components,
                  config: EmcidConfig, *, method: str = "emcid") -> EditArtifact:
    layers, value_layer = resolve_layers(config, components)
    res = target_values(requests, stats, components, config.values, value_layer,
                        config.value_batch_size, config.latent_images, config.latent_seed,
                        config.latent_steps)
    solver = MemitSolver(moments={layer: stats.moment(layer) for layer in layers}, lam=config.lam)
    return compute_multilayer_edit(
        components.adapter, components.tokenizer, requests, res.z, layers, value_layer, solver,
        config.values.templates, method=method, base_model_id=components.base_model_id,
        base_revision=components.base_revision, config=config_dict(config))
