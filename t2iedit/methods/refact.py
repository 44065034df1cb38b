"""ReFACT (Arad, Orgad & Belinkov, 2024): a rank-one ROME edit of one text-encoder MLP layer.

For one edit (source prompt = the subject ``s``, target prompt ``t``) at layer ``l``:

1. key ``k`` = fc2 input at the last token of ``s`` averaged over 9 context templates;
   ``u = C0⁻¹ k / ‖C0⁻¹ k‖`` (ROME's second-moment adjustment, by a linear solve).
2. ``δ`` added to the MLP output (= fc2 output) at the last subject token is optimised with the
   contrastive text loss: scores = −L2 distance between the edited encoder's [EOS] feature of each
   rewriting prompt and the frozen encoder's features of [t, old] (old: RoAD's Old, else ``s``);
   loss = −mean log softmax(target) + ``wd · ‖δ‖ / ‖v0‖²``; Adam, stop once the mean p(target)
   exceeds the threshold; ``‖δ‖ ≤ c·‖v0‖``.
3. ``r = (v0 + δ − W k_s) / (k_s · u)`` with ``k_s`` the fc2 input of the plain source prompt, and
   ``ΔW = r uᵀ`` (rank one), so the edited layer maps ``k_s`` to ``v0 + δ``.

ReFACT is single-edit: several facts are applied one after another, each computed on the encoder left
by the previous edit (C0 and the frozen target features stay those of the unedited encoder).
Follows technion-cs-nlp/ReFACT (``contrastive_text``, ``l2``); deviations in docs/BASELINES.md.
Speed: δ enters at block ``layer``, so each Adam step runs only the blocks from it on (their input
computed once) and the model's pooler — the full forward's features (tested), ~35 % less time on
the default's MiniLM at layer 3 of 6.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from t2iedit.models import TextEncoderAdapter, capture_block_input, encoder_tail, pooler_output
from t2iedit.prompts import EditRequest, fill, subject_last_token, tokenize_with_offsets

logger = logging.getLogger(__name__)

#: ReFACT's context templates (``get_context_templates`` of the reference).
REFACT_TEMPLATES: tuple[str, ...] = (
    "{} in a realistic style portrait image", "{}, a portrait", "realistic painting of {}",
    "a current image of {}", "{}, news image", "a beautiful photograph of {}",
    "realistic drawing of {}", "{}, realistic portrait", "{} in a photo",
)


@dataclass(frozen=True)
class RefactConfig:
    """ReFACT's hyperparameters (METHOD.md §7). ``layer``: 9 for TIMED, 7 for RoAD (SD 1.x)."""

    layer: int = 9
    templates: tuple[str, ...] = REFACT_TEMPLATES
    lr: float = 0.05
    max_steps: int = 100
    prob_threshold: float = 0.99
    clamp_norm_factor: float = 4.0
    weight_decay: float = 0.1


