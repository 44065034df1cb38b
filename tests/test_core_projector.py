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
