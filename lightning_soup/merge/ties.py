"""TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

Per tensor: trim each task vector to its largest-magnitude entries, elect a sign per entry from the sum of the
trimmed deltas, and average only the deltas that agree with the elected sign (disjoint mean). With all weights 1
this equals mergekit's ``ties`` with ``normalize=True`` and ``lambda=scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_soup.merge._checks import check_density, check_real, check_state_dict, check_state_dicts
from lightning_soup.merge._core import acc_dtype, copy_non_floating, prepare
from lightning_soup.merge._related import check_related
from lightning_soup.merge.lora import _refuse_pairs

__all__ = ["ties"]


def ties(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    density: float,
    scale: float = 1.0,
    *,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """TIES-merge fine-tunes of a common base.

    For every floating tensor, with task vectors ``τᵢ = finetunedᵢ − base`` flattened:

    1. trim: keep exactly the ``max(1, ⌊density·numel⌋)`` largest ``|τᵢ|`` entries of each ``τᵢ``, zero the rest;
       among entries whose magnitude ties with the smallest one kept, the lowest flat indices are kept;
    2. elect: ``s = sign(Σᵢ trimmedᵢ)``, a zero sum counting as positive;
    3. disjoint mean: average, per entry, the trimmed deltas whose sign equals ``s`` (an entry with no agreeing
       delta stays 0);

    and return ``base + scale·merged``.

    Memory: about 3 tensors' worth per merged tensor, the result included, whatever the number of fine-tunes
    (task vectors are recomputed slice by slice rather than stored; the trimming threshold comes from a radix
    select, not a sort).

    Args:
        base: the common base state dict.
        finetuned: one or more fine-tuned state dicts (same keys and shapes as `base`).
        density: fraction of each task vector kept, in ``(0, 1]``; 1 keeps everything.
        scale: multiplier of the merged task vector (mergekit's ``lambda``); any finite real.
        allow_unrelated: merge even fine-tunes that do not look fine-tuned from `base`.

    Returns:
        A new state dict with `base`'s keys; floating tensors in `base`'s dtype and on its device (computed in
        float32 or better), non-floating tensors copied from ``finetuned[0]``.

    Raises:
        SoupError: (unless `allow_unrelated`) for a fine-tune that does not look fine-tuned from `base` (see
            :mod:`lightning_soup.merge._related`); for incompatible state dicts, an empty `finetuned`,
            `density` outside ``(0, 1]`` or a
            non-finite `scale`.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(3)}
        >>> fts = [{"w": torch.tensor([1.0, -2.0, 0.1])}, {"w": torch.tensor([3.0, 1.0, -0.2])}]
        >>> ties(base, fts, density=2 / 3)
        {'w': tensor([ 2., -2.,  0.])}
    """
    bs = check_state_dict(base, "base")
    _refuse_pairs(bs, "base", "ties")
    fts = check_state_dicts(finetuned, "finetuned")
    density = check_density(density)
    scale = check_real(scale, "scale")
    names = ["base"] + [f"finetuned[{i}]" for i in range(len(fts))]
    bs, *fts = prepare([bs, *fts], names)
    if not allow_unrelated:
        check_related(bs, fts, names[1:], "base")

    result = copy_non_floating(fts[0], [k for k, t in bs.items() if not t.is_floating_point()])
    for k, b in bs.items():
        if b.is_floating_point():
            result[k] = _ties_tensor(b, [ft[k] for ft in fts], density, scale)
    return {k: result[k] for k in bs}


#: entries per slice: every temporary is a slice of a few MiB, never a whole tensor
_SLICE = 1 << 20
#: up to this many entries a tensor's cut is one k-th value selection instead of a radix select
_SMALL = 1 << 16


def _ties_tensor(base: Tensor, finetuned: list[Tensor], density: float, scale: float) -> Tensor:
    """TIES of one tensor in about 3 tensors of memory (result included), whatever the number of fine-tunes.

    Task vectors are never stored: each delta is recomputed slice by slice from its fine-tune and `base` (the same
    bits every time). Pass 1 finds each task vector's trimming cut (:func:`_cut`, a radix select that allocates
    no index tensor) and accumulates the trimmed sum that elects the signs; pass 2 accumulates the agreeing deltas
    and their count (uint8). Peak: the float sums (reused for the result), a bool sign, the count, slice temporaries.
    """
    acc = acc_dtype(base.dtype, *(t.dtype for t in finetuned))
    device = base.device
    b = base.reshape(-1)
    fts = [t.to(device=device).reshape(-1) for t in finetuned]  # no copy when already on base's device
    numel = b.numel()
    k = max(1, math.floor(density * numel))
    slices = [slice(i, min(i + _SLICE, numel)) for i in range(0, numel, _SLICE)]

    def delta(ft: Tensor) -> Callable[[slice], Tensor]:
        return lambda s: ft[s].to(acc) - b[s].to(acc)  # a fresh tensor, safe to modify in place

    cuts = [_cut(delta(ft), slices, k, acc) if k < numel else None for ft in fts]

    total = torch.zeros(numel, dtype=acc, device=device)
    for ft, cut in zip(fts, cuts):
        for s, d, keep in _trimmed(delta(ft), slices, cut):
            if keep is not None:
                d.masked_fill_(keep.logical_not_(), 0)
            total[s].add_(d)
    positive = total >= 0  # elected sign: a zero sum counts as positive

    merged = total.zero_()
    count = torch.zeros(numel, dtype=torch.uint8 if len(fts) < 256 else torch.int32, device=device)
    for ft, cut in zip(fts, cuts):
        for s, d, keep in _trimmed(delta(ft), slices, cut):
            agree = torch.where(positive[s], d > 0, d < 0)  # a zero delta never agrees
            if keep is not None:
                agree &= keep
            merged[s].add_(d.masked_fill_(agree.logical_not(), 0))
            count[s].add_(agree)
    for s in slices:
        merged[s].div_(count[s].clamp_min(1)).mul_(scale).add_(b[s])
    return merged.reshape(base.shape).to(base.dtype)


def _abs_bits(d: Tensor) -> Tensor:
    """The bit patterns of ``|d|`` as integers: for non-negative floats, integer order is magnitude order."""
    if d.dtype == torch.float32:
        return d.view(torch.int32) & 0x7FFFFFFF
    return d.view(torch.int64) & 0x7FFFFFFFFFFFFFFF


def _cut(delta: Callable[[slice], Tensor], slices: list[slice], k: int, acc: torch.dtype) -> _Cut:
    """Where to trim a task vector so that exactly `k` entries stay.

    Radix select of the k-th largest ``|τ|`` over its bit pattern, 16 bits at a time (2 passes in float32, 4 in
    float64), each pass a histogram of the candidates' next digit built with ``index_add_`` slice by slice; no
    sort, no per-entry index. Returns the threshold's bits, how many entries equal to it are kept, and whether
    that is fewer than all of them (the only host sync, one per task vector and tensor).
    """
    first = delta(slices[0])
    device = first.device
    if len(slices) == 1 and first.numel() <= _SMALL:
        # A small tensor (biases, norms): one selection beats the radix passes' fixed cost of 65 536-bin histograms.
        bits = _abs_bits(first)
        threshold = torch.kthvalue(bits, bits.numel() - k + 1).values  # the k-th largest
        remaining = k - (bits > threshold).sum()
        return _Cut(threshold, remaining, bool((bits == threshold).sum() > remaining))
    int_dtype, nbits = (torch.int32, 31) if acc == torch.float32 else (torch.int64, 63)
    one = torch.ones((), dtype=torch.int64, device=device)
    prefix = torch.zeros((), dtype=int_dtype, device=device)
    remaining = torch.full((), k, dtype=torch.int64, device=device)  # entries still to keep at or below prefix
    shift = nbits
    ties = remaining
    while shift:
        width = min(16, shift)
        shift -= width
        counts = torch.zeros((1 << width) + 1, dtype=torch.int64, device=device)  # last bin: not a candidate
        for s in slices:
            bits = _abs_bits(first if s is slices[0] else delta(s))
            digit = (bits >> shift) & ((1 << width) - 1)
            if shift + width < nbits:
                digit.masked_fill_((bits >> (shift + width)) != prefix, 1 << width)
            counts.index_add_(0, digit, one.expand(digit.numel()))
        counts = counts[:-1]
        at_least = counts.flip(0).cumsum(0).flip(0)  # candidates whose digit is >= j; at_least[0] >= remaining
        j = (at_least >= remaining).sum() - 1
        remaining = remaining - (at_least[j] - counts[j])
        prefix = (prefix << width) | j.to(int_dtype)
        ties = counts[j]
    return _Cut(prefix, remaining, bool(ties > remaining))


class _Cut(NamedTuple):
    threshold: Tensor  # bits of the k-th largest |τ| (0-d)
    kept_equal: Tensor  # how many entries with exactly that magnitude are kept, the lowest indices first (0-d)
    partial: bool  # fewer than all entries equal to the threshold are kept


def _trimmed(
    delta: Callable[[slice], Tensor], slices: list[slice], cut: _Cut | None
) -> Iterator[tuple[slice, Tensor, Tensor | None]]:
    """Each slice's fresh delta and keep mask (None: keep everything); tied magnitudes go to the lowest indices."""
    seen = None  # entries equal to the threshold in the slices before
    for s in slices:
        d = delta(s)
        if cut is None:
            yield s, d, None
            continue
        bits = _abs_bits(d)
        if not cut.partial:
            yield s, d, bits >= cut.threshold
            continue
        equal = bits == cut.threshold
        rank = equal.cumsum(0) if seen is None else equal.cumsum(0) + seen  # 1-based rank among the equal entries
        seen = rank[-1]
        yield s, d, (bits > cut.threshold) | (equal & (rank <= cut.kept_equal))
