"""The baselines as their own code runs them (issue 14 items 5–6, docs/BASELINES.md), on the tiny model:

- EMCID's text term is 0.01 × the mean squared error of the pooled features (its compute_z.py:615-616);
- EMCID's residual: z from its first template minus the current layer's fc2 output (emcid_main.py:1004-1016);
- the per-dataset settings (EMCID λ/lr, ReFACT's layer) come from the dataset, overrides win;
- ReFACT contrasts the target with RoAD's ``Old``, not the source prompt (compute_v.py:76).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from t2iedit.keys import collect_second_moment, compute_hidden, compute_keys
from t2iedit.methods import Components, SharedStats, build_config, compute_edit, dataset_defaults, get_method
from t2iedit.methods.compare import requests_from_edits
from t2iedit.methods.per_dataset import method_params
from t2iedit.methods.refact import RefactConfig, compute_refact_edit, compute_refact_update, eos_features
from t2iedit.models import PRESETS, TextEncoderAdapter
from t2iedit.prompts import EditRequest
from t2iedit.solve import memit_update
from t2iedit.values import VisualInputs, compute_target_values, ddpm_scheduler_for, generate_source_latents

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
TIMED = [EditRequest("t0", "A banana", "A blue banana"), EditRequest("t1", "An apple", "A blue apple")]
ROAD_OLD = EditRequest("r0", "Canada's Prime Minister", "Beyonce", (), "justin trudeau")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    return TextEncoderAdapter(tiny_pipe.text_encoder)


@pytest.fixture(scope="module")
def latents(tiny_pipe):
    return generate_source_latents(tiny_pipe, [r.edit_id for r in TIMED], [r.source for r in TIMED], seed=0,
                                   num_inference_steps=2)


# ------------------------------------------------------------------------------------------- EMCID
def test_emcid_text_term_is_a_hundredth_of_the_mse_of_the_pooled_features(tiny_pipe, adapter, latents):
    """EMCID's loss: ``text_repr_loss_scale_factor`` (0.01) × F.mse_loss(pooled edited source, pooled
    target), noise loss weight 1. Computed from the model's pooler output directly; today's summed
    norm made it d× (64 here, 768 on SD 1.4) stronger."""
    cfg = build_config(get_method("emcid"), {"values": {"steps": 0}}).values
    assert (cfg.text_weight, cfg.lambda_visual, cfg.alpha) == (0.01, 1.0, 0.0)
    tok, model = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    vis = VisualInputs(tiny_pipe.unet, ddpm_scheduler_for(tiny_pipe), latents)
    res = compute_target_values(tok, model, adapter.block(PRESETS["tiny"].value_layer), TIMED, cfg, vis)

    def pooled(text):
        with torch.no_grad():
            return model(**tok([text], return_tensors="pt")).pooler_output[0]

    for i, req in enumerate(TIMED):
        mse = torch.stack([F.mse_loss(pooled(t.format(req.source)), pooled(t.format(req.target)))
                           for t in cfg.templates]).mean()
        torch.testing.assert_close(res.losses["first_text"][i], 0.01 * mse, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(cfg.text_weight * res.losses["text"][i], 0.01 * mse, rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="module")
def stats(tiny_pipe, adapter, latents):
    caps = RAW / "coco" / "coco_30k.csv"
    if not caps.exists():
        caps = Path(__file__).parents[2] / "shared" / "data" / "coco" / "coco_30k.csv"
    texts = pd.read_csv(caps, usecols=["prompt"], nrows=300)["prompt"].tolist()
    m = collect_second_moment(adapter, tiny_pipe.tokenizer, texts, list(range(5)), progress=False)
    return SharedStats(moments={l: s.moment() for l, s in m.items()}, source_latents=latents)


def _components(tiny_pipe, adapter):
    p = PRESETS["tiny"]
    return Components(pipe=tiny_pipe, adapter=adapter, base_model_id="tiny", base_revision=None,
                      edit_layers=p.edit_layers, value_layer=p.value_layer)


def test_emcid_residual_is_first_template_target_minus_the_layers_fc2_output(tiny_pipe, adapter, stats):
    """Layer 0 of EMCID's edit solves ``R = (z − o_0) / L`` with z = h_L(first template) + δ and o_0 the
    fc2 output of layer 0 averaged over the templates — gathered here by a plain forward hook."""
    comps = _components(tiny_pipe, adapter)
    params = {"lam": 50.0, "values": {"steps": 3, "log_every": 0}}
    art = compute_edit("emcid", TIMED, stats, comps, params)
    cfg = build_config(get_method("emcid"), params)
    tok, layers, value_layer = tiny_pipe.tokenizer, comps.edit_layers, comps.value_layer
    delta = stats.values[next(iter(stats.values))].delta.double()  # the memoised values of this call
    z = compute_hidden(adapter, tok, TIMED, value_layer, cfg.values.templates[0]) + delta

    fc2 = adapter.layer(0)
    outs = []
    for t in cfg.values.templates:
        rows = []
        for req in TIMED:
            text = t.format(req.source)
            ids = tok([text], return_tensors="pt")
            pos = ids["input_ids"].shape[1] - 2  # the source ends each template here: last token before EOS
            seen = {}

            def hook(_mod, _inp, out, seen=seen):
                seen["o"] = out.detach()

            handle = fc2.register_forward_hook(hook)
            with torch.no_grad():
                tiny_pipe.text_encoder(**ids)
            handle.remove()
            rows.append(seen["o"][0, pos].double())
        outs.append(torch.stack(rows))
    o0 = torch.stack(outs).mean(0)
    R = (z - o0) / len(layers)
    K1 = compute_keys(adapter, tok, TIMED, 0, cfg.values.templates)
    want = memit_update(K1, R, stats.moment(0), 50.0)
    got = art.deltas[f"text_encoder:{adapter.module_name(0)}"]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)
    assert art.manifest.extra["residual"] == "emcid"
    # MEMIT's residual (z from "{}", the value layer's block output) is the switch, and differs
    memit = compute_edit("emcid", TIMED, stats, comps, {**params, "residual": "memit"})
    key = f"text_encoder:{adapter.module_name(0)}"
    assert (memit.deltas[key] - got).norm() > 1e-3 * got.norm()


# ---------------------------------------------------------------------------- per-dataset settings
def test_per_dataset_settings_come_from_the_dataset():
    road, timed = dataset_defaults("road", "sd-v1-4"), dataset_defaults("timed", "sd-v1-4")
    assert road == {"emcid": {"lam": 6000.0, "values": {"lr": 0.1}}, "refact": {"layer": 7}}
    assert timed == {"emcid": {"lam": 4000.0, "values": {"lr": 0.2}}, "refact": {"layer": 9}}
    assert dataset_defaults("cake", "sd-v1-4") == timed  # no published CAKE setting: TIMED's
    # the tiny presets have 6 text layers: ⌊l·6/12⌋ keeps the two datasets apart
    assert dataset_defaults("timed", "tiny")["refact"] == {"layer": 4}
    assert dataset_defaults("road", "tiny")["refact"] == {"layer": 3}
    # an explicit compare.method_params setting wins key by key; the rest stays the dataset's
    cfg = build_config(get_method("emcid"), method_params("emcid", "road", "sd-v1-4", {"lam": 5000.0}))
    assert cfg.lam == 5000.0 and cfg.values.lr == 0.1 and cfg.values.text_weight == 0.01
    assert build_config(get_method("refact"), method_params("refact", "road", "sd-v1-4")).layer == 7
    assert method_params("time", "road", "sd-v1-4") == {}
    with pytest.raises(ValueError, match="dataset"):
        dataset_defaults("imagenet")


# ------------------------------------------------------------------------------------ ReFACT on RoAD
def test_refact_contrasts_the_target_with_roads_old(tiny_pipe, adapter, stats):
    """ReFACT's contrast pair is [new, old]; RoAD's old is the referent ("justin trudeau")."""
    cfg = RefactConfig(layer=3, max_steps=5)
    tok = tiny_pipe.tokenizer
    got, _ = compute_refact_edit(adapter, tok, [ROAD_OLD], stats.moment(3), cfg)

    def update(pair):
        with torch.no_grad():
            feats = eos_features(tiny_pipe.text_encoder, tok(pair, padding=True, return_tensors="pt"))
        return compute_refact_update(adapter, tok, ROAD_OLD, stats.moment(3), feats, cfg)[0].float()

    (dw,) = got.values()
    torch.testing.assert_close(dw, update([ROAD_OLD.target, "justin trudeau"]), rtol=1e-5, atol=1e-7)
    assert (dw - update([ROAD_OLD.target, ROAD_OLD.source])).norm() > 1e-3 * dw.norm()
    # without an old (TIMED: the old is the prompt) the source is the contrast, as before
    plain = EditRequest("r0", ROAD_OLD.source, ROAD_OLD.target)
    (dw_plain,) = compute_refact_edit(adapter, tok, [plain], stats.moment(3), cfg)[0].values()
    torch.testing.assert_close(dw_plain, update([ROAD_OLD.target, ROAD_OLD.source]), rtol=1e-5, atol=1e-7)


def test_edits_table_carries_roads_old_to_the_requests():
    from t2iedit.edit_data import load_benchmark

    if not (RAW / "RoAD").exists() or not (RAW / "TIMED").exists():
        pytest.skip("vendored RoAD/TIMED data not present")
    road = requests_from_edits(load_benchmark("road", RAW).edits.to_pandas())
    assert road[0].source == "Canada's Prime Minister" and road[0].old.lower() == "justin trudeau"
    assert all(r.old for r in road)
    timed = requests_from_edits(load_benchmark("timed", RAW).edits.to_pandas())
    assert all(r.old is None for r in timed)  # TIMED's Old is its source prompt
