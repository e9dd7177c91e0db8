"""Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
ICML 2025): isotropic merging in the common and task-specific subspaces, as in the paper's reference code.

For each 2-D weight, with task vectors ``τᵢ = finetunedᵢ − base`` (``m × n``), ``T`` fine-tunes,
``r = min(m, n)`` and ``f = common_fraction``::

    s  = round((r − ⌊f·r⌋) / T), at most ⌊r/T⌋         (directions per task; Python's round, half to even)
    kc = r − T·s                                         (the common subspace takes the rest of the rank budget)
    U, S, Vh = svd(Σᵢ τᵢ);  Uc, Sc, Vhc = U[:, :kc], S[:kc], Vh[:kc]           (common subspace)
    Uᵢ, Sᵢ, Vhᵢ = svd(τᵢ − Uc Ucᵀ τᵢ)                    (each task vector without its common part; batched)
    U'  = [U₁[:, :s] … U_T[:, :s]  Uc]     (m × r)
    S'  = [S₁[:s] … S_T[:s]  Sc]           (r)
    Vh' = [Vh₁[:s]; …; Vh_T[:s]; Vhc]      (r × n)
    Δ = mean(S') · polar(U') @ polar(Vh')   (polar(X) = P @ Qh for X = P Σ Qh: orthogonalised as in TSV)
    result = base + alpha·Δ

Iso-C's common subspace keeps the directions most tasks share; its least significant directions are replaced by
each task's strongest directions outside it, so tasks that the sum under-represents are not left behind. Every
floating tensor that is not 2-D gets ``Δ = mean(τᵢ)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.merge._stacked import (
    check_fraction,
    concat_top,
    is_matrix,
    merge_state_dicts,
    polar_pair,
    significant,
    svd,
)
from lightning_soup.merge.lora import _refuse_pairs

__all__ = ["iso_cts"]


def iso_cts(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    *,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """Merge fine-tunes of a common base by Iso-CTS: common plus task-specific subspaces, flat spectrum.

    Behaviour beyond the formula (module docstring):

    - **Not 2-D** (biases, norms, 0-d scalars, conv kernels): ``Δ = mean(τᵢ)``. A 2-D tensor with no entries is
      returned as `base`'s values.
    - **No room for task-specific directions** (``s = 0``: ``T > min(m, n)``, or ``common_fraction`` close to 1):
      the common subspace is the whole rank budget and the result is exactly :func:`~lightning_soup.merge.iso_c`.
      The reference code's rounding could ask for more task directions than the rank (``r = 2``, ``T = 3``,
      ``f = 0``); the cap ``s ≤ ⌊r/T⌋`` prevents that.
    - **Low-rank task vectors** (e.g. LoRA updates merged into dense weights): directions whose singular value is
      numerically zero (``σ ≤ eps·max(m, n)·σ₁``) are an arbitrary basis of a null space; they are zeroed before
      the orthogonalisation and left out of ``Δ`` (their σ still count in the mean), so the result is well defined.
    - **bf16 / fp16 inputs**: the task vectors and every SVD are float32 (float64 when any input is float64);
      the result is rounded once into `base`'s dtype. The SVDs run on `base`'s device.

    Args:
        base: the common base state dict.
        finetuned: one or more fine-tuned state dicts (same keys and shapes as `base`).
        alpha: multiplier of the merged update; any finite real (the paper tunes it on validation, ~1.0–1.5).
        common_fraction: share of each matrix's rank given to the common subspace, in ``[0, 1]`` (paper: 0.8).
        allow_unrelated: merge even fine-tunes that do not look fine-tuned from `base` (see
            :mod:`lightning_soup.merge._related`).

    Returns:
        A new state dict with `base`'s keys; floating tensors in `base`'s dtype and on its device, non-floating
        tensors copied from `base`.

    Raises:
        SoupError: for incompatible state dicts, an empty `finetuned`, a non-finite `alpha` or `common_fraction`
            outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2, 2)}
        >>> fts = [{"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]])}, {"w": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}]
        >>> out = iso_cts(base, fts, common_fraction=0.0)  # kc = 0, s = 1: each task's own direction
        >>> torch.allclose(out["w"], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
        True
    """
    fraction = check_fraction(common_fraction, "common_fraction")
    delta = lambda taus: iso_cts_delta(taus, fraction)  # noqa: E731
    _refuse_pairs(base, "base", "iso_cts")
    return merge_state_dicts(base, finetuned, delta, alpha, allow_unrelated=allow_unrelated)


def subspace_sizes(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(kc, s)``: the common subspace's size and the directions per task for a matrix of rank budget `rank`.

    Example:
        >>> subspace_sizes(768, 8, 0.8), subspace_sizes(10, 3, 0.8), subspace_sizes(2, 3, 0.0)
        ((616, 19), (7, 1), (2, 0))
    """
    per_task = min(round((rank - math.floor(common_fraction * rank)) / tasks), rank // tasks)
    return rank - tasks * per_task, per_task


def iso_cts_delta(taus: Tensor, common_fraction: float) -> Tensor:
    """Iso-CTS's ``Δ`` of one tensor from its stacked task vectors ``taus`` (``T × shape``, float32/64)."""
    if not is_matrix(taus):
        return taus.mean(0)
    t, m, n = taus.shape
    kc, s = subspace_sizes(min(m, n), t, common_fraction)
    u, sv, vh = svd(taus.sum(0))
    keep_c = significant(sv, m, n)  # numerically null directions are arbitrary: kept out of every product
    if s == 0:  # the common subspace is everything: Iso-C (U and Vh are already orthonormal)
        return ((u * keep_c) @ vh).mul_(sv.mean())
    uc, sc, vhc, keep_c = u[:, :kc] * keep_c[:kc], sv[:kc], vh[:kc], keep_c[:kc]
    specific = taus - uc @ (uc.mT @ taus)  # (T, m, n): each τᵢ without its component in the common subspace
    ut, st, vht = svd(specific)
    del specific
    keep_t = significant(st, m, n, scale=sv[:1].maximum(st[:, 0].amax()))[:, :s].reshape(t * s)
    ut, st, vht = concat_top(ut, st, vht, s)  # (m, Ts), (Ts,), (Ts, n)
    keep = torch.cat((keep_t, keep_c))
    u, vh = polar_pair(torch.cat((ut, uc), 1) * keep, torch.cat((vht, vhc), 0) * keep[:, None])  # (m, r), (r, n)
    return ((u * keep) @ vh).mul_(torch.cat((st, sc)).mean())
