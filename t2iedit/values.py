"""Target values V1* (METHOD.md §5): entity-aware semantic alignment, batched over edits.

For edit i a residual δ_i (d_model) is added to the output of text-encoder block ``value_layer`` at the
edit token — the last token of the source prompt — in every prompt template (EMCID/MEMIT scheme), and
optimised with (paper eq. 4–6)

    L_i = w_text L_T(δ_i) + α L_E(δ_i) + w_V L_V(δ_i) + wd ‖δ_i‖² / ‖z0_i‖²

    L_T = mean_d (c_src(δ_i) − c_tgt)²,  L_E = mean over entities and d of (c_e(δ_i) − c_e)²,
    L_V = mean over latent elements of (ε(x_t, c_src(δ_i), t) − ε(x_t, c_tgt, t))²

- c_src(δ): pooled feature of the source prompt under the edited encoder, c_tgt: of the target prompt
  (same template) under the frozen encoder (``losses.pooled_feature``; CLIP: [EOS] after the final
  layer norm, un-projected);
- c_e: mean final hidden state of each named entity's tokens in the source prompt, edited vs frozen;
- L_V: x_t = DDPM-noised latents of images the
  unedited model generated from the source prompt, t ~ U{0..T−1} (EMCID); the UNet is conditioned on
  the full padded 77-token hidden states of the plain source prompt as Stable Diffusion encodes it;
- terms are averaged over the templates (text, EATA) and the sampled latents (visual).

With a causal encoder (CLIP) δ reaches only the edit token and the tokens after it, so EATA constrains
an entity only through its tokens at or after the edit token: for CAKE the entity ends the source
prompt ("The president of the United States"), its last token is the edit token; an entity before
it ("The Titanic male lead") is untouched by δ and its term is exactly zero. A bidirectional encoder
(BERT/MiniLM) moves every token, so there every entity token counts.

Normalisation: every term is a mean squared error (mean over its elements), EMCID's convention for
both its terms (SilentView/EMCID emcid/compute_z.py:544, :615; ``t2iedit.losses``), so no weight
depends on the feature width or the latent resolution. The weights (w_text, w_V) come from the
paper's λ = 0.01 under a named reading (:data:`WEIGHTINGS`, docs/METHOD.md §5): ``paper`` (1, λ), eq. 6
as printed; ``emcid`` (λ, 1), EMCID's code. The weight decay is scale-free (‖δ‖² / ‖z0‖²).

The result for the editing core is z_i = z0_i + δ_i with z0_i = h_L(source)_i, the block output at the
edit token of the plain source prompt ("{}" template), the value the closed-form solve writes.

Two encodings per step: the (edits × templates) rows of the text and EATA terms as sentence features
(padded to the longest row, with the attention mask: the features ``c_tgt`` and the text-space metrics
read), and, for L_V, the plain source prompts as Stable Diffusion conditions on them (77 tokens, no
mask unless the encoder's config asks for one). With CLIP's causal attention the two agree on real
tokens, and so they do for a bidirectional encoder whose config asks for the mask (tiny-minilm's
``use_attention_mask``); one that does not (a plain BERT) would see the pads of the 77-token rows, so
the text term is always taken on the masked rows — and only the plain rows pay for 77 tokens.

Batching: all edits of a batch are optimised together, one padded forward pass per encoding per step.
The optimised objective is Σ_i L_i: L_i depends only on δ_i (rows never mix in the encoder, per-edit
masks, per-edit means, per-edit clamp and per-edit random draws) and Adam is per-coordinate, so every
δ_i follows exactly the trajectory it would follow alone.
Everything up to the value layer is frozen and does not depend on δ: its output (and the attention
mask the encoder passes to its blocks) is computed once, and each step runs only the blocks after it
and the final layer norm (``models.EncoderTail``; CLIP and BERT). Other encoders run the full forward
with δ injected by a hook: the same function of δ, slower.
The models are unchanged when these functions return (hooks removed, ``requires_grad`` restored).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import torch
from torch import nn

from t2iedit.storage import stable_hash
from t2iedit.losses import (Pooling, entity_features, eata_loss, per_edit_mean, pooled_feature,
                            text_loss, visual_loss)
from t2iedit.models import encoder_tail
from t2iedit.prompts import DEFAULT_TEMPLATES, EditRequest, fill, span_token_positions, subject_last_token

logger = logging.getLogger(__name__)

PLAIN_TEMPLATE = "{}"
#: Which term the paper's λ (0.01) weights: name → (text-side scale s, visual weight w_V) as functions
#: of λ. The text side is the text term and what was tuned against a unit text term — α's EATA term and
#: the weight decay — so their ratios to the text stay the paper's: weights (s, s·α, w_V, s·wd).
#: ``paper``: eq. 6 as printed, L_T + α L_E + λ L_V. ``emcid``: EMCID's code, λ (L_T + α L_E) + L_V
#: (``text_repr_loss_scale_factor`` 0.01 on the text, SilentView/EMCID emcid/compute_z.py:616 and
#: hparams/dest_s-200_c-1.5_ly-11_lr-0.2_ewc-1e7_txt-align-0.01.json:26; the noise loss unweighted,
#: compute_z.py:556). Adam is invariant to the loss' overall scale, so ``emcid`` is the paper's form
#: with L_V weighted 1/λ. The default is argued in docs/METHOD.md §5.
WEIGHTINGS: dict[str, Callable[[float], tuple[float, float]]] = {
    "paper": lambda lam: (1.0, lam),
    "emcid": lambda lam: (lam, 1.0),
}
DEFAULT_WEIGHTING = "emcid"  # argued in docs/METHOD.md §5
PAPER_ALPHA, PAPER_LAMBDA, WEIGHT_DECAY = 0.11, 0.01, 1.0e-3  # α, λ (paper eq. 6); wd vs a unit text term
_S, _WV = WEIGHTINGS[DEFAULT_WEIGHTING](PAPER_LAMBDA)
#: Weighted terms recorded at the first and the last Adam step (their shares go to metrics.json).
SHARE_TERMS = ("text", "eata", "visual", "total")


@dataclass(frozen=True)
class ValueConfig:
    """Hyper-parameters of the target-value optimisation.

    ``text_weight``, ``alpha``, ``lambda_visual`` and ``weight_decay`` are the weights the terms get;
    build them from the paper's α and λ with :func:`weighted_config` (a bare ``ValueConfig(alpha=0.11)``
    would put the paper's α against the default weighting's text weight 0.01)."""

    # the weights each term gets; defaults: the default weighting of the paper's α = 0.11, λ = 0.01
    # (``weighted_config``: emcid → text 0.01, EATA 0.0011, L_V 1, decay 1e-5)
    alpha: float = _S * PAPER_ALPHA  # EATA weight (0: the ablation without entity awareness)
    lambda_visual: float = _WV       # weight w_V of L_V (0: text-only mode, no UNet needed)
    text_weight: float = _S          # weight w_text of the text term
    steps: int = 200
    lr: float = 0.2
    clamp_factor: float = 1.5      # ‖δ_i‖ ≤ clamp_factor ‖z0_i‖ (EMCID)
    weight_decay: float = _S * WEIGHT_DECAY  # on ‖δ_i‖² / ‖z0_i‖² (scale-free)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    pooling: Pooling = "eos"
    seed: int = 0                  # visual-loss draws (t, noise), one generator per edit
    log_every: int = 50

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.clamp_factor <= 0:
            raise ValueError("steps must be ≥ 0, lr and clamp_factor > 0")
        if min(self.alpha, self.lambda_visual, self.text_weight, self.weight_decay) < 0:
            raise ValueError("loss weights must be ≥ 0")
        if not self.templates:
            raise ValueError("at least one prompt template is needed")
        for t in self.templates:
            fill(t, "x")  # validates the placeholder
        if self.lambda_visual > 0 and PLAIN_TEMPLATE not in self.templates:
            raise ValueError("the visual loss conditions the UNet on the plain source prompt: "
                             "templates must include '{}'")

    def hash(self) -> str:
        return stable_hash(asdict(self))


def weighted_config(weighting: str = DEFAULT_WEIGHTING, lam: float = PAPER_LAMBDA,
                    alpha: float = PAPER_ALPHA, weight_decay: float = WEIGHT_DECAY, **kwargs) -> ValueConfig:
    """A ``ValueConfig`` from the paper's α, λ and a weight decay tuned against a unit text term, under
    a named reading of λ (:data:`WEIGHTINGS`): the weights of (text, EATA, L_V, decay) are
    ``paper`` → (1, α, λ, wd), ``emcid`` → (λ, λα, 1, λ·wd).

    λ = 0 is the text-only mode (no UNet): under ``paper`` it drops L_V; under ``emcid`` it would
    drop the text term instead, so it is refused there.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, not {weighting!r}")
    if "text_weight" in kwargs or "lambda_visual" in kwargs:
        raise ValueError("weighted_config sets text_weight and lambda_visual from lam and the weighting")
    if lam < 0:
        raise ValueError(f"lam must be ≥ 0, got {lam}")
    if weighting == "emcid" and lam == 0:
        raise ValueError("weighting 'emcid' puts λ on the text term: λ = 0 would leave the visual loss "
                         "alone; the text-only mode is weighting 'paper' with λ = 0")
    s, w_v = WEIGHTINGS[weighting](float(lam))
    return ValueConfig(text_weight=s, alpha=s * alpha, lambda_visual=w_v, weight_decay=s * weight_decay,
                       **kwargs)


