"""Keys and hidden states of the edited text-encoder layers (METHOD.md §2 and §6).

- :class:`SecondMoment` / :func:`collect_second_moment`: the preserved keys' uncentred second moment
  ``C0 = (1/n) Σ k kᵀ`` over every non-padding token of a prompt corpus (paper eq. 3's K0 K0ᵀ),
  streaming and mergeable, accumulated in float64.
- :func:`compute_keys`: the edit keys K1, fc2 inputs at the edit token averaged over templates.
- :func:`compute_hidden`: the residual-stream output of a block at the edit token (MEMIT's ``cur_zs``).

Conventions: keys are rows, ``(n, d_in)``; the edit token is the last token of the source prompt
inside each template (EMCID / MEMIT "last subject token", the whole source being the subject).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from t2iedit.storage import load_meta, load_tensors, save_tensors
from t2iedit.models import TextEncoderAdapter
from t2iedit.prompts import DEFAULT_TEMPLATES, EditRequest, fill, subject_last_token, tokenize_with_offsets

logger = logging.getLogger(__name__)


@dataclass
class SecondMoment:
    """Streaming ``Σ k kᵀ`` (float64, (d, d)) and the number of keys it holds.

    ``update`` adds a batch of keys; ``merge`` combines accumulators of disjoint data (other batches,
    other workers) — the result equals one accumulator over all of it.
    """

    dim: int
    sum: torch.Tensor = None  # (d, d) float64
    count: int = 0

    def __post_init__(self):
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if self.sum.shape != (self.dim, self.dim) or self.sum.dtype != torch.float64:
            raise ValueError(f"sum must be float64 ({self.dim}, {self.dim}), got "
                             f"{self.sum.dtype} {tuple(self.sum.shape)}")

    def update(self, keys: torch.Tensor) -> "SecondMoment":
        """Add keys ``(n, d)`` in place (cast to float64 before the product)."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {tuple(keys.shape)}")
        k = keys.detach().to(device=self.sum.device, dtype=torch.float64)  # (n, d)
        self.sum.addmm_(k.T, k)  # (d, d) += kᵀk
        self.count += k.shape[0]
        return self

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """A new accumulator holding both ``self`` and ``other``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {self.dim} and {other.dim}")
        return SecondMoment(self.dim, self.sum + other.sum.to(self.sum.device), self.count + other.count)

    def moment(self) -> torch.Tensor:
        """``C0 = Σ k kᵀ / n`` (d, d) float64."""
        if self.count == 0:
            raise ValueError("second moment of zero keys is undefined")
        return self.sum / self.count

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        """safetensors ``sum`` + sidecar (``count``, ``dim`` and ``meta``), both atomic."""
        return save_tensors(path, {"sum": self.sum},
                            meta={**(meta or {}), "count": self.count, "dim": self.dim})

    @classmethod
    def load(cls, path: str | Path) -> "SecondMoment":
        meta = load_meta(path)
        return cls(int(meta["dim"]), load_tensors(path)["sum"], int(meta["count"]))


@dataclass
class _Batches:
    """Tokenized corpus sorted by length, so each batch is padded only to its own longest prompt."""

    ids: list[list[int]]
    order: list[int] = field(init=False)

    def __post_init__(self):
        self.order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))

    def __call__(self, batch_size: int) -> Iterable[list[list[int]]]:
        for s in range(0, len(self.order), batch_size):
            yield [self.ids[i] for i in self.order[s:s + batch_size]]


def collect_second_moment(adapter: TextEncoderAdapter, tokenizer, texts: Sequence[str],
                          layers: Sequence[int], batch_size: int = 64,
                          progress: bool = True) -> dict[int, SecondMoment]:
    """Second moments of the edited layers' inputs over every non-padding token of ``texts``.

    BOS and EOS count as tokens; texts are truncated at the tokenizer's length (77 for CLIP). The
    corpus is sorted by token length and each batch padded only to its longest text; the forward pass
    stops right after the last needed layer. The result does not depend on ``batch_size`` (up to
    float rounding): padding tokens are masked out, and keys of a real token do not depend on the
    padding (CLIP is causal and padded on the right; BERT masks padding in attention).
    """
    if not layers:
        raise ValueError("no layers to collect")
    layers = sorted(set(layers))
    ids = tokenizer(list(texts), truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    batches = _Batches(ids)
    moments = {layer: SecondMoment(adapter.layer(layer).in_features) for layer in layers}
    device = next(adapter.model.parameters()).device
    n_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(ids), desc="second moment", unit="text", disable=not progress)
    with torch.inference_mode(), adapter.capture(layers, keys=True, values=False,
                                                 stop_after=layers[-1]) as rec:
        for chunk in batches(batch_size):
            enc = tokenizer.pad({"input_ids": chunk}, padding="longest", return_attention_mask=True,
                                return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            adapter.run(**enc)
            mask = enc["attention_mask"].bool()  # (B, T)
            for layer in layers:
                moments[layer].update(rec["keys"][layer][mask])  # (n_real_tokens, d_in)
            n_tokens += int(mask.sum())
            bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - start
    logger.info("second moment of layers %s: %d texts, %d tokens in %.1f s (%.0f tokens/s)",
                layers, len(ids), n_tokens, elapsed, n_tokens / max(elapsed, 1e-9))
    return moments


def _edit_token_inputs(tokenizer, requests: Sequence[EditRequest], template: str):
    """Tokenized ``template.format(source)`` for each request and the edit-token position of each."""
    filled = [fill(template, r.source) for r in requests]
    enc, offsets = tokenize_with_offsets(tokenizer, [text for text, _ in filled])
    positions = [subject_last_token(off, start, start + len(r.source))
                 for off, (_, start), r in zip(offsets, filled, requests)]
    return enc, torch.tensor(positions)


def compute_keys(adapter: TextEncoderAdapter, tokenizer, requests: Sequence[EditRequest], layer: int,
                 templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """K1 ``(n_edits, d_in)`` float64: input of the edited linear of ``layer`` at the edit token,
    averaged over ``templates`` (METHOD.md §6). The forward stops after ``layer``."""
    if not requests or not templates:
        raise ValueError("need at least one request and one template")
    device = next(adapter.model.parameters()).device
    total = torch.zeros(len(requests), adapter.layer(layer).in_features, dtype=torch.float64)
    with torch.inference_mode():
        for template in templates:
            enc, pos = _edit_token_inputs(tokenizer, requests, template)
            with adapter.capture([layer], keys=True, values=False, stop_after=layer) as rec:
                adapter.run(**{k: v.to(device) for k, v in enc.items()})
            keys = rec["keys"][layer]  # (n_edits, T, d_in)
            total += keys[torch.arange(len(requests)), pos.to(keys.device)].double().cpu()
    return total / len(templates)


class _StopAfterBlock(Exception):
    pass


def compute_hidden(adapter: TextEncoderAdapter, tokenizer, requests: Sequence[EditRequest], layer: int,
                   template: str = "{}") -> torch.Tensor:
    """``(n_edits, d_model)`` float64: residual-stream output of block ``layer`` at the edit token.

    The forward stops after that block; the hook is removed on exit, even on error.
    """
    if not requests:
        raise ValueError("need at least one request")
    device = next(adapter.model.parameters()).device
    enc, pos = _edit_token_inputs(tokenizer, requests, template)
    out: dict[str, torch.Tensor] = {}

    def hook(_mod, _inputs, output):
        out["h"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _StopAfterBlock

    handle = adapter.block(layer).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            adapter.model(**{k: v.to(device) for k, v in enc.items()})
    except _StopAfterBlock:
        pass
    finally:
        handle.remove()
    h = out["h"]  # (n_edits, T, d_model)
    return h[torch.arange(len(requests)), pos.to(h.device)].double().cpu()
