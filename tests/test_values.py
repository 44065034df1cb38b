"""Target values: loss properties, δ injection, tail-only forward, optimisation on the tiny model, batch
independence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from t2iedit import values
from t2iedit.storage import load_meta, load_tensors, read_parquet, save_tensors, write_parquet
from t2iedit.losses import (eata_loss, entity_features, per_edit_mean, pooled_feature, text_loss,
                            visual_loss)
from t2iedit.models import (BERT_BLOCK_TEMPLATE, BERT_DENSE_TEMPLATE, TextEncoderAdapter, encoder_tail,
                            get_preset, load_text_encoder)
from t2iedit.ner import heuristic_spans
from t2iedit.prompts import EditRequest
from t2iedit.values import (LOSS_SCHEMA, ValueConfig, VisualInputs, add_at_positions,
                            capture_output, compute_target_values, compute_target_values_batched,
                            ddpm_scheduler_for, generate_source_latents, losses_table, prepare_rows,
                            value_meta, value_tensors, weighted_config)

LAYER = get_preset("tiny").value_layer
FACTS = [("The president of the United States", "Tim Cook"), ("The CEO of Amazon", "Sundar Pichai"),
         ("A dog", "A cat"), ("The Titanic male lead", "Jeff Bezos")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def requests():
    return [EditRequest(f"e{i}", s, t, tuple(heuristic_spans(s))) for i, (s, t) in enumerate(FACTS)]


@pytest.fixture(scope="module")
def enc(tiny_pipe):
    adapter = TextEncoderAdapter(tiny_pipe.text_encoder)
    return tiny_pipe.tokenizer, tiny_pipe.text_encoder, adapter.block(LAYER)


@pytest.fixture(scope="module")
def visual(tiny_pipe, requests):
    lat = generate_source_latents(tiny_pipe, [r.edit_id for r in requests], [r.source for r in requests],
                                  seed=0, images_per_prompt=2, num_inference_steps=2, batch_size=3)
    return VisualInputs(tiny_pipe.unet, ddpm_scheduler_for(tiny_pipe), lat)


def _sub(visual, i, j):
    return VisualInputs(visual.unet, visual.noise_scheduler, visual.latents[i:j])


# ---------------------------------------------------------------------------------------- loss terms
def test_loss_terms_zero_for_identical_inputs():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(5, 8, generator=g)
    e = torch.randn(5, 3, 8, generator=g)
    eps = torch.randn(5, 4, 6, 6, generator=g)
    assert torch.equal(text_loss(c, c), torch.zeros(5))
    assert torch.equal(eata_loss(e, e, torch.ones(5, 3)), torch.zeros(5))
    assert torch.equal(visual_loss(eps, eps), torch.zeros(5))
    # and the definitions: one normalisation, the mean squared error over each term's elements
    # (EMCID's F.mse_loss for both its terms, compute_z.py:544/:615), per row
    d = torch.randn(5, 8, generator=g)
    e2 = torch.randn(5, 3, 8, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    for r in range(5):
        assert torch.allclose(text_loss(c, d)[r], F.mse_loss(c[r], d[r]))
        assert torch.allclose(visual_loss(eps, 0 * eps)[r], F.mse_loss(eps[r], 0 * eps[r]))
        real = mask[r] > 0
        want = F.mse_loss(e[r, real], e2[r, real]) if real.any() else torch.tensor(0.0)
        assert torch.allclose(eata_loss(e, e2, mask)[r], want)


def test_eata_gradient_zero_without_entities():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 8, generator=g, requires_grad=True)
    frozen = torch.randn(3, 2, 8, generator=g)
    weights = torch.zeros(3, 2, 7)
    mask = torch.zeros(3, 2)
    eata_loss(entity_features(hidden, weights), frozen, mask).sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    # with an entity on row 1 only, only row 1 gets a gradient
    hidden.grad = None
    weights[1, 0, 2:4] = 0.5
    mask[1, 0] = 1
    eata_loss(entity_features(hidden, weights), frozen, mask).sum().backward()
    assert hidden.grad[[0, 2]].abs().sum() == 0 and hidden.grad[1, 2:4].abs().sum() > 0


def test_per_edit_mean_and_pooling():
    vals = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    assert torch.equal(per_edit_mean(vals, torch.tensor([0, 0, 1, 1, 1]), 3), torch.tensor([2.0, 20.0, 0.0]))
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert pooled_feature(h, m, "eos").flatten().tolist() == [2.0, 7.0]
    assert pooled_feature(h, m, "cls").flatten().tolist() == [0.0, 4.0]
    assert pooled_feature(h, m, "mean").flatten().tolist() == [1.0, 5.5]


def test_eos_pooling_is_clip_pooler_output(enc):
    tok, model, _ = enc
    batch = tok(["A dog", "The president of the United States"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert torch.allclose(pooled_feature(out.last_hidden_state, batch["attention_mask"], "eos"),
                          out.pooler_output, atol=1e-6)


def test_rows_positions_and_entity_weights(enc, requests):
    tok, model, _ = enc
    rows = prepare_rows(tok, model, requests[:2], ("A photo of {}", "{}"), sd_conditioning=False)
    assert rows.row_edit.tolist() == [0, 0, 1, 1]
    for r in range(4):  # the edit token is the last real token before [EOS]
        assert rows.input_ids[r, rows.edit_pos[r] + 1] == tok.eos_token_id
    words = tok.decode(rows.input_ids[0][rows.entity_weights[0, 0] > 0])
    assert words.strip() == "the united states" and rows.entity_weights[0, 0].sum() == pytest.approx(1.0)
    assert tok.decode(rows.input_ids[3][rows.entity_weights[3, 0] > 0]).strip() == "amazon"


# ---------------------------------------------------------------------------------- optimisation
def test_identical_prompts_have_zero_loss(enc, visual):
    tok, model, block = enc
    req = [EditRequest("same", "The president of the United States", "The president of the United States",
                       ((17, 34),))]
    res = compute_target_values(tok, model, block, req, ValueConfig(steps=0), _sub(visual, 0, 1))
    for k in ("text", "eata", "visual", "total", "total_init"):
        assert res.losses[k].abs().max() < 1e-8, k


def test_z0_is_block_output_and_z_is_z0_plus_delta(enc, requests):
    tok, model, block = enc
    res = compute_target_values(tok, model, block, requests, ValueConfig(lambda_visual=0.0, steps=3))
    for i, req in enumerate(requests):
        ids = tok(req.source, return_tensors="pt")
        with torch.no_grad():  # hidden_states[L + 1] is the output of block L
            h = model(**ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        assert torch.allclose(res.z0[i], h[ids["input_ids"].shape[1] - 2], atol=1e-5)
    assert torch.equal(res.z, res.z0 + res.delta)
    # the editing core measures h at the same place (its residual R = z − h starts at δ)
    from t2iedit.keys import compute_hidden

    h_core = compute_hidden(TextEncoderAdapter(model), tok, requests, LAYER)
    assert torch.allclose(h_core.float(), res.z0, atol=1e-5)


def test_text_only_lowers_loss_and_respects_clamp(enc, requests):
    tok, model, block = enc
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = dict(block._forward_hooks)  # transformers may keep its own output-capturing hook
    cfg = weighted_config("paper", lam=0.0, steps=60, clamp_factor=0.5)  # the text-only mode, text weight 1
    res = compute_target_values(tok, model, block, requests, cfg)
    assert (res.losses["total"] < 0.99 * res.losses["total_init"]).all()  # the clamp limits the gain
    assert (res.losses["text"] < res.losses["total_init"]).all()
    assert (res.delta.norm(dim=1) <= 0.5 * res.z0.norm(dim=1) * (1 + 1e-5)).all()
    # the model is unchanged: weights, requires_grad, no hooks left behind
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())
    assert dict(block._forward_hooks) == hooks and all(p.grad is None for p in model.parameters())


def test_eata_without_entities_keeps_delta_zero(enc):
    tok, model, block = enc
    req = [EditRequest("x", "A dog", "A cat", ())]
    res = compute_target_values(tok, model, block, req, ValueConfig(
        alpha=1.0, text_weight=0.0, lambda_visual=0.0, weight_decay=0.0, steps=5))
    assert torch.equal(res.delta, torch.zeros_like(res.delta))


def test_entity_term_pulls_towards_frozen_entities(enc, requests):
    """With α the entity representations move less than without (same text objective)."""
    tok, model, block = enc
    reqs = requests[:2]  # entity ends the prompt: its last token is the edit token (CLIP is causal)
    eata = {a: compute_target_values(tok, model, block, reqs, ValueConfig(
        alpha=a, lambda_visual=0.0, steps=60)).losses["eata"] for a in (0.0, 5.0)}
    assert (eata[5.0] < eata[0.0]).all()


def _visual_at_fixed_draw(enc, visual, requests, delta, seed=123):
    """L_V recomputed independently of values.py's loop at one fixed (t, noise) per edit."""
    tok, model, block = enc
    n = len(requests)
    g = torch.Generator().manual_seed(seed)
    x0 = visual.latents[:, 0]
    t = torch.randint(0, 1000, (n,), generator=g)
    x_t = visual.noise_scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)

    def cond(texts, d=None):
        ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        pos = torch.tensor([len(tok(s)["input_ids"]) - 2 for s in texts])
        with torch.no_grad():
            if d is None:
                return model(input_ids=ids).last_hidden_state
            with add_at_positions(block, torch.arange(n), pos, lambda: d):
                return model(input_ids=ids).last_hidden_state

    with torch.no_grad():
        eps_tgt = visual.unet(x_t, t, encoder_hidden_states=cond([r.target for r in requests])).sample
        eps = visual.unet(x_t, t, encoder_hidden_states=cond([r.source for r in requests], delta)).sample
    return visual_loss(eps, eps_tgt)