def _encode_subject(tokenizer, subject: str, templates: Sequence[str]):
    """Tokenized prompts ``template.format(subject)`` and the position of the subject's last token."""
    filled = [fill(t, subject) for t in templates]
    enc, offsets = tokenize_with_offsets(tokenizer, [f for f, _ in filled])
    pos = [subject_last_token(off, start, start + len(subject))
           for off, (_, start) in zip(offsets, filled)]
    return enc, torch.tensor(pos)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def fc2_io_at(adapter: TextEncoderAdapter, tokenizer, subject: str, templates: Sequence[str],
              layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fc2 input (n_templates, d_in) and output (n_templates, d_out) at the subject's last token."""
    enc, pos = _encode_subject(tokenizer, subject, templates)
    dev = _device(adapter.model)
    with adapter.capture([layer], keys=True, values=True, stop_after=layer) as rec:
        adapter.run(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
    rows = torch.arange(len(pos))
    return rec["keys"][layer][rows, pos.to(dev)], rec["values"][layer][rows, pos.to(dev)]


def eos_features(model: nn.Module, enc, projection: nn.Module | None = None) -> torch.Tensor:
    """The [EOS] text feature: ``text_embeds`` of a model with projection, else the pooled output
    (final layer norm at EOS), passed through ``projection`` when one is given. (B, d)."""
    dev = _device(model)
    out = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
    feat = getattr(out, "text_embeds", None)
    if feat is None:
        feat = out.pooler_output
        if projection is not None:
            feat = projection(feat)
    return feat


@contextlib.contextmanager
def _add_at(module: nn.Module, delta: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` to ``module``'s output at the positions where ``mask`` (B, T) is 1."""
    def hook(_mod, _inp, out):
        return out + mask[..., None].to(out.dtype) * delta
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def refact_left_vector(k: torch.Tensor, C0: torch.Tensor) -> torch.Tensor:
    """``u = C0⁻¹ k / ‖C0⁻¹ k‖`` in float64 by a linear solve. k: (d_in,), C0: (d_in, d_in)."""
    u = torch.linalg.solve(C0.double(), k.double().cpu())
    return u / u.norm()


def _features_with_delta(adapter: TextEncoderAdapter, layer: int, enc,
                         projection: nn.Module | None) -> Callable[[], torch.Tensor]:
    """A function computing :func:`eos_features` of ``enc`` as the encoder is when called (the δ hook
    on layer ``layer``'s fc2 included). Everything before block ``layer`` is frozen and does not see δ:
    where the architecture allows (``models.encoder_tail``), its input is computed once and each call
    runs only the blocks from ``layer`` on and the pooler — the same operations on the same inputs as
    the full forward (tested equal)."""
    model = adapter.model
    tail = (encoder_tail(model, adapter.block(layer), inclusive=True)
            if adapter.block_template else None)
    if tail is None:  # e.g. CLIPTextModelWithProjection (text_embeds): the full forward
        return lambda: eos_features(model, enc, projection)
    dev = _device(model)
    ids, attn = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    with torch.no_grad(), capture_block_input(adapter.block(layer)) as at:
        adapter.run(input_ids=ids, attention_mask=attn)

    def features() -> torch.Tensor:
        feat = pooler_output(model, tail(at["h"], *at["args"], **at["kwargs"]), ids)
        return feat if projection is None else projection(feat)

    return features


def optimise_delta(adapter: TextEncoderAdapter, tokenizer, request: EditRequest,
                   target_feats: torch.Tensor, config: RefactConfig,
                   projection: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ReFACT's ``compute_v`` optimisation. ``target_feats``: (2, d) frozen features of
    [target, old] (``request.old``, else the source). Returns (v0, δ, info) with v0 the fc2 output
    of the plain source prompt at its last token; the model's weights are not changed (the δ hook is
    removed on return)."""
    prompts = ("{}",) + tuple(config.templates)
    enc, pos = _encode_subject(tokenizer, request.source, prompts)
    dev = _device(adapter.model)
    mask = torch.zeros(enc["input_ids"].shape, device=dev)
    mask[torch.arange(len(pos)), pos.to(dev)] = 1.0
    fc2 = adapter.layer(config.layer)
    with torch.no_grad(), adapter.capture([config.layer], keys=False, values=True,
                                          stop_after=config.layer) as rec:
        adapter.run(input_ids=enc["input_ids"][:1].to(dev),
                    attention_mask=enc["attention_mask"][:1].to(dev))
    v0 = rec["values"][config.layer][0, pos[0]].detach()  # (d_out,)
    features = _features_with_delta(adapter, config.layer, enc, projection)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)
    max_norm = config.clamp_norm_factor * v0.norm()
    target_feats = target_feats.to(dev)
    requires = [p.requires_grad for p in adapter.model.parameters()]
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    prob, steps = 0.0, 0
    try:
        for steps in range(config.max_steps):
            opt.zero_grad()
            with _add_at(fc2, delta, mask):
                feats = features()  # (n_prompts, d)
            scores = -torch.cdist(feats[None], target_feats[None])[0]  # (n_prompts, 2)
            logp = torch.log_softmax(scores, dim=1)[:, 0]
            prob = logp.exp().mean().item()
            loss = -logp.mean() + config.weight_decay * delta.norm() / v0.norm() ** 2
            if prob > config.prob_threshold or steps == config.max_steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():  # project back into the L2 ball
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        for p, r in zip(adapter.model.parameters(), requires):
            p.requires_grad_(r)
    return v0, delta.detach(), {"prob": prob, "steps": steps + 1}


def compute_refact_update(adapter: TextEncoderAdapter, tokenizer, request: EditRequest,
                          C0: torch.Tensor, target_feats: torch.Tensor, config: RefactConfig,
                          projection: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """The rank-one ΔW = r uᵀ (float64, (d_out, d_in)) of one edit on the encoder as it is now."""
    k = fc2_io_at(adapter, tokenizer, request.source, config.templates, config.layer)[0].mean(0)
    u = refact_left_vector(k, C0)  # (d_in,)
    v0, delta, info = optimise_delta(adapter, tokenizer, request, target_feats, config, projection)
    k_s, out_s = fc2_io_at(adapter, tokenizer, request.source, ("{}",), config.layer)
    r = (v0 + delta - out_s[0]).double().cpu() / torch.dot(k_s[0].double().cpu(), u)  # (d_out,)
    return torch.outer(r, u), info


def compute_refact_edit(adapter: TextEncoderAdapter, tokenizer, requests: Sequence[EditRequest],
                        C0: torch.Tensor, config: RefactConfig = RefactConfig(),
                        projection: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """ΔW (float32, keyed by the fc2 module name) of ReFACT applied to ``requests`` in sequence,
    plus per-edit info (final p(target), steps).

    Each edit is applied to the layer before the next is computed; the original weights are restored
    bit-exactly on return (also on error), so the model is unchanged when this returns.
    """
    fc2 = adapter.layer(config.layer)
    w0 = fc2.weight.detach().clone()
    with torch.no_grad():
        # ReFACT's contrast pair is [new, old] (technion-cs-nlp/ReFACT src/refact/compute_v.py:76 with
        # clip_edit.py:262-263 ``new_text``/``true_text`` = the dataset's New/Old): RoAD's Old is the
        # referent ("justin trudeau"), not the prompt ("Canada's Prime Minister"); TIMED's Old is the prompt
        texts = [t for req in requests for t in (req.target, req.old or req.source)]
        enc, _ = tokenize_with_offsets(tokenizer, texts)
        frozen = eos_features(adapter.model, enc, projection).reshape(len(requests), 2, -1)
    total = torch.zeros(w0.shape, dtype=torch.float64)
    infos = []
    try:
        for i, req in enumerate(requests):
            dw, info = compute_refact_update(adapter, tokenizer, req, C0, frozen[i], config,
                                             projection)
            with torch.no_grad():
                fc2.weight += dw.to(fc2.weight)
            total += dw
            infos.append({"edit_id": req.edit_id, **info})
            logger.debug("ReFACT edit %d/%d p(target)=%.3f after %d steps",
                         i + 1, len(requests), info["prob"], info["steps"])
    finally:
        with torch.no_grad():
            fc2.weight.copy_(w0)
    logger.info("ReFACT: %d edits at layer %d", len(requests), config.layer)
    return {adapter.module_name(config.layer): total.float()}, infos


def refact_method(requests: Sequence[EditRequest], stats, components, config: RefactConfig,
                  *, method: str = "refact"):
    """The registry entry: ReFACT's accumulated ΔW as an ``EditArtifact`` (one ``text_encoder:``
    module), with each edit's final p(target) and step count in the manifest."""
    from t2iedit.edit import EditArtifact, module_key
    from t2iedit.methods.base import make_manifest

    deltas, infos = compute_refact_edit(components.adapter, components.tokenizer, requests,
                                        stats.moment(config.layer), config)
    return EditArtifact(
        {module_key("text_encoder", name): d for name, d in deltas.items()},
        make_manifest(method, components, config, (config.layer,), len(requests),
                      {"per_edit": infos, "sequential": True}))
