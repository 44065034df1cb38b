"""Text-space metrics (t2iedit.text_space, docs/METHOD.md "Text-space metrics"): each metric against a
direct computation, the features against the MiniLM's own sentence-transformers recipe, the held-out
captions, and an edit of the real MiniLM moving the metrics the right way."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from t2iedit import text_space as TS


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data() -> TS.TextSpaceData:
    edits = pd.DataFrame({"edit_id": ["e0", "e1", "e2"], "source": ["s0", "s1", "s2"],
                          "target": ["t0", "t1", "t2"]})
    rows = [  # edit_id, category, prompt, eval_text, class_original, class_edited
        ("e0", "efficacy", "s0", None, "c-orig0", "c-edit0"),
        ("e0", "generality", "g0", "q0", "c-orig0", "c-edit0"),
        ("e1", "generality", "g1", "q1", None, None),
        ("e1", "kgemap", "k1", "qk1", None, None),
        ("e0", "specificity", "p0", None, "c-orig0", "c-edit0"),
        ("e1", "specificity", "p1", None, None, None),
        ("e2", "specificity", "p2", None, None, None),
        ("c9", "specificity", "p9", None, None, None),  # a prompt of an edit not applied: left out
    ]
    prompts = pd.DataFrame(rows, columns=["edit_id", "category", "prompt", "eval_text", "class_original",
                                          "class_edited"])
    entities = pd.DataFrame({"edit_id": ["e0", "e2"], "text": ["ent0", "ent2"]})
    return TS.TextSpaceData(edits, prompts, entities, ("cap0", "cap1", "cap2"))


def _features(data: TS.TextSpaceData, seed: int) -> tuple[TS.Features, TS.Features, dict, dict]:
    rng = np.random.default_rng(seed)
    ft, et = data.frozen_texts(), data.edited_texts()
    f = dict(zip(ft, _unit(rng, len(ft))))
    # edited features: the frozen one moved part of the way towards a random direction
    e = {}
    for t in et:
        v = f[t] + rng.uniform(0.0, 2.0) * _unit(rng, 1)[0]
        e[t] = v / np.linalg.norm(v)
    return (TS.Features(ft, torch.tensor(np.stack([f[t] for t in ft]))),
            TS.Features(et, torch.tensor(np.stack([e[t] for t in et]))), f, e)


def _direct(data: TS.TextSpaceData, f: dict, e: dict) -> dict:
    """The definitions of docs/METHOD.md written out per item, in plain numpy."""
    cos = lambda a, b: float(np.dot(a, b))  # noqa: E731 (unit vectors)
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {"efficacy": pct([cos(e[s], f[t]) > cos(e[s], f[s])
                            for s, t in zip(data.edits["source"], data.edits["target"])])}
    for cat in ("generality", "kgemap", "compo"):
        out[cat] = pct([cos(e[r.prompt], f[r.eval_text]) > cos(e[r.prompt], f[r.prompt])
                        for r in data.prompts.itertuples() if r.category == cat and not pd.isna(r.eval_text)])
    target = dict(zip(data.edits["edit_id"], data.edits["target"]))
    out["specificity"] = pct([cos(e[r.prompt], f[r.prompt]) > cos(e[r.prompt], f[target[r.edit_id]])
                              for r in data.prompts.itertuples()
                              if r.category == "specificity" and r.edit_id in target])
    out["entity_drift"] = float(np.mean([1 - cos(e[x], f[x]) for x in data.entities["text"]]))
    out["caption_drift"] = float(np.mean([1 - cos(e[x], f[x]) for x in data.captions]))
    binary = {}
    for r in data.prompts.itertuples():
        if pd.isna(r.class_original):
            continue
        win_edit = cos(e[r.prompt], f[r.class_edited]) > cos(e[r.prompt], f[r.class_original])
        win_orig = cos(e[r.prompt], f[r.class_original]) > cos(e[r.prompt], f[r.class_edited])
        binary.setdefault(r.category, []).append(win_orig if r.category == "specificity" else win_edit)
    out["binary"] = {c: pct(v) for c, v in binary.items()}
    return out


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_the_direct_computation(seed):
    data = _data()
    frozen, edited, f, e = _features(data, seed)
    got, want = TS.text_space_metrics(data, frozen, edited), _direct(data, f, e)
    for key in ("efficacy", "generality", "kgemap", "specificity", "entity_drift", "caption_drift"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["compo"] is None and want["compo"] is None  # no compo prompt
    assert got["binary"] == pytest.approx(want["binary"])
    assert got["n"] == {"edits": 3, "generality": 2, "kgemap": 1, "compo": 0, "specificity": 3,
                        "entities": 2, "captions": 3, "binary": 3}


def test_unedited_is_the_floor_and_the_ceiling():
    data = _data()
    frozen, _, _, _ = _features(data, 0)
    r = TS.text_space_metrics(data, frozen, frozen)
    assert (r["efficacy"], r["generality"], r["kgemap"], r["specificity"]) == (0.0, 0.0, 0.0, 100.0)
    assert r["entity_drift"] == pytest.approx(0.0, abs=1e-12)
    assert r["caption_drift"] == pytest.approx(0.0, abs=1e-12)


def test_a_perfect_edit_scores_full_efficacy():
    """Edited source feature = the frozen target's: efficacy 100 % (and not otherwise)."""
    data = _data()
    frozen, edited, _, _ = _features(data, 1)
    m = edited.matrix.clone()
    for s, t in zip(data.edits["source"], data.edits["target"]):
        m[edited.index[s]] = frozen.matrix[frozen.index[t]]
    r = TS.text_space_metrics(data, frozen, TS.Features(list(edited.index), m))
    assert r["efficacy"] == 100.0


