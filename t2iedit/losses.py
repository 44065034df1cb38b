"""The loss terms of the target-value optimisation (paper eq. 4–6, METHOD.md §5), per row.

Every function returns one value per prompt row (no batch reduction): the optimiser sums per-edit
losses, so edits optimised together never influence each other (see ``t2iedit.values``).

One normalisation for every term: the mean squared error over the compared elements — the feature
dimension (text), the real entities' features (EATA), the latent elements (visual). This is EMCID's
convention for both its terms (``F.mse_loss(..., reduction="mean")``, SilentView/EMCID
emcid/compute_z.py:544 noise, :615 text) and the diffusion training loss'; a summed squared norm would
make a term ``d``× (768× for CLIP ViT-L) stronger than a mean one and its weight meaningless.
"""

from __future__ import annotations

from typing import Literal

import torch

Pooling = Literal["eos", "cls", "mean"]


def pooled_feature(hidden: torch.Tensor, attention_mask: torch.Tensor,
                   strategy: Pooling = "eos") -> torch.Tensor:
    """Sentence feature of each row, (B, T, d) → (B, d).

    ``eos``: the last attended token — CLIP's [EOS] after the final layer norm, un-projected (what
    ``CLIPTextModel``'s ``pooler_output`` returns); ``cls``: the first token (BERT's [CLS]);
    ``mean``: the attention-masked mean over tokens (sentence-transformers' pooling).
    """
    mask = attention_mask.to(hidden.dtype)  # (B, T)
    if strategy == "eos":
        last = attention_mask.long().sum(1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if strategy == "cls":
        return hidden[:, 0]
    if strategy == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    raise ValueError(f"pooling must be eos/cls/mean, not {strategy!r}")


def entity_features(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Entity representations: mean of each entity's token states, (B, T, d), (B, E, T) → (B, E, d).

    ``weights[b, e]`` is 1/n on the n tokens of entity e of row b (all zero for a padding entity).
    """
    return torch.einsum("bet,btd->bed", weights, hidden)


def text_loss(c_src: torch.Tensor, c_tgt: torch.Tensor) -> torch.Tensor:
    """‖c_src(δ) − c_tgt‖² / d per row (eq. 4 as a mean squared error over the d features, EMCID's
    ``F.mse_loss(edit_pooler_repr, dest_pooler_repr)``, compute_z.py:615), (B, d) → (B,)."""
    return (c_src - c_tgt).pow(2).mean(-1)


def eata_loss(c_e: torch.Tensor, c_e_frozen: torch.Tensor, entity_mask: torch.Tensor) -> torch.Tensor:
    """‖c_e(δ) − c_e‖² (eq. 5) as the mean squared error over the elements of the row's real entities
    (mean over its entities and their d features), (B, E, d) → (B,).

    ``entity_mask`` (B, E) is 1 for real entities; a row without entities contributes exactly zero
    (and no gradient).
    """
    mask = entity_mask.to(c_e.dtype)  # (B, E)
    per_entity = (c_e - c_e_frozen).pow(2).mean(-1)  # (B, E)
    return (per_entity * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def visual_loss(eps_src: torch.Tensor, eps_tgt: torch.Tensor) -> torch.Tensor:
    """L_V = ‖ε(x_t, c_src(δ), t) − ε(x_t, c_tgt, t)‖² per sample, as the mean over latent elements
    (the diffusion training loss' normalisation, independent of the resolution), (N, C, H, W) → (N,)."""
    return (eps_src - eps_tgt).pow(2).flatten(1).mean(1)


def per_edit_mean(row_values: torch.Tensor, row_edit: torch.Tensor, n_edits: int) -> torch.Tensor:
    """Mean of row values per edit (over its prompt templates), (B,) → (n_edits,)."""
    total = torch.zeros(n_edits, dtype=row_values.dtype, device=row_values.device)
    total = total.index_add(0, row_edit, row_values)
    count = torch.zeros(n_edits, dtype=row_values.dtype, device=row_values.device)
    count = count.index_add(0, row_edit, torch.ones_like(row_values))
    return total / count.clamp_min(1.0)
