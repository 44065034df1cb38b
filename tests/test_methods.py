"""Each method's defining property on the tiny model (docs/BASELINES.md), through the real loading code.

- TIME: the closed form equals a direct least-squares solve on [√λ I; K], and the whole sequential
  edit equals diffusers' reference ``StableDiffusionModelEditingPipeline.edit_model`` (float64).
- ReFACT: the update is rank one and writes exactly v0 + δ at the key; the model is unchanged.
- EMCID: λ → ∞ leaves the weights unchanged (‖Δ‖ ~ 1/λ → 0).
- ours with P = I ≡ MEMIT/EMCID's solve with λ C0 = β I (same keys, same values).
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from t2iedit.edit import apply_edit, revert_edit
from t2iedit.keys import collect_second_moment
from t2iedit.methods import METHODS, Components, SharedStats, build_config, compute_edit, get_method
from t2iedit.methods.refact import (RefactConfig, compute_refact_edit, eos_features, fc2_io_at,
                                    optimise_delta)
from t2iedit.methods.time_crossattn import (TimeConfig, align_tokens, compute_time_edit, cross_attention_modules,
                                  time_keys_values, time_solve)
from t2iedit.models import PRESETS, TextEncoderAdapter
from t2iedit.prompts import EditRequest
from t2iedit.solve import memit_update, null_space_update

TIMED = [EditRequest("t0", "A banana", "A blue banana"), EditRequest("t1", "An apple", "A blue apple")]
ROAD = EditRequest("r0", "Canada's Prime Minister", "Beyonce")
LAYER = 3  # tiny text encoder has layers 0..5; edits 0..4 with value layer 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    return TextEncoderAdapter(tiny_pipe.text_encoder)


@pytest.fixture(scope="module")
def moments(tiny_pipe, adapter):
    """C0 per edited layer over 300 COCO captions (> 256 = d_in tokens: full rank)."""
    from pathlib import Path

    caps = Path(__file__).parents[1] / "data" / "raw" / "coco" / "coco_30k.csv"
    if not caps.exists():
        caps = Path(__file__).parents[2] / "shared" / "data" / "coco" / "coco_30k.csv"
    texts = pd.read_csv(caps, usecols=["prompt"], nrows=300)["prompt"].tolist()
    stats = collect_second_moment(adapter, tiny_pipe.tokenizer, texts, list(range(5)), progress=False)
    return {layer: m.moment() for layer, m in stats.items()}


def _weights(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ TIME
def test_time_solve_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    K = torch.randn(20, 7, generator=g, dtype=torch.float64)
    V = torch.randn(20, 5, generator=g, dtype=torch.float64)
    lam = 0.1
    # argmin_W λ‖W − W0‖² + Σ‖W k − v‖²  ⇔  lstsq of [√λ I; K] Wᵀ = [√λ W0ᵀ; V]
    A = torch.cat([lam ** 0.5 * torch.eye(7, dtype=torch.float64), K])
    B = torch.cat([lam ** 0.5 * W0.T, V])
    expected = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(time_solve(W0, K, V, lam), expected, rtol=1e-10, atol=1e-10)


def test_time_edit_solves_the_augmented_least_squares_problem_on_the_tiny_unet(tiny_pipe):
    """One edit: every cross-attention ΔW equals the lstsq solution built from independently
    gathered keys (77 token embeddings × 4 prompts) and values (W0 × aligned target embeddings)."""
    deltas = compute_time_edit(tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.tokenizer, TIMED[:1])
    mods = cross_attention_modules(tiny_pipe.unet, context_dim=64)
    assert set(deltas) == set(mods) and len(mods) == 8  # 4 cross-attention layers × (to_k, to_v)
    keys, aligned = time_keys_values(tiny_pipe.text_encoder, tiny_pipe.tokenizer, TIMED[0])
    assert keys.shape == aligned.shape == (4, 77, 64)
    K, A = keys.reshape(-1, 64), aligned.reshape(-1, 64)
    lam = TimeConfig().lam
    for name, mod in mods.items():
        W0 = mod.weight.detach().double()
        lhs = torch.cat([lam ** 0.5 * torch.eye(64, dtype=torch.float64), K])
        rhs = torch.cat([lam ** 0.5 * W0.T, A @ W0.T])
        expected = torch.linalg.lstsq(lhs, rhs).solution.T - W0
        torch.testing.assert_close(deltas[name].double(), expected, rtol=1e-4, atol=1e-5)


def test_time_matches_diffusers_reference_pipeline_over_sequential_edits(tiny_pipe):
    """Two edits in sequence (reference: ``restart_params=False``), both run in float64."""
    from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_model_editing import (  # noqa: E501
        StableDiffusionModelEditingPipeline)

    te = copy.deepcopy(tiny_pipe.text_encoder).double()
    unet = copy.deepcopy(tiny_pipe.unet).double()
    ours = compute_time_edit(tiny_pipe.unet, te, tiny_pipe.tokenizer, TIMED)

    ref = StableDiffusionModelEditingPipeline(
        vae=tiny_pipe.vae, text_encoder=te, tokenizer=tiny_pipe.tokenizer, unet=unet,
        scheduler=tiny_pipe.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    # The reference finds layers by the pre-0.20 class name "CrossAttention" and SD's 768-d text
    # width; point it at the tiny UNet's text cross-attention (same to_v-then-to_k order).
    ca = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    ref.ca_clip_layers = ca
    ref.projection_matrices = [m.to_v for m in ca] + [m.to_k for m in ca]
    ref.og_matrices = [copy.deepcopy(m) for m in ref.projection_matrices]
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its λI is created in the default dtype
    try:
        for r in TIMED:
            ref.edit_model(r.source, r.target, lamb=0.1, restart_params=False)
    finally:
        torch.set_default_dtype(dtype)
    edited, base = dict(unet.named_modules()), dict(tiny_pipe.unet.named_modules())
    for name, delta in ours.items():
        got = edited[name].weight.detach() - base[name].weight.detach().double()
        assert got.abs().max() > 0.1  # the edit is substantial ...
        torch.testing.assert_close(delta.double(), got, rtol=0, atol=1e-6)  # ... and identical


def test_time_alignment_reference_and_fallback(tiny_pipe):
    tok = tiny_pipe.tokenizer
    # reference: BOS, "a" (from "an"), skip "blue", "apple", EOS, then the tail continues after EOS
    idx = align_tokens(tok, "An apple", "A blue apple")
    assert idx[:6] == [0, 1, 3, 4, 5, 6] and idx[-1] == 76 and len(idx) == 77
    # fallback (the reference raises IndexError): the source's last word and EOS map to the target's
    idx = align_tokens(tok, ROAD.source, ROAD.target)  # 6 source tokens, 3 target tokens
    assert idx[:7] == [0, 1, 1, 1, 1, 2, 3]


def test_time_leaves_the_models_unchanged(tiny_pipe):
    before = _weights(tiny_pipe.unet)
    compute_time_edit(tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.tokenizer, [ROAD])
    after = _weights(tiny_pipe.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------- ReFACT
def test_refact_update_is_rank_one_and_writes_the_optimised_value(tiny_pipe, adapter, moments):
    cfg = RefactConfig(layer=LAYER, max_steps=15)
    before = _weights(tiny_pipe.text_encoder)
    deltas, infos = compute_refact_edit(adapter, tiny_pipe.tokenizer, [ROAD], moments[LAYER], cfg)
    after = _weights(tiny_pipe.text_encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)  # model unchanged on return
    (name, dW), = deltas.items()
    assert name == adapter.module_name(LAYER) and dW.shape == (64, 256)
    s = torch.linalg.svdvals(dW.double())
    assert s[0] > 1e-2 and s[1] / s[0] < 1e-5  # rank one (up to float32 storage)
    # u ∝ C0⁻¹ k: the row space of ΔW is C0⁻¹ k with k the mean key over the 9 templates
    k = fc2_io_at(adapter, tiny_pipe.tokenizer, ROAD.source, cfg.templates, LAYER)[0].mean(0).double()
    u = torch.linalg.solve(moments[LAYER], k)
    cos = (torch.linalg.svd(dW.double()).Vh[0] @ u).abs() / u.norm()
    assert cos > 1 - 1e-6
    # ΔW k_s = v0 + δ − W k_s = δ: the layer now outputs the optimised value for the source prompt
    # (δ is deterministic: re-run ReFACT's optimisation on the unchanged model)
    k_s = fc2_io_at(adapter, tiny_pipe.tokenizer, ROAD.source, ("{}",), LAYER)[0][0].double()
    frozen = eos_features(tiny_pipe.text_encoder, tiny_pipe.tokenizer(
        [ROAD.target, ROAD.source], padding=True, return_tensors="pt"))
    _, delta, _ = optimise_delta(adapter, tiny_pipe.tokenizer, ROAD, frozen.detach(), cfg)
    torch.testing.assert_close(dW.double() @ k_s, delta.double(), rtol=1e-4, atol=1e-5)
    # the edit moves the source prompt's [EOS] feature towards the target's (the contrastive loss)
    assert infos[0]["steps"] >= 1
    enc = tiny_pipe.tokenizer([ROAD.source, ROAD.target], padding=True, return_tensors="pt")
    with torch.no_grad():
        f0 = tiny_pipe.text_encoder(**enc).pooler_output
        layer = adapter.layer(LAYER)
        layer.weight += dW
        try:
            f1 = tiny_pipe.text_encoder(**enc).pooler_output
        finally:
            layer.weight.copy_(before[[k for k in before if k.endswith(f"{LAYER}.mlp.fc2.weight")][0]])
    # contrastive margin ‖c − c_source‖ − ‖c − c_target‖ (frozen c_source = f0[0], c_target = f0[1])
    margin = lambda c: (c - f0[0]).norm() - (c - f0[1]).norm()  # noqa: E731
    assert margin(f1[0]) > margin(f0[0]) + 1.0


def test_refact_sequential_edits_accumulate_one_rank_each(tiny_pipe, adapter, moments):
    cfg = RefactConfig(layer=LAYER, max_steps=5)
    deltas, infos = compute_refact_edit(adapter, tiny_pipe.tokenizer, [TIMED[0], ROAD],
                                        moments[LAYER], cfg)
    s = torch.linalg.svdvals(next(iter(deltas.values())).double())
    assert s[1] / s[0] > 1e-3 and s[2] / s[0] < 1e-5 and [i["edit_id"] for i in infos] == ["t0", "r0"]


@pytest.mark.parametrize("model", ["tiny-clip", "minilm"])
@pytest.mark.parametrize("layer", [0, 3])
def test_refact_tail_features_equal_the_full_forward(model, layer, tiny_pipe, adapter, minilm_dir):
    """ReFACT's optimisation runs only the blocks from its layer on (their input cached once) and the
    model's own pooler: with a δ on fc2 the features must equal the full forward's, for the causal CLIP
    ([EOS] pooler) and the bidirectional BERT/MiniLM (dense+tanh pooler), at the first layer too."""
    from t2iedit.methods.refact import _add_at, _encode_subject, _features_with_delta
    from t2iedit.models import BERT_BLOCK_TEMPLATE, BERT_DENSE_TEMPLATE, load_text_encoder

    if model == "tiny-clip":
        tok, ad = tiny_pipe.tokenizer, adapter
    else:
        tok, te = load_text_encoder(minilm_dir, subfolder=None, tokenizer_subfolder=None)
        ad = TextEncoderAdapter(te, BERT_DENSE_TEMPLATE, BERT_BLOCK_TEMPLATE)
    enc, pos = _encode_subject(tok, ROAD.source, ("{}",) + RefactConfig().templates)
    mask = torch.zeros(enc["input_ids"].shape)
    mask[torch.arange(len(pos)), pos] = 1.0
    delta = torch.randn(ad.layer(layer).out_features, generator=torch.Generator().manual_seed(0))
    tail = _features_with_delta(ad, layer, enc, None)
    with torch.no_grad(), _add_at(ad.layer(layer), delta, mask):
        full = eos_features(ad.model, enc)
        fast = tail()
    with torch.no_grad():
        plain = eos_features(ad.model, enc)
    assert not torch.allclose(full, plain, atol=1e-3)  # δ reaches the features
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- EMCID, ours, the registry
def _components(pipe, adapter):
    preset = PRESETS["tiny"]
    return Components(pipe=pipe, adapter=adapter, base_model_id="tiny", base_revision=None,
                      edit_layers=preset.edit_layers, value_layer=preset.value_layer)


FAST_VALUES = {"steps": 3, "log_every": 0}


@pytest.fixture(scope="module")
def stats(tiny_pipe, moments):
    from t2iedit.projector import null_space_projector

    n_latents = len(TIMED)
    g = torch.Generator().manual_seed(0)
    side = PRESETS["tiny"].resolution // 2
    return SharedStats(moments=moments,
                       projectors={l: null_space_projector(c, "relative", 1e-2).P for l, c in moments.items()},
                       source_latents=torch.randn(n_latents, 1, 4, side, side, generator=g))


def test_emcid_with_lambda_to_infinity_leaves_the_weights_unchanged(tiny_pipe, adapter, stats):
    comps = _components(tiny_pipe, adapter)
    norms = {}
    for lam in (1.0, 1.0e4, 1.0e8, 1.0e12):
        art = compute_edit("emcid", TIMED, stats, comps, {"lam": lam, "values": FAST_VALUES})
        norms[lam] = sum(float(d.double().norm()) ** 2 for d in art.deltas.values()) ** 0.5
        assert set(art.deltas) == {f"text_encoder:{adapter.module_name(l)}" for l in range(5)}
    assert norms[1.0] > norms[1.0e4] > norms[1.0e8] > norms[1.0e12]
    assert norms[1.0e12] < 1e-9 * norms[1.0]
    # ‖Δ‖ ~ ‖R K1ᵀ C0⁻¹‖ / λ for large λ: the first layer's residual is the same at every λ
    assert norms[1.0e8] / norms[1.0e12] == pytest.approx(1.0e4, rel=1e-2)


def test_ours_without_projector_equals_memit_solve_with_lambda_c0_identity(tiny_pipe, adapter, stats):
    """Identity: R K1ᵀ I (K1 K1ᵀ I + β I)⁻¹ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹ with C0 = I, λ = β.
    Same values (the memo hands both methods the same z) and the same keys → the same artifact."""
    g = torch.Generator().manual_seed(1)
    K1, R = torch.randn(4, 9, generator=g), torch.randn(4, 6, generator=g)
    torch.testing.assert_close(null_space_update(K1, R, torch.eye(9), beta=2.5),
                               memit_update(K1, R, torch.eye(9), lam=2.5), rtol=1e-12, atol=1e-12)

    comps = _components(tiny_pipe, adapter)
    values = {**FAST_VALUES, "alpha": 0.11, "text_weight": 1.0, "lambda_visual": 0.01}
    identity = SharedStats(moments={l: torch.eye(256, dtype=torch.float64) for l in range(5)},
                           source_latents=stats.source_latents, values=stats.values)
    ours = compute_edit("ours-no-projector", TIMED, identity, comps, {"beta": 2.5, "values": values})
    memit = compute_edit("emcid", TIMED, identity, comps, {"lam": 2.5, "values": values, "residual": "memit"})
    assert set(ours.deltas) == set(memit.deltas) and len(ours.deltas) == 5
    for key in ours.deltas:
        assert ours.deltas[key].norm() > 0
        torch.testing.assert_close(ours.deltas[key], memit.deltas[key], rtol=1e-9, atol=1e-12)
    # and the projector is what makes `ours` different: it leaves the preserved keys alone
    full = compute_edit("ours", TIMED, stats, comps, {"values": values})
    for layer in range(5):
        key = f"text_encoder:{adapter.module_name(layer)}"
        P = stats.projectors[layer]
        torch.testing.assert_close(full.deltas[key].double() @ P, full.deltas[key].double(),
                                   rtol=1e-6, atol=1e-8)


def test_registry_configs_and_every_method_round_trips(tiny_pipe, adapter, stats, tmp_path):
    assert set(METHODS) == {"unedited", "ours", "oracle", "time", "refact", "emcid", "ours-no-projector",
                            "ours-no-eata", "ours-no-visual", "ours-entity-keys"}
    assert build_config(get_method("ours-no-eata")).values.alpha == 0.0
    assert build_config(get_method("ours-entity-keys")).entity_keys == "preserve"
    assert build_config(get_method("ours-no-visual")).values.lambda_visual == 0.0
    assert build_config(get_method("emcid"), {"values": {"steps": 5}}).values.text_weight == 0.01
    with pytest.raises(ValueError, match="fixed"):
        build_config(get_method("ours-no-eata"), {"values": {"alpha": 0.5}})
    with pytest.raises(ValueError, match="unknown keys"):
        build_config(get_method("time"), {"lamb": 0.1})
    assert get_method("oracle").oracle_prompts and not get_method("ours").oracle_prompts
    assert not get_method("unedited").oracle_prompts  # the paper's Oracle row: the test prompts

    comps = _components(tiny_pipe, adapter)
    params = {"time": {}, "refact": {"layer": LAYER, "max_steps": 3}, "oracle": {}, "unedited": {},
              "ours-no-eata": {"values": FAST_VALUES}}
    components = {"text_encoder": tiny_pipe.text_encoder, "unet": tiny_pipe.unet}
    before = {c: _weights(m) for c, m in components.items()}
    for name, p in params.items():
        art = compute_edit(name, TIMED, stats, comps, p)
        assert art.manifest.method == name and art.manifest.n_edits == 2
        prefixes = {k.split(":")[0] for k in art.deltas}
        assert prefixes == {"time": {"unet"}, "oracle": set(), "unedited": set()}.get(name, {"text_encoder"})
        loaded = type(art).load(art.save(tmp_path / name))
        applied = apply_edit(components, loaded, "tiny", None)
        revert_edit(components, applied)
    after = {c: _weights(m) for c, m in components.items()}
    assert all(torch.equal(before[c][k], after[c][k]) for c in before for k in before[c])
