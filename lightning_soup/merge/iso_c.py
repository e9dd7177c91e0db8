"""Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
ICML 2025): isotropic merging in the common subspace.

For each 2-D weight, with task vectors ``τᵢ = finetunedᵢ − base`` (``m × n``) and ``r = min(m, n)``::

    U, S, Vh = svd(Σᵢ τᵢ)                 (reduced: U is m × r, S has r values, Vh is r × n)
    Δ = mean(S) · U @ Vh
    result = base + alpha·Δ

The sum of the task vectors (task arithmetic) is dominated by a few directions; flattening its spectrum to the
mean singular value lets the directions that only a few tasks use count as much as the shared ones. Every
floating tensor that is not 2-D gets ``Δ = mean(τᵢ)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lightning_soup.merge._stacked import is_matrix, merge_state_dicts, significant, svd
from lightning_soup.merge.lora import _refuse_pairs

__all__ = ["iso_c"]


def iso_c(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    alpha: float = 1.0,
    *,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """Merge fine-tunes of a common base by Iso-C: the summed task vector with a flat singular spectrum.

    Behaviour beyond the formula (module docstring):

    - **Not 2-D** (biases, norms, 0-d scalars, conv kernels): ``Δ = mean(τᵢ)``. A 2-D tensor with no entries is
      returned as `base`'s values.
    - **Any T** (including ``T > min(m, n)`` and one fine-tune): one SVD of the ``m × n`` sum, nothing depends on
      T but the sum; ``mean(S)`` averages all ``min(m, n)`` singular values, zeros included, as the paper does.
    - **Rank-deficient sum** (low-rank task vectors, e.g. LoRA updates merged into dense weights): the singular
      vectors of numerically zero singular values (``σ ≤ eps·max(m, n)·σ₁``) are an arbitrary basis of the null
      space and are left out of ``U @ Vh``; ``mean(S)`` still averages all ``min(m, n)`` values.
    - **bf16 / fp16 inputs**: the task vectors and the SVD are float32 (float64 when any input is float64); the
      result is rounded once into `base`'s dtype. The SVD runs on `base`'s device.

    Args:
        base: the common base state dict.
        finetuned: one or more fine-tuned state dicts (same keys and shapes as `base`).
        alpha: multiplier of the merged update; any finite real (the paper tunes it on validation, ~1.0–1.5).
        allow_unrelated: merge even fine-tunes that do not look fine-tuned from `base` (see
            :mod:`lightning_soup.merge._related`).

    Returns:
        A new state dict with `base`'s keys; floating tensors in `base`'s dtype and on its device, non-floating
        tensors copied from `base`.

    Raises:
        SoupError: for incompatible state dicts, an empty `finetuned` or a non-finite `alpha`.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2, 2)}
        >>> fts = [{"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]])}, {"w": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}]
        >>> torch.allclose(iso_c(base, fts)["w"], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))  # spectrum (3, 1) -> (2, 2)
        True
    """
    _refuse_pairs(base, "base", "iso_c")
    return merge_state_dicts(base, finetuned, iso_c_delta, alpha, allow_unrelated=allow_unrelated)


def iso_c_delta(taus: Tensor) -> Tensor:
    """Iso-C's ``Δ`` of one tensor from its stacked task vectors ``taus`` (``T × shape``, float32/64)."""
    if not is_matrix(taus):
        return taus.mean(0)
    _, m, n = taus.shape
    u, s, vh = svd(taus.sum(0))
    # directions of numerically zero singular values are arbitrary (a rank-deficient sum): left out
    return ((u * significant(s, m, n)) @ vh).mul_(s.mean())