def test_visual_loss_is_optimised(enc, requests, visual):
    tok, model, block = enc
    before = {n: p.detach().clone() for n, p in visual.unet.named_parameters()}
    # L_V alone (the tiny UNet's L_V is ~1e-3, so no weight decay to compete with it)
    cfg = ValueConfig(alpha=0.0, text_weight=0.0, lambda_visual=1.0, steps=15, lr=0.5, weight_decay=0.0)
    res = compute_target_values(tok, model, block, requests, cfg, visual)
    for seed in (1, 2):  # draws the optimisation never saw
        lv0 = _visual_at_fixed_draw(enc, visual, requests, torch.zeros_like(res.delta), seed)
        lv1 = _visual_at_fixed_draw(enc, visual, requests, res.delta, seed)
        assert lv1.mean() < 0.9 * lv0.mean()
    assert all(torch.equal(p, before[n]) for n, p in visual.unet.named_parameters())


def test_full_loss_with_visual_lowers_total(enc, requests, visual):
    tok, model, block = enc
    res = compute_target_values(tok, model, block, requests, ValueConfig(steps=10), visual)
    assert (res.losses["total"] < res.losses["total_init"]).all()
    assert (res.losses["visual"] > 0).all()


def test_weightings_say_which_term_lambda_weights():
    cfg = weighted_config("emcid", steps=3)  # EMCID's code: text 0.01, noise 1
    assert (cfg.text_weight, cfg.lambda_visual) == (0.01, 1.0)
    assert (weighted_config("paper").text_weight, weighted_config("paper").lambda_visual) == (1.0, 0.01)
    assert weighted_config("paper", lam=0.05).lambda_visual == 0.05
    assert weighted_config("emcid", lam=0.05).text_weight == 0.05
    # the text side (α's EATA term, the weight decay) keeps its ratio to the text term
    e, p = weighted_config("emcid", alpha=0.2, weight_decay=1.0e-3), weighted_config("paper", alpha=0.2)
    assert e.alpha / e.text_weight == pytest.approx(p.alpha / p.text_weight) == pytest.approx(0.2)
    assert e.weight_decay / e.text_weight == pytest.approx(p.weight_decay / p.text_weight)
    assert e.lambda_visual / e.text_weight == pytest.approx(100.0)  # EMCID: noise 1, text 0.01
    assert weighted_config("paper", lam=0.0).lambda_visual == 0.0  # the text-only mode
    # the defaults are the default weighting at the paper's λ = 0.01
    default = weighted_config(values.DEFAULT_WEIGHTING)
    assert (ValueConfig().text_weight, ValueConfig().lambda_visual) == (default.text_weight,
                                                                         default.lambda_visual)
    with pytest.raises(ValueError, match="text-only"):
        weighted_config("emcid", lam=0.0)
    with pytest.raises(ValueError):
        weighted_config("other")
    with pytest.raises(ValueError, match="sets text_weight"):
        weighted_config("paper", text_weight=2.0)
    with pytest.raises(ValueError, match="'{}'"):
        ValueConfig(templates=("A photo of {}",))  # visual loss needs the plain prompt


