"""Edits on the tiny model: null-space guarantee on real keys, apply/revert exactness, base-model
check, artifact round trip and MEMIT-style residual spreading."""

from __future__ import annotations

import itertools

import pytest
import torch

from t2iedit.edit import (EditArtifact, EditManifest, MemitSolver, NullSpaceSolver, apply_edit,
                          compute_multilayer_edit, edited, module_key, revert_edit)
from t2iedit.keys import collect_second_moment, compute_hidden, compute_keys
from t2iedit.models import TextEncoderAdapter, load_text_encoder
from t2iedit.projector import null_space_projector
from t2iedit.prompts import EditRequest
from t2iedit.solve import null_space_update

BASE = ("tiny-seed0", "rev-abc")
# preserved corpus: few enough tokens (< 256 = tiny key dim) that C0 has an exact null space
PRESERVED = [
    "A bicycle replica with a clock as the front wheel.",
    "A black Honda motorcycle parked in front of a garage.",
    "A room with blue walls and a white sink and door.",
    "A car that seems to be parked illegally behind a legally parked car",
    "A large passenger airplane flying through the air.",
    "There is a GOL plane taking off in a partly cloudy sky.",
]
REQUESTS = [
    EditRequest("e0", "The president of the United States", "Joe Biden"),
    EditRequest("e1", "A dog", "A cat"),
    EditRequest("e2", "The CEO of Amazon", "Andy Jassy"),
]
LAYERS, VALUE_LAYER = (0, 1, 2, 3, 4), 4


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    tokenizer, model = load_text_encoder(tiny_dir)
    return tokenizer, TextEncoderAdapter(model)


@pytest.fixture(scope="module")
def moments(encoder):
    tokenizer, adapter = encoder
    # float64 batch products: the tests below check the *exact* null space of 81 keys (< 256 dims); the
    # float32 default (issue 16) leaves ~1e-7 rounding that a relative 1e-10 cut counts as signal
    return collect_second_moment(adapter, tokenizer, PRESERVED, LAYERS, progress=False, batch_dtype=torch.float64)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())


def _preserved_keys(adapter, tokenizer, layer):
    enc = tokenizer(PRESERVED, padding="longest", return_tensors="pt")
    with torch.no_grad(), adapter.capture([layer], stop_after=layer) as rec:
        adapter.run(**enc)
    return rec["keys"][layer][enc["attention_mask"].bool()].double()  # (n_tokens, d_in)


def _targets(adapter, tokenizer):
    """z: the value-layer hidden state of each target prompt (a realistic, far-away target)."""
    targets = [EditRequest(r.edit_id, r.target, r.target) for r in REQUESTS]
    return compute_hidden(adapter, tokenizer, targets, VALUE_LAYER)


def test_null_space_update_preserves_real_keys(encoder):
    tokenizer, adapter = encoder
    layer = 2
    # C0 of exactly the keys checked below (K0ᵀK0, float64): the guarantee is about the keys the moment
    # was built from. The same texts through the collector's batches (equal lengths, another batch
    # shape) give float32 keys that differ by ~1e-7 per entry, depending on the CPU's kernels (1.07e-6
    # here on an AMD EPYC vs < 1e-6 elsewhere); the collector's own moment is checked against hooked
    # keys in tests/test_core_keys.py
    K0 = _preserved_keys(adapter, tokenizer, layer)  # (n_tokens, d_in)
    assert K0.shape[0] < adapter.key_dim
    proj = null_space_projector(K0.T @ K0 / K0.shape[0], "relative", 1e-10)
    assert proj.null_rank >= adapter.key_dim - K0.shape[0]
    K1 = compute_keys(adapter, tokenizer, REQUESTS, layer)
    W = adapter.layer(layer).weight.detach().double()  # (d_out, d_in)
    R = torch.randn(len(REQUESTS), W.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) * (K1 @ W.T).norm(dim=1, keepdim=True)
    delta = null_space_update(K1, R, proj.P, beta=1e-3)
    assert (delta @ K0.T).norm() / (W @ K0.T).norm() < 1e-6
    # ... while the edit keys do move to the requested residual (their null-space part suffices)
    fit = (K1 @ delta.T - R).norm() / R.norm()
    assert fit < 0.05
    # without the projector the preserved keys would move
    free = null_space_update(K1, R, torch.eye(adapter.key_dim, dtype=torch.float64))
    assert (free @ K0.T).norm() / (W @ K0.T).norm() > 1e-3


