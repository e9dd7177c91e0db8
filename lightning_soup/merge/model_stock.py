"""Model Stock (Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024).

Fine-tunes of one base lie on a thin shell around a centre; the point of the plane through the base and the
fine-tunes' average that is nearest that centre is an interpolation whose ratio follows from the angle between the
fine-tunes alone, with no validation. Per floating tensor, with ``τᵢ = finetunedᵢ − base`` flattened and
``N ≥ 2`` fine-tunes::

    c = mean over pairs i < j of cos(τᵢ, τⱼ)
    t = N·c / (1 + (N − 1)·c)
    result = t·mean(finetunedᵢ) + (1 − t)·base  =  base + t·mean(τᵢ)

The paper leaves θ undefined for ``N > 2``; the mean pairwise cosine is mergekit's reading and DESIGN's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.merge._core import acc_dtype
from lightning_soup.merge._stacked import merge_state_dicts
from lightning_soup.merge.lora import _refuse_pairs

__all__ = ["model_stock"]


def model_stock(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], *, allow_unrelated: bool = False
) -> dict[str, Tensor]:
    """Merge two or more fine-tunes of a common base by Model Stock, tensor by tensor, with no coefficient to tune.

    Behaviour beyond the formula (module docstring):

    - **Every floating tensor** gets its own ratio ``t`` (weights, biases, norms, 0-d scalars alike).
    - **A task vector of zeros** (a tensor this fine-tune did not train) has cosine 0 with every other one.
    - **Negative mean cosine** (fine-tunes that moved a tensor in opposite directions, which the paper's geometry
      does not cover): ``c`` is clamped at 0, so ``t = 0`` and the tensor stays at `base`. Unclamped, the formula
      would extrapolate away from the fine-tunes (``t < 0``) and divide by zero at ``c = −1/(N − 1)``.
    - **bf16 / fp16 inputs**: computed in float32 (float64 when any input is float64), rounded once into `base`'s
      dtype, on `base`'s device.

    Args:
        base: the common base state dict (the pre-trained weights ``w₀``).
        finetuned: two or more fine-tuned state dicts (same keys and shapes as `base`).
        allow_unrelated: merge even fine-tunes that do not look fine-tuned from `base` (see
            :mod:`lightning_soup.merge._related`).

    Returns:
        A new state dict with `base`'s keys; floating tensors in `base`'s dtype and on its device, non-floating
        tensors copied from `base`.

    Raises:
        SoupError: for incompatible state dicts or fewer than two fine-tunes.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2)}
        >>> fts = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]  # 45°: c = 0.7071
        >>> model_stock(base, fts)["w"]  # t = 2c / (1 + c) = 0.8284 times the mean (1.5, 0.5)
        tensor([1.2426, 0.4142])
    """
    _refuse_pairs(base, "base", "model_stock")
    return merge_state_dicts(
        base, finetuned, None, 1.0, min_finetuned=2, per_key=model_stock_tensor, allow_unrelated=allow_unrelated
    )


#: entries per slice: the task vectors are never stored whole, only a few MiB of them at a time
_SLICE = 1 << 18


def model_stock_tensor(base: Tensor, finetuned: Sequence[Tensor]) -> Tensor:
    """Model Stock of one tensor, in two passes over slices without storing the task vectors.

    Pass 1 reads each slice of the inputs once, forms its ``N × slice`` task vectors, adds their inner products to
    the ``N × N`` Gram matrix and writes their sum into the output buffer; pass 2 is ``base + (t/N)·sum``, fused.
    Memory: the result plus slice temporaries; no host sync (``t`` stays a device scalar).
    """
    n = len(finetuned)
    acc = acc_dtype(base.dtype, *(t.dtype for t in finetuned))
    device = base.device
    b = base.reshape(-1)
    fts = [t.to(device=device).reshape(-1) for t in finetuned]  # no copy when already on base's device
    numel = b.numel()
    total = torch.empty(numel, dtype=acc, device=device)
    gram = torch.zeros((n, n), dtype=acc, device=device)
    for start in range(0, numel, _SLICE):
        s = slice(start, min(start + _SLICE, numel))
        bs = b[s].to(acc)
        taus = torch.stack([ft[s].to(acc) for ft in fts]).sub_(bs)  # (N, slice)
        gram.addmm_(taus, taus.mT)
        torch.sum(taus, 0, out=total[s])
    norms = gram.diagonal().sqrt()
    outer = norms[:, None] * norms[None, :]
    cos = torch.where(outer > 0, gram / outer.clamp_min(torch.finfo(acc).tiny), 0.0)
    i, j = torch.triu_indices(n, n, 1, device=device)
    c = cos[i, j].mean().clamp(0.0, 1.0)
    t = c / (1 + (n - 1) * c)  # N·c / (1 + (N − 1)·c), divided by N for the sum
    out = torch.addcmul(b, total, t, out=total)  # computed in `acc` (b is widened on the fly), one rounding below
    return out.reshape(base.shape).to(base.dtype)