def test_features_reject_unknown_texts_and_mismatched_rows():
    with pytest.raises(ValueError, match="2 distinct texts but 3"):
        TS.Features(["a", "b"], torch.zeros(3, 4))
    with pytest.raises(KeyError, match="'zzz'"):
        TS.Features(["a"], torch.zeros(1, 4))[["zzz"]]
    with pytest.raises(ValueError, match="missing columns"):
        TS.TextSpaceData(pd.DataFrame({"edit_id": []}), _data().prompts, _data().entities, ())


def test_held_out_captions_skip_the_fid_head_and_k0():
    caps = [f"c{i}" for i in range(20)] + ["c12"]
    got = TS.held_out_captions(caps, corpus=["c6", "c7", "c12"], skip_first=5, n=6)
    assert got == ["c5", "c8", "c9", "c10", "c11", "c13"]
    with pytest.raises(ValueError, match="only 12 held-out"):
        TS.held_out_captions(caps, corpus=["c6", "c7", "c12"], skip_first=5, n=50)


def test_markdown_table_lists_methods_and_present_columns():
    r = {"unedited": {"efficacy": 0.0, "generality": None, "specificity": 100.0, "entity_drift": 0.0,
                      "caption_drift": 0.0, "binary": {"efficacy": 10.0}},
         "ours": {"efficacy": 80.0, "generality": None, "specificity": 60.0, "entity_drift": 0.01234,
                  "caption_drift": 0.002, "binary": {}}}
    md = TS.markdown_table(r, "T")
    assert "Generality" not in md and "Binary efficacy ↑" in md
    assert "| ours | 80.0 | 60.0 | 0.0123 | 0.0020 | – |" in md


# --- the real MiniLM -------------------------------------------------------------------------

def _minilm(minilm_dir):
    from t2iedit.models import load_text_encoder

    return load_text_encoder(minilm_dir, subfolder=None, tokenizer_subfolder=None)


def test_mean_features_equal_sentence_transformers_recipe(minilm_dir, one_thread):
    """MiniLM's features: the attention-masked mean of the final states, L2-normalised — computed
    one text at a time (no padding at all), equal to the batched, padded computation."""
    tok, model = _minilm(minilm_dir)
    texts = ["A photo of a dog", "The president of the United States in a carriage", "cat"]
    got = TS.sentence_features(tok, model, texts, "mean", batch_size=3)
    for i, t in enumerate(texts):
        enc = tok([t], return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0].double()
        want = h.mean(0) / h.mean(0).norm()
        assert torch.allclose(got[i], want, atol=1e-5), t
    assert got.norm(dim=-1).sub(1).abs().max() < 1e-9


def test_minilm_features_carry_meaning(minilm_dir, one_thread):
    """The pretrained encoder, not a random one: paraphrases are nearer than unrelated texts."""
    tok, model = _minilm(minilm_dir)
    f = TS.sentence_features(tok, model, ["a dog runs on the beach", "a puppy running on the sand",
                                          "a bowl of soup on a table"], "mean")
    assert float(f[0] @ f[1]) > float(f[0] @ f[2]) + 0.3


def test_clip_eos_features_are_the_pooler_output(tiny_dir):
    """On CLIP, ``eos`` pooling is the pooled [EOS] state (the model's pooler_output), normalised."""
    from t2iedit.models import load_text_encoder

    tok, te = load_text_encoder(tiny_dir)
    texts = ["a red apple", "an image of the president of the united states"]
    got = TS.sentence_features(tok, te, texts, "eos")
    enc = tok(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        pooled = te(input_ids=enc.input_ids).pooler_output.double()
    assert torch.allclose(got, pooled / pooled.norm(dim=-1, keepdim=True), atol=1e-5)
    assert not math.isnan(float(got.sum()))
