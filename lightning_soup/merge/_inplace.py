"""In-place hot-path ops over lists of tensors, for the callbacks (running sums, averages, blends).

Each op is one ``torch._foreach_*`` pass over the lists when the dtypes agree (one fused kernel per group of tensors
on accelerators), takes Python numbers for counts and weights (no ``.item()``, no host sync) and works on whatever
device the tensors are on. When dtypes differ (a float32 running sum written into bf16 weights) the arithmetic is
done in float32 (float64 when an operand is float64) and rounded once into the output dtype; PyTorch's foreach
kernels fall back to one kernel per tensor for mixed dtypes, and so do these ops, without temporary copies.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.errors import SoupError
from lightning_soup.merge._checks import check_real

__all__ = ["accumulate_", "add_scaled_", "all_finite", "assign_", "assign_lerp_", "assign_mean_", "float32_copy", "layer_weights"]


def _same_length(**lists: Sequence[Tensor] | None) -> None:
    sizes = {name: len(v) for name, v in lists.items() if v is not None}
    if len(set(sizes.values())) > 1:
        got = ", ".join(f"`{k}`: {n}" for k, n in sizes.items())
        raise SoupError(f"Tensor lists must have the same length, got {got}.")


def _aliases(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _once(out: Sequence[Tensor]) -> list[int]:
    """Indices of `out` without the tensors listed again (tied weights under two keys): an in-place op that is not
    idempotent (a mean, a lerp) must run once per storage, not once per key."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    keep = []
    for i, t in enumerate(out):
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.data_ptr() == 0 or key not in seen:  # 0: empty or meta tensors, never shared storage we write twice
            seen.add(key)
            keep.append(i)
    return keep


