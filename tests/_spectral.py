"""Inputs and float64 NumPy/SciPy helpers for the tests of the SVD merges and Model Stock (no code under test here)."""

from __future__ import annotations

import itertools

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

T = 3  # fine-tunes per test
#: key -> shape: tall, wide and square weights, one with min(m, n) < T, 1-D, 0-d and a conv kernel
SHAPES: dict[str, tuple[int, ...]] = {
    "tall.weight": (16, 10),
    "wide.weight": (10, 24),
    "square.weight": (12, 12),
    "thin.weight": (2, 7),
    "bias": (5,),
    "temperature": (),
    "conv.weight": (3, 2, 2, 2),
}
MATRICES = [k for k, s in SHAPES.items() if len(s) == 2]


def _orthonormal(g: torch.Generator, rows: int, cols: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def make_inputs(seed: int = 0, dtype: torch.dtype = torch.float32, count: int = T):
    """A random base, `count` fine-tunes of it and integer buffers.

    Each 2-D task vector is ``U diag(σ) Vᵀ`` with random orthonormal factors and a geometric spectrum (ratio 0.7),
    so its singular values are well separated and the top-k directions are well defined in float32 and bf16.
    """
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    fts = []
    for _ in range(count):
        ft = {}
        for k, s in SHAPES.items():
            if len(s) == 2:
                r = min(s)
                sigma = 0.5 * 0.7 ** torch.arange(r, dtype=torch.float64)
                tau = _orthonormal(g, s[0], r) @ torch.diag(sigma) @ _orthonormal(g, s[1], r).T
            else:
                tau = 0.1 * torch.randn(s, generator=g, dtype=torch.float64)
            ft[k] = base[k] + tau
        fts.append(ft)
    out_base = {k: v.to(dtype) for k, v in base.items()}
    out_fts = [{k: v.to(dtype) for k, v in ft.items()} for ft in fts]
    for i, sd in enumerate([out_base, *out_fts]):
        sd["bn.num_batches_tracked"] = torch.tensor(100 + i)
        sd["position_ids"] = torch.arange(4, dtype=torch.int32) + i
    return out_base, out_fts


def np64(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def taus_of(base: dict, fts: list[dict], key: str) -> list[np.ndarray]:
    return [np64(ft[key]) - np64(base[key]) for ft in fts]


def svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(x, full_matrices=False)


def polar(x: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor, from SciPy (independent of the SVD route the code takes); for a rank-deficient
    `x`, the unique partial isometry on its range (the pairs of zero singular values left out)."""
    p, s, qh = svd(x)
    keep = s > np.finfo(np.float64).eps * max(x.shape) * s.max(initial=0.0)
    if keep.all():
        return scipy.linalg.polar(x, side="right")[0]
    return (p * keep) @ qh


def assert_close(out: Tensor, ref: np.ndarray, base: Tensor, rtol: float, key: str = "") -> None:
    """`out` equals ``ref`` up to rounding into out's dtype plus `rtol` times the size of the update."""
    assert tuple(out.shape) == ref.shape, (key, out.shape, ref.shape)
    got = np64(out)
    update = np.abs(ref - np64(base)).max() if ref.size else 0.0
    bound = 0.5 * torch.finfo(out.dtype).eps * np.abs(ref) + rtol * update + 1e-12
    err = np.abs(got - ref)
    assert (err <= bound).all(), f"{key}: max error {err.max():.3g}, update size {update:.3g}"


# ------------------------------------------------------------- the papers' formulas in float64 (Δ of one tensor)


def nonzero(s: np.ndarray, m: int, n: int, scale: float | None = None) -> np.ndarray:
    """Singular values that are not numerically zero (NumPy's matrix_rank rule); the others' vectors are arbitrary."""
    return s > np.finfo(np.float64).eps * max(m, n) * (s.max(initial=0.0) if scale is None else scale)


def ref_tsv(taus: list[np.ndarray]) -> np.ndarray:
    """Δ of TSV-Merge in float64: top-k of each τᵢ side by side, U and Vh orthogonalised, S kept."""
    if taus[0].ndim != 2:
        return np.mean(taus, axis=0)
    m, n = taus[0].shape
    k = max(1, min(m, n) // len(taus))
    parts = [svd(tau) for tau in taus]
    keep = [nonzero(p[1], m, n)[:k] for p in parts]  # a rank below k: the null directions are left out
    u = np.concatenate([p[0][:, :k] * kp for p, kp in zip(parts, keep)], axis=1)
    s = np.concatenate([p[1][:k] * kp for p, kp in zip(parts, keep)])
    vh = np.concatenate([p[2][:k] * kp[:, None] for p, kp in zip(parts, keep)], axis=0)
    return polar(u) @ np.diag(s) @ polar(vh)


def ref_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    """Δ of Iso-C in float64: the summed task vectors with every singular value replaced by their mean."""
    if taus[0].ndim != 2:
        return np.mean(taus, axis=0)
    u, s, vh = svd(np.sum(taus, axis=0))
    return s.mean() * (u * nonzero(s, *u.shape[:1], vh.shape[1])) @ vh


def ref_sizes(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """The reference code's split (``int``, Python's ``round``), with the cap on task directions."""
    s = min(round((r - int(r * fraction)) / tasks), r // tasks)
    return r - tasks * s, s


def ref_iso_cts(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    """Δ of Iso-CTS in float64, following the paper's reference code (common space, then task-specific parts)."""
    if taus[0].ndim != 2:
        return np.mean(taus, axis=0)
    m, n = taus[0].shape
    kc, s = ref_sizes(min(m, n), len(taus), fraction)
    u, sv, vh = svd(np.sum(taus, axis=0))
    keep_c = nonzero(sv, m, n)
    if s == 0:
        return sv.mean() * (u * keep_c) @ vh
    uc = u[:, :kc] * keep_c[:kc]
    parts = [svd(tau - uc @ uc.T @ tau) for tau in taus]
    scale = max(sv[0], max(p[1][0] for p in parts))
    keep = np.concatenate([nonzero(p[1], m, n, scale)[:s] for p in parts] + [keep_c[:kc]])
    us = np.concatenate([p[0][:, :s] for p in parts] + [uc], 1) * keep
    vhs = np.concatenate([p[2][:s] for p in parts] + [vh[:kc]], 0) * keep[:, None]
    ss = np.concatenate([p[1][:s] for p in parts] + [sv[:kc]])
    return ss.mean() * (polar(us) * keep) @ polar(vhs)


def ref_model_stock(base: np.ndarray, fts: list[np.ndarray]) -> np.ndarray:
    """The result of Model Stock in float64 (not Δ): a zero task vector has cosine 0, a negative mean is clamped."""
    taus = [(ft - base).ravel() for ft in fts]
    n = len(taus)
    norms = [np.linalg.norm(t) for t in taus]
    cos = [
        taus[i] @ taus[j] / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0
        for i, j in itertools.combinations(range(n), 2)
    ]
    c = min(max(float(np.mean(cos)), 0.0), 1.0)
    t = n * c / (1 + (n - 1) * c)
    return t * np.mean(fts, axis=0) + (1 - t) * base
