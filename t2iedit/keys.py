"""Keys and hidden states of the edited text-encoder layers (METHOD.md §2 and §6).

- :class:`SecondMoment` / :func:`collect_second_moment`: the preserved keys' uncentred second moment
  ``C0 = (1/n) Σ k kᵀ`` over every non-padding token of a prompt corpus (paper eq. 3's K0 K0ᵀ),
  streaming and mergeable, accumulated in float64 (the product of each buffer of up to 4,096 keys in
  float32, merged in float64; batches of equal-length texts, no padding; in a causal encoder each
  distinct token prefix's key once, weighted by its count).
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
        the float64 sum. float64 (default): exact to float64 rounding. float32: one triangle of the
        product (a BLAS SYRK on the CPU: half a GEMM's flops, ≈ 4× faster than the float64 GEMM
        there), mirrored; the batches are still merged in float64, so rounding does not grow with
        the corpus (relative difference to the float64 product ≈ 1e-7 per batch, METHOD.md §2).
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
            k = _scaled(keys.detach().to(dtype=batch_dtype), weights)  # (n, d)
            gram = _mirror_lower_(_gram_lower(k))  # (d, d) float32, symmetric
            _add_into(self.sum, gram)
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


def _gram_lower(k: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (default: a new zero matrix) with its lower triangle (diagonal included) set to that
    of ``kᵀ k`` ``(d, d)``, computed in ``k``'s dtype, and zeros above the diagonal — provided ``out``
    had zeros there (as a matrix that only this function writes does): on the CPU in float32 one
    BLAS SYRK (scipy's ``ssyrk``, ``beta = 0``: half a GEMM's flops, in place) writes the triangle
    only; elsewhere :func:`_gram_lower_torch`."""
    d = k.shape[1]
    if out is None:
        out = torch.zeros(d, d, dtype=k.dtype, device=k.device)
    if k.device.type != "cpu" or k.dtype != torch.float32:
        return _gram_lower_torch(k, out)
    from scipy.linalg import blas

    # k (n, d) C-order is (d, n) Fortran-order, so ssyrk(trans=0) gives kᵀk; out's C-order lower
    # triangle is the upper triangle of its Fortran-order view, which ssyrk updates in place
    c = out.numpy().T
    res = blas.ssyrk(1.0, k.contiguous().numpy().T, beta=0.0, c=c, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(res, c):  # not expected; kept correct if scipy copies
        c[...] = np.triu(res) + np.tril(c, -1)
    return out


def _gram_lower_torch(k: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`_gram_lower` for any device and dtype: one GEMM, its lower triangle (zeros above) into
    ``out`` (torch has no SYRK; on a GPU the GEMM is cheap next to the forward)."""
    return torch.tril(k.T @ k, out=out)  # (d, d)


_MIRROR_BLOCK = 384  # a (384, 384) float64 block is 1.2 MB: source and target stay in cache


def _mirror_lower_(m: torch.Tensor, block: int = _MIRROR_BLOCK) -> torch.Tensor:
    """Copy the lower triangle of the square ``m`` onto its upper one, in place, block by block (a
    whole-matrix transposed copy strides through memory: ~10× slower at d = 3072)."""
    d = m.shape[0]
    edges = list(range(0, d, block)) + [d]
    for i in range(len(edges) - 1):
        ri = slice(edges[i], edges[i + 1])
        m[ri, ri] = torch.tril(m[ri, ri]) + torch.tril(m[ri, ri], -1).T
        for j in range(i + 1, len(edges) - 1):
            rj = slice(edges[j], edges[j + 1])
            m[ri, rj] = m[rj, ri].T
    return m


def _add_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """``out`` (float64) += ``x`` (any float dtype, any device), without a float64 temporary of
    ``x`` on the CPU (torch's mixed-dtype ``+=`` allocates one: page faults cost ~5× the add)."""
    x = x.to(out.device)
    if out.device.type == "cpu":
        np.add(out.numpy(), x.numpy(), out=out.numpy())
    else:
        out += x


class _KeyBuffer:
    """Kept keys of every layer, gathered straight into a float32 buffer of ``rows`` rows per layer;
    when a buffer is full (and at the end), one triangle of its ``Σ w k kᵀ`` in float32
    (:func:`_gram_lower`, into one scratch matrix shared by the layers) is added into that layer's
    float64 sum (lower triangle only; :meth:`moments` mirrors it once). Large SYRKs run near the
    BLAS peak; the float64 merge keeps rounding from growing with the corpus."""

    def __init__(self, dims: dict[int, int], device: torch.device | str, rows: int):
        self.dims, self.rows = dims, rows
        # torch.empty: pages are touched (and cost) only as rows are written
        self.buf = {layer: torch.empty(rows, d, dtype=torch.float32, device=device)
                    for layer, d in dims.items()}
        self.fill = {layer: 0 for layer in dims}
        self.sums: dict[int, torch.Tensor | None] = {layer: None for layer in dims}  # (d, d) float64
        self.counts = {layer: 0 for layer in dims}
        self.scratch: dict[int, torch.Tensor] = {}  # d -> (d, d) float32, zeros above the diagonal

    def add(self, layer: int, keys: torch.Tensor, index: torch.Tensor | None = None,
            weights: torch.Tensor | None = None) -> None:
        """Rows ``index`` (default: all) of ``keys`` (m, d) for ``layer``; ``weights`` (len(index),):
        kept row i stands for ``weights[i]`` identical keys (default 1 each)."""
        keys = keys.detach()
        if keys.dtype != torch.float32:
            keys = keys.float()
        n = keys.shape[0] if index is None else index.shape[0]
        self.counts[layer] += n if weights is None else int(weights.sum())
        if n > self.rows:  # larger than a buffer: its own product
            self.fold(layer)
            self._fold_rows(layer, _scaled(keys if index is None else keys[index], weights))
            return
        if self.fill[layer] + n > self.rows:
            self.fold(layer)
        dst = self.buf[layer][self.fill[layer]:self.fill[layer] + n]  # (n, d), contiguous
        if index is None:
            dst.copy_(keys)
        else:
            torch.index_select(keys, 0, index, out=dst)
        if weights is not None:
            dst.mul_(weights.to(dst.device, torch.float32).sqrt()[:, None])
        self.fill[layer] += n

    def fold(self, layer: int) -> None:
        if self.fill[layer]:
            self._fold_rows(layer, self.buf[layer][:self.fill[layer]])
            self.fill[layer] = 0

    def _fold_rows(self, layer: int, k: torch.Tensor) -> None:
        d = self.dims[layer]
        if d not in self.scratch:
            self.scratch[d] = torch.zeros(d, d, dtype=torch.float32, device=k.device)
        tri = _gram_lower(k, self.scratch[d])  # (d, d) float32, zeros above the diagonal
        if self.sums[layer] is None:
            self.sums[layer] = tri.to(device="cpu", dtype=torch.float64)
        else:
            _add_into(self.sums[layer], tri)

    def moments(self) -> dict[int, SecondMoment]:
        """Fold what is pending and return each layer's :class:`SecondMoment` (full symmetric sum)."""
        out = {}
        for layer, d in self.dims.items():
            self.fold(layer)
            s = self.sums[layer]
            s = torch.zeros(d, d, dtype=torch.float64) if s is None else _mirror_lower_(s)
            out[layer] = SecondMoment(d, s, self.counts[layer])
        return out


def _scaled(k: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``k`` times ``sqrt(weights)``: ``Σ (√w k)(√w k)ᵀ = Σ w k kᵀ``."""
    return k if weights is None else k * weights.to(k.device, k.dtype).sqrt()[:, None]


@dataclass
class _Batches:
    """Tokenized corpus sorted by length and cut into batches of texts of one length each (at most
    ``batch_size``): no token is padding, so the forward does no wasted work (on COCO captions
    padding each batch of 64 to its longest text costs 50 % more token positions)."""

    ids: list[list[int]]
    order: list[int] = field(init=False)

    def __post_init__(self):
        self.order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))

    def __call__(self, batch_size: int) -> Iterable[list[int]]:
        """Row indices of each batch, in ``order``."""
        s = 0
        while s < len(self.order):
            length = len(self.ids[self.order[s]])
            e = s + 1
            while e < len(self.order) and e - s < batch_size and len(self.ids[self.order[e]]) == length:
                e += 1
            yield self.order[s:e]
            s = e


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
                          fold_rows: int = 4096) -> dict[int, SecondMoment]:
    """Second moments of the edited layers' inputs over every non-padding token of ``texts``.

    BOS and EOS count as tokens; texts are truncated at the tokenizer's length (77 for CLIP). The
    corpus is sorted by token length and cut into batches of at most ``batch_size`` texts of equal
    length (no padding at all); the forward pass stops at the last needed layer's input. The result
    does not depend on ``batch_size`` (up to float rounding).

    ``batch_dtype``: float64 — each batch's ``Σ k kᵀ`` in float64 (:meth:`SecondMoment.update`);
    float32 (default, METHOD.md §2) — the kept keys are buffered (float32, at most ``fold_rows``
    rows per layer: 4096 × 3072 × 4 B = 50 MB a layer at SD 1.4's size), each buffer's product is
    one float32 SYRK and the products are merged in float64 (:class:`_KeyBuffer`). ``causal``
    (default: the encoder is a ``CLIPTextModel``): tokens sharing a prefix share their key, so each
    distinct prefix's key enters once, weighted by its count (:func:`_prefix_weights`) — the same
    moment, fewer products. Never for a bidirectional encoder (BERT: a token's key depends on the
    tokens after it).
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
    dims = {layer: adapter.layer(layer).in_features for layer in layers}
    device = next(adapter.model.parameters()).device
    if batch_dtype == torch.float32:
        kept = sum(len(ids[i]) for i in batches.order) if prefix_w is None else \
            sum(x > 0 for row in prefix_w for x in row)
        buffer = _KeyBuffer(dims, device, max(1, min(fold_rows, kept)))
    else:
        moments = {layer: SecondMoment(dims[layer]) for layer in layers}
    n_tokens, start = 0, time.perf_counter()

    bar = tqdm(total=len(ids), desc="second moment", unit="text", disable=not progress)
    with torch.inference_mode(), adapter.capture(layers, keys=True, values=False,
                                                 stop_after=layers[-1]) as rec:
        for rows in batches(batch_size):
            input_ids = torch.tensor([ids[i] for i in rows])  # (B, T): one length, no padding
            if prefix_w is not None:
                w = torch.tensor([prefix_w[i] for i in rows]).flatten()  # (B T,): 0 on repeated prefixes
                index = torch.nonzero(w).flatten().to(device)  # (n_kept,)
                weights = w[w > 0].to(device)
            else:
                index, weights = None, None
            adapter.run(input_ids=input_ids.to(device))  # no padding: no attention mask needed
            for layer in layers:
                keys = rec["keys"][layer]  # (B, T, d_in)
                keys = keys.reshape(-1, keys.shape[-1])  # (B T, d_in)
                if batch_dtype == torch.float32:
                    buffer.add(layer, keys, index, weights)
                else:
                    moments[layer].update(keys if index is None else keys[index], weights,
                                          batch_dtype=batch_dtype)
            n_tokens += input_ids.numel()
            bar.update(len(rows))
        if batch_dtype == torch.float32:
            moments = buffer.moments()
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
