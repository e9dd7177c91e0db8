"""Spherical linear interpolation of weights (Shoemake, "Animating rotation with quaternion curves",
SIGGRAPH 1985), as popularised for model merging by mergekit and White, "Sampling generative networks" (2016).

Each tensor is flattened; the angle ``θ`` between the two flattened tensors gives
``sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b``. When they are nearly colinear (``|cos θ| > 0.9995``) or one has zero
norm the angle is meaningless and plain lerp ``(1−t)·a + t·b`` is used instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_soup.merge._checks import check_real
from lightning_soup.merge._core import batches, cast, copy_non_floating, group_keys, move, prepare
from lightning_soup.merge._related import check_related
from lightning_soup.merge.lora import _refuse_pairs

__all__ = ["slerp"]

#: Above this |cos θ| the two tensors are treated as colinear and linearly interpolated.
COLINEAR = 0.9995


def slerp(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float, *, allow_unrelated: bool = False
) -> dict[str, Tensor]:
    """Per-tensor spherical interpolation from `a` (``t = 0``) to `b` (``t = 1``).

    The lerp-or-slerp choice is made per tensor on the device (``torch.where`` over the stacked cosines of a group
    of tensors), so nothing waits on the host; norms are computed with one ``_foreach_norm`` per group.

    Args:
        a: the state dict at ``t = 0``.
        b: the state dict at ``t = 1``; same keys and shapes.
        t: interpolation parameter; any finite real (outside ``[0, 1]`` extrapolates along the arc).
        allow_unrelated: interpolate even when `b`'s weights look unrelated to `a`'s (no shared base, see
            :mod:`lightning_soup.merge._related`).

    Returns:
        A new state dict with `b`'s keys; floating tensors in `b`'s dtype and on its device (computed on float32 or
        float64 flattened views), non-floating tensors copied from `b`.

    Raises:
        SoupError: for incompatible state dicts, a `t` that is not a finite real number, or (unless
            `allow_unrelated`) `a` and `b` that do not share a base.

    Example:
        >>> import torch
        >>> out = slerp({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}, 0.5)
        >>> out["w"]  # on the unit circle, not at the chord's midpoint (0.5, 0.5)
        tensor([0.7071, 0.7071])
    """
    t = check_real(t, "t")
    _refuse_pairs(a, "a", "slerp")
    sa, sb = prepare([a, b], ["a", "b"])
    if not allow_unrelated:
        check_related(sa, [sb], ["b"], "a", derived=False)
    keys = [k for k, x in sb.items() if x.is_floating_point()]
    result = copy_non_floating(sb, [k for k, x in sb.items() if not x.is_floating_point()])
    for group, gkeys in group_keys(keys, sb, [sa, sb]).items():
        for run in batches(gkeys, sb, group.acc_dtype) if not group.direct else [gkeys]:
            # flattened views in the accumulator dtype: no copy for float32/float64 inputs
            va = [move(sa[k], group.acc_dtype, group.device).reshape(-1) for k in run]
            vb = [move(sb[k], group.acc_dtype, group.device).reshape(-1) for k in run]
            c0, c1 = _coefficients(va, vb, t)
            out = torch._foreach_mul(va, c0)
            torch._foreach_addcmul_(out, vb, c1)
            result.update((k, o.view(sb[k].shape)) for k, o in zip(run, cast(out, group.out_dtype)))
    return {k: result[k] for k in sb}


def _coefficients(va: list[Tensor], vb: list[Tensor], t: float) -> tuple[list[Tensor], list[Tensor]]:
    """Per-tensor weights of `a` and `b`, as 0-d device tensors, chosen without a host sync."""
    na = torch.stack(torch._foreach_norm(va))  # [m]
    nb = torch.stack(torch._foreach_norm(vb))  # [m]
    dots = torch.stack([torch.dot(x, y) for x, y in zip(va, vb)])  # [m]
    denom = na * nb
    cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 1.0).clamp(-1.0, 1.0)
    linear = (cos.abs() > COLINEAR) | ~torch.isfinite(cos)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    safe = torch.where(linear, 1.0, sin)
    c0 = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / safe)
    c1 = torch.where(linear, t, torch.sin(t * theta) / safe)
    return list(c0.unbind()), list(c1.unbind())
