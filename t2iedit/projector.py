"""Null-space projector of the preserved keys (METHOD.md §3; AlphaEdit's P, paper eq. 7).

``C0 = U Λ Uᵀ`` (``torch.linalg.eigh``, float64). The null space is spanned by the eigenvectors whose
eigenvalue falls below a threshold; ``P = U_null U_nullᵀ``, so ``P k0 ≈ 0`` for every preserved key
and any update of the form ``Δ = X P`` leaves the preserved associations unchanged.

What a rule protects is measured, not assumed (METHOD.md §3): :func:`protected_energy` of a moment C is
``1 − tr(P C)/tr(C)``, the share of the keys' energy ``E‖k‖²`` outside the null space — on C0 itself
and on held-out keys (captions outside the K0 sample). The ``energy`` rule fixes that share on C0:
the null space is the largest set of smallest eigen-directions whose eigenvalues sum to at most
``value · tr(C0)``, so ``protected_energy(P, C0) ≥ 1 − value`` by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from t2iedit.storage import load_meta, load_tensors, save_tensors

Mode = Literal["absolute", "relative", "rank", "energy"]
MODES: tuple[str, ...] = ("absolute", "relative", "rank", "energy")

#: Each model preset's calibrated rule (``projector.mode``/``value`` null in params.yaml), from
#: bench/bench_projector_sweep.py (bench/results/projector_sweep.md, METHOD.md §3): the energy rule
#: protecting ≥ 99 % of C0's energy where that keeps most of the efficacy (MiniLM: 0.87 vs 0.80
#: unprojected); on the random-weight ``tiny`` CLIP (a flat spectrum) 99 % costs most of it (0.30 vs
#: 1.00), so the best trade-off: 97 % protected, efficacy 0.80. SD 1.x: MiniLM's (a pretrained
#: encoder's peaked spectrum, not measurable offline), the ≥ 99 % guarantee holding by construction.
CALIBRATED: dict[str, tuple[str, float]] = {
    "tiny": ("energy", 3.0e-2),
    "tiny-minilm": ("energy", 1.0e-2),
    "sd-v1-4": ("energy", 1.0e-2),
    "sd-v1-5": ("energy", 1.0e-2),
}


def calibrated_rule(preset: str) -> tuple[str, float]:
    """``(mode, value)`` of ``preset``'s calibrated projector rule (:data:`CALIBRATED`)."""
    if preset not in CALIBRATED:
        raise KeyError(f"no calibrated projector rule for model preset {preset!r} (have {sorted(CALIBRATED)}); "
                       f"set projector.mode and projector.value in params.yaml")
    return CALIBRATED[preset]


def protected_energy(P: torch.Tensor, C: torch.Tensor) -> float:
    """``1 − tr(P C)/tr(C)``: the share of the energy ``E‖k‖² = tr(C)`` of keys with second moment
    ``C`` (d, d) that lies outside the null space of ``P`` (for a projector ``tr(P C) = E‖P k‖²``).

    1 = every key is orthogonal to the null space (an update ``Δ = Δ P`` cannot move them); 0 = P = I.
    """
    if P.shape != C.shape or P.ndim != 2:
        raise ValueError(f"P and C must be the same (d, d), got {tuple(P.shape)} and {tuple(C.shape)}")
    P, C = P.detach().to(torch.float64), C.detach().to(torch.float64)
    total = float(torch.trace(C))
    if not total > 0:
        raise ValueError("the moment has zero trace: no key energy to protect")
    return 1.0 - float((P * C.T).sum()) / total  # tr(P C) = Σ_ij P_ij C_ji


@dataclass(frozen=True)
class NullSpaceProjector:
    """``P`` (d, d) float64, the eigenvalues of C0 (ascending, float64) and how the split was chosen.

    Eigenvectors with eigenvalue ``< threshold`` span the null space; ``null_rank`` of them.
    ``mode``/``value``: the rule that produced ``threshold`` (see :func:`null_space_projector`).
    """

    P: torch.Tensor
    eigenvalues: torch.Tensor
    null_rank: int
    mode: str
    value: float
    threshold: float

    @property
    def dim(self) -> int:
        return self.P.shape[0]

    def metrics(self) -> dict:
        """Null rank and threshold, and ``protected_energy`` on C0 (from the eigenvalues: the null space
        holds the ``null_rank`` smallest of them, so ``tr(P C0) = Σ_{i<r} λ_i``)."""
        lam = self.eigenvalues.clamp_min(0)
        return {"null_rank": self.null_rank, "dim": self.dim, "null_fraction": self.null_rank / self.dim,
                "threshold": self.threshold, "max_eigenvalue": float(self.eigenvalues[-1]),
                "protected_energy": 1.0 - float(lam[:self.null_rank].sum() / lam.sum())}

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        return save_tensors(path, {"P": self.P, "eigenvalues": self.eigenvalues}, meta={
            **(meta or {}), "null_rank": self.null_rank, "mode": self.mode, "value": self.value,
            "threshold": self.threshold if math.isfinite(self.threshold) else "inf"})

    @classmethod
    def load(cls, path: str | Path) -> "NullSpaceProjector":
        t, m = load_tensors(path), load_meta(path)
        return cls(P=t["P"], eigenvalues=t["eigenvalues"], null_rank=int(m["null_rank"]), mode=m["mode"],
                   value=float(m["value"]), threshold=float(m["threshold"]))


