"""Continual editing on the tiny model: the materialised weights are exactly base + Σ ΔW of the
applied batches (bit-exact revert of the last batch, exact removal of a middle one), accumulated keys
K_p grow batch by batch, the sequential solve is AlphaEdit's objective (lstsq parity) and keeps an
earlier batch's keys while the plain solve does not, and the store refuses other base models and
changed files."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from t2iedit.continual import (BaseModelMismatch, ContinualEditor, ContinualState, StoreError,
                               base_model_of, preserved_stats)
from t2iedit.edit import EditArtifact
from t2iedit.storage import read_json
from t2iedit.keys import compute_hidden
from t2iedit.models import TextEncoderAdapter, load_text_encoder
from t2iedit.prompts import EditRequest

LAYERS, VALUE_LAYER = (0, 1, 2, 3, 4), 4
A = [EditRequest("a0", "The president of the United States", "Tim Cook"),
     EditRequest("a1", "A dog", "A cat")]
B = [EditRequest("b0", "The CEO of Amazon", "Andy Jassy"),
     EditRequest("b1", "A banana", "A blue banana"),
     EditRequest("b2", "The capital of France", "Tokyo")]
C = [EditRequest("c0", "The tallest mountain", "Mount Fuji")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def encoder(tiny_dir):
    """A fresh tiny text encoder per test (tests edit it)."""
    tokenizer, model = load_text_encoder(tiny_dir)
    return tokenizer, TextEncoderAdapter(model)


def _targets(adapter, tokenizer, requests, seed):
    """Deterministic target values: the current block output at the edit token, moved by 30% of its
    norm in a seeded random direction."""
    h = compute_hidden(adapter, tokenizer, requests, VALUE_LAYER)  # (n, d)
    g = torch.Generator().manual_seed(seed)
    step = torch.randn(h.shape, generator=g, dtype=torch.float64)
    return h + 0.3 * h.norm(dim=1, keepdim=True) * step / step.norm(dim=1, keepdim=True)


def _apply(editor, tokenizer, requests, seed, **kw):
    z = _targets(editor.adapter, tokenizer, requests, seed)
    kw.setdefault("projectors", None)
    return editor.apply_batch(requests, z, tokenizer, layers=LAYERS, value_layer=VALUE_LAYER, **kw)


def _weights(adapter):
    return {adapter.module_name(l): adapter.layer(l).weight.detach().clone() for l in range(adapter.num_layers)}


def _assert_weights(adapter, expected):
    for name, w in expected.items():
        assert torch.equal(dict(adapter.model.named_modules())[name].weight, w), name


def _new_editor(tmp_path, encoder, name="store"):
    tokenizer, adapter = encoder
    state = ContinualState.create(tmp_path / name, base_model_of(adapter, "tiny", None), {"preset": "tiny"})
    return tokenizer, ContinualEditor(state, adapter)


def test_a_then_b_equals_the_stored_record_and_keys_accumulate(encoder, tmp_path):
    tokenizer, editor = _new_editor(tmp_path, encoder)
    adapter = editor.adapter
    base = _weights(adapter)
    a = _apply(editor, tokenizer, A, seed=1)
    assert editor.state.key_counts() == {l: 2 for l in LAYERS}
    b = _apply(editor, tokenizer, B, seed=2)
    assert editor.state.key_counts() == {l: 5 for l in LAYERS}
    Kp = editor.state.prior_keys()
    assert all(Kp[l].shape == (5, adapter.key_dim) and Kp[l].dtype == torch.float64 for l in LAYERS)
    assert all(torch.equal(Kp[l], torch.cat([a.keys[l], b.keys[l]])) for l in LAYERS)

    # the record on disk, read back through the generic artifact loader (float64 ΔW)
    state = ContinualState.open(tmp_path / "store")
    assert [x.edit_id for x in state.batches] == [a.edit_id, b.edit_id] == ["001-batch", "002-batch"]
    folder_a, folder_b = (tmp_path / "store" / "batches" / x for x in (a.edit_id, b.edit_id))
    dA, dB = EditArtifact.load(folder_a).deltas, EditArtifact.load(folder_b).deltas
    assert set(dA) == set(dB) and len(dA) == len(LAYERS)
    for key in dA:
        assert dA[key].dtype == torch.float64
        name = key.split(":", 1)[1]
        expected = (base[name].double() + dA[key] + dB[key]).float()  # W0 + ΔA + ΔB, one rounding
        assert torch.equal(dict(adapter.model.named_modules())[name].weight, expected)
    man_b = read_json(folder_b / "manifest.json")
    assert man_b["extra"]["continual"]["prior_batches"] == [a.edit_id]
    assert man_b["extra"]["continual"]["prior_key_counts"] == {str(l): 2 for l in LAYERS}
    assert man_b["base_model_id"] == "tiny" and man_b["n_edits"] == 3
    files = read_json(tmp_path / "store" / "state.json")["batches"][1]["files"]
    assert set(files) == {"deltas.safetensors", "deltas.safetensors.json", "keys.safetensors",
                          "keys.safetensors.json", "manifest.json", "requests.json", "sha256.json"}

    # a fresh copy of the base model bound to the reopened store materialises the same weights
    fresh = copy.deepcopy(adapter.model)
    with torch.no_grad():
        for name, w in base.items():
            dict(fresh.named_modules())[name].weight.copy_(w)
    ContinualEditor(state, TextEncoderAdapter(fresh))
    for name in base:
        assert torch.equal(dict(fresh.named_modules())[name].weight,
                           dict(adapter.model.named_modules())[name].weight)


def test_revert_last_is_bit_exact_and_revert_all_restores_base(encoder, tmp_path):
    tokenizer, editor = _new_editor(tmp_path, encoder)
    adapter = editor.adapter
    base_state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    a = _apply(editor, tokenizer, A, seed=1)
    after_a = _weights(adapter)
    b = _apply(editor, tokenizer, B, seed=2)
    assert not torch.equal(adapter.layer(0).weight, after_a[adapter.module_name(0)])
    report = editor.revert(b.edit_id)
    assert report.removed.edit_id == b.edit_id and report.later_shift == {}
    _assert_weights(adapter, after_a)
    assert editor.state.key_counts() == {l: 2 for l in LAYERS}
    editor.revert(a.edit_id)
    assert all(torch.equal(v, base_state[k]) for k, v in adapter.model.state_dict().items())
    assert editor.state.batches == [] and editor.state.prior_keys() == {}
    assert (tmp_path / "store" / "reverted" / b.edit_id / "deltas.safetensors").exists()
    assert ContinualState.open(tmp_path / "store").batches == []


def test_revert_middle_batch_leaves_base_plus_the_rest(encoder, tmp_path):
    tokenizer, editor = _new_editor(tmp_path, encoder)
    adapter = editor.adapter
    base = _weights(adapter)
    a, b, c = (_apply(editor, tokenizer, r, seed=s) for r, s in ((A, 1), (B, 2), (C, 3)))
    report = editor.revert(b.edit_id[:3])  # a unique prefix ("002") names the batch
    assert report.removed.edit_id == b.edit_id
    assert set(report.later_shift) == {c.edit_id} and set(report.later_shift[c.edit_id]) == set(LAYERS)
    assert all(v > 0 for v in report.later_shift[c.edit_id].values())
    for l in LAYERS:
        key = a.layer_modules[l]
        name = key.split(":", 1)[1]
        expected = (base[name].double() + a.artifact.deltas[key] + c.artifact.deltas[key]).float()
        assert torch.equal(adapter.layer(l).weight, expected)
        assert torch.equal(editor.state.prior_keys()[l], torch.cat([a.keys[l], c.keys[l]]))
    reopened = ContinualState.open(tmp_path / "store")
    assert [x.edit_id for x in reopened.batches] == [a.edit_id, c.edit_id]
    assert reopened.new_edit_id("x") == "004-x"  # ids are never reused
    with pytest.raises(StoreError, match="no applied edit matches"):
        editor.revert(b.edit_id)


def test_sequential_solve_is_alphaedit_and_keeps_earlier_keys(encoder, tmp_path):
    """Batch B's ΔW at layer 0 equals an independent lstsq solve of AlphaEdit's objective
    ‖Δ K_B − R‖² + ‖Δ K_A‖² + β‖Δ‖² (P = I), and maps A's keys to a small fraction of what it writes
    at B's keys; the plain solve (no K_p) on the same edited model does not."""
    tokenizer, adapter = encoder
    ratios = {}
    for sequential in (True, False):
        state = ContinualState.in_memory(base_model_of(adapter, "tiny", None))
        editor = ContinualEditor(state, adapter)
        a = _apply(editor, tokenizer, A, seed=1)
        zB = _targets(adapter, tokenizer, B, seed=2)
        hB = compute_hidden(adapter, tokenizer, B, VALUE_LAYER)
        b = editor.apply_batch(B, zB, tokenizer, layers=LAYERS, value_layer=VALUE_LAYER, projectors=None,
                               sequential=sequential)
        if sequential:
            K1, Kp = b.keys[0], a.keys[0]  # (3, 256), (2, 256)
            R = (zB - hB) / len(LAYERS)  # (3, 64) the first layer's share of the residual
            d = K1.shape[1]
            lhs = torch.cat([K1, Kp, torch.eye(d, dtype=torch.float64)])  # β = 1
            rhs = torch.cat([R, torch.zeros(len(Kp) + d, R.shape[1], dtype=torch.float64)])
            reference = torch.linalg.lstsq(lhs, rhs).solution.T  # (64, 256)
            torch.testing.assert_close(b.artifact.deltas[b.layer_modules[0]], reference, rtol=1e-8, atol=1e-10)
        ratios[sequential] = [
            float((a.keys[l] @ b.artifact.deltas[b.layer_modules[l]].T).norm()
                  / (b.keys[l] @ b.artifact.deltas[b.layer_modules[l]].T).norm()) for l in LAYERS]
        editor.revert(b.edit_id)
        editor.revert(a.edit_id)
    assert max(ratios[True]) < 0.25, ratios
    assert min(ratios[False]) > 0.5, ratios
    assert all(s < 0.3 * p for s, p in zip(ratios[True], ratios[False])), ratios


