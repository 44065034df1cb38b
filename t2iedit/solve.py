"""Closed-form weight updates of one linear layer ``W k ≈ v`` (METHOD.md §6, §7).

Interface convention: keys and residuals are rows, ``K1 (n, d_in)``, ``R (n, d_out)``; the update is
``Δ (d_out, d_in)``, added to ``W``. Inside, the paper's convention (columns = edits) is used:
``K = K1ᵀ (d_in, n)``, ``Rc = Rᵀ (d_out, n)``. Everything is float64; systems are solved with
``torch.linalg.solve``, never an explicit inverse.

- :func:`null_space_update` — the paper's eq. 7 ``Δ = R K1ᵀ P (K1 K1ᵀ P + β I)⁻¹`` and AlphaEdit's
  sequential form ``Δ = R K1ᵀ P (K1 K1ᵀ P + Kp Kpᵀ P + β I)⁻¹`` (Kp: earlier batches' keys).
  It minimises ``‖Δ P K1 − R‖² + β‖Δ P‖² + ‖Δ P Kp‖²``; ``Δ = Δ P``, so ``Δ k0 = 0`` for keys in
  the preserved space.
- :func:`memit_update` — MEMIT/EMCID's ``Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹``.
- :func:`without_directions` — a null-space projector with given keys' directions removed (the hard
  form of ``edit.entity_keys: preserve``).
"""

from __future__ import annotations

from typing import Literal

import torch

Form = Literal["auto", "direct", "push_through"]


def _f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().to(torch.float64) for t in tensors]


def _check(K1: torch.Tensor, R: torch.Tensor) -> None:
    if K1.ndim != 2 or R.ndim != 2 or K1.shape[0] != R.shape[0]:
        raise ValueError(f"K1 (n, d_in) and R (n, d_out) must have the same n; got "
                         f"{tuple(K1.shape)} and {tuple(R.shape)}")


def null_space_update(K1: torch.Tensor, R: torch.Tensor, P: torch.Tensor,
                      Kp: torch.Tensor | None = None, beta: float = 1.0, form: Form = "auto"
                      ) -> torch.Tensor:
    """Paper eq. 7 (``Kp`` None) or AlphaEdit's sequential update; returns ``Δ (d_out, d_in)``.

    ``P (d_in, d_in)``: symmetric null-space projector (``torch.eye`` = no projection). ``form``:
    ``direct`` solves the ``d_in × d_in`` system of eq. 7; ``push_through`` uses
    ``K1ᵀP(K1K1ᵀP + βI)⁻¹ = (K1ᵀPK1 + βI)⁻¹K1ᵀP`` and solves ``n × n`` (only without ``Kp``);
    ``auto`` picks ``push_through`` when there is no ``Kp`` and ``n < d_in``.
    """
    _check(K1, R)
    K1, R, P = _f64(K1, R, P)
    K = K1.T  # (d_in, n)
    Rc = R.T  # (d_out, n)
    d, n = K.shape
    if form == "auto":
        form = "push_through" if Kp is None and n < d else "direct"
    if form == "push_through":
        if Kp is not None:
            raise ValueError("the push-through form has no sequential (Kp) generalisation; use 'direct'")
        PK = P @ K  # (d_in, n)
        M = K.T @ PK + beta * torch.eye(n, dtype=torch.float64)  # (n, n) symmetric: K1ᵀPK1 + βI
        X = torch.linalg.solve(M, Rc.T).T  # (d_out, n) = Rc M⁻¹
        return X @ PK.T  # (d_out, d_in) = Rc M⁻¹ K1ᵀ P
    if form != "direct":
        raise ValueError(f"form must be 'auto', 'direct' or 'push_through', got {form!r}")
    A = K @ (K.T @ P) + beta * torch.eye(d, dtype=torch.float64)  # (d_in, d_in) K1K1ᵀP + βI
    if Kp is not None:
        (Kp,) = _f64(Kp)
        Kpc = Kp.T  # (d_in, n_p)
        A = A + Kpc @ (Kpc.T @ P)  # + KpKpᵀP
    B = Rc @ (K.T @ P)  # (d_out, d_in) = R K1ᵀ P
    # Δ A = B  ⇔  Aᵀ Δᵀ = Bᵀ
    return torch.linalg.solve(A.T, B.T).T  # (d_out, d_in)


def memit_update(K1: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT/EMCID: ``Δ = R K1ᵀ (λ C0 + K1 K1ᵀ)⁻¹`` (``C0 (d_in, d_in)`` the preserved second moment,
    ``λ`` EMCID's mom2 weight, 4000 / 6000); returns ``Δ (d_out, d_in)``."""
    _check(K1, R)
    K1, R, C0 = _f64(K1, R, C0)
    K = K1.T  # (d_in, n)
    A = lam * C0 + K @ K.T  # (d_in, d_in) symmetric
    A = (A + A.T) / 2
    return torch.linalg.solve(A, K @ R).T  # Δᵀ = A⁻¹ K Rᵀ → (d_out, d_in)


def without_directions(P: torch.Tensor, keys: torch.Tensor, rtol: float = 1.0e-10) -> tuple[torch.Tensor, int]:
    """``P`` with the span of ``P kᵀ`` for every row ``k`` of ``keys (n, d)`` removed from its null space.

    ``P' = P − Q Qᵀ``, ``Q`` an orthonormal basis of ``range(P Kᵀ)`` (SVD; singular values below
    ``rtol · max ‖k‖`` are rounding). ``Q ⊂ range(P)``, so ``P'`` is again a symmetric idempotent
    projector, ``P' ≤ P``, and ``P' k = 0`` for every key: an update ``Δ = Δ P'`` leaves them exactly
    unchanged. Returns ``(P', number of directions removed)``.
    """
    if keys.ndim != 2 or keys.shape[1] != P.shape[0]:
        raise ValueError(f"keys must be (n, {P.shape[0]}), got {tuple(keys.shape)}")
    P, K = _f64(P, keys)
    if K.shape[0] == 0:
        return P, 0
    PK = P @ K.T  # (d, n)
    U, S, _ = torch.linalg.svd(PK, full_matrices=False)
    tol = rtol * float(K.norm(dim=1).max())
    Q = U[:, S > tol]  # (d, q)
    out = P - Q @ Q.T
    return (out + out.T) / 2, Q.shape[1]
