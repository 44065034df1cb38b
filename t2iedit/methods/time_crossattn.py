"""TIME (Orgad, Kawar & Belinkov, 2023): closed-form edit of the UNet's text cross-attention projections.

Every text cross-attention ``to_k`` / ``to_v`` matrix ``W`` (16 layers × 2 in SD 1.x) is treated as a
linear memory from text-encoder token embeddings to keys/values and re-solved (TIME eq. 5)::

    W* = argmin_W  Σ_i ‖W k_i − v_i‖² + λ ‖W − W_cur‖²
       = (λ W_cur + Σ v kᵀ)(λ I + Σ k kᵀ)⁻¹

keys ``k`` = all 77 token embeddings (text-encoder output, as the UNet sees them) of the source prompt
and of its augmentations ("A photo of …", "An image of …", "A picture of …"); values ``v = W_cur k*``
with ``k*`` the aligned token embeddings of the target prompt. TIME is a single-edit method: several
facts are edited one after another, each re-solving on the weights left by the previous edit (the
reference's ``restart_params=False``).

Behaviour follows diffusers' ``StableDiffusionModelEditingPipeline.edit_model`` (the authors' port),
with the deviations listed in docs/BASELINES.md: float64 ``torch.linalg.solve`` instead of a float32
inverse, and a fallback alignment when the target does not contain the source's tokens (the reference
raises an IndexError there, e.g. on every RoAD row).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from t2iedit.prompts import EditRequest

logger = logging.getLogger(__name__)

#: The reference's textual augmentations (``AUGS_CONST``), prefixed to the lower-cased prompt.
TIME_AUGMENTATIONS: tuple[str, ...] = ("A photo of ", "An image of ", "A picture of ")
#: Text cross-attention key/value projections of a diffusers ``UNet2DConditionModel``.
TIME_MODULE_PATTERN = r"attn2\.to_[kv]$"


@dataclass(frozen=True)
class TimeConfig:
    """TIME's hyperparameters (published defaults)."""

    lam: float = 0.1
    augmentations: tuple[str, ...] = TIME_AUGMENTATIONS
    module_pattern: str = TIME_MODULE_PATTERN


def augment(text: str, augmentations: Sequence[str]) -> list[str]:
    """The prompt followed by its augmentations; a leading capital "A" is lower-cased as in the
    reference (``"A banana"`` → ``"A photo of a banana"``)."""
    base = text if text[:1] != "A" else "a" + text[1:]
    return [text] + [aug + base for aug in augmentations]


def align_tokens(tokenizer, source: str, target: str, length: int = 77) -> list[int]:
    """For each of the ``length`` token positions of ``source``, the position of ``target`` whose
    embedding supplies its new value.

    Reference behaviour: "an" counts as "a"; each source token (BOS/EOS included) is matched greedily
    to the next equal target token; positions after the source's EOS continue after the target's
    matched EOS and the remainder repeats the last position. If the source tokens are not a
    subsequence of the target (the reference fails), the common prefix is matched position by
    position and the rest of the source is right-aligned to the target's tail (so the source's last
    word maps to the target's last word and EOS to EOS), clamped to the first token after the prefix.
    """
    a_id = tokenizer.encode("a ")[1]

    def ids(text: str) -> list[int]:
        raw = tokenizer(text, truncation=True, max_length=length).input_ids
        return [a_id if tokenizer.decode(t) == "an" else t for t in raw]

    a, b = ids(source), ids(target)
    idx: list[int] | None = []
    j = 0
    for tok in a:
        while j < len(b) and b[j] != tok:
            j += 1
        if j == len(b):
            idx = None
            break
        idx.append(j)
        j += 1
    if idx is None:
        p = 0
        while p < min(len(a), len(b)) - 1 and a[p] == b[p]:
            p += 1
        idx = list(range(p)) + [max(p, len(b) - len(a) + i) for i in range(p, len(a))]
        j = idx[-1] + 1
    idx += list(range(j, length))
    idx += [length - 1] * (length - len(idx))
    return idx[:length]


def cross_attention_modules(unet: nn.Module, pattern: str = TIME_MODULE_PATTERN,
                            context_dim: int | None = None) -> dict[str, nn.Linear]:
    """The UNet's text cross-attention projections, by module name (sorted).

    ``context_dim``: the text embedding width; every match must read it (a self-attention
    projection matching the pattern would be a configuration error, not something to skip).
    """
    rx = re.compile(pattern)
    mods = {n: m for n, m in unet.named_modules() if rx.search(n)}
    if not mods:
        raise KeyError(f"pattern {pattern!r} matches no module of {type(unet).__name__}")
    for name, mod in mods.items():
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is {type(mod).__name__}, not nn.Linear")
        if context_dim is not None and mod.in_features != context_dim:
            raise ValueError(f"{name} reads {mod.in_features}-d inputs, text embeddings are "
                             f"{context_dim}-d: not a text cross-attention projection")
    return dict(sorted(mods.items()))