def test_re_editing_a_source_supersedes_its_old_key(encoder):
    tokenizer, adapter = encoder
    editor = ContinualEditor(ContinualState.in_memory(base_model_of(adapter, "tiny", None)), adapter)
    _apply(editor, tokenizer, A, seed=1)
    b = _apply(editor, tokenizer, [EditRequest("d0", "a  DOG", "A wolf")], seed=4)
    cont = b.manifest.extra["continual"]
    assert cont["superseded"] == ["a1"]
    assert cont["prior_key_counts"] == {str(l): 1 for l in LAYERS}  # only "The president ..." stays in K_p
    assert editor.state.key_counts() == {l: 3 for l in LAYERS}  # all applied keys are still recorded


def test_store_refuses_another_base_model_and_changed_files(encoder, tmp_path):
    tokenizer, editor = _new_editor(tmp_path, encoder)
    adapter = editor.adapter
    a = _apply(editor, tokenizer, A, seed=1)
    editor.revert(a.edit_id)  # the model is the base again
    _apply(editor, tokenizer, B, seed=2)
    folder = tmp_path / "store"

    with editor.at_base():
        other = copy.deepcopy(adapter.model)  # the base model: binds fine
    ContinualEditor(ContinualState.open(folder), TextEncoderAdapter(other))
    with torch.no_grad():  # a "base" with one weight changed: same id, other weights
        for l in range(adapter.num_layers):
            TextEncoderAdapter(other).layer(l).weight.copy_(editor.base_weight(a.layer_modules[l])
                                                            if l in a.layer_modules else
                                                            adapter.layer(l).weight)
        TextEncoderAdapter(other).layer(2).weight[0, 0] += 1e-3
    with pytest.raises(BaseModelMismatch, match="were made on base model 'tiny'"):
        ContinualEditor(ContinualState.open(folder), TextEncoderAdapter(other))

    state = ContinualState.open(folder)
    with pytest.raises(BaseModelMismatch, match="'sd-v1-4'"):
        state.check_base(base_model_of(TextEncoderAdapter(other), "sd-v1-4", "133a221"))
    with pytest.raises(StoreError, match="already exists"):
        ContinualState.create(folder, state.base)

    # an edit folder whose ΔW file changed no longer opens
    deltas = folder / "batches" / state.batches[0].edit_id / "deltas.safetensors"
    raw = bytearray(deltas.read_bytes())
    raw[-1] ^= 1
    deltas.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="sha256 differs"):
        ContinualState.open(folder)
    with pytest.raises(StoreError, match="no continual-editing store"):
        ContinualState.open(tmp_path / "nowhere")


