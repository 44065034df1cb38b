"""Key collection on real forward passes: second moments, edit keys, hidden states (tiny CLIP, MiniLM)."""

from __future__ import annotations

import pytest
import torch

from t2iedit.keys import SecondMoment, collect_second_moment, compute_hidden, compute_keys
from t2iedit.models import (BERT_BLOCK_TEMPLATE, BERT_DENSE_TEMPLATE, TextEncoderAdapter,
                            load_text_encoder)
from t2iedit.prompts import EditRequest

TEXTS = [
    "A bicycle replica with a clock as the front wheel.",
    "A black Honda motorcycle parked in front of a garage.",
    "A dog",
    "Two giraffes standing next to each other in a grassy field under a bright blue sky with clouds.",
    "The president of the United States",
    "A room with blue walls and a white sink and door.",
    "a cat",
]
REQUESTS = [
    EditRequest("e0", "The president of the United States", "Joe Biden"),
    EditRequest("e1", "A dog", "A cat"),
    EditRequest("e2", "The CEO of Amazon", "Andy Jassy"),
]


@pytest.fixture(scope="module")
def clip(tiny_dir):
    tokenizer, model = load_text_encoder(tiny_dir)
    return tokenizer, TextEncoderAdapter(model)


def _naive_keys(adapter, tokenizer, texts, layer):
    """Reference: every text padded to 77, full forward, non-padding tokens' fc2 inputs (n, d_in)."""
    enc = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad(), adapter.capture([layer]) as rec:
        out = adapter.run(**enc)
    assert out is not None
    return rec["keys"][layer][enc["attention_mask"].bool()].double()


def test_second_moment_streaming_merge_and_io(tmp_path):
    g = torch.Generator().manual_seed(0)
    K = torch.randn(103, 12, generator=g)
    whole = SecondMoment(12).update(K)
    torch.testing.assert_close(whole.moment(), K.double().T @ K.double() / 103, rtol=1e-12, atol=1e-14)
    streamed = SecondMoment(12)
    for chunk in K.split(10):
        streamed.update(chunk)
    assert streamed.count == 103
    torch.testing.assert_close(streamed.sum, whole.sum, rtol=1e-12, atol=1e-12)
    merged = SecondMoment(12).update(K[:40]).merge(SecondMoment(12).update(K[40:]))
    assert merged.count == 103
    torch.testing.assert_close(merged.moment(), whole.moment(), rtol=1e-12, atol=1e-14)
    whole.save(tmp_path / "m.safetensors", meta={"layer": 2})
    back = SecondMoment.load(tmp_path / "m.safetensors")
    assert back.count == 103 and torch.equal(back.sum, whole.sum)
    with pytest.raises(ValueError):
        SecondMoment(12).update(torch.zeros(3, 11))
    with pytest.raises(ValueError):
        SecondMoment(12).moment()


def test_collected_moment_equals_naive_pad_to_77(clip):
    """Sorting, padding to the longest and stopping early change nothing: same tokens, same moment."""
    tokenizer, adapter = clip
    layers = [0, 2]
    moments = collect_second_moment(adapter, tokenizer, TEXTS, layers, batch_size=3, progress=False)
    for layer in layers:
        K0 = _naive_keys(adapter, tokenizer, TEXTS, layer)
        assert moments[layer].count == K0.shape[0] == sum(
            len(ids) for ids in tokenizer(TEXTS)["input_ids"])  # BOS and EOS included, no padding
        torch.testing.assert_close(moments[layer].moment(), K0.T @ K0 / K0.shape[0], rtol=1e-5, atol=1e-7)
    # batch size does not matter either; merging two halves equals the whole corpus
    one = collect_second_moment(adapter, tokenizer, TEXTS, layers, batch_size=1, progress=False)
    a = collect_second_moment(adapter, tokenizer, TEXTS[:4], layers, batch_size=8, progress=False)
    b = collect_second_moment(adapter, tokenizer, TEXTS[4:], layers, batch_size=8, progress=False)
    for layer in layers:
        torch.testing.assert_close(one[layer].moment(), moments[layer].moment(), rtol=1e-5, atol=1e-7)
        merged = a[layer].merge(b[layer])
        assert merged.count == moments[layer].count
        torch.testing.assert_close(merged.moment(), moments[layer].moment(), rtol=1e-5, atol=1e-7)


