"""Keys and hidden states of the edited text-encoder layers (METHOD.md §2 and §6).

- :class:`SecondMoment` / :func:`collect_second_moment`: the preserved keys' uncentred second moment
  ``C0 = (1/n) Σ k kᵀ`` over every non-padding token of a prompt corpus (paper eq. 3's K0 K0ᵀ),
  streaming and mergeable, accumulated in float64 (each batch's product in float32, merged in float64;
  in a causal encoder each distinct token prefix's key once, weighted by its count).
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

import numpy as np
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

    def update(self, keys: torch.Tensor, weights: torch.Tensor | None = None,
               batch_dtype: torch.dtype = torch.float64) -> "SecondMoment":
        """Add keys ``(n, d)`` in place; ``weights`` ``(n,)`` (positive integers): row i stands for
        ``weights[i]`` identical keys (default 1 each).

        ``batch_dtype``: precision of this batch's product ``kᵀ diag(w) k``, which is then added into
        the float64 sum. float64 (default): exact to float64 rounding. float32: the per-batch
        product is computed for the upper triangle only (the sum is symmetric: a BLAS SYRK on the
        CPU, ≈ 7× faster than the float64 GEMM there; block GEMMs on a GPU); the batches are still merged in float64, so rounding does not grow with the corpus
        (relative difference to the float64 product ≈ 1e-7 per batch, METHOD.md §2).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {tuple(keys.shape)}")
        if weights is not None and weights.shape != (keys.shape[0],):
            raise ValueError(f"weights must be ({keys.shape[0]},), got {tuple(weights.shape)}")
        n = keys.shape[0] if weights is None else int(weights.sum())
        if batch_dtype == torch.float64:
            k = keys.detach().to(device=self.sum.device, dtype=torch.float64)  # (n, d)
            kw = k if weights is None else k * weights.to(k.device, torch.float64)[:, None]
            self.sum.addmm_(kw.T, k)  # (d, d) += kᵀ diag(w) k
        else:
            k = keys.detach().to(dtype=batch_dtype)
            if weights is not None:
                k = k * weights.to(k.device, batch_dtype).sqrt()[:, None]
            _add_gram(self.sum, k)
        self.count += n
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