def test_preserved_stats_are_of_the_base_model_and_cached(encoder, tmp_path):
    tokenizer, adapter = encoder
    from pathlib import Path

    caps = Path(__file__).parents[1] / "data" / "raw" / "coco" / "coco_30k.csv"
    texts = pd.read_csv(caps, usecols=["prompt"], nrows=120)["prompt"].tolist()
    editor = ContinualEditor(ContinualState.in_memory(base_model_of(adapter, "tiny", None)), adapter)
    first = preserved_stats(editor, tokenizer, texts, [0, 3], mode="rank", value=200, moments=True,
                            cache_dir=tmp_path)
    assert not first.cached and first.metrics["3"]["null_rank"] == 200
    _apply(editor, tokenizer, A, seed=1)
    edited_w = adapter.layer(0).weight.clone()
    again = preserved_stats(editor, tokenizer, texts, [0, 3], mode="rank", value=200, moments=True)
    assert torch.equal(adapter.layer(0).weight, edited_w)  # at_base restored the edited weights
    torch.testing.assert_close(again.moments[3], first.moments[3], rtol=1e-12, atol=1e-12)
    cached = preserved_stats(editor, tokenizer, texts, [0, 3], mode="rank", value=200, moments=True,
                             cache_dir=tmp_path)
    assert cached.cached and torch.equal(cached.projectors[0], first.projectors[0])
    P = first.projectors[3]
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------- crash safety (issue 18 item 2)
@pytest.fixture(scope="module")
def two_batches(tiny_dir):
    """Batches A (seq 1) and B (seq 2) computed once on an in-memory state (no store)."""
    tokenizer, model = load_text_encoder(tiny_dir)
    adapter = TextEncoderAdapter(model)
    state = ContinualState.in_memory(base_model_of(adapter, "tiny", None))
    editor = ContinualEditor(state, adapter)
    a, b = _apply(editor, tokenizer, A, seed=1), _apply(editor, tokenizer, B, seed=2)
    return state.base, a, b