def _artifact(adapter, layers=(1, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = {module_key("text_encoder", adapter.module_name(l)):
              1e-3 * torch.randn(adapter.layer(l).weight.shape, generator=g, dtype=torch.float64)
              for l in layers}
    manifest = EditManifest(method="test", base_model_id=BASE[0], base_revision=BASE[1],
                            config_hash="x", layers=tuple(layers), n_edits=1)
    return EditArtifact(deltas, manifest)


def test_apply_then_revert_is_exact(encoder, tmp_path):
    _, adapter = encoder
    components = {"text_encoder": adapter.model}
    before = _state(adapter.model)
    art = _artifact(adapter)
    applied = apply_edit(components, art, *BASE)
    w = adapter.layer(1).weight
    assert not torch.equal(w, before[adapter.module_name(1) + ".weight"])
    torch.testing.assert_close(w.double() - before[adapter.module_name(1) + ".weight"].double(),
                               art.deltas[module_key("text_encoder", adapter.module_name(1))],
                               atol=1e-6, rtol=0)
    revert_edit(components, applied)
    _assert_same_state(adapter.model, before)
    # the saved artifact applies identically and the context manager reverts on error
    art.save(tmp_path / "edit")
    back = EditArtifact.load(tmp_path / "edit")
    assert back.manifest == art.manifest and set(back.deltas) == set(art.deltas)
    with pytest.raises(RuntimeError, match="boom"):
        with edited(components, back, *BASE):
            assert not torch.equal(adapter.layer(3).weight, before[adapter.module_name(3) + ".weight"])
            raise RuntimeError("boom")
    _assert_same_state(adapter.model, before)


def test_refuses_other_base_model(encoder):
    _, adapter = encoder
    before = _state(adapter.model)
    with pytest.raises(ValueError, match="refusing to apply"):
        apply_edit({"text_encoder": adapter.model}, _artifact(adapter), "CompVis/stable-diffusion-v1-4", "133a")
    with pytest.raises(ValueError, match="refusing to apply"):
        apply_edit({"text_encoder": adapter.model}, _artifact(adapter), BASE[0], "other-revision")
    with pytest.raises(KeyError, match="unet"):
        art = _artifact(adapter)
        art.deltas["unet:down_blocks.0.attn2.to_k"] = torch.zeros(2, 2)
        apply_edit({"text_encoder": adapter.model}, art, *BASE)
    _assert_same_state(adapter.model, before)


def test_unet_modules_are_addressable(tiny_pipe):
    """TIME edits UNet cross-attention projections: the artifact keys them by component."""
    name = next(n for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    w = tiny_pipe.unet.get_submodule(name).weight
    before = w.detach().clone()
    art = EditArtifact({module_key("unet", name): torch.ones_like(w, dtype=torch.float64)},
                       EditManifest("time", *BASE, config_hash="x", layers=(), n_edits=1))
    comps = {"unet": tiny_pipe.unet, "text_encoder": tiny_pipe.text_encoder}
    with edited(comps, art, *BASE):
        assert torch.equal(w, (before.double() + 1).float())
    assert torch.equal(w, before)


def test_multilayer_edit_reaches_target_and_leaves_model_unchanged(encoder):
    tokenizer, adapter = encoder
    z = _targets(adapter, tokenizer)
    h0 = compute_hidden(adapter, tokenizer, REQUESTS, VALUE_LAYER)
    before = _state(adapter.model)
    # small β: a nearly unregularised fit; keys from the "{}" template only, the one h is read at, so
    # the last layer (= the value layer) absorbs whatever residual the earlier layers left
    art = compute_multilayer_edit(adapter, tokenizer, REQUESTS, z, LAYERS, VALUE_LAYER,
                                  NullSpaceSolver(projectors=None, beta=1e-3), templates=("{}",),
                                  method="ours-noproj", base_model_id=BASE[0], base_revision=BASE[1],
                                  config={"beta": 1e-3})
    _assert_same_state(adapter.model, before)
    assert set(art.manifest.layers) == set(LAYERS) and len(art.deltas) == len(LAYERS)
    with edited({"text_encoder": adapter.model}, art, *BASE):
        h = compute_hidden(adapter, tokenizer, REQUESTS, VALUE_LAYER)
    gap = ((h - z).norm(dim=1) / (h0 - z).norm(dim=1)).max()
    assert gap < 0.05
    assert art.manifest.extra["relative_residual_after"] == pytest.approx(
        float(((h - z).norm(dim=1) / (h0 - z).norm(dim=1)).mean()), rel=1e-3)
    _assert_same_state(adapter.model, before)


def test_multilayer_null_space_edit_keeps_preserved_prompts(encoder, moments):
    """With P per layer from the preserved prompts, every layer's ΔW annihilates their keys, so their
    hidden states stay put (by induction over layers) while the edit tokens move toward z."""
    tokenizer, adapter = encoder
    projectors = {l: null_space_projector(m.moment(), "relative", 1e-10).P for l, m in moments.items()}
    z = _targets(adapter, tokenizer)
    h0 = compute_hidden(adapter, tokenizer, REQUESTS, VALUE_LAYER)
    art = compute_multilayer_edit(adapter, tokenizer, REQUESTS, z, LAYERS, VALUE_LAYER,
                                  NullSpaceSolver(projectors, beta=1e-3),
                                  method="ours", base_model_id=BASE[0], base_revision=BASE[1])
    enc = tokenizer(PRESERVED, padding="longest", return_tensors="pt")
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = adapter.model(**enc, output_hidden_states=True).hidden_states[VALUE_LAYER + 1][mask]
        with edited({"text_encoder": adapter.model}, art, *BASE):
            new = adapter.model(**enc, output_hidden_states=True).hidden_states[VALUE_LAYER + 1][mask]
            h = compute_hidden(adapter, tokenizer, REQUESTS, VALUE_LAYER)
    assert (new - ref).norm() / ref.norm() < 1e-5
    assert ((h - z).norm(dim=1) / (h0 - z).norm(dim=1)).mean() < 0.5


def test_memit_solver_runs_through_spreading(encoder):
    """EMCID's solve needs a full-rank C0: a corpus with more tokens than key dimensions."""
    tokenizer, adapter = encoder
    corpus = [f"{a} {b} {c}" for a, b, c in itertools.product(
        ["A red", "The old", "Two small", "A shiny", "Some wet"],
        ["dog", "car", "house", "bottle", "tree", "woman"],
        ["on the beach.", "in a city", "near a lake at night"])]
    moments = collect_second_moment(adapter, tokenizer, corpus, LAYERS, progress=False)
    assert all(m.count > adapter.key_dim for m in moments.values())
    z = _targets(adapter, tokenizer)
    h0 = compute_hidden(adapter, tokenizer, REQUESTS, VALUE_LAYER)
    solver = MemitSolver({l: m.moment() for l, m in moments.items()}, lam=1.0)
    art = compute_multilayer_edit(adapter, tokenizer, REQUESTS, z, LAYERS, VALUE_LAYER, solver,
                                  method="emcid", base_model_id=BASE[0], base_revision=BASE[1])
    assert art.manifest.extra["relative_residual_after"] < 0.6
    with edited({"text_encoder": adapter.model}, art, *BASE):
        h = compute_hidden(adapter, tokenizer, REQUESTS, VALUE_LAYER)
    assert ((h - z).norm(dim=1) < (h0 - z).norm(dim=1)).all()


def test_multilayer_edit_rejects_bad_input(encoder):
    tokenizer, adapter = encoder
    z = torch.zeros(len(REQUESTS), adapter.value_dim + 1)
    with pytest.raises(ValueError, match="targets_z"):
        compute_multilayer_edit(adapter, tokenizer, REQUESTS, z, LAYERS, VALUE_LAYER, NullSpaceSolver(None),
                                method="x", base_model_id="a", base_revision=None)
    with pytest.raises(ValueError, match="after the value layer"):
        compute_multilayer_edit(adapter, tokenizer, REQUESTS, z, (3, 5), 4, NullSpaceSolver(None),
                                method="x", base_model_id="a", base_revision=None)


# ---------------------------------------------------------------- entity keys (issue 15 item 4)
from t2iedit.edit import entity_prompts, prompt_token_keys  # noqa: E402

ENTITY_REQUESTS = [
    EditRequest("e0", "The president of the United States", "Joe Biden", ((17, 34),)),
    EditRequest("e1", "A dog", "A cat"),
    EditRequest("e2", "The CEO of Amazon", "Andy Jassy", ((11, 17),)),
]


def test_entity_prompts_are_the_entity_alone_and_in_the_templates():
    assert entity_prompts(ENTITY_REQUESTS, ("An image of {}", "{}")) == [
        "the United States", "An image of the United States", "Amazon", "An image of Amazon"]


def _entity_keys_edit(adapter, tokenizer, projectors, form, preserve=True):
    targets = [EditRequest(r.edit_id, r.target, r.target) for r in ENTITY_REQUESTS]
    z = compute_hidden(adapter, tokenizer, targets, VALUE_LAYER)
    return compute_multilayer_edit(
        adapter, tokenizer, ENTITY_REQUESTS, z, LAYERS, VALUE_LAYER,
        NullSpaceSolver(projectors, beta=1e-3, preserve_form=form), method="ours-entity-keys",
        base_model_id=BASE[0], base_revision=BASE[1],
        preserve_prompts=entity_prompts(ENTITY_REQUESTS) if preserve else ())


def _entity_shift(adapter, tokenizer, art):
    """max over edited layers and entity-prompt tokens of ‖ΔW k‖ / ‖W k‖ (keys of the unedited model)."""
    texts = entity_prompts(ENTITY_REQUESTS)
    worst = 0.0
    for layer in LAYERS:
        K = prompt_token_keys(adapter, tokenizer, texts, layer)  # (n_tokens, d_in)
        W = adapter.layer(layer).weight.detach().double()
        delta = art.deltas[module_key("text_encoder", adapter.module_name(layer))].double()
        worst = max(worst, float(((K @ delta.T).norm(dim=1) / (K @ W.T).norm(dim=1)).max()))
    return worst


@pytest.mark.parametrize("use_projector", [True, False])
def test_entity_keys_preserve_leaves_every_entity_key_unmoved(encoder, moments, use_projector):
    tokenizer, adapter = encoder
    projectors = ({l: null_space_projector(m.moment(), "relative", 1e-10).P for l, m in moments.items()}
                  if use_projector else None)
    before = _state(adapter.model)
    plain = _entity_keys_edit(adapter, tokenizer, projectors, "nullspace", preserve=False)
    kept = _entity_keys_edit(adapter, tokenizer, projectors, "nullspace")
    _assert_same_state(adapter.model, before)
    assert _entity_shift(adapter, tokenizer, plain) > 1e-3  # the paper's solve moves them
    # ‖ΔW k‖ ≈ 0 at every edited layer: exact (1e-15) on the keys the solve saw, float32 rounding of
    # the partially edited model (W + ΔW cast back) on the unedited model's keys
    assert _entity_shift(adapter, tokenizer, kept) < 1e-5
    stats = kept.manifest.extra["layer_stats"]
    # 1e-8, not 1e-9: with a large null space P is built as I − U_keep U_keepᵀ (t2iedit.projector,
    # null_space_from_eigenvectors), which leaves the eigenvectors' orthogonality error in P·k: measured
    # 1e-9..6e-9 here, vs ~1e-15 from U_null U_nullᵀ; an unpreserved key moves by > 1e-3
    assert all(stats[str(l)]["preserved_keys"] > 0 and stats[str(l)]["preserved_key_shift"] < 1e-8 for l in LAYERS), stats
    # ... so the entity's standalone prompts encode exactly as before, while the edit still moves
    enc = tokenizer(entity_prompts(ENTITY_REQUESTS), padding="longest", return_tensors="pt")
    mask = enc["attention_mask"].bool()  # padding tokens' keys are not preserved (nor read)
    with torch.no_grad():
        ref = adapter.model(**enc).last_hidden_state[mask]
        with edited({"text_encoder": adapter.model}, kept, *BASE):
            new = adapter.model(**enc).last_hidden_state[mask]
    assert (new - ref).norm() / ref.norm() < 1e-5
    assert kept.manifest.extra["relative_residual_after"] < 0.9


def test_entity_keys_sequential_form_shrinks_the_shift(encoder, moments):
    tokenizer, adapter = encoder
    projectors = {l: null_space_projector(m.moment(), "relative", 1e-10).P for l, m in moments.items()}
    plain = _entity_shift(adapter, tokenizer, _entity_keys_edit(adapter, tokenizer, projectors, "sequential", False))
    soft = _entity_shift(adapter, tokenizer, _entity_keys_edit(adapter, tokenizer, projectors, "sequential"))
    assert soft < 0.5 * plain
    with pytest.raises(ValueError, match="preserve_form"):
        NullSpaceSolver(None, preserve_form="hard")
    with pytest.raises(TypeError, match="cannot preserve"):
        compute_multilayer_edit(adapter, tokenizer, ENTITY_REQUESTS, torch.zeros(3, adapter.value_dim), LAYERS,
                                VALUE_LAYER, MemitSolver({}, lam=1.0), method="x", base_model_id="a",
                                base_revision=None, preserve_prompts=["Amazon"])