def test_truncation_at_77(clip):
    tokenizer, adapter = clip
    long_text = " ".join(["dog"] * 120)
    m = collect_second_moment(adapter, tokenizer, [long_text], [1], progress=False)
    assert m[1].count == 77


def test_early_stop_gives_identical_keys(clip):
    tokenizer, adapter = clip
    enc = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        with adapter.capture([1, 3]) as full:
            assert adapter.run(**enc) is not None
        with adapter.capture([1, 3], stop_after=3) as early:
            assert adapter.run(**enc) is None
    for layer in (1, 3):
        assert torch.equal(full["keys"][layer], early["keys"][layer])


def test_compute_keys_at_the_edit_token(clip):
    tokenizer, adapter = clip
    layer, templates = 2, ("A photo of {}", "{}")
    K1 = compute_keys(adapter, tokenizer, REQUESTS, layer, templates)
    assert K1.shape == (3, adapter.key_dim) and K1.dtype == torch.float64
    # independent reference: one prompt at a time, last token before EOS (the source ends the prompt)
    for i, r in enumerate(REQUESTS):
        ref = 0
        for t in templates:
            enc = tokenizer([t.format(r.source)], return_tensors="pt")
            with torch.no_grad(), adapter.capture([layer]) as rec:
                adapter.run(**enc)
            ref = ref + rec["keys"][layer][0, -2].double()
        torch.testing.assert_close(K1[i], ref / len(templates), rtol=1e-5, atol=1e-6)
    # subject in the middle of a template: the edit token is the source's last token, not the prompt's
    K_mid = compute_keys(adapter, tokenizer, REQUESTS[1:2], layer, ("{} on the beach",))
    enc = tokenizer(["A dog on the beach"], return_tensors="pt")
    with torch.no_grad(), adapter.capture([layer]) as rec:
        adapter.run(**enc)
    torch.testing.assert_close(K_mid[0], rec["keys"][layer][0, 2].double(), rtol=1e-5, atol=1e-6)


def test_compute_hidden_is_block_output(clip):
    tokenizer, adapter = clip
    hooks = dict(adapter.block(3)._forward_hooks)
    h = compute_hidden(adapter, tokenizer, REQUESTS, 3)
    assert dict(adapter.block(3)._forward_hooks) == hooks  # our hook removed
    assert h.shape == (3, adapter.value_dim) and h.dtype == torch.float64
    enc = tokenizer([r.source for r in REQUESTS], padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = adapter.model(**enc, output_hidden_states=True)
    last = enc["attention_mask"].sum(1) - 2  # token before EOS
    ref = out.hidden_states[4][torch.arange(3), last].double()  # hidden_states[0] = embeddings
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6)


def test_adapter_on_minilm(minilm_dir):
    """The same collector and edit-key code on a BERT-style encoder (non-causal, masked padding)."""
    tokenizer, model = load_text_encoder(minilm_dir, subfolder=None, tokenizer_subfolder=None)
    adapter = TextEncoderAdapter(model, BERT_DENSE_TEMPLATE, BERT_BLOCK_TEMPLATE)
    assert adapter.key_dim == 1536 and adapter.value_dim == 384
    layers = [0, 3]
    texts = TEXTS[:5]
    m = collect_second_moment(adapter, tokenizer, texts, layers, batch_size=2, progress=False)
    one = collect_second_moment(adapter, tokenizer, texts, layers, batch_size=1, progress=False)
    for layer in layers:
        assert m[layer].count == sum(len(ids) for ids in tokenizer(texts)["input_ids"])  # CLS, SEP included
        torch.testing.assert_close(m[layer].moment(), one[layer].moment(), rtol=1e-4, atol=1e-6)
    K1 = compute_keys(adapter, tokenizer, REQUESTS, 3)
    h = compute_hidden(adapter, tokenizer, REQUESTS, 3)
    assert K1.shape == (3, 1536) and h.shape == (3, 384)
    assert torch.isfinite(K1).all() and torch.isfinite(h).all()