def _killed_at(step: str, fn) -> int:
    """Run ``fn`` in a forked child with the store's fault hook set to ``step``; the signal that ended it."""
    import os

    from t2iedit.continual import FAULT_ENV

    pid = os.fork()
    if pid == 0:  # child: no pytest cleanup, no finally blocks
        try:
            os.environ[FAULT_ENV] = step
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _store_with(folder, base, *batches):
    state = ContinualState.create(folder, base, {"preset": "tiny"})
    for b in batches:
        state.add(b)
    return state


@pytest.mark.parametrize("step", [s for s in __import__("t2iedit.continual", fromlist=["x"]).WRITE_STEPS
                                  if s.startswith("add:")])
def test_a_store_killed_at_any_write_of_a_new_batch_recovers(two_batches, tmp_path, step):
    import signal

    base, a, b = two_batches
    folder = tmp_path / "store"
    _store_with(folder, base, a)
    assert _killed_at(step, lambda: ContinualState.open(folder).add(b)) == signal.SIGKILL, \
        f"the write path never reached {step}"

    state = ContinualState.open(folder)  # today: opens, but B's folder blocks the same edit forever
    ids = [x.edit_id for x in state.batches]
    assert not list((folder / "batches").glob(".*")), "half-written folders are cleaned up"
    if step in ("add:renamed", "add:state"):  # B was written whole: it is (or is adopted as) applied
        assert ids == ["001-batch", "002-batch"]
        assert any("adopted batch 002-batch" in m for m in state.recovered) == (step == "add:renamed")
    else:  # B never completed: the store is as before, and the same edit goes through
        assert ids == ["001-batch"] and not (folder / "batches" / "002-batch").exists()
        state.add(b)
    again = ContinualState.open(folder)
    assert again.recovered == [] and [x.edit_id for x in again.batches] == ["001-batch", "002-batch"]
    got = again.batch("002-batch")
    assert all(torch.equal(got.artifact.deltas[k], b.artifact.deltas[k]) for k in b.artifact.deltas)
    assert again.next_seq == 3


