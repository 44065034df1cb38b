"""Preset tiny-minilm (issue 17 item 1): the pretrained MiniLM as the text encoder of a tiny SD pipeline,
through the real lock / save_pretrained / from_pretrained path, and every stage's use of it — key
statistics, target values (mean pooling), the closed-form edit, generation."""

from __future__ import annotations

import pytest
import torch

from t2iedit.models import get_preset, load_pipeline, load_text_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm_lock(tmp_path_factory):
    from t2iedit.storage import read_json
    from tasks.model import lock_model

    models = tmp_path_factory.mktemp("minilm") / "models"
    return read_json(lock_model.fn(models / "lock.json", "fp", "tiny-minilm", 0))


def test_lock_builds_the_pipeline_around_the_pretrained_minilm(minilm_lock, minilm_dir):
    lock = minilm_lock
    assert lock["preset"] == "tiny-minilm" and lock["source"].endswith("tiny-minilm-seed0")
    assert lock["text_layer_template"] == "encoder.layer.{}.output.dense"
    assert lock["edit_layers"] == [0, 1, 2, 3] and lock["value_layer"] == 3
    pipe = load_pipeline(lock["source"])
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.use_attention_mask is True
    assert pipe.unet.config.cross_attention_dim == 384
    _, original = load_text_encoder(minilm_dir, subfolder=None, tokenizer_subfolder=None)
    saved = dict(pipe.text_encoder.named_parameters())
    for name, p in original.named_parameters():  # the pretrained weights, bit for bit
        assert torch.equal(saved[name], p), name


def test_generation_conditions_on_masked_minilm_states(minilm_lock):
    """SD's encode_prompt passes the attention mask (use_attention_mask): its conditioning equals the
    MiniLM's states of the prompt padded to 77 with the mask, and differs from the unmasked ones."""
    pipe = load_pipeline(minilm_lock["source"])
    prompt = ["a photo of a red apple"]
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    enc = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        masked = pipe.text_encoder(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        unmasked = pipe.text_encoder(enc.input_ids).last_hidden_state
    assert torch.allclose(embeds, masked, atol=1e-5) and not torch.allclose(embeds, unmasked, atol=1e-3)
    out = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_statistics_values_and_edit_on_minilm(minilm_lock):
    """C0 of the edited layers (keys: the 1536-wide MLP hidden), target values with the preset's mean
    pooling (text-only), the null-space edit: every edited source moves towards its target."""
    from t2iedit.edit import NullSpaceSolver, compute_multilayer_edit, edited
    from t2iedit.keys import collect_second_moment
    from t2iedit.models import TextEncoderAdapter
    from t2iedit.projector import null_space_projector
    from t2iedit.prompts import EditRequest
    from t2iedit.text_space import sentence_features
    from t2iedit.values import ValueConfig, compute_target_values

    pre = get_preset("tiny-minilm")
    assert pre.pooling == "mean"
    tok, te = load_text_encoder(minilm_lock["source"])
    adapter = TextEncoderAdapter(te, pre.text_layer_template, pre.text_block_template)
    captions = ["a man riding a horse on a beach", "two cats sleeping on a sofa", "a plate of pasta",
                "a red bus on a city street", "a child flying a kite in a park"] * 4
    moments = collect_second_moment(adapter, tok, captions, pre.edit_layers, progress=False)
    assert {l: m.dim for l, m in moments.items()} == {0: 1536, 1: 1536, 2: 1536, 3: 1536}
    projectors = {l: null_space_projector(m.moment(), "relative", 1.0e-4).P for l, m in moments.items()}
    reqs = [EditRequest("e0", "The president of the United States", "Tim Cook"),
            EditRequest("e1", "The painter of Starry Night", "Serena Williams")]
    cfg = ValueConfig(alpha=0.0, lambda_visual=0.0, steps=30, pooling=pre.pooling)
    values = compute_target_values(tok, te, adapter.block(pre.value_layer), reqs, cfg, None, pre.value_layer)
    art = compute_multilayer_edit(adapter, tok, reqs, values.z, pre.edit_layers, pre.value_layer,
                                  NullSpaceSolver(projectors), cfg.templates, method="ours",
                                  base_model_id="tiny-minilm", base_revision=None)
    src, tgt = [r.source for r in reqs], [r.target for r in reqs]
    f_src, f_tgt = (sentence_features(tok, te, t, "mean") for t in (src, tgt))
    with edited({"text_encoder": te}, art, "tiny-minilm", None):
        now = sentence_features(tok, te, src, "mean")
    before, after = (f_src * f_tgt).sum(-1), (now * f_tgt).sum(-1)
    assert bool((after > before + 0.05).all()), (before, after)