@pytest.mark.parametrize("lambda_visual", [0.0, 0.01])
def test_batched_equals_one_at_a_time(enc, requests, visual, lambda_visual):
    tok, model, block = enc
    cfg = ValueConfig(lambda_visual=lambda_visual, steps=40 if lambda_visual == 0 else 6)
    vis = visual if lambda_visual else None
    together = compute_target_values(tok, model, block, requests, cfg, vis)
    for i, req in enumerate(requests):
        alone = compute_target_values(tok, model, block, [req], cfg, _sub(visual, i, i + 1) if vis else None)
        assert torch.allclose(alone.delta[0], together.delta[i], atol=1e-4, rtol=1e-4), req.edit_id
        for k in ("text", "eata", "visual", "total"):
            assert torch.allclose(alone.losses[k][0], together.losses[k][i], atol=1e-4, rtol=1e-4)
    # splitting into batches of 3 + 1 changes nothing either
    split = compute_target_values_batched(tok, model, block, requests, cfg, 3, vis)
    assert split.edit_ids == together.edit_ids
    assert torch.allclose(split.delta, together.delta, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------- tail-only forward (issue 4)
MINILM_LAYER = 3  # of 6 (bench_values_minilm.py)
TEXTS = ["A dog", "An image of the president of the United States"]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    tok, model = load_text_encoder(minilm_dir, subfolder=None, tokenizer_subfolder=None)
    return tok, model, TextEncoderAdapter(model, BERT_DENSE_TEMPLATE, BERT_BLOCK_TEMPLATE).block(MINILM_LAYER)


@pytest.mark.parametrize("encoder, padding, with_mask", [
    ("clip", "longest", True),       # text-only mode: padding masked, plus the causal mask
    ("clip", "max_length", False),   # SD conditioning: 77 tokens, causal mask only
    ("minilm", "longest", True),     # BERT: bidirectional, padding masked
])
def test_encoder_tail_reproduces_last_hidden_state(enc, minilm, encoder, padding, with_mask):
    tok, model, block = enc if encoder == "clip" else minilm
    batch = tok(TEXTS, padding=padding, max_length=77, return_tensors="pt")
    kwargs = {"input_ids": batch["input_ids"]}
    if with_mask:
        kwargs["attention_mask"] = batch["attention_mask"]
    with torch.no_grad(), capture_output(block) as at_block:
        want = model(**kwargs).last_hidden_state  # (2, T, d), every position (padding too)
    tail = encoder_tail(model, block)
    layer = LAYER if encoder == "clip" else MINILM_LAYER
    assert tail is not None and len(tail.blocks) == model.config.num_hidden_layers - layer - 1
    with torch.no_grad():
        got = tail(at_block["h"], *at_block["args"], **at_block["kwargs"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_encoder_tail_only_for_known_architectures(enc):
    _, model, block = enc
    assert encoder_tail(torch.nn.Sequential(block), block) is None  # unknown architecture
    assert encoder_tail(model, torch.nn.Linear(2, 2)) is None       # not one of its blocks
    last = TextEncoderAdapter(model).block(model.config.num_hidden_layers - 1)
    assert encoder_tail(model, last).blocks == ()                  # value layer = last block: norm only


@pytest.mark.parametrize("encoder, lambda_visual", [("clip", 0.0), ("clip", 0.01), ("minilm", 0.0)])
def test_tail_forward_equals_full_forward(enc, minilm, requests, visual, monkeypatch, encoder, lambda_visual):
    """The optimisation from cached value-layer states gives what the full forward with δ hooked in at
    the value layer gives (the path of encoders without a known tail, and of all before issue 4)."""
    tok, model, block = enc if encoder == "clip" else minilm
    cfg = ValueConfig(lambda_visual=lambda_visual, steps=8, pooling="eos" if encoder == "clip" else "mean")
    vis = visual if lambda_visual else None
    assert encoder_tail(model, block) is not None
    tail = compute_target_values(tok, model, block, requests, cfg, vis)
    with monkeypatch.context() as m:
        m.setattr(values, "encoder_tail", lambda model, block: None)
        full = compute_target_values(tok, model, block, requests, cfg, vis)
    torch.testing.assert_close(tail.z0, full.z0, rtol=0, atol=0)
    torch.testing.assert_close(tail.delta, full.delta, rtol=1e-5, atol=1e-5)
    for k in ("text", "eata", "visual", "decay", "total", "total_init"):
        torch.testing.assert_close(tail.losses[k], full.losses[k], rtol=1e-5, atol=1e-6, msg=k)


def test_steps_do_not_rerun_the_frozen_layers(enc, requests):
    """The embeddings and the blocks up to the value layer run a fixed number of times (the frozen
    forwards: z0, targets, cached value-layer states), whatever the number of steps."""
    tok, model, block = enc
    calls = {"embeddings": 0, "block": 0}
    handles = [m.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, m in (("embeddings", model.embeddings), ("block", block))]
    try:
        seen = []
        for steps in (2, 6):
            calls.update(embeddings=0, block=0)
            compute_target_values(tok, model, block, requests, ValueConfig(lambda_visual=0.0, steps=steps))
            seen.append(dict(calls))
    finally:
        for h in handles:
            h.remove()
    assert seen[0] == seen[1] == {"embeddings": 3, "block": 3}


def test_source_latents_do_not_depend_on_batching(tiny_pipe, requests, visual):
    alone = generate_source_latents(tiny_pipe, [requests[2].edit_id], [requests[2].source], seed=0,
                                    images_per_prompt=2, num_inference_steps=2)
    assert alone.shape == (1, 2, 4, 16, 16)
    assert torch.allclose(alone[0], visual.latents[2], atol=1e-5)
    assert not torch.allclose(visual.latents[2, 0], visual.latents[2, 1])


def test_artifacts_roundtrip(enc, requests, tmp_path):
    tok, model, block = enc
    cfg = ValueConfig(lambda_visual=0.0, steps=2)
    res = compute_target_values(tok, model, block, requests, cfg, value_layer=LAYER)
    path = save_tensors(tmp_path / "values.safetensors", value_tensors(res), value_meta(res, cfg))
    back = load_tensors(path)
    assert back["z"].shape == (len(requests), model.config.hidden_size)
    assert torch.equal(back["z"], res.z)
    meta = load_meta(path)
    assert meta["edit_ids"] == [r.edit_id for r in requests] and meta["value_layer"] == LAYER
    assert meta["config_hash"] == cfg.hash()
    table = read_parquet(write_parquet(tmp_path / "losses.parquet", losses_table(res)), LOSS_SCHEMA)
    assert table.column("edit_id").to_pylist() == meta["edit_ids"]
    assert table.column("steps").to_pylist() == [2] * len(requests)


# ---------------------------------------------------------------- normalisation and weighting (issue 14)
def _pooled(model, tok, texts):
    """CLIP's pooled [EOS] feature, straight from the model (an independent reference)."""
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).pooler_output


def test_text_term_is_the_mean_squared_error_of_the_pooled_features(enc, requests, visual):
    """L_T(δ = 0) = mean over templates of F.mse_loss(pooled source, pooled target) — computed from the
    model's own pooler output, not from t2iedit.losses. Today's summed norm is d× (64 tiny, 768 SD)."""
    tok, model, block = enc
    cfg = ValueConfig(steps=0)
    res = compute_target_values(tok, model, block, requests, cfg, visual)
    for i, req in enumerate(requests):
        want = torch.stack([F.mse_loss(_pooled(model, tok, [t.format(req.source)])[0],
                                       _pooled(model, tok, [t.format(req.target)])[0])
                            for t in cfg.templates]).mean()
        torch.testing.assert_close(res.losses["text"][i], want, rtol=1e-4, atol=1e-7)
        # the recorded weighted terms: at the first step δ = 0, so they are the weights × the terms
        torch.testing.assert_close(res.losses["first_text"][i], cfg.text_weight * want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(res.losses["first_total"], res.losses["total_init"])


def test_the_visual_term_moves_delta_under_the_default_weighting(enc, requests, visual):
    """With the default weighting L_V must change the values: δ with and without it differ by > 1 %
    (relative) on the tiny preset. Under today's code (summed text norm, λ on L_V) they agree to 1e-6."""
    tok, model, block = enc
    cfg = weighted_config(values.DEFAULT_WEIGHTING, steps=10)
    with_visual = compute_target_values(tok, model, block, requests, cfg, visual)
    without = compute_target_values(tok, model, block, requests,
                                    dataclasses.replace(cfg, lambda_visual=0.0), None)
    rel = (with_visual.delta - without.delta).norm() / without.delta.norm()
    assert rel > 0.01, float(rel)
    # and the visual term's recorded share of the loss is not negligible at the first step
    share = with_visual.losses["first_visual"].sum() / with_visual.losses["first_total"].sum()
    assert share > 0.01, float(share)


def test_weighted_terms_at_first_and_last_step_add_up(enc, requests, visual):
    tok, model, block = enc
    cfg = ValueConfig(steps=4)
    res = compute_target_values(tok, model, block, requests, cfg, visual)
    for when in ("first", "last"):
        parts = sum(res.losses[f"{when}_{k}"] for k in ("text", "eata", "visual"))
        assert (parts <= res.losses[f"{when}_total"] + 1e-7).all()  # the rest is the weight decay
        assert (res.losses[f"{when}_visual"] > 0).all()
    assert not torch.equal(res.losses["first_total"], res.losses["last_total"])
    table = losses_table(res)
    assert table.schema.equals(LOSS_SCHEMA) and table.column("last_visual").to_pylist()[0] > 0


def test_progress_is_told_every_step(enc, requests):
    tok, model, block = enc
    seen = []
    compute_target_values(tok, model, block, requests[:1], ValueConfig(lambda_visual=0.0, steps=3),
                          progress=lambda step, total, loss: seen.append((step, total, loss)))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)] and all(s[2] > 0 for s in seen)


def test_visual_mode_text_terms_are_the_masked_features_and_the_unet_gets_sd_conditioning(minilm, requests):
    """With L_V on, the text and EATA terms are still those of the sentence features (padded to the
    longest row, attention mask: what c_tgt and the text-space metrics read), and only L_V sees the
    plain prompts as Stable Diffusion encodes them (77 tokens, no mask). Before, every row was encoded
    SD-style in visual mode, so a bidirectional encoder's pads leaked into c_src (MiniLM). Checked at
    δ = 0 against text-only mode and against L_V computed directly from SD-style encodings."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    tok, model, block = minilm
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
                                attention_head_dim=8, norm_num_groups=16).eval()
    sched = DDPMScheduler()
    latents = torch.randn(len(requests), 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = ValueConfig(steps=0, pooling="mean", lambda_visual=0.01)
    with_v = compute_target_values(tok, model, block, requests, cfg, VisualInputs(unet, sched, latents))
    text_only = compute_target_values(tok, model, block, requests, dataclasses.replace(cfg, lambda_visual=0.0))
    for k in ("text", "eata"):
        torch.testing.assert_close(with_v.losses[k], text_only.losses[k], rtol=1e-5, atol=1e-7, msg=k)

    def sd_states(texts):  # diffusers' encode_prompt for an encoder without use_attention_mask
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return model(input_ids=ids).last_hidden_state

    with torch.no_grad():
        c_src, c_tgt = sd_states([r.source for r in requests]), sd_states([r.target for r in requests])
        expected = []
        for i, r in enumerate(requests):
            g = values.edit_generator(cfg.seed, f"{r.edit_id}/report")
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
            noise = torch.randn(latents.shape[2:], generator=g)[None]
            x_t = sched.add_noise(latents[i:i + 1, 0], noise, t)
            eps = [unet(x_t, t, encoder_hidden_states=c[i:i + 1]).sample for c in (c_src, c_tgt)]
            expected.append(visual_loss(*eps))
    torch.testing.assert_close(with_v.losses["visual"], torch.cat(expected), rtol=1e-4, atol=1e-9)
    assert with_v.losses["visual"].min() > 0