def float32_copy(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Fresh float32 copies of `tensors` on their own devices, in one ``_foreach_copy_`` pass; float64 tensors stay
    float64 (a float32 copy would round ``precision="64-true"`` weights).

    Example:
        >>> import torch
        >>> float32_copy([torch.tensor([1.5, 2.0], dtype=torch.bfloat16)])
        [tensor([1.5000, 2.0000])]
    """
    out = [torch.empty_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    if out:
        torch._foreach_copy_(out, list(tensors))
    return out


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True when no tensor holds NaN or ±inf. One host sync for the whole list (a per-checkpoint check, not a
    hot-path one); non-floating tensors are always finite.

    Example:
        >>> import torch
        >>> all_finite([torch.tensor([1.0, 2.0]), torch.tensor([3])])
        True
        >>> all_finite([torch.tensor([1.0, float("nan")])])
        False
    """
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def accumulate_(sums: Sequence[Tensor], add: Sequence[Tensor], sub: Sequence[Tensor] | None = None) -> None:
    """``sums += add`` (and ``sums -= sub`` when given), in place; `add` and `sub` may have any floating dtype.

    Example:
        >>> import torch
        >>> sums = [torch.zeros(2)]
        >>> accumulate_(sums, [torch.tensor([3.0, 4.0], dtype=torch.bfloat16)], [torch.tensor([1.0, 1.0])])
        >>> sums
        [tensor([2., 3.])]
    """
    _same_length(sums=sums, add=add, sub=sub)
    if not sums:
        return
    torch._foreach_add_(list(sums), list(add))
    if sub is not None:
        torch._foreach_sub_(list(sums), list(sub))


def add_scaled_(sums: Sequence[Tensor], add: Sequence[Tensor], weight: float) -> None:
    """``sums += weight·add``, in place, in one ``_foreach_add_`` pass; `add` may have any floating dtype.

    Example:
        >>> import torch
        >>> sums = [torch.ones(2)]
        >>> add_scaled_(sums, [torch.tensor([2.0, 4.0], dtype=torch.bfloat16)], 0.25)
        >>> sums
        [tensor([1.5000, 2.0000])]
    """
    _same_length(sums=sums, add=add)
    weight = check_real(weight, "weight")
    if sums:
        torch._foreach_add_(list(sums), list(add), alpha=weight)


def assign_(out: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``out[i].copy_(src[i])`` for every tensor, casting to `out`'s dtype, in one ``_foreach_copy_`` pass.

    Example:
        >>> import torch
        >>> out = [torch.zeros(2, dtype=torch.float16)]
        >>> assign_(out, [torch.tensor([0.5, 1.0])])
        >>> out
        [tensor([0.5000, 1.0000], dtype=torch.float16)]
    """
    _same_length(out=out, src=src)
    if out:
        torch._foreach_copy_(list(out), list(src))


def assign_mean_(out: Sequence[Tensor], sums: Sequence[Tensor], count: int) -> None:
    """``out = sums / count``, computed in `sums`' dtype and rounded once into `out`'s dtype. A tensor that `out`
    lists twice (tied weights) is written once.

    Args:
        out: tensors to overwrite (e.g. the module's parameters).
        sums: running sums (float32 or float64).
        count: how many tensors were summed; a Python int, so nothing syncs with the device.

    Example:
        >>> import torch
        >>> out = [torch.zeros(2, dtype=torch.bfloat16)]
        >>> assign_mean_(out, [torch.tensor([3.0, 6.0])], 3)
        >>> out
        [tensor([1., 2.], dtype=torch.bfloat16)]
    """
    _same_length(out=out, sums=sums)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SoupError(f"`count` must be a positive int, got {count!r}.")
    once = _once(out)
    if len(once) < len(out):  # a tied tensor listed twice is written once (from its first entry)
        out, sums = [out[i] for i in once], [sums[i] for i in once]
    same = [i for i, (o, s) in enumerate(zip(out, sums)) if o.dtype == s.dtype]
    if same:
        o_list = [out[i] for i in same]
        torch._foreach_copy_(o_list, [sums[i] for i in same])
        torch._foreach_div_(o_list, count)
    for i in range(len(out)):
        if out[i].dtype != sums[i].dtype:
            # one pass: TensorIterator divides in sums' dtype and casts on the store
            torch.div(sums[i], count, out=out[i])


def assign_lerp_(
    out: Sequence[Tensor], start: Sequence[Tensor], end: Sequence[Tensor], weight: float | Sequence[float]
) -> None:
    """``out = start + weight·(end − start)`` computed in float32 or better, written in `out`'s dtype.

    `out` may be the very tensors of `start` or of `end` (e.g. blend the module's weights in place toward or away
    from an anchor); partial overlaps are not supported. A tensor that `out` lists twice (tied weights) moves once.

    Args:
        out: tensors to overwrite.
        start: values at ``weight = 0``.
        end: values at ``weight = 1``.
        weight: one number for every tensor, or one per tensor (see :func:`layer_weights`); any finite real.

    Example:
        >>> import torch
        >>> a, b = [torch.tensor([0.0, 2.0])], [torch.tensor([4.0, 2.0])]
        >>> assign_lerp_(a, a, b, 0.25)
        >>> a
        [tensor([1., 2.])]
    """
    _same_length(out=out, start=start, end=end)
    n = len(out)
    if isinstance(weight, Sequence) and not isinstance(weight, str):
        weights = [check_real(w, "weight") for w in weight]
        if len(weights) != n:
            raise SoupError(f"`weight` has {len(weights)} values for {n} tensors; give one number or one per tensor.")
    else:
        weights = [check_real(weight, "weight")] * n
    once = _once(out)
    if len(once) < n:  # a tied tensor listed twice moves once (with its first entry's weight)
        out, start, end, weights = ([x[i] for i in once] for x in (out, start, end, weights))

    # groups for the fused paths: (kind) -> indices; kind says which operand `out` aliases
    fused: dict[str, list[int]] = {"start": [], "end": [], "none": []}
    for i, (o, s, e) in enumerate(zip(out, start, end)):
        if not (o.dtype == s.dtype == e.dtype and o.device == s.device == e.device):
            # mixed dtypes: lerp in float32 (float64 if any operand is), one rounding into out's dtype
            acc = torch.float64 if torch.float64 in (o.dtype, s.dtype, e.dtype) else torch.float32
            o.copy_(torch.lerp(s.to(device=o.device, dtype=acc), e.to(device=o.device, dtype=acc), weights[i]))
        elif _aliases(o, s):
            fused["start"].append(i)
        elif _aliases(o, e):
            fused["end"].append(i)
        else:
            fused["none"].append(i)
    # torch.lerp computes bf16/fp16 in float32 internally and rounds once, so the fused paths need no copies
    for kind, idx in fused.items():
        if not idx:
            continue
        o_list = [out[i] for i in idx]
        w = [weights[i] for i in idx]
        if kind == "end":
            # out is end: start + w(end - start) == end + (1 - w)(start - end)
            torch._foreach_lerp_(o_list, [start[i] for i in idx], [1.0 - x for x in w])
        else:
            if kind == "none":
                torch._foreach_copy_(o_list, [start[i] for i in idx])
            torch._foreach_lerp_(o_list, [end[i] for i in idx], w)


def layer_weights(
    keys: Sequence[str], ratio: float, layer_ratios: Mapping[str, float] | None = None
) -> list[float]:
    """Each key's ratio: that of the first `layer_ratios` pattern it matches (fnmatch, case-sensitive), else `ratio`.

    Args:
        keys: state-dict keys.
        ratio: the ratio of keys that match no pattern.
        layer_ratios: ``{pattern: ratio}``, tried in order; e.g. ``{"encoder.layers.0.*": 0.0, "*.bias": 1.0}``.

    Raises:
        SoupError: when `ratio` or a value of `layer_ratios` is not a finite real number, or a pattern is not a str.

    Example:
        >>> layer_weights(["head.weight", "body.weight", "body.bias"], 0.5, {"head.*": 1.0, "*.bias": 0.0})
        [1.0, 0.5, 0.0]
    """
    ratio = check_real(ratio, "ratio")
    if not layer_ratios:
        return [ratio] * len(keys)
    if not isinstance(layer_ratios, Mapping):
        raise SoupError(
            "`layer_ratios` must map fnmatch patterns to ratios, e.g. {'*.bias': 0.0}, "
            f"got {type(layer_ratios).__name__}."
        )
    bad = [repr(p) for p in layer_ratios if not isinstance(p, str)]
    if bad:
        raise SoupError(
            f"`layer_ratios` patterns must be strings (fnmatch patterns over key names), got {', '.join(bad)}."
        )
    patterns = [(p, check_real(r, f"layer_ratios[{p!r}]")) for p, r in layer_ratios.items()]
    out = []
    for key in keys:
        out.append(next((r for p, r in patterns if fnmatch.fnmatchcase(key, p)), ratio))
    return out
