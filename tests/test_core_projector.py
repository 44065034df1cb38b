"""Null-space projector: projector properties, threshold modes, recorded rank, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from t2iedit.projector import NullSpaceProjector, null_space_projector


def _moment(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    return K.T @ K / n


@pytest.mark.parametrize("mode,value", [("absolute", 1e-4), ("relative", 1e-3), ("rank", 12)])
def test_projector_is_symmetric_idempotent_and_records_rank(mode, value):
    C0 = _moment(200, 32)
    proj = null_space_projector(C0, mode, value)
    P = proj.P
    assert P.dtype == torch.float64 and P.shape == (32, 32)
    assert torch.equal(P, P.T)
    torch.testing.assert_close(P @ P, P, atol=1e-12, rtol=0)
    # trace of an orthogonal projector = its rank
    assert round(float(torch.trace(P))) == proj.null_rank
    assert 0 < proj.null_rank < 32
    evals = torch.linalg.eigvalsh(C0)
    assert proj.null_rank == int((proj.eigenvalues < proj.threshold).sum())
    torch.testing.assert_close(proj.eigenvalues, evals, rtol=1e-10, atol=1e-14)


def test_threshold_modes_agree():
    C0 = _moment(200, 32)
    lam_max = float(torch.linalg.eigvalsh(C0)[-1])
    rel = null_space_projector(C0, "relative", 1e-3)
    ab = null_space_projector(C0, "absolute", 1e-3 * lam_max)
    rk = null_space_projector(C0, "rank", rel.null_rank)
    assert rel.threshold == pytest.approx(1e-3 * lam_max)
    assert rel.null_rank == ab.null_rank == rk.null_rank
    torch.testing.assert_close(rel.P, ab.P, rtol=0, atol=0)
    torch.testing.assert_close(rel.P, rk.P, rtol=0, atol=0)


def test_exact_null_space_annihilates_keys():
    g = torch.Generator().manual_seed(1)
    K0 = torch.randn(20, 48, generator=g, dtype=torch.float64)  # rank 20 < 48
    proj = null_space_projector(K0.T @ K0 / 20, "relative", 1e-10)
    assert proj.null_rank == 28
    assert (K0 @ proj.P).norm() < 1e-12 * K0.norm()


def test_edge_ranks_and_bad_input():
    C0 = _moment(100, 16)
    assert null_space_projector(C0, "rank", 0).null_rank == 0
    full = null_space_projector(C0, "rank", 16)
    assert full.null_rank == 16 and math.isinf(full.threshold)
    torch.testing.assert_close(full.P, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        null_space_projector(C0, "fraction", 0.1)
    with pytest.raises(ValueError, match="rank"):
        null_space_projector(C0, "rank", 2.5)
    with pytest.raises(ValueError, match="square"):
        null_space_projector(C0[:, :3], "rank", 1)


def test_save_load_round_trip(tmp_path):
    proj = null_space_projector(_moment(100, 16), "rank", 16)  # threshold inf survives JSON
    proj.save(tmp_path / "p.safetensors", meta={"layer": 3})
    back = NullSpaceProjector.load(tmp_path / "p.safetensors")
    assert torch.equal(back.P, proj.P) and torch.equal(back.eigenvalues, proj.eigenvalues)
    assert (back.null_rank, back.mode, back.value, back.threshold) == (
        proj.null_rank, proj.mode, proj.value, proj.threshold)


# ---------------------------------------------------------------- what a rule protects (issue 15)
from t2iedit.projector import protected_energy  # noqa: E402
from t2iedit.solve import without_directions  # noqa: E402


@pytest.mark.parametrize("mode,value", [("absolute", 1e-4), ("relative", 1e-3), ("rank", 12), ("energy", 1e-2)])
def test_protected_energy_equals_direct_computation_on_keys(mode, value):
    """1 − Σ‖P k‖² / Σ‖k‖² over the keys themselves (no trace identity), on the keys the moment was
    built from and on other keys drawn the same way."""
    g = torch.Generator().manual_seed(3)
    scale = torch.logspace(0, -3, 32, dtype=torch.float64)
    K = torch.randn(300, 32, generator=g, dtype=torch.float64) * scale
    K_held = torch.randn(200, 32, generator=g, dtype=torch.float64) * scale
    proj = null_space_projector(K.T @ K / 300, mode, value)
    for keys in (K, K_held):
        direct = 1 - float(sum((proj.P @ k).norm() ** 2 for k in keys)) / float(sum(k.norm() ** 2 for k in keys))
        assert protected_energy(proj.P, keys.T @ keys / len(keys)) == pytest.approx(direct, rel=1e-10, abs=1e-12)
    assert proj.metrics()["protected_energy"] == pytest.approx(protected_energy(proj.P, K.T @ K / 300), abs=1e-10)
    assert protected_energy(torch.eye(32, dtype=torch.float64), K.T @ K) == pytest.approx(0.0, abs=1e-12)


def test_energy_rule_bounds_the_energy_and_is_monotone():
    C0 = _moment(400, 48)
    lam = torch.linalg.eigvalsh(C0)
    ranks = []
    for value in (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.5, 0.99, 1.0):
        proj = null_space_projector(C0, "energy", value)
        ranks.append(proj.null_rank)
        # the largest prefix of the smallest eigenvalues within the budget
        assert float(lam[:proj.null_rank].clamp_min(0).sum()) <= value * float(lam.clamp_min(0).sum()) * (1 + 1e-9)
        if proj.null_rank < 48:
            assert float(lam[:proj.null_rank + 1].sum()) > value * float(lam.sum())
        assert protected_energy(proj.P, C0) >= 1 - value - 1e-12
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 48 and len(set(ranks)) > 4
    with pytest.raises(ValueError, match="energy"):
        null_space_projector(C0, "energy", 1.5)


def test_without_directions_is_a_smaller_projector_annihilating_the_keys():
    proj = null_space_projector(_moment(200, 32), "rank", 20)
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(6, 32, generator=g, dtype=torch.float64)
    P2, removed = without_directions(proj.P, torch.cat([keys, keys[:2] * 3]))  # duplicates cost nothing
    assert removed == 6
    assert torch.equal(P2, P2.T)
    torch.testing.assert_close(P2 @ P2, P2, atol=1e-12, rtol=0)
    assert round(float(torch.trace(P2))) == 14
    assert (keys @ P2).norm() < 1e-12 * keys.norm()
    torch.testing.assert_close(proj.P @ P2, P2, atol=1e-12, rtol=0)  # range(P2) ⊂ range(P)


def test_null_rule_is_the_presets_calibrated_one():
    from flows.projector import ProjectorParams, resolve_rule
    from t2iedit.models import PRESETS
    from t2iedit.projector import CALIBRATED

    assert set(CALIBRATED) == set(PRESETS)  # every preset has a calibrated rule
    assert resolve_rule(ProjectorParams(), "tiny-minilm") == ("energy", 1.0e-2, "calibrated for preset tiny-minilm")
    assert resolve_rule(ProjectorParams(mode="rank", value=3), "tiny")[:2] == ("rank", 3)
    with pytest.raises(ValueError, match="both mode and value"):
        resolve_rule(ProjectorParams(mode="energy"), "tiny")
    with pytest.raises(KeyError, match="no calibrated projector rule"):
        resolve_rule(ProjectorParams(), "other")


@pytest.mark.parametrize("null_rank", [0, 5, 16, 17, 27, 32])
def test_null_space_from_eigenvectors_either_side_is_the_same_projector(null_rank):
    """The complement form (null space the larger part) equals the direct ``U_null U_nullᵀ``."""
    from t2iedit.projector import eigh_moment, null_space_from_eigenvectors

    _, U = eigh_moment(_moment(200, 32))
    U_null = U[:, :null_rank]
    P = null_space_from_eigenvectors(U, null_rank)
    assert torch.equal(P, P.T)
    torch.testing.assert_close(P, U_null @ U_null.T, atol=1e-13, rtol=0)
    torch.testing.assert_close(P @ P, P, atol=1e-12, rtol=0)
    torch.testing.assert_close(P @ U[:, null_rank:], torch.zeros(32, 32 - null_rank, dtype=torch.float64),
                               atol=1e-13, rtol=0)
