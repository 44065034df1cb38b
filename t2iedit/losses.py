"""The loss terms of the target-value optimisation (paper eq. 4–6, METHOD.md §5), per row.

Every function returns one value per prompt row (no batch reduction): the optimiser sums per-edit
losses, so edits optimised together never influence each other (see ``t2iedit.values``).
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
    """‖c_src(δ) − c_tgt‖² per row (eq. 4), (B, d) → (B,)."""
    return (c_src - c_tgt).pow(2).sum(-1)


def eata_loss(c_e: torch.Tensor, c_e_frozen: torch.Tensor, entity_mask: torch.Tensor) -> torch.Tensor:
    """Σ over the row's entities of ‖c_e(δ) − c_e‖² (eq. 5), (B, E, d) → (B,).

    ``entity_mask`` (B, E) is 1 for real entities; a row without entities contributes exactly zero
    (and no gradient).
    """
    return ((c_e - c_e_frozen).pow(2).sum(-1) * entity_mask.to(c_e.dtype)).sum(-1)


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
