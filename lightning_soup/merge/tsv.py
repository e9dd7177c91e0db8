"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

For each 2-D weight, with task vectors ``τᵢ = finetunedᵢ − base`` (``m × n``), ``T`` fine-tunes and
``k = max(1, ⌊min(m, n)/T⌋)``::

    Uᵢ, Sᵢ, Vhᵢ = svd(τᵢ)                                    (reduced; one batched call for the T task vectors)
    U  = [U₁[:, :k] … U_T[:, :k]]        (m × Tk)
    S  = [S₁[:k] … S_T[:k]]              (Tk)
    Vh = [Vh₁[:k]; …; Vh_T[:k]]          (Tk × n)
    U⊥ = P @ Qh   where P, _, Qh = svd(U)       (the orthonormal matrix nearest to U)
    Vh⊥ = P' @ Q'h where P', _, Q'h = svd(Vh)
    Δ  = U⊥ @ diag(S) @ Vh⊥
    result = base + alpha·Δ

Each task keeps its k strongest singular directions; orthogonalising the concatenated directions removes the
interference between tasks (the paper's "TSV-M"). Every floating tensor that is not 2-D gets ``Δ = mean(τᵢ)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lightning_soup.merge._stacked import concat_top, is_matrix, merge_state_dicts, polar_pair, significant, svd
from lightning_soup.merge.lora import _refuse_pairs

__all__ = ["tsv_merge"]


def tsv_merge(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    alpha: float = 1.0,
    *,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """Merge fine-tunes of a common base by Task Singular Vectors (TSV-Merge).

    Behaviour beyond the formula (module docstring):

    - **Not 2-D** (biases, norms, 0-d scalars, conv kernels): ``Δ = mean(τᵢ)``, so ``alpha = T`` there is task
      arithmetic with every scale 1. A 2-D tensor with no entries is returned as `base`'s values.
    - **T > min(m, n)** (more fine-tunes than the rank of the matrix): ``k = 1``, so the ``Tk = T`` concatenated
      directions outnumber the dimension and cannot be orthonormal. The formula is applied as written: the polar
      factor of a wide ``U`` (or tall ``Vh``) has orthonormal *rows*, it is still the nearest such matrix, and
      ``Δ`` has rank at most ``min(m, n)``. On a ``1 × 1`` weight this gives exactly ``mean(τᵢ)``.
    - **One fine-tune**: ``k = min(m, n)`` keeps every direction and ``Δ = τ₁`` (to rounding).
    - **Low-rank task vectors** (rank below k, e.g. LoRA updates merged into dense weights): the singular vectors of
      numerically zero singular values (``σ ≤ eps·max(m, n)·σ₁``) are an arbitrary basis, and orthogonalised with
      the rest they would change the result at random (a 1e-9 perturbation changed it by 88% in a test); they are
      dropped (zeroed before the orthogonalisation), which is the formula's limit as those σ go to zero.
    - **bf16 / fp16 inputs**: the task vectors and every SVD are float32 (float64 when any input is float64);
      the result is rounded once into `base`'s dtype. The SVDs run on `base`'s device.

    Args:
        base: the common base state dict.
        finetuned: one or more fine-tuned state dicts (same keys and shapes as `base`).
        alpha: multiplier of the merged update; any finite real (the paper tunes it on validation, ~1.0).
        allow_unrelated: merge even fine-tunes that do not look fine-tuned from `base` (see
            :mod:`lightning_soup.merge._related`).

    Returns:
        A new state dict with `base`'s keys; floating tensors in `base`'s dtype and on its device, non-floating
        tensors copied from `base`.

    Raises:
        SoupError: for incompatible state dicts, an empty `finetuned` or a non-finite `alpha`.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
        >>> fts = [{"w": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([1.0, 0.0])},
        ...        {"w": torch.tensor([[0.0, 0.0], [0.0, 4.0]]), "b": torch.tensor([0.0, 3.0])}]
        >>> out = tsv_merge(base, fts)  # k = 1 direction per task, already orthogonal: both kept whole
        >>> torch.allclose(out["w"], torch.tensor([[2.0, 0.0], [0.0, 4.0]]), atol=1e-6), out["b"]
        (True, tensor([0.5000, 1.5000]))
    """
    _refuse_pairs(base, "base", "tsv_merge")
    return merge_state_dicts(base, finetuned, tsv_delta, alpha, allow_unrelated=allow_unrelated)


def tsv_delta(taus: Tensor) -> Tensor:
    """TSV's ``Δ`` of one tensor from its stacked task vectors ``taus`` (``T × shape``, float32/64)."""
    if not is_matrix(taus):
        return taus.mean(0)
    t, m, n = taus.shape
    k = max(1, min(m, n) // t)
    u, s, vh = svd(taus)  # (T, m, r), (T, r), (T, r, n)
    keep = significant(s, m, n)[:, :k].reshape(t * k)
    u, s, vh = concat_top(u, s, vh, k)  # (m, Tk), (Tk,), (Tk, n)
    # numerically null directions (a task vector of rank < k) are arbitrary: zeroed, they cannot sway the others
    u, vh = polar_pair(u * keep, vh * keep[:, None])
    return (u * (s * keep)) @ vh