class _Gram32:
    """A float32 ``Σ k kᵀ`` (one triangle on the CPU) of consecutive batches, added into a
    :class:`SecondMoment`'s float64 sum by :meth:`fold_into`. On the CPU each batch is one in-place
    BLAS SYRK (``ssyrk`` with ``beta = 1``: half a GEMM's flops, no temporary (d, d) matrix); on a
    GPU one ``addmm_``."""

    def __init__(self, dim: int, device: torch.device | str):
        self.c = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.count = 0
        self._cpu = self.c.device.type == "cpu"

    def add(self, keys: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        k = keys.detach().to(torch.float32)
        if weights is not None:
            k = k * weights.to(k.device, torch.float32).sqrt()[:, None]
            self.count += int(weights.sum())
        else:
            self.count += k.shape[0]
        if self._cpu:
            from scipy.linalg import blas

            c = self.c.numpy().T  # Fortran-order view: ssyrk updates it in place
            out = blas.ssyrk(1.0, k.cpu().numpy().T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
            if not np.shares_memory(out, c):  # not expected; kept correct if scipy copies
                c[...] = out
        else:
            self.c.addmm_(k.T, k)

    def fold_into(self, moment: "SecondMoment") -> None:
        if self.count == 0:
            return
        c = self.c.to(moment.sum.device)
        if self._cpu:  # one triangle (the lower one of the C-order tensor) holds the sum
            moment.sum += c
            moment.sum += c.T
            moment.sum.diagonal().sub_(c.diagonal())
        else:
            moment.sum += (c + c.T) / 2
        moment.count += self.count
        self.c.zero_()
        self.count = 0


def _add_gram(out: torch.Tensor, k: torch.Tensor) -> None:
    """``out`` (d, d) float64 += ``kᵀ k`` computed in ``k``'s dtype. On the CPU in float32: one BLAS
    SYRK (upper triangle only: half the flops of a GEMM; scipy's ``ssyrk``), mirrored; elsewhere
    :func:`_add_gram_upper_blocks`."""
    if k.device.type == "cpu" and k.dtype == torch.float32 and out.device.type == "cpu":
        from scipy.linalg import blas

        a = k.numpy()  # (n, d) C-order = (d, n) Fortran-order: ssyrk(trans=0) gives aᵀa for k
        upper = torch.from_numpy(blas.ssyrk(1.0, a.T, trans=0, lower=0)).to(torch.float64)  # (d, d)
        out += upper
        out += torch.triu(upper, diagonal=1).T
        return
    _add_gram_upper_blocks(out, k)


_GRAM_BLOCKS = 4  # 10 of 16 blocks computed: 62.5 % of the full product's flops


def _add_gram_upper_blocks(out: torch.Tensor, k: torch.Tensor, blocks: int = _GRAM_BLOCKS) -> None:
    """``out`` (d, d) float64 += ``kᵀ k`` computed in ``k``'s dtype, block by block over the upper
    triangle (``i <= j``) and mirrored: the product is symmetric, so ``blocks (blocks + 1) / 2`` of
    ``blocks²`` block products are enough (torch has no SYRK)."""
    d = k.shape[1]
    edges = [d * i // blocks for i in range(blocks + 1)]
    kt = k.T.contiguous()  # (d, n)
    dev = out.device
    for i in range(blocks):
        ri = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            rj = slice(edges[j], edges[j + 1])
            blk = (kt[ri] @ k[:, rj]).to(device=dev, dtype=out.dtype)  # (d_i, d_j)
            if j > i:
                out[ri, rj] += blk
                out[rj, ri] += blk.T
            else:  # a GEMM's diagonal block is symmetric only up to rounding: make it exact
                out[ri, rj] += (blk + blk.T) / 2


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


def _prefix_weights(ids: list[list[int]], order: Sequence[int]) -> list[list[int]]:
    """Per text and token position: how many tokens of the corpus share this token's prefix (the
    token and every token before it) if this is the prefix's first occurrence in ``order``, else 0.

    In a causal encoder a token's hidden states depend on its prefix only, so every token with the same
    prefix has the same key: one key, weighted by the prefix's count, stands for all of them (BOS
    always; "a", "a man", … of COCO captions: 18 % of 256 captions' tokens, 31 % of 10,000's)."""
    node_of: dict[tuple[int, int], int] = {}
    counts: list[int] = []
    nodes: list[list[int]] = [[] for _ in ids]
    for i in order:
        parent = -1
        for tok in ids[i]:
            node = node_of.setdefault((parent, tok), len(node_of))
            if node == len(counts):
                counts.append(0)
            counts[node] += 1
            nodes[i].append(node)
            parent = node
    seen = [False] * len(counts)
    weights: list[list[int]] = [[] for _ in ids]
    for i in order:
        for node in nodes[i]:
            weights[i].append(0 if seen[node] else counts[node])
            seen[node] = True
    return weights


def collect_second_moment(adapter: TextEncoderAdapter, tokenizer, texts: Sequence[str],
                          layers: Sequence[int], batch_size: int = 64, progress: bool = True,
                          batch_dtype: torch.dtype = torch.float32, causal: bool | None = None,
                          fold_rows: int = 16384) -> dict[int, SecondMoment]:
    """Second moments of the edited layers' inputs over every non-padding token of ``texts``.

    BOS and EOS count as tokens; texts are truncated at the tokenizer's length (77 for CLIP). The
    corpus is sorted by token length and each batch padded only to its longest text; the forward pass
    stops right after the last needed layer. The result does not depend on ``batch_size`` (up to
    float rounding): padding tokens are masked out, and keys of a real token do not depend on the
    padding (CLIP is causal and padded on the right; BERT masks padding in attention).

    ``batch_dtype``: float64 — each batch's ``Σ k kᵀ`` in float64 (:meth:`SecondMoment.update`);
    float32 (default, METHOD.md §2) — the batches' products are summed in a float32 accumulator
    (:class:`_Gram32`), merged into the float64 sum every ``fold_rows`` kept keys and at the end. ``causal`` (default: the encoder
    is a ``CLIPTextModel``): tokens sharing a prefix share their key, so each distinct prefix's key
    enters once, weighted by its count (:func:`_prefix_weights`) — the same moment, fewer products.
    Never for a bidirectional encoder (BERT: a token's key depends on the tokens after it).
    """
    if not layers:
        raise ValueError("no layers to collect")
    layers = sorted(set(layers))
    if causal is None:
        from transformers import CLIPTextModel

        causal = isinstance(adapter.model, CLIPTextModel)
    ids = tokenizer(list(texts), truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    batches = _Batches(ids)
    prefix_w = _prefix_weights(ids, batches.order) if causal else None
    moments = {layer: SecondMoment(adapter.layer(layer).in_features) for layer in layers}
    device = next(adapter.model.parameters()).device
    n_tokens, start = 0, time.perf_counter()
    # each batch's kᵀk is added to a float32 accumulator per layer (in place: a BLAS SYRK on the CPU),
    # which is merged into the float64 sum every fold_rows keys and at the end
    acc = ({layer: _Gram32(moments[layer].dim, device) for layer in layers}
           if batch_dtype == torch.float32 else None)
    pending_rows = 0

    bar = tqdm(total=len(ids), desc="second moment", unit="text", disable=not progress)
    with torch.inference_mode(), adapter.capture(layers, keys=True, values=False,
                                                 stop_after=layers[-1]) as rec:
        for s in range(0, len(batches.order), batch_size):
            rows = batches.order[s:s + batch_size]
            enc = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, padding="longest",
                                return_attention_mask=True, return_tensors="pt")
            mask = enc["attention_mask"].bool()  # (B, T)
            if prefix_w is not None:
                w = torch.zeros(mask.shape, dtype=torch.int64)  # (B, T): 0 on padding and repeats
                for r, i in enumerate(rows):
                    w[r, :len(prefix_w[i])] = torch.tensor(prefix_w[i])
                mask = w > 0
                weights = w[mask].to(device)
            else:
                weights = None
            enc = {k: v.to(device) for k, v in enc.items()}
            adapter.run(**enc)
            mask = mask.to(device)
            for layer in layers:
                keys = rec["keys"][layer][mask]  # (n_kept_tokens, d_in)
                if acc is None:
                    moments[layer].update(keys, weights, batch_dtype=batch_dtype)
                else:
                    acc[layer].add(keys, weights)
            pending_rows += int(mask.sum())
            if acc is not None and pending_rows >= fold_rows:
                for layer in layers:
                    acc[layer].fold_into(moments[layer])
                pending_rows = 0
            n_tokens += int(enc["attention_mask"].sum())
            bar.update(len(rows))
        for layer in layers if acc is not None else []:
            acc[layer].fold_into(moments[layer])
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