def test_float32_batches_merged_in_float64_match_the_float64_update():
    """The per-batch float32 product (one triangle, mirrored) and weighted rows agree with the exact
    float64 Σ k kᵀ (issue 16 item 8)."""
    g = torch.Generator().manual_seed(1)
    K = torch.rand(500, 37, generator=g)  # fc2 inputs are mostly >= 0: the worst case for rounding
    exact = SecondMoment(37).update(K)
    fast = SecondMoment(37)
    for chunk in K.split(64):
        fast.update(chunk, batch_dtype=torch.float32)
    assert fast.count == 500 and torch.equal(fast.sum, fast.sum.T)  # mirrored exactly
    rel = float((fast.sum - exact.sum).norm() / exact.sum.norm())
    assert 0 < rel < 1e-6  # float32 rounding, not float64 (0) and not a wrong block (~1)
    # weights: one row standing for w identical rows
    w = torch.randint(1, 5, (500,), generator=g)
    rep = SecondMoment(37).update(K.repeat_interleave(w, dim=0))
    for dt, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        weighted = SecondMoment(37).update(K, w, batch_dtype=dt)
        assert weighted.count == int(w.sum())
        torch.testing.assert_close(weighted.moment(), rep.moment(), rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="weights"):
        SecondMoment(37).update(K, w[:3])
    # the non-SYRK path (GPU: one GEMM, its lower triangle) and the blocked mirror, run on the CPU
    from t2iedit.keys import _gram_lower, _gram_lower_torch, _mirror_lower_

    for tri in (_gram_lower(K), _gram_lower_torch(K, torch.zeros(37, 37))):
        assert torch.equal(tri, torch.tril(tri))  # nothing written above the diagonal
        full = _mirror_lower_(tri.clone(), block=8)  # 5 blocks: diagonal and off-diagonal ones
        assert torch.equal(full, full.T) and torch.equal(torch.tril(full), tri)
        assert 0 < float((full.double() - exact.sum).norm() / exact.sum.norm()) < 1e-6


def test_key_buffer_folds_and_weights_match_float64():
    """The collector's buffer: float32 SYRKs of up to fold_rows keys, merged in float64 — over many
    folds (a fold that dropped or doubled a buffer, or a wrong mirror, is off by ≥ 1e-2)."""
    from t2iedit.keys import _KeyBuffer

    g = torch.Generator().manual_seed(2)
    K = {0: torch.rand(700, 37, generator=g), 4: torch.rand(700, 21, generator=g)}
    w = torch.randint(1, 4, (700,), generator=g)
    keep = torch.rand(700, generator=g) < 0.7  # rows of layer 4 gathered by index
    buf = _KeyBuffer({0: 37, 4: 21}, "cpu", rows=50)
    for s in range(0, 700, 33):  # batches that straddle the folds
        buf.add(0, K[0][s:s + 33])
        idx = torch.nonzero(keep[s:s + 33]).flatten()
        buf.add(4, K[4][s:s + 33], idx, w[s:s + 33][idx])
    buf.add(0, K[0][:0])  # an empty batch changes nothing
    m = buf.moments()
    K4, w4 = K[4][keep].double(), w[keep].double()
    ref0 = K[0].double().T @ K[0].double()
    ref4 = (K4 * w4[:, None]).T @ K4
    assert m[0].count == 700 and m[4].count == int(w[keep].sum())
    for got, ref in ((m[0].sum, ref0), (m[4].sum, ref4)):
        assert torch.equal(got, got.T)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6
    big = _KeyBuffer({0: 37}, "cpu", rows=40)  # a batch larger than the buffer: its own product
    big.add(0, K[0][:10])
    big.add(0, K[0][10:])
    got = big.moments()[0].sum
    assert float((got - ref0).abs().max() / ref0.abs().max()) < 1e-6
    empty = _KeyBuffer({1: 5}, "cpu", rows=10).moments()[1]
    assert empty.count == 0 and not empty.sum.any()


