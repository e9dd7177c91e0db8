"""Task arithmetic (Ilharco et al., "Editing models with task arithmetic", ICLR 2023) and weight-space
interpolation between a base and a fine-tune (WiSE-FT, Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022).

A task vector is ``τ = θ_finetuned − θ_base``; adding ``λ·τ`` to the base adds a capability (``λ > 0``) or removes
it (``λ < 0``). Interpolation ``anchor + r·(θ − anchor)`` is the one-vector case, computed with a fused lerp.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.errors import SoupError
from lightning_soup.merge._checks import (
    check_scales,
    check_state_dict,
    check_state_dicts,
    check_task_vectors,
)
from lightning_soup.merge._core import batches, cast, copy_non_floating, group_keys, materialize, move, prepare
from lightning_soup.merge._inplace import layer_weights
from lightning_soup.merge._related import check_related

__all__ = ["interpolate", "task_arithmetic", "task_vector"]


def task_vector(
    finetuned: Mapping[str, Tensor], base: Mapping[str, Tensor], *, allow_unrelated: bool = False
) -> dict[str, Tensor]:
    """The task vector ``finetuned − base`` of every floating key.

    State dicts with PEFT LoRA pairs are refused: a difference of factors is not a difference of updates
    (:func:`~lightning_soup.merge.lora_task_arithmetic` takes the fine-tuned adapters themselves).

    Args:
        finetuned: the fine-tuned state dict.
        base: the state dict it was fine-tuned from (same keys and shapes).
        allow_unrelated: subtract even when `finetuned` does not look fine-tuned from `base` (see
            :mod:`lightning_soup.merge._related`).

    Returns:
        ``{key: finetuned[key] − base[key]}`` for the floating keys only (integer buffers have no task vector), in
        float32 (float64 when either input is float64), on `finetuned`'s device.

    Raises:
        SoupError: when the keys or shapes differ (all listed), or (unless `allow_unrelated`) `finetuned` does not
            look fine-tuned from `base`.

    Example:
        >>> import torch
        >>> ft = {"w": torch.tensor([1.5, 2.0], dtype=torch.bfloat16), "steps": torch.tensor(7)}
        >>> task_vector(ft, {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(0)})
        {'w': tensor([0.5000, 0.0000])}
    """
    from lightning_soup.merge import lora  # built on this module, so imported here

    if lora._has_pairs(finetuned):
        pair = lora.lora_pairs(finetuned.keys())[0]
        raise SoupError(
            f"`task_vector`: `finetuned` holds PEFT LoRA pairs (e.g. `{pair.a_key}`); a difference of LoRA factors "
            "is not the difference of the updates ΔW = scaling·B·A, so it is no task vector. Use "
            "`lora_task_arithmetic(base, finetuned, scales)`, which takes the fine-tuned adapters themselves, or "
            "merge the adapters into their base weights first (`merge.delta_weight`, CLI `--merge-into BASE`) and "
            "take the task vector of the dense weights."
        )
    ft, bs = prepare([finetuned, base], ["finetuned", "base"])
    if not allow_unrelated:
        check_related(bs, [ft], ["finetuned"], "base")
    keys = [k for k, t in ft.items() if t.is_floating_point()]
    result: dict[str, Tensor] = {}
    for group, gkeys in group_keys(keys, ft, [ft, bs]).items():
        if group.direct:
            result.update(zip(gkeys, torch._foreach_sub([ft[k] for k in gkeys], [bs[k] for k in gkeys])))
            continue
        for run in batches(gkeys, ft, group.acc_dtype):
            out = [ft[k].to(dtype=group.acc_dtype, copy=True) for k in run]
            torch._foreach_sub_(out, [move(bs[k], bs[k].dtype, group.device) for k in run])
            result.update(zip(run, out))
    return {k: result[k] for k in keys}


def task_arithmetic(
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    scales: float | Sequence[float],
    *,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """``base + Σ λᵢ τᵢ``: add (``λ > 0``) or remove (``λ < 0``) the capabilities of fine-tunes.

    When `base` holds PEFT LoRA pairs, each pair's entries of ``τᵢ`` are read as ``θᵢ − base`` (factor by factor)
    and the pair becomes the rank-r pair closest to ``ΔW_base + Σ λᵢ(ΔWᵢ − ΔW_base)``, as
    :func:`~lightning_soup.merge.lora_task_arithmetic` (which also returns the rank-r error; here a
    ``UserWarning`` names the worst module above :data:`~lightning_soup.merge.lora.ROUTED_WARN_ERROR`).

    Args:
        base: the base state dict.
        task_vectors: one or more task vectors (see :func:`task_vector`), each holding exactly `base`'s floating
            keys; base's integer buffers may be absent (entries for them are ignored).
        scales: one number for every task vector, or one per task vector; any finite real.
        allow_unrelated: add even task vectors that move `base` to an unrelated model (``base + τ`` not a
            fine-tune of `base`, see :mod:`lightning_soup.merge._related`).

    Returns:
        A new state dict with `base`'s keys, floating tensors in `base`'s dtype and on its device (computed in
        float32 or better), non-floating tensors copied from `base`.

    Raises:
        SoupError: for keys/shapes that do not match `base`, an empty `task_vectors`, bad `scales`, or (unless
            `allow_unrelated`) a task vector taken against another base.

    Example:
        >>> import torch
        >>> base = {"w": torch.tensor([1.0, 1.0])}
        >>> task_arithmetic(base, [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}], [0.5, -0.25])
        {'w': tensor([2., 0.])}
    """
    bs = check_state_dict(base, "base")
    tvs = check_state_dicts(task_vectors, "task_vectors")
    lams = check_scales(scales, len(tvs))
    bs = prepare([bs], ["base"])[0]
    tvs = [materialize(check_state_dict(tv, f"task_vectors[{i}]")) for i, tv in enumerate(tvs)]
    check_task_vectors(bs, tvs)
    from lightning_soup.merge import lora  # built on this module, so imported here

    if lora._has_pairs(bs):  # ΔW = B·A, never factor by factor

        def plain(b: Mapping[str, Tensor], vs: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
            return task_arithmetic(b, vs, lams, allow_unrelated=allow_unrelated)

        return lora._route_task_arithmetic(bs, tvs, lams, plain)
    if not allow_unrelated:
        names = [f"base + task_vectors[{i}]" for i in range(len(tvs))]
        check_related(bs, tvs, names, "base", deltas=True)

    keys = [k for k, t in bs.items() if t.is_floating_point()]
    result = copy_non_floating(bs, [k for k, t in bs.items() if not t.is_floating_point()])
    for group, gkeys in group_keys(keys, bs, [bs, *tvs]).items():
        if group.direct:
            # base + λ₀τ₀ into fresh outputs, then one fused in-place pass per further vector
            out = torch._foreach_add([bs[k] for k in gkeys], [tvs[0][k] for k in gkeys], alpha=lams[0])
            for tv, lam in zip(tvs[1:], lams[1:]):
                torch._foreach_add_(out, [tv[k] for k in gkeys], alpha=lam)
            result.update(zip(gkeys, out))
            continue
        for run in batches(gkeys, bs, group.acc_dtype):
            acc = [bs[k].to(dtype=group.acc_dtype, copy=True) for k in run]
            for tv, lam in zip(tvs, lams):
                torch._foreach_add_(acc, [move(tv[k], tv[k].dtype, group.device) for k in run], alpha=lam)
            result.update(zip(run, cast(acc, group.out_dtype)))
    return {k: result[k] for k in bs}


def interpolate(
    anchor: Mapping[str, Tensor],
    model: Mapping[str, Tensor],
    ratio: float,
    layer_ratios: Mapping[str, float] | None = None,
    *,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """``anchor + r·(model − anchor)``: move a fine-tune back toward its base (WiSE-FT), or past it (``r > 1``).

    ``r = 0`` gives `anchor`, ``r = 1`` gives `model` (exactly, for equal dtypes). PEFT LoRA pairs blend on
    ``ΔW = B·A`` (:func:`~lightning_soup.merge.lora_interpolate`: exact toward an adapter of zeros, where B scales;
    otherwise the best rank-r pairs, with a ``UserWarning`` naming the worst module above
    :data:`~lightning_soup.merge.lora.ROUTED_WARN_ERROR`).

    Args:
        anchor: the state dict at ``r = 0`` (the base, or a safety-tuned checkpoint).
        model: the state dict at ``r = 1`` (the fine-tune); same keys and shapes.
        ratio: `r` for every key that matches no `layer_ratios` pattern; any finite real.
        layer_ratios: ``{fnmatch pattern over key names: r}``, first matching pattern wins, e.g.
            ``{"classifier.*": 1.0, "encoder.layer.0.*": 0.2}``. A pattern that matches no key is warned about.
        allow_unrelated: interpolate even when `model` does not look fine-tuned from `anchor` (see
            :mod:`lightning_soup.merge._related`), e.g. toward the random initialisation of a from-scratch run.

    Returns:
        A new state dict with `model`'s keys; floating tensors in `model`'s dtype and on its device (computed with
        a single rounding from float32 or better), non-floating tensors copied from `model`.

    Raises:
        SoupError: for incompatible state dicts, a `ratio` / `layer_ratios` value that is not a finite real, or
            (unless `allow_unrelated`) a `model` that does not look fine-tuned from `anchor`.

    Example:
        >>> import torch
        >>> anchor, model = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, -2.0])}
        >>> interpolate(anchor, model, 0.25)
        {'w': tensor([ 0.2500, -0.5000])}
    """
    layer_weights([], ratio, layer_ratios)  # validate `ratio` and `layer_ratios` before reading anything
    from lightning_soup.merge import lora  # built on this module, so imported here

    if lora._has_pairs(model):  # ΔW = B·A, never factor by factor
        merged = lora.lora_interpolate(anchor, model, ratio, layer_ratios, allow_unrelated=allow_unrelated)
        return lora._routed("interpolate", merged)
    an, md = prepare([anchor, model], ["anchor", "model"])
    if not allow_unrelated:
        check_related(an, [md], ["model"], "anchor")
    keys = [k for k, t in md.items() if t.is_floating_point()]
    if layer_ratios:
        unused = [p for p in layer_ratios if not any(fnmatch.fnmatchcase(k, p) for k in md)]
        if unused:
            warnings.warn(
                f"`layer_ratios` patterns {unused} match no key, so they have no effect. Patterns are fnmatch "
                f"patterns over whole key names, such as {next(iter(md))!r}.",
                UserWarning,
                stacklevel=2,
            )
    ratios = dict(zip(keys, layer_weights(keys, ratio, layer_ratios)))

    result = copy_non_floating(md, [k for k, t in md.items() if not t.is_floating_point()])
    # torch.lerp computes bf16/fp16 in float32 and rounds once, so equal dtypes need no conversion at all
    fused = [k for k in keys if an[k].dtype == md[k].dtype and an[k].device == md[k].device]
    if fused:
        by_dtype: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for k in fused:
            by_dtype.setdefault((md[k].dtype, md[k].device), []).append(k)
        for gkeys in by_dtype.values():
            out = torch._foreach_lerp([an[k] for k in gkeys], [md[k] for k in gkeys], [ratios[k] for k in gkeys])
            result.update(zip(gkeys, out))
    fused_set = set(fused)
    mixed = [k for k in keys if k not in fused_set]
    for group, gkeys in group_keys(mixed, md, [an, md]).items():
        for run in batches(gkeys, md, group.acc_dtype):
            acc = [an[k].to(device=group.device, dtype=group.acc_dtype, copy=True) for k in run]
            torch._foreach_lerp_(acc, cast([md[k] for k in run], group.acc_dtype), [ratios[k] for k in run])
            result.update(zip(run, cast(acc, group.out_dtype)))
    return {k: result[k] for k in md}
