"""Closed-form solves against independent references (lstsq oracles) and the null-space guarantee."""

from __future__ import annotations

import pytest
import torch

from t2iedit.projector import null_space_projector
from t2iedit.solve import memit_update, null_space_update


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _ridge_oracle(design: torch.Tensor, target: torch.Tensor, reg_rows: torch.Tensor) -> torch.Tensor:
    """argmin_X ‖design X − target‖² + ‖reg_rows X‖² by least squares on the stacked system."""
    A = torch.cat([design, reg_rows])
    B = torch.cat([target, torch.zeros(reg_rows.shape[0], target.shape[1], dtype=target.dtype)])
    return torch.linalg.lstsq(A, B, driver="gelsd").solution


@pytest.mark.parametrize("n", [3, 40])  # n < d (push-through) and n > d (direct)
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_identity_projector_matches_ridge_lstsq(n, beta):
    d_in, d_out = 24, 7
    K1, R = _rand(n, d_in, seed=1), _rand(n, d_out, seed=2)
    delta = null_space_update(K1, R, torch.eye(d_in, dtype=torch.float64), beta=beta)
    # Δ = argmin ‖K1 Δᵀ − R‖² + β‖Δ‖²  (rows = edits)
    oracle = _ridge_oracle(K1, R, beta ** 0.5 * torch.eye(d_in, dtype=torch.float64)).T
    assert delta.shape == (d_out, d_in)
    torch.testing.assert_close(delta, oracle, rtol=1e-9, atol=1e-10)


def test_push_through_equals_direct():
    d_in, d_out, n = 50, 9, 6
    K0 = _rand(30, d_in, seed=3)
    P = null_space_projector(K0.T @ K0 / 30, "relative", 1e-10).P
    K1, R = _rand(n, d_in, seed=4), _rand(n, d_out, seed=5)
    a = null_space_update(K1, R, P, form="direct", beta=0.7)
    b = null_space_update(K1, R, P, form="push_through", beta=0.7)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert null_space_update(K1, R, P).shape == (d_out, d_in)
    with pytest.raises(ValueError, match="push-through"):
        null_space_update(K1, R, P, Kp=K1, form="push_through")


def test_alphaedit_sequential_matches_basis_oracle():
    """Δ = R K1ᵀP(K1K1ᵀP + KpKpᵀP + βI)⁻¹ equals Y Uᵀ with Y = argmin ‖Y UᵀK1 − R‖² + β‖Y‖² + ‖Y UᵀKp‖²
    (U an orthonormal basis of the null space; derived independently of eq. 7)."""
    d_in, d_out, n, n_p = 40, 6, 5, 8
    K0 = _rand(25, d_in, seed=6)
    proj = null_space_projector(K0.T @ K0, "relative", 1e-10)
    assert proj.null_rank == d_in - 25
    evals, vecs = torch.linalg.eigh(K0.T @ K0)
    U = vecs[:, : proj.null_rank]  # (d_in, r)
    K1, R, Kp = _rand(n, d_in, seed=7), _rand(n, d_out, seed=8), _rand(n_p, d_in, seed=9)
    beta = 1.5
    delta = null_space_update(K1, R, proj.P, Kp=Kp, beta=beta)
    reg = torch.cat([beta ** 0.5 * torch.eye(proj.null_rank, dtype=torch.float64), Kp @ U])
    Y = _ridge_oracle(K1 @ U, R, reg).T  # (d_out, r)
    torch.testing.assert_close(delta, Y @ U.T, rtol=1e-8, atol=1e-10)
    # preserved keys untouched (Δ = Δ P)
    assert (delta @ K0.T).norm() < 1e-10 * delta.norm()


def test_memit_matches_lstsq():
    d_in, d_out, n, n0, lam = 30, 5, 4, 60, 50.0
    K0, K1, R = _rand(n0, d_in, seed=10), _rand(n, d_in, seed=11), _rand(n, d_out, seed=12)
    C0 = K0.T @ K0 / n0
    delta = memit_update(K1, R, C0, lam)
    # argmin ‖K1 Δᵀ − R‖² + λ/n0 ‖K0 Δᵀ‖²   ⇔   Δ (λC0 + K1ᵀK1) = Rᵀ K1
    oracle = _ridge_oracle(K1, R, (lam / n0) ** 0.5 * K0).T
    torch.testing.assert_close(delta, oracle, rtol=1e-9, atol=1e-10)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same n"):
        null_space_update(_rand(3, 8), _rand(4, 2), torch.eye(8, dtype=torch.float64))