@dataclass
class VisualInputs:
    """What L_V needs: the UNet, a scheduler with DDPM ``add_noise`` and the cached latents
    (n_edits, K, C, H, W) of K images per edit generated by the unedited model from its source."""

    unet: nn.Module
    noise_scheduler: object
    latents: torch.Tensor


@dataclass
class ValueResult:
    edit_ids: list[str]
    z: torch.Tensor        # (n_edits, d) target block output at the edit token, z0 + δ
    delta: torch.Tensor    # (n_edits, d)
    z0: torch.Tensor       # (n_edits, d) unedited block output at the edit token (plain source)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (n_edits,)
    steps: int = 0
    value_layer: int = -1


# --------------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------------
def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def add_at_positions(module: nn.Module, rows: torch.Tensor, positions: torch.Tensor,
                     values: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Add ``values()`` (len(rows), d) to ``module``'s output (B, T, d) at ``(rows, positions)``.

    The δ injection: ``values`` is called at each forward, so it sees the current δ; gradients flow
    to it. The hook is removed on exit, even on error.
    """
    def hook(_mod, _inputs, output):
        return _replace_hidden(output, _add_at(_hidden(output), rows, positions, values()))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _add_at(h: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
            values: torch.Tensor) -> torch.Tensor:
    """``h`` (B, T, d) with ``values`` (len(rows), d) added at ``(rows, positions)`` (out of place)."""
    return h.index_put((rows, positions), values.to(h.dtype), accumulate=True)


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[dict]:
    """Record ``module``'s output hidden states (B, T, d) under key ``"h"`` (detached), and the other
    arguments the model called it with under ``"args"`` (after the hidden states) and ``"kwargs"``
    (attention mask, ``is_causal``, …: what the later blocks get too, see ``models.EncoderTail``)."""
    record: dict = {}

    def hook(_mod, args, kwargs, output):
        record.update(h=_hidden(output).detach(), args=args[1:], kwargs=kwargs)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Parameters do not require grad inside the block (only δ gets gradients); restored on exit."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------------
# batch preparation
# --------------------------------------------------------------------------------------------------
@dataclass
class PromptRows:
    """(edits × templates) source rows, edit-major: row r belongs to edit ``row_edit[r]``."""

    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T) from the tokenizer (pooling); the model may get none
    model_mask: torch.Tensor | None
    row_edit: torch.Tensor        # (B,)
    edit_pos: torch.Tensor        # (B,) edit token = last token of the source inside the template
    entity_weights: torch.Tensor  # (B, E, T), 1/n on each entity's n tokens
    entity_mask: torch.Tensor     # (B, E)


def encode(tokenizer, texts: Sequence[str], model: nn.Module, sd_conditioning: bool):
    """Tokenize as the consumer of the features does.

    ``sd_conditioning``: Stable Diffusion's ``encode_prompt`` — padded to ``model_max_length`` (77)
    and no attention mask unless the encoder's config asks for one; else padded to the longest text,
    with the attention mask. (With CLIP's causal attention both give the same states on real tokens.)
    Returns (encoding, offsets, mask for the model).
    """
    enc = tokenizer(list(texts), padding="max_length" if sd_conditioning else "longest",
                    truncation=True, max_length=tokenizer.model_max_length,
                    return_offsets_mapping=True, return_tensors="pt")
    offsets = [[tuple(map(int, o)) for o in row] for row in enc.pop("offset_mapping")]
    use_mask = not sd_conditioning or bool(getattr(model.config, "use_attention_mask", False))
    return enc, offsets, enc["attention_mask"] if use_mask else None


def prepare_rows(tokenizer, model: nn.Module, requests: Sequence[EditRequest],
                 templates: Sequence[str], sd_conditioning: bool) -> PromptRows:
    texts, spans = [], []
    for req in requests:
        for t in templates:
            text, shift = fill(t, req.source)
            texts.append(text)
            spans.append((shift, req))
    enc, offsets, model_mask = encode(tokenizer, texts, model, sd_conditioning)
    n_rows, n_tok = enc["input_ids"].shape
    n_ent = max([1] + [len(r.entities) for r in requests])
    weights = torch.zeros(n_rows, n_ent, n_tok)
    emask = torch.zeros(n_rows, n_ent)
    edit_pos = torch.empty(n_rows, dtype=torch.long)
    for r, (shift, req) in enumerate(spans):
        edit_pos[r] = subject_last_token(offsets[r], shift, shift + len(req.source))
        for e, (a, b) in enumerate(req.entities):
            pos = span_token_positions(offsets[r], a + shift, b + shift)
            weights[r, e, pos] = 1.0 / len(pos)
            emask[r, e] = 1.0
    return PromptRows(enc["input_ids"], enc["attention_mask"], model_mask,
                      torch.arange(len(requests)).repeat_interleave(len(templates)),
                      edit_pos, weights, emask)


def _forward(model: nn.Module, input_ids, mask) -> torch.Tensor:
    kwargs = {"input_ids": input_ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    return model(**kwargs).last_hidden_state


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def edit_generator(seed: int, edit_id: str) -> torch.Generator:
    """The per-edit random stream (t and noise of L_V): the same whatever batch the edit is in."""
    return torch.Generator().manual_seed(int(stable_hash({"seed": seed, "edit": edit_id})[:15], 16))


def source_values(tokenizer, model: nn.Module, block: nn.Module,
                  requests: Sequence[EditRequest]) -> torch.Tensor:
    """z0: the unedited output of ``block`` at the edit token of each plain source prompt, (n, d)."""
    device = _device_of(model)
    rows = prepare_rows(tokenizer, model, requests, (PLAIN_TEMPLATE,), sd_conditioning=False)
    with torch.no_grad(), capture_output(block) as rec:
        _forward(model, rows.input_ids.to(device), rows.model_mask.to(device))
    return rec["h"][torch.arange(len(requests), device=device), rows.edit_pos.to(device)].float()


# --------------------------------------------------------------------------------------------------
# the optimisation
# --------------------------------------------------------------------------------------------------
#: ``progress(steps done, total steps, current mean total loss)``, called after every Adam step.
Progress = Callable[[int, int, float], None]


def compute_target_values(tokenizer, model: nn.Module, block: nn.Module,
                          requests: Sequence[EditRequest], config: ValueConfig,
                          visual: VisualInputs | None = None, value_layer: int = -1,
                          progress: Progress | None = None) -> ValueResult:
    """Optimise δ for all ``requests`` together (one batch); see the module docstring.

    ``block``: the transformer block whose output is the residual stream at the value layer
    (``TextEncoderAdapter.block(value_layer)``). ``visual`` is required iff ``config.lambda_visual``
    > 0. ``progress`` is told each step (the caller decides how often to show it). Runs on the device
    of ``model``; the model and UNet are unchanged when this returns.

    ``losses`` of the result: the unweighted terms at the final δ (``text``, ``eata``, ``visual``,
    ``decay``), ``total`` and ``total_init`` (at δ = 0), and the *weighted* terms and total at the first
    and the last Adam step (``first_text`` … ``last_total``), each (n_edits,).
    """
    use_visual = config.lambda_visual > 0
    if use_visual and visual is None:
        raise ValueError("lambda_visual > 0 needs VisualInputs (UNet, scheduler, source latents)")
    if not requests:
        raise ValueError("no edit requests")
    ids = [r.edit_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("edit ids within a batch must be unique")
    device = _device_of(model)
    n = len(requests)

    with frozen(model, visual.unet if visual else None):
        # text and EATA terms: the sentence features as the metrics read them (padded to the longest row,
        # attention mask); L_V: the plain source prompt as Stable Diffusion conditions on it (77 tokens)
        rows = prepare_rows(tokenizer, model, requests, config.templates, sd_conditioning=False)
        input_ids, model_mask = rows.input_ids.to(device), _to(rows.model_mask, device)
        attn, row_edit, edit_pos = (rows.attention_mask.to(device), rows.row_edit.to(device),
                                    rows.edit_pos.to(device))
        ent_w, ent_m = rows.entity_weights.to(device), rows.entity_mask.to(device)
        z0 = source_values(tokenizer, model, block, requests)  # (n, d)
        with torch.no_grad():  # frozen quantities, computed once
            tgt_texts = [fill(t, r.target)[0] for r in requests for t in config.templates]
            tgt_enc, _, tgt_mask = encode(tokenizer, tgt_texts, model, sd_conditioning=False)
            c_tgt = pooled_feature(_forward(model, tgt_enc["input_ids"].to(device), _to(tgt_mask, device)),
                                   tgt_enc["attention_mask"].to(device), config.pooling)  # (B, d)
            with capture_output(block) as at_block:  # the value layer's output, δ = 0 (B, T, d)
                h_frozen = _forward(model, input_ids, model_mask)
            c_e_frozen = entity_features(h_frozen, ent_w)  # (B, E, d)
            if use_visual:
                sd = prepare_rows(tokenizer, model, requests, (PLAIN_TEMPLATE,), sd_conditioning=True)
                sd_ids, sd_mask, sd_pos = (sd.input_ids.to(device), _to(sd.model_mask, device),
                                           sd.edit_pos.to(device))
                with capture_output(block) as at_block_sd:
                    _forward(model, sd_ids, sd_mask)
                cond_enc, _, cond_mask = encode(tokenizer, [r.target for r in requests], model, True)
                cond_tgt = _forward(model, cond_enc["input_ids"].to(device), _to(cond_mask, device))
                latents = visual.latents.to(device)
                if latents.shape[0] != n:
                    raise ValueError(f"latents for {latents.shape[0]} edits, requests {n}")
                gens = [edit_generator(config.seed, i) for i in ids]
                n_train = int(visual.noise_scheduler.config.num_train_timesteps)

        delta = torch.zeros_like(z0, requires_grad=True)  # (n, d)
        max_norm = config.clamp_factor * z0.norm(dim=1)  # (n,)
        opt = torch.optim.Adam([delta], lr=config.lr)

        all_rows = torch.arange(len(row_edit), device=device)
        tail = encoder_tail(model, block)

        def run(ids, mask, at, rows_, pos, which) -> torch.Tensor:
            """Final hidden states (B, T, d) with δ[which] added at the value layer. Everything up to the
            value layer is frozen and independent of δ, so only the blocks after it run, from its cached
            output ``at``; encoders without a known tail run the full forward with δ injected by a hook."""
            if tail is None:
                with add_at_positions(block, rows_, pos, lambda: delta[which]):
                    return _forward(model, ids, mask)
            return tail(_add_at(at["h"], rows_, pos, delta[which]), *at["args"], **at["kwargs"])

        def hidden() -> torch.Tensor:
            return run(input_ids, model_mask, at_block, all_rows, edit_pos, row_edit)

        def conditioning() -> torch.Tensor:
            """The UNet's conditioning of L_V: the plain source prompts' 77 states, δ added (n, 77, d)."""
            edits = torch.arange(n, device=device)
            return run(sd_ids, sd_mask, at_block_sd, edits, sd_pos, edits)

        def eval_draws() -> list[torch.Generator]:
            """The (t, noise) draw at which the loss before and after the optimisation is reported:
            the same one for both, separate from the training draws, so the two are comparable."""
            return [edit_generator(config.seed, f"{i}/report") for i in ids]

        def losses(step: int, draws: list[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
            """Per-edit loss terms at the current δ, each (n,); L_V at the next draw of ``draws``
            (default: the training stream)."""
            h = hidden()  # (B, T, d)
            c_src = pooled_feature(h, attn, config.pooling)
            out = {
                "text": per_edit_mean(text_loss(c_src, c_tgt), row_edit, n),
                "eata": per_edit_mean(eata_loss(entity_features(h, ent_w), c_e_frozen, ent_m), row_edit, n),
            }
            if use_visual:
                out["visual"] = _visual_term(visual, latents, draws or gens, n_train, step, conditioning(),
                                             cond_tgt)
            else:
                out["visual"] = torch.zeros(n, device=device)
            out["decay"] = config.weight_decay * delta.pow(2).sum(1) / z0.pow(2).sum(1)
            out["total"] = (config.text_weight * out["text"] + config.alpha * out["eata"]
                            + config.lambda_visual * out["visual"] + out["decay"])
            return out

        def weighted(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            w = {"text": config.text_weight, "eata": config.alpha, "visual": config.lambda_visual,
                 "total": 1.0}
            return {k: (w[k] * out[k]).detach().float().cpu() for k in SHARE_TERMS}

        with torch.no_grad():
            at_init = losses(0, eval_draws() if use_visual else None)
        initial = at_init["total"].detach()
        first = last = weighted(at_init)  # no Adam step (steps = 0): both are δ = 0
        t0 = time.perf_counter()
        for step in range(config.steps):
            opt.zero_grad(set_to_none=True)
            out = losses(step)
            total = out["total"]  # (n,)
            if step == 0:
                first = weighted(out)
            if step == config.steps - 1:
                last = weighted(out)
            total.sum().backward()  # Σ_i L_i: each δ_i gets exactly its own edit's gradient
            opt.step()
            with torch.no_grad():  # per-edit clamp ‖δ_i‖ ≤ c ‖z0_i‖
                norm = delta.norm(dim=1)
                delta.mul_((max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)[:, None])
            loss_now = total.detach().mean().item()
            if progress is not None:
                progress(step + 1, config.steps, loss_now)
            if config.log_every and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
                rate = (step + 1) / (time.perf_counter() - t0)
                logger.info("values: step %d/%d, mean loss %.4g, %.2f steps/s (%d edits)",
                            step + 1, config.steps, loss_now, rate, n)
        with torch.no_grad():
            final = {k: v.detach().float().cpu()
                     for k, v in losses(0, eval_draws() if use_visual else None).items()}
    final["total_init"] = initial.float().cpu()
    final.update({f"first_{k}": v for k, v in first.items()})
    final.update({f"last_{k}": v for k, v in last.items()})
    delta = delta.detach().float()
    return ValueResult(edit_ids=ids, z=(z0 + delta).cpu(), delta=delta.cpu(), z0=z0.cpu(),
                       losses=final, steps=config.steps, value_layer=value_layer)


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _visual_term(visual: VisualInputs, latents: torch.Tensor, gens: list[torch.Generator],
                 n_train: int, step: int, cond_src: torch.Tensor, cond_tgt: torch.Tensor) -> torch.Tensor:
    """L_V per edit at one draw: each edit's own generator picks t ~ U{0..T−1} and the noise; the
    latent cycles through the edit's K cached images."""
    n, k = latents.shape[:2]
    x0 = latents[:, step % k]  # (n, C, H, W)
    t = torch.cat([torch.randint(0, n_train, (1,), generator=g) for g in gens]).to(x0.device)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0)
    x_t = visual.noise_scheduler.add_noise(x0, noise, t)
    eps_src = visual.unet(x_t, t, encoder_hidden_states=cond_src).sample
    with torch.no_grad():
        eps_tgt = visual.unet(x_t, t, encoder_hidden_states=cond_tgt).sample
    return visual_loss(eps_src, eps_tgt)


def compute_target_values_batched(tokenizer, model: nn.Module, block: nn.Module,
                                  requests: Sequence[EditRequest], config: ValueConfig,
                                  batch_size: int, visual: VisualInputs | None = None,
                                  value_layer: int = -1, progress: Progress | None = None) -> ValueResult:
    """:func:`compute_target_values` over consecutive batches of ``batch_size`` edits, concatenated."""
    parts = []
    for i in range(0, len(requests), batch_size):
        sub = None if visual is None else VisualInputs(visual.unet, visual.noise_scheduler,
                                                       visual.latents[i:i + batch_size])
        parts.append(compute_target_values(tokenizer, model, block, requests[i:i + batch_size],
                                           config, sub, value_layer, progress))
    return concat_results(parts)


def concat_results(parts: Sequence[ValueResult]) -> ValueResult:
    if not parts:
        raise ValueError("nothing to concatenate")
    return ValueResult(
        edit_ids=[i for p in parts for i in p.edit_ids],
        z=torch.cat([p.z for p in parts]), delta=torch.cat([p.delta for p in parts]),
        z0=torch.cat([p.z0 for p in parts]),
        losses={k: torch.cat([p.losses[k] for p in parts]) for k in parts[0].losses},
        steps=parts[0].steps, value_layer=parts[0].value_layer)


# --------------------------------------------------------------------------------------------------
# source-image latents for L_V
# --------------------------------------------------------------------------------------------------
def ddpm_scheduler_for(pipe):
    """A DDPM scheduler with the pipeline's noise schedule (for ``add_noise``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def generate_source_latents(pipe, edit_ids: Sequence[str], prompts: Sequence[str], seed: int,
                            images_per_prompt: int = 1, batch_size: int = 8,
                            num_inference_steps: int | None = None,
                            guidance_scale: float | None = None, height: int | None = None,
                            width: int | None = None) -> torch.Tensor:
    """Latents of the images the unedited pipeline generates from each source prompt,
    (n, K, C, H, W) in the UNet's latent space (``output_type="latent"``, already VAE-scaled).

    Image k of edit i uses its own generator seeded from (seed, edit id, k): the latents of an edit do
    not depend on which other edits are generated with it, so they can be cached per edit.
    """
    kwargs = {}
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if height is not None:  # width None: square (height × height)
        kwargs["height"] = kwargs["width"] = height
    if width is not None:
        kwargs["width"] = width
    jobs = [(eid, p, k) for eid, p in zip(edit_ids, prompts, strict=True) for k in range(images_per_prompt)]
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator().manual_seed(int(stable_hash(
            {"seed": seed, "edit": eid, "image": k})[:15], 16)) for eid, _, k in chunk]
        res = pipe(prompt=[p for _, p, _ in chunk], generator=gens, output_type="latent", **kwargs)
        out.append(res.images.float().cpu())
        logger.info("source latents: %d/%d images", min(i + batch_size, len(jobs)), len(jobs))
    lat = torch.cat(out)  # (n*K, C, H, W)
    return lat.reshape(len(prompts), images_per_prompt, *lat.shape[1:])


# --------------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------------
#: The per-edit loss columns of :data:`LOSS_SCHEMA` (``ValueResult.losses`` keys).
LOSS_TERMS = ("text", "eata", "visual", "decay", "total", "total_init",
              *(f"{when}_{k}" for when in ("first", "last") for k in SHARE_TERMS))

LOSS_SCHEMA = pa.schema([
    pa.field("edit_id", pa.string(), nullable=False),
    pa.field("text", pa.float64(), nullable=False),
    pa.field("eata", pa.float64(), nullable=False),
    pa.field("visual", pa.float64(), nullable=False),
    pa.field("decay", pa.float64(), nullable=False),
    pa.field("total", pa.float64(), nullable=False),
    pa.field("total_init", pa.float64(), nullable=False),
    # weighted terms at the first and the last Adam step (shares of the loss: tasks.values.values_metrics)
    *(pa.field(f"{when}_{k}", pa.float64(), nullable=False)
      for when in ("first", "last") for k in SHARE_TERMS),
    pa.field("steps", pa.int32(), nullable=False),
    pa.field("delta_norm", pa.float64(), nullable=False),
    pa.field("z0_norm", pa.float64(), nullable=False),
])


def losses_table(result: ValueResult) -> pa.Table:
    cols = {"edit_id": result.edit_ids}
    for k in LOSS_TERMS:
        cols[k] = result.losses[k].double().tolist()
    cols["steps"] = [result.steps] * len(result.edit_ids)
    cols["delta_norm"] = result.delta.norm(dim=1).double().tolist()
    cols["z0_norm"] = result.z0.norm(dim=1).double().tolist()
    return pa.table(cols, schema=LOSS_SCHEMA)


def value_tensors(result: ValueResult) -> dict[str, torch.Tensor]:
    """What the editing core reads: ``z`` (n_edits, d), plus ``delta`` and ``z0``."""
    return {"z": result.z, "delta": result.delta, "z0": result.z0}


def value_meta(result: ValueResult, config: ValueConfig, **extra) -> dict:
    return {"edit_ids": list(result.edit_ids), "value_layer": result.value_layer,
            "config_hash": config.hash(), "config": asdict(config), **extra}