def null_space_projector(C0: torch.Tensor, mode: Mode = "relative", value: float = 1.0e-2
                         ) -> NullSpaceProjector:
    """Projector onto the (near-)null space of the second moment ``C0`` (d, d).

    mode:
      - ``"absolute"``: eigenvalues ``< value`` are null (AlphaEdit: 2e-2 on its normalised moment).
      - ``"relative"``: eigenvalues ``< value · λ_max`` are null (scale-free; re-calibrates to CLIP).
      - ``"rank"``: the ``int(value)`` smallest eigenvalues are null.
      - ``"energy"``: the ``r`` smallest eigenvalues are null, ``r`` the largest with
        ``Σ_{i<r} λ_i ≤ value · tr(C0)`` (``value`` in [0, 1]: the key energy allowed in the null space;
        negative rounding eigenvalues count as 0). ``protected_energy(P, C0) ≥ 1 − value``; the null
        rank is monotone in ``value``.
    """
    return projector_from_eigh(*eigh_moment(C0), mode, value)


def eigh_moment(C0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues ascending (d,), eigenvectors (d, d) as columns)`` of ``C0``, float64."""
    if C0.ndim != 2 or C0.shape[0] != C0.shape[1]:
        raise ValueError(f"C0 must be square, got {tuple(C0.shape)}")
    C = C0.detach().to(torch.float64)
    C = (C + C.T) / 2  # exact symmetry for eigh; C0 is symmetric up to rounding
    return torch.linalg.eigh(C)


def projector_from_eigh(eigenvalues: torch.Tensor, U: torch.Tensor, mode: Mode = "relative",
                        value: float = 1.0e-2) -> NullSpaceProjector:
    """:func:`null_space_projector` from a decomposition :func:`eigh_moment` (one decomposition, many
    rules: bench/bench_projector_sweep.py)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    d = eigenvalues.shape[0]
    if mode == "rank":
        null_rank = int(value)
        if null_rank != value or not 0 <= null_rank <= d:
            raise ValueError(f"rank must be an integer in [0, {d}], got {value}")
        threshold = float(eigenvalues[null_rank]) if null_rank < d else math.inf
    elif mode == "energy":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"energy fraction must be in [0, 1], got {value}")
        lam = eigenvalues.clamp_min(0)
        budget = float(value) * float(lam.sum())
        cum = torch.cumsum(lam, 0)  # cum[r-1] = Σ_{i<r} λ_i, non-decreasing
        null_rank = int((cum <= budget * (1 + 1e-12)).sum())
        threshold = float(eigenvalues[null_rank]) if null_rank < d else math.inf
    else:
        threshold = float(value) if mode == "absolute" else float(value) * float(eigenvalues[-1])
        null_rank = int((eigenvalues < threshold).sum())
    P = null_space_from_eigenvectors(U, null_rank)
    return NullSpaceProjector(P=P, eigenvalues=eigenvalues, null_rank=null_rank, mode=mode,
                              value=float(value), threshold=threshold)



def null_space_from_eigenvectors(U: torch.Tensor, null_rank: int) -> torch.Tensor:
    """``P = U_null U_nullᵀ`` (d, d), ``U_null`` the first ``null_rank`` columns of the orthogonal ``U``.

    When the null space is the larger part (the usual case: thousands of null directions of 3,072), the
    complement ``I − U_keep U_keepᵀ`` over the ``d − null_rank`` other columns is the same projector
    (``U Uᵀ = I``) for a fraction of the product's cost: at d = 3,072 and rank 2,657 a 415-column
    product instead of a 2,657-column one, 6× fewer flops per layer. Both agree to rounding (~1e-15).
    """
    d = U.shape[0]
    if 2 * null_rank <= d:
        U_null = U[:, :null_rank]  # (d, r)
        P = U_null @ U_null.T  # (d, d)
    else:
        U_keep = U[:, null_rank:]  # (d, d − r)
        P = torch.eye(d, dtype=U.dtype) - U_keep @ U_keep.T  # (d, d)
    return (P + P.T) / 2