@pytest.mark.parametrize("step", ["revert:state", "revert:moved"])
def test_a_store_killed_during_a_revert_recovers(two_batches, tmp_path, step):
    import signal

    base, a, b = two_batches
    folder = tmp_path / "store"
    _store_with(folder, base, a, b)
    assert _killed_at(step, lambda: ContinualState.open(folder).revert("002")) == signal.SIGKILL
    state = ContinualState.open(folder)
    assert [x.edit_id for x in state.batches] == ["001-batch"]
    assert (folder / "reverted" / "002-batch").is_dir() and not (folder / "batches" / "002-batch").exists()
    assert any("finished reverting" in m for m in state.recovered) == (step == "revert:state")
    assert ContinualState.open(folder).recovered == []


def test_a_store_killed_while_being_created_opens(two_batches, tmp_path):
    import signal

    base, a, _ = two_batches
    folder = tmp_path / "store"
    assert _killed_at("create:state", lambda: ContinualState.create(folder, base, {})) == signal.SIGKILL
    state = ContinualState.open(folder)
    assert state.batches == []
    state.add(a)
    assert [x.edit_id for x in ContinualState.open(folder).batches] == ["001-batch"]


def test_an_unlisted_batch_that_does_not_match_its_hashes_is_moved_aside(two_batches, tmp_path):
    import signal

    base, a, b = two_batches
    folder = tmp_path / "store"
    _store_with(folder, base, a)
    assert _killed_at("add:renamed", lambda: ContinualState.open(folder).add(b)) == signal.SIGKILL
    (folder / "batches" / "002-batch" / "requests.json").write_text("{}")  # damaged after the kill
    state = ContinualState.open(folder)
    assert [x.edit_id for x in state.batches] == ["001-batch"]
    assert (folder / "interrupted" / "002-batch" / "deltas.safetensors").is_file()
    assert any("moved" in m and "interrupted" in m for m in state.recovered)
    state.add(b)  # the edit can be made again
    assert [x.edit_id for x in ContinualState.open(folder).batches] == ["001-batch", "002-batch"]


def test_ctrl_c_during_a_store_write_waits_for_the_write():
    import os
    import signal

    from t2iedit.continual import interrupts_deferred

    # a run started in the background (nohup, `cmd &`) inherits SIGINT ignored: give it Python's handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # delivered at once, held until the block ends
            done.append("write finished")
    assert done == ["write finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, previous)
