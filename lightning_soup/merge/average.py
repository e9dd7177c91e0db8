"""Uniform and weighted averaging of weights: model soups (Wortsman et al., "Model soups", ICML 2022) and
checkpoint averaging (LAWA, Kaddour 2022; Sanyal et al. 2023).

The mean is built as a running mean, ``m ← lerp(m, θᵢ, wᵢ / Σⱼ≤ᵢ wⱼ)``: with float32 (or float64) inputs that is
one fused ``_foreach_lerp`` pass per extra input and no temporary beyond the output, the fewest bytes moved for a
chain of two-operand kernels. Other dtypes accumulate in float32 and are rounded once at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.merge._checks import check_state_dicts, check_weights
from lightning_soup.merge._core import batches, cast, copy_non_floating, group_keys, move, prepare
from lightning_soup.merge._related import check_related

__all__ = ["uniform_soup", "weighted_average"]


def uniform_soup(state_dicts: Sequence[Mapping[str, Tensor]], *, allow_unrelated: bool = False) -> dict[str, Tensor]:
    """Elementwise mean of state dicts (a uniform model soup, or an average of checkpoints).

    Floating tensors are averaged in float32 (float64 when an input is float64) and returned in the dtype and on
    the device of the first state dict's tensor; non-floating tensors (e.g. ``num_batches_tracked``) are copied
    from the first state dict. Inputs are never modified; lazy mappings are read once. PEFT LoRA pairs are
    averaged on ``ΔW = B·A``, never factor by factor (see :func:`~lightning_soup.merge.lora_uniform_soup`, which
    also returns how far the rank-r pairs are from the exact mean; here a ``UserWarning`` names the worst module
    when that is above :data:`~lightning_soup.merge.lora.ROUTED_WARN_ERROR`).

    Args:
        state_dicts: one or more state dicts with the same keys and shapes.
        allow_unrelated: merge even state dicts whose weights look unrelated to the first one's (not fine-tunes
            of one base, see :mod:`lightning_soup.merge._related`).

    Returns:
        A new state dict, keys in the order of ``state_dicts[0]``.

    Raises:
        SoupError: when `state_dicts` is empty or the state dicts differ in keys or shapes (all listed), or (unless
            `allow_unrelated`) a state dict does not share a base with the first one.

    Example:
        >>> import torch
        >>> uniform_soup([{"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}])
        {'w': tensor([0.5000, 3.0000])}
    """
    sds = check_state_dicts(state_dicts, "state_dicts")
    from lightning_soup.merge import lora  # built on this module, so imported here

    if lora._has_pairs(sds[0]):  # ΔW = B·A, never factor by factor
        return lora._routed("uniform_soup", lora.lora_uniform_soup(sds, allow_unrelated=allow_unrelated))
    return _average(sds, [1.0] * len(sds), allow_unrelated)


def weighted_average(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float], *, allow_unrelated: bool = False
) -> dict[str, Tensor]:
    """Weighted mean ``Σ wᵢθᵢ / Σ wᵢ`` of state dicts.

    Dtypes, devices and non-floating tensors as in :func:`uniform_soup`. A zero weight leaves that state dict out
    of the arithmetic (its keys and shapes are still checked). LoRA pairs as in :func:`uniform_soup`
    (:func:`~lightning_soup.merge.lora_weighted_average`).

    Args:
        state_dicts: one or more state dicts with the same keys and shapes.
        weights: one finite, non-negative number per state dict, not all zero; they need not sum to one.
        allow_unrelated: as in :func:`uniform_soup`.

    Returns:
        A new state dict, keys in the order of ``state_dicts[0]``.

    Raises:
        SoupError: for incompatible state dicts, or a wrong number of weights / negative / non-finite weights /
            weights summing to zero, or (unless `allow_unrelated`) a state dict unrelated to the first one.

    Example:
        >>> import torch
        >>> weighted_average([{"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}], weights=[2, 1])
        {'w': tensor([1.])}
    """
    sds = check_state_dicts(state_dicts, "state_dicts")
    w = check_weights(weights, len(sds))
    from lightning_soup.merge import lora  # built on this module, so imported here

    if lora._has_pairs(sds[0]):  # ΔW = B·A, never factor by factor
        return lora._routed("weighted_average", lora.lora_weighted_average(sds, w, allow_unrelated=allow_unrelated))
    return _average(sds, w, allow_unrelated)


def _average(
    state_dicts: list[Mapping[str, Tensor]], weights: list[float], allow_unrelated: bool
) -> dict[str, Tensor]:
    names = [f"state_dicts[{i}]" for i in range(len(state_dicts))]
    sds = prepare(state_dicts, names)
    if not allow_unrelated and len(sds) > 1:
        check_related(sds[0], sds[1:], names[1:], names[0], derived=False)
    ref = sds[0]
    float_keys = [k for k, t in ref.items() if t.is_floating_point()]
    result = copy_non_floating(ref, [k for k, t in ref.items() if not t.is_floating_point()])

    # running mean: after input i, m = Σⱼ≤ᵢ wⱼθⱼ / Σⱼ≤ᵢ wⱼ, so step i lerps toward θᵢ by wᵢ / Σⱼ≤ᵢ wⱼ
    steps: list[tuple[int, float]] = []
    total = 0.0
    for i, w in enumerate(weights):
        if w > 0:
            total += w
            steps.append((i, w / total))
    active = [sds[i] for i, _ in steps]

    for group, keys in group_keys(float_keys, ref, active).items():
        if group.direct:
            # cast: the first state dict sets the dtype even when its zero weight leaves it out of `active`
            mean = _running_mean([[sd[k] for k in keys] for sd in sds], steps)
            result.update(zip(keys, cast(mean, group.out_dtype)))
            continue
        for run in batches(keys, ref, group.acc_dtype):
            # mixed dtypes: in-place adds promote to the accumulator's dtype, so no input is copied to float32
            i0 = steps[0][0]
            acc = [sds[i0][k].to(device=group.device, dtype=group.acc_dtype, copy=True) for k in run]
            torch._foreach_mul_(acc, weights[i0] / total)
            for i, _ in steps[1:]:
                torch._foreach_add_(acc, [move(sds[i][k], sds[i][k].dtype, group.device) for k in run],
                                    alpha=weights[i] / total)
            result.update(zip(run, cast(acc, group.out_dtype)))
    return {k: result[k] for k in ref}


def _running_mean(tensors: list[list[Tensor]], steps: list[tuple[int, float]]) -> list[Tensor]:
    """Weighted mean of same-dtype tensor lists (``tensors[i]`` is input i) as a chain of fused lerps."""
    first = tensors[steps[0][0]]
    if len(steps) == 1:
        return [t.clone() for t in first]
    i, frac = steps[1]
    acc = torch._foreach_lerp(first, tensors[i], frac)  # fresh outputs
    for i, frac in steps[2:]:
        torch._foreach_lerp_(acc, tensors[i], frac)
    return list(acc)
