"""Ours (paper eq. 4–7) and its ablations: target values with text + EATA + visual losses, then the
null-space constrained multi-layer solve ``Δ = R K1ᵀ P (K1 K1ᵀ P + β I)⁻¹``.

The ablations are the same function under fixed settings (see the registry in ``t2iedit.methods``):
``ours-no-projector`` (P = I), ``ours-no-eata`` (α = 0), ``ours-no-visual`` (λ = 0); and beyond the
paper ``ours-entity-keys`` (``entity_keys="preserve"``: the keys of each entity's standalone prompts
are preserved by the solve, METHOD.md §6).
:func:`target_values` is shared with EMCID (same optimisation under EMCID's loss weighting).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Sequence

from t2iedit.edit import EditArtifact, NullSpaceSolver, compute_multilayer_edit, entity_prompts
from t2iedit.storage import stable_hash
from t2iedit.methods.base import Components, SharedStats, config_dict
from t2iedit.prompts import EditRequest
from t2iedit.values import (ValueConfig, ValueResult, VisualInputs, compute_target_values_batched,
                            ddpm_scheduler_for, generate_source_latents)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OursConfig:
    """``layers``/``value_layer`` ``None``: the preset's (SD: 0..10 / 10). ``use_projector`` False is
    the P = I ablation. ``latent_*``: the source images of L_V when the pipeline supplies none.
    ``entity_keys``: ``none`` (paper) | ``preserve`` (the keys of every token of each entity's
    standalone prompts — the entity alone and in ``values.templates`` — are kept by the solve, by
    ``entity_keys_form``: ``sequential`` (default) adds them to AlphaEdit's K_p, soft; ``nullspace``
    removes them from the null space, exact but one null direction per key — measured in METHOD.md §6)."""

    values: ValueConfig = field(default_factory=ValueConfig)
    layers: tuple[int, ...] | None = None
    value_layer: int | None = None
    use_projector: bool = True
    beta: float = 1.0
    value_batch_size: int = 16
    latent_images: int = 1
    latent_seed: int = 0
    latent_steps: int | None = None
    entity_keys: str = "none"
    entity_keys_form: str = "sequential"

    def __post_init__(self):
        if self.entity_keys not in ("none", "preserve"):
            raise ValueError(f"entity_keys must be 'none' or 'preserve', got {self.entity_keys!r}")
        if self.entity_keys_form not in ("nullspace", "sequential"):
            raise ValueError(f"entity_keys_form must be 'nullspace' or 'sequential', got {self.entity_keys_form!r}")


def resolve_layers(config, components: Components) -> tuple[tuple[int, ...], int]:
    layers = tuple(config.layers) if config.layers is not None else tuple(components.edit_layers)
    value_layer = config.value_layer if config.value_layer is not None else components.value_layer
    return layers, value_layer


def target_values(requests: Sequence[EditRequest], stats: SharedStats, components: Components,
                  values: ValueConfig, value_layer: int, batch_size: int, latent_images: int = 1,
                  latent_seed: int = 0, latent_steps: int | None = None) -> ValueResult:
    """z for every request (paper eq. 4–6 / EMCID), memoised in ``stats.values`` by everything the
    result depends on (value config, layer, requests, base model)."""
    key = stable_hash({
        "values": dataclasses.asdict(values), "value_layer": value_layer,
        "requests": [dataclasses.asdict(r) for r in requests],
        "model": [components.base_model_id, components.base_revision],
        "latents": None if values.lambda_visual == 0 else
        ("shared" if stats.source_latents is not None else [latent_images, latent_seed, latent_steps]),
    })
    if key in stats.values:
        return stats.values[key]
    visual = None
    if values.lambda_visual > 0:
        latents = stats.source_latents
        if latents is None:
            latents = generate_source_latents(
                components.pipe, [r.edit_id for r in requests], [r.source for r in requests],
                seed=latent_seed, images_per_prompt=latent_images, num_inference_steps=latent_steps)
        visual = VisualInputs(components.unet, ddpm_scheduler_for(components.pipe), latents)
    result = compute_target_values_batched(
        components.tokenizer, components.text_encoder, components.adapter.block(value_layer),
        requests, values, batch_size, visual, value_layer)
    stats.values[key] = result
    return result


def compute_ours(requests: Sequence[EditRequest], stats: SharedStats, components: Components,
                 config: OursConfig, *, method: str = "ours") -> EditArtifact:
    """Values (eq. 4–6), then eq. 7 per layer with the residual spread over ``layers``."""
    layers, value_layer = resolve_layers(config, components)
    res = target_values(requests, stats, components, config.values, value_layer,
                        config.value_batch_size, config.latent_images, config.latent_seed,
                        config.latent_steps)
    projectors = ({layer: stats.projector(layer) for layer in layers}
                  if config.use_projector else None)
    solver = NullSpaceSolver(projectors=projectors, beta=config.beta, preserve_form=config.entity_keys_form)
    preserve = entity_prompts(requests, config.values.templates) if config.entity_keys == "preserve" else ()
    return compute_multilayer_edit(
        components.adapter, components.tokenizer, requests, res.z, layers, value_layer, solver,
        config.values.templates, method=method, base_model_id=components.base_model_id,
        base_revision=components.base_revision, config=config_dict(config), preserve_prompts=preserve)
