"""TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

Per tensor: trim each task vector to its largest-magnitude entries, elect a sign per entry from the sum of the
trimmed deltas, and average only the deltas that agree with the elected sign (disjoint mean). With all weights 1
this equals mergekit's ``ties`` with ``normalize=True`` and ``lambda=scale``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.merge._checks import check_density, check_real, check_state_dict, check_state_dicts
from lightning_soup.merge._core import acc_dtype, copy_non_floating, move, prepare

__all__ = ["ties"]


def ties(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    density: float,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """TIES-merge fine-tunes of a common base.

    For every floating tensor, with task vectors ``τᵢ = finetunedᵢ − base`` flattened:

    1. trim: keep the ``max(1, ⌊density·numel⌋)`` largest ``|τᵢ|`` entries of each ``τᵢ`` (ties in magnitude are
       broken by :func:`torch.topk`, deterministically), zero the rest;
    2. elect: ``s = sign(Σᵢ trimmedᵢ)``, a zero sum counting as positive;
    3. disjoint mean: average, per entry, the trimmed deltas whose sign equals ``s`` (an entry with no agreeing
       delta stays 0);

    and return ``base + scale·merged``.

    Args:
        base: the common base state dict.
        finetuned: one or more fine-tuned state dicts (same keys and shapes as `base`).
        density: fraction of each task vector kept, in ``(0, 1]``; 1 keeps everything.
        scale: multiplier of the merged task vector (mergekit's ``lambda``); any finite real.

    Returns:
        A new state dict with `base`'s keys; floating tensors in `base`'s dtype and on its device (computed in
        float32 or better), non-floating tensors copied from ``finetuned[0]``.

    Raises:
        SoupError: for incompatible state dicts, an empty `finetuned`, `density` outside ``(0, 1]`` or a
            non-finite `scale`.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(3)}
        >>> fts = [{"w": torch.tensor([1.0, -2.0, 0.1])}, {"w": torch.tensor([3.0, 1.0, -0.2])}]
        >>> ties(base, fts, density=2 / 3)
        {'w': tensor([ 2., -2.,  0.])}
    """
    bs = check_state_dict(base, "base")
    fts = check_state_dicts(finetuned, "finetuned")
    density = check_density(density)
    scale = check_real(scale, "scale")
    names = ["base"] + [f"finetuned[{i}]" for i in range(len(fts))]
    bs, *fts = prepare([bs, *fts], names)

    result = copy_non_floating(fts[0], [k for k, t in bs.items() if not t.is_floating_point()])
    for k, b in bs.items():
        if b.is_floating_point():
            result[k] = _ties_tensor(b, [ft[k] for ft in fts], density, scale)
    return {k: result[k] for k in bs}


def _ties_tensor(base: Tensor, finetuned: list[Tensor], density: float, scale: float) -> Tensor:
    acc = acc_dtype(base.dtype, *(t.dtype for t in finetuned))
    b = base.to(acc).reshape(-1)
    # deltas: [n, numel], one row per task vector
    deltas = torch.stack([move(t, acc, base.device).reshape(-1) for t in finetuned]) - b
    numel = b.numel()
    k = max(1, math.floor(density * numel))
    if k < numel:
        idx = deltas.abs().topk(k, dim=1, sorted=False).indices  # [n, k]
        deltas = torch.zeros_like(deltas).scatter_(1, idx, deltas.gather(1, idx))
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(acc)  # [numel]
    agree = torch.sign(deltas) == elected  # [n, numel]; a trimmed (zero) delta never agrees
    merged = (deltas * agree).sum(0) / agree.sum(0).clamp_min(1)  # [numel]
    return (b + scale * merged).reshape(base.shape).to(base.dtype)