@torch.no_grad()
def encode_tokens(text_encoder: nn.Module, tokenizer, texts: Sequence[str],
                  length: int = 77) -> torch.Tensor:
    """All ``length`` token embeddings (last hidden state, final layer norm) of each text, padded to
    ``length`` and without attention mask, exactly as Stable Diffusion conditions the UNet.
    Returns (n_texts, length, d) float64."""
    ids = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0].double().cpu()


def time_keys_values(text_encoder: nn.Module, tokenizer, request: EditRequest,
                     augmentations: Sequence[str] = TIME_AUGMENTATIONS,
                     length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """TIME's keys and value inputs of one edit, both (n_aug + 1, length, d) float64.

    keys = token embeddings of the (augmented) source prompts; second = the target prompts' token
    embeddings re-indexed by :func:`align_tokens`, so ``W @ second[i, t]`` is the value for key
    ``keys[i, t]``.
    """
    src, tgt = augment(request.source, augmentations), augment(request.target, augmentations)
    emb = encode_tokens(text_encoder, tokenizer, src + tgt, length)  # (2n, length, d)
    keys, tgt_emb = emb[: len(src)], emb[len(src):]
    idx = torch.tensor([align_tokens(tokenizer, s, t, length) for s, t in zip(src, tgt)])
    aligned = torch.gather(tgt_emb, 1, idx[..., None].expand(-1, -1, tgt_emb.shape[-1]))
    return keys, aligned


def time_solve(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """TIME eq. 5: ``(λ W + V Kᵀ)(λ I + K Kᵀ)⁻¹`` in float64 by a linear solve.

    W: (d_out, d_in); K: (n, d_in) keys; V: (n, d_out) values. Returns the new (d_out, d_in) matrix.
    """
    W, K, V = W.double(), K.double(), V.double()
    lhs = lam * torch.eye(W.shape[1], dtype=torch.float64) + K.T @ K  # (d_in, d_in), symmetric
    rhs = lam * W + V.T @ K  # (d_out, d_in)
    return torch.linalg.solve(lhs, rhs.T).T


@torch.no_grad()
def compute_time_edit(unet: nn.Module, text_encoder: nn.Module, tokenizer,
                      requests: Sequence[EditRequest], config: TimeConfig = TimeConfig(),
                      ) -> dict[str, torch.Tensor]:
    """ΔW (float32, per UNet module name) of TIME applied to ``requests`` one after another.

    Pure computation: the weights are copied to float64 and edited there, so neither the UNet nor
    the text encoder is changed when this returns. The text encoder is not edited by TIME, so the
    keys of all requests are computed once.
    """
    width = text_encoder.config.hidden_size
    mods = cross_attention_modules(unet, config.module_pattern, context_dim=width)
    W0 = {n: m.weight.detach().double().cpu() for n, m in mods.items()}
    W = dict(W0)
    for i, req in enumerate(requests):
        keys, aligned = time_keys_values(text_encoder, tokenizer, req, config.augmentations)
        K = keys.reshape(-1, width)  # (n_aug+1)*77 keys of this edit
        A = aligned.reshape(-1, width)
        for name in W:
            # values = the current (already edited) projection of the aligned target embeddings
            W[name] = time_solve(W[name], K, A @ W[name].T, config.lam)
        logger.debug("TIME edit %d/%d (%s -> %s)", i + 1, len(requests), req.source, req.target)
    logger.info("TIME: %d edits over %d cross-attention projections", len(requests), len(W))
    return {n: (W[n] - W0[n]).float() for n in W}


def time_method(requests: Sequence[EditRequest], stats, components, config: TimeConfig,
                *, method: str = "time"):
    """The registry entry: TIME's ΔW as an ``EditArtifact`` of ``unet:`` modules."""
    from t2iedit.edit import EditArtifact, module_key
    from t2iedit.methods.base import make_manifest

    deltas = compute_time_edit(components.unet, components.text_encoder, components.tokenizer,
                               requests, config)
    return EditArtifact(
        {module_key("unet", name): d for name, d in deltas.items()},
        make_manifest(method, components, config, (), len(requests),
                      {"modules": sorted(deltas), "edit_ids": [r.edit_id for r in requests],
                       "sequential": True}))