def _hooked_keys(adapter, tokenizer, texts, layer):
    """Independent reference: each text alone (no padding, full forward), the fc2 input taken by a
    plain forward hook on the module (not the adapter's capture), float64 (n_tokens, d_in)."""
    rows = []
    handle = adapter.layer(layer).register_forward_hook(lambda _m, inp, _o: rows.append(inp[0][0].double()))
    try:
        with torch.no_grad():
            for text in texts:
                adapter.model(**tokenizer([text], truncation=True, max_length=77, return_tensors="pt"))
    finally:
        handle.remove()
    return torch.cat(rows)


def test_fast_collection_matches_direct_float64_moment(clip):
    """The default path (equal-length batches, prefix dedup, float32 SYRKs merged in float64, early
    stop) against C0 = K0ᵀK0 in float64 of hooked keys: every token once (a dropped batch or a
    padding token changes the count and the moment), max relative difference ≤ 1e-6 (measured ≈ 1e-7)."""
    from t2iedit.keys import _Batches

    tokenizer, adapter = clip
    texts = TEXTS + ["A dog on a bench", "A dog on a sofa", "A dog", "two dogs", "A cat on a mat"]
    ids = tokenizer(texts)["input_ids"]
    batches = list(_Batches(ids)(3))
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))  # every text once
    assert all(len(b) <= 3 and len({len(ids[i]) for i in b}) == 1 for b in batches)  # one length each
    for batch_size, fold_rows in ((3, 5), (64, 4096)):  # many folds / one
        m = collect_second_moment(adapter, tokenizer, texts, [1, 3], batch_size=batch_size,
                                  progress=False, fold_rows=fold_rows)
        for layer in (1, 3):
            K0 = _hooked_keys(adapter, tokenizer, texts, layer)  # (n_tokens, d_in)
            ref = K0.T @ K0 / K0.shape[0]
            assert m[layer].count == K0.shape[0] == sum(map(len, ids))
            assert torch.equal(m[layer].sum, m[layer].sum.T)
            rel = float((m[layer].moment() - ref).abs().max() / ref.abs().max())
            assert rel < 1e-6, rel


def test_prefix_dedup_and_float32_give_the_float64_moment(clip):
    """Shared prefixes (BOS, "A …") enter once with their count; float32 batches: same C0 as the
    exact float64 collection of every token padded to 77."""
    from t2iedit.keys import _prefix_weights

    tokenizer, adapter = clip
    texts = TEXTS + ["A dog on a bench", "A dog on a sofa", "A dog"]
    ids = tokenizer(texts)["input_ids"]
    w = _prefix_weights(ids, range(len(ids)))
    assert sum(map(sum, w)) == sum(map(len, ids))  # every token counted exactly once
    assert w[0][0] == len(texts)  # BOS: one key for all texts
    assert sum(x > 0 for row in w for x in row) < sum(map(len, ids))
    for layer in (0, 2):
        K0 = _naive_keys(adapter, tokenizer, texts, layer)
        ref = K0.T @ K0 / K0.shape[0]
        for causal in (True, False):
            m = collect_second_moment(adapter, tokenizer, texts, [0, 2], batch_size=4, progress=False,
                                      causal=causal)[layer]
            assert m.count == K0.shape[0]
            torch.testing.assert_close(m.moment(), ref, rtol=1e-5, atol=1e-7)
        exact = collect_second_moment(adapter, tokenizer, texts, [layer], batch_size=4,
                                      progress=False, batch_dtype=torch.float64, causal=False)[layer]
        torch.testing.assert_close(exact.moment(), ref, rtol=1e-5, atol=1e-7)
