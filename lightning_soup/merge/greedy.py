"""Greedy model soup (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, Recipe 1 "greedy soup").

Ingredients are sorted by their own held-out score; starting from the best, each next ingredient joins the
uniform average only if the held-out score of the average does not get worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_soup.errors import SoupError
from lightning_soup.merge._checks import check_compatible, check_mode, check_state_dicts
from lightning_soup.merge._core import acc_dtype, copy_non_floating, has_metadata, materialize, move
from lightning_soup.merge.lora import _merge_pairs, lora_pairs

__all__ = ["greedy_soup"]


def greedy_soup(
    ingredients: Sequence[Mapping[str, Tensor]],
    evaluate: Callable[[dict[str, Tensor]], float],
    mode: Literal["max", "min"] = "max",
    scores: Sequence[float] | None = None,
    *,
    into: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Wortsman's greedy soup.

    Ingredients are tried in order of their score (best first; equal scores keep their input order). The soup
    starts as the best ingredient; each next ingredient is added to the running uniform mean when
    ``evaluate(candidate)`` is not worse than the current soup's score (``>=`` in ``"max"`` mode, ``<=`` in
    ``"min"`` mode), where ``candidate = (sum + θ) / (k + 1)`` is built from a float32 (float64 for float64
    tensors) running sum and cast back to the ingredients' dtypes. Ingredients whose score is NaN or infinite are
    skipped and never read.

    LoRA pairs (see :mod:`lightning_soup.merge.lora`) are averaged on ``ΔW = B·A``, never factor by factor: the
    soup keeps its members' factors (tiny) and each candidate's pairs are the best rank-r pairs for the mean ΔW,
    whose relative error each recipe entry records as ``lora_relative_error``.

    Each ingredient mapping is read exactly once, in score order, so lazy on-disk mappings
    (``open_state_dict``) keep memory to the running sum plus one ingredient and one candidate. With
    ``scores=None`` each ingredient is first evaluated alone, which reads it a second time (before the greedy
    pass); pass `scores` when you already have them (e.g. from training) to skip those evaluations.

    Args:
        ingredients: state dicts with the same keys and shapes (dicts or lazy mappings).
        evaluate: ``evaluate(state_dict) -> float``, the held-out score of a state dict (higher is better in
            ``"max"`` mode). It gets a fresh dict it may keep; it must not modify the tensors in place.
        mode: ``"max"`` (accuracy) or ``"min"`` (loss).
        scores: the ingredients' own scores, one per ingredient; ``None`` evaluates each ingredient first.
        into: tensors to build every candidate in, by key (e.g. ``model.state_dict()`` or
            ``dict(model.named_parameters())``): each candidate's floating tensors are written into ``into``'s
            storage, which ``evaluate`` then receives (it must not keep them: the next candidate overwrites them),
            and at the end ``into`` holds the soup, which the returned dict's floating entries view. Nothing is
            allocated per candidate and, for a model, nothing needs copying into it. Any dtype and device; the
            ingredients' shapes. Where a target has the running sum's dtype and device (float32 weights), the soup
            keeps a running mean instead, and each candidate is one pass, ``lerp(mean, θ, 1/(k+1))``, written
            straight into the target; other tensors keep the float32 sum, whose next value goes into a reused
            buffer.

    Returns:
        ``(soup, recipe)``: the soup state dict (floating tensors in the best ingredient's dtypes, non-floating
        tensors copied from it), and one dict per ingredient in the order tried, ``{"index": i, "score": s,
        "accepted": bool, "soup_score": float | None, "skipped": bool}``, where ``soup_score`` is the soup's score
        after that ingredient's turn (``None`` when skipped).

    Raises:
        SoupError: for an empty `ingredients`, a bad `mode`, a wrong number of `scores`, scores that are all
            NaN/inf, or ingredients that differ in keys or shapes from the best one.

    Example:
        >>> import torch
        >>> ingredients = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([9.0])}]
        >>> evaluate = lambda sd: -abs(sd["w"].item() - 2.0)  # best when w == 2
        >>> soup, recipe = greedy_soup(ingredients, evaluate, scores=[-1.0, -1.0, -7.0])
        >>> soup
        {'w': tensor([2.])}
        >>> [(r["index"], r["accepted"]) for r in recipe]
        [(0, True), (1, True), (2, False)]
    """
    items = check_state_dicts(ingredients, "ingredients")
    mode = check_mode(mode)
    if not callable(evaluate):
        raise SoupError(f"`evaluate` must be a callable returning a score, got {type(evaluate).__name__}.")
    names = [f"ingredients[{i}]" for i in range(len(items))]
    # dicts, and lazy mappings through meta(), let a mismatch fail before any (possibly hours of) evaluation
    if all(has_metadata(sd) for sd in items):
        check_compatible(items, names)
    if scores is None:
        own = [_score(evaluate(dict(materialize(sd))), f"evaluate(ingredients[{i}])") for i, sd in enumerate(items)]
    else:
        if isinstance(scores, (str, bytes, Mapping)) or not hasattr(scores, "__len__"):
            raise SoupError(
                f"`scores` must be a sequence of {len(items)} numbers (one per ingredient), got {scores!r}."
            )
        if len(scores) != len(items):
            raise SoupError(
                f"`scores` has {len(scores)} values but there are {len(items)} ingredients; give one score per "
                "ingredient, or `scores=None` to evaluate them."
            )
        own = [_score(s, f"scores[{i}]") for i, s in enumerate(scores)]

    finite = [i for i in range(len(items)) if math.isfinite(own[i])]
    if not finite:
        raise SoupError(
            f"Every ingredient's score is NaN or infinite ({own}); there is nothing to build a soup from. Check "
            "`evaluate` / the monitored metric."
        )
    # stable sort: equal scores keep the input order
    order = sorted(finite, key=lambda i: -own[i] if mode == "max" else own[i])
    better = (lambda new, old: new >= old) if mode == "max" else (lambda new, old: new <= old)

    first = order[0]
    best = materialize(items[first])
    check_compatible([best], [names[first]])
    ref_layout = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in best.items()}
    float_keys = [k for k, t in best.items() if t.is_floating_point()]
    targets = None if into is None else _check_into(into, ref_layout, float_keys)
    fixed = copy_non_floating(best, [k for k, t in best.items() if not t.is_floating_point()])
    sums = {k: best[k].to(acc_dtype(best[k].dtype), copy=True) for k in float_keys}
    count = 1
    soup = {k: fixed[k] if k in fixed else best[k].clone() for k in best} if targets is None else {}
    soup_score = own[first]
    pairs = lora_pairs(best.keys())
    factor_keys = [k for p in pairs for k in (p.a_key, p.b_key)]
    members = [{k: best[k] for k in factor_keys}] if pairs else []  # the soup's factors: ΔW is not a sum of them
    soup_lora = {k: best[k] for k in factor_keys}  # the soup's LoRA factors (its pairs are not a mean of factors)
    lora_error = 0.0
    del best
    recipe: list[dict[str, Any]] = [
        {"index": first, "score": own[first], "accepted": True, "soup_score": soup_score, "skipped": False}
    ]
    if pairs:
        recipe[0]["lora_relative_error"] = 0.0

    # With `into`, a tensor whose target has the sum's dtype and device (float32 weights) keeps a running mean
    # instead of a sum: each candidate is then one pass, ``target = lerp(mean, θ, 1/(k+1))``, and an accepted one
    # is copied back. The others keep the sum: the next sum goes into a reused buffer (`trial`), then is divided
    # into the target, rounded once.
    lerp_keys = [] if targets is None else [
        k for k in float_keys
        if k not in factor_keys and targets[k].dtype == sums[k].dtype == ref_layout[k].dtype
        and targets[k].device == sums[k].device
    ]
    sum_keys = [k for k in float_keys if k not in set(lerp_keys)]
    trial: dict[str, Tensor] | None = None  # with `into`: the buffer for the next running sums, reused
    for i in order[1:]:
        sd = materialize(items[i])
        check_compatible([ref_layout, sd], [names[first], names[i]])
        if targets is None:
            new_sums = _add_into(None, sums, sd, float_keys)
            candidate = _mean_into(None, new_sums, ref_layout, count + 1)
        else:
            new_sums = trial = _add_into(trial, sums, sd, sum_keys)
            _mean_into(targets, trial, ref_layout, count + 1)
            for k in lerp_keys:
                torch.lerp(sums[k], move(sd[k], sd[k].dtype, sums[k].device), 1.0 / (count + 1), out=targets[k])
            candidate = {k: targets[k] for k in float_keys}
        new_members = [*members, {k: sd[k] for k in factor_keys}] if pairs else []
        del sd
        # Non-floating entries: fresh copies for a dict the caller may keep; shared (never written) with `into`.
        candidate.update(fixed if targets is not None else {k: v.clone() for k, v in fixed.items()})
        if pairs:
            n = len(new_members)
            lora, report = _merge_pairs(new_members, pairs, [[1.0 / n] * n] * len(pairs))
            candidate.update(lora)
        candidate = {k: candidate[k] for k in ref_layout}
        score = _score(evaluate(candidate), f"evaluate(candidate with ingredients[{i}])")
        accepted = not math.isnan(score) and better(score, soup_score)
        if accepted:
            if targets is None:
                sums = new_sums
            else:
                _copy_([sums[k] for k in lerp_keys], [targets[k] for k in lerp_keys])
                trial = {k: sums[k] for k in sum_keys}  # the replaced sums' buffers take the next ones
                sums.update(new_sums)
            count, soup_score = count + 1, score
            soup = candidate if targets is None else {}
            soup_lora = {k: candidate[k] for k in factor_keys}
            members = new_members
            if pairs:
                lora_error = report.relative_error
        del new_sums, candidate, new_members
        recipe.append({"index": i, "score": own[i], "accepted": accepted, "soup_score": soup_score, "skipped": False})
        if pairs:
            recipe[-1]["lora_relative_error"] = lora_error  # the soup's after this turn

    if targets is not None:  # `into` holds the last candidate: put the soup there
        _copy_([targets[k] for k in lerp_keys], [sums[k] for k in lerp_keys])
        _mean_into(targets, {k: sums[k] for k in sum_keys}, ref_layout, count)
        for k in factor_keys:
            targets[k].copy_(soup_lora[k])
        soup = {k: targets[k] if k in targets else fixed[k] for k in ref_layout}
    tried = set(finite)
    recipe.extend(
        {"index": i, "score": own[i], "accepted": False, "soup_score": None, "skipped": True}
        for i in range(len(items))
        if i not in tried
    )
    return soup, recipe


def _score(value: Any, name: str) -> float:
    """A score as a Python float (a tensor is synced once here: this is per evaluation, not per tensor)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SoupError(f"`{name}` must be a number, got {value!r}.") from None


def _add_into(
    out: dict[str, Tensor] | None, sums: dict[str, Tensor], sd: Mapping[str, Tensor], keys: list[str]
) -> dict[str, Tensor]:
    """``sums + sd``, one pass per tensor, into ``out`` (fresh tensors like ``sums`` when None)."""
    if out is None:
        out = {k: torch.empty_like(sums[k]) for k in keys}
    for k in keys:
        torch.add(sums[k], move(sd[k], sd[k].dtype, sums[k].device), out=out[k])
    return out


def _mean_into(
    out: dict[str, Tensor] | None, sums: dict[str, Tensor], ref: Mapping[str, Tensor], count: int
) -> dict[str, Tensor]:
    """``sums / count``, computed in the sums' dtype and rounded once, into ``out`` (any dtypes and devices; fresh
    tensors in the dtypes of ``ref`` when None). Returns the written tensors, keyed like ``sums``."""
    if out is None:
        out = {k: torch.empty(v.shape, dtype=ref[k].dtype, device=v.device) for k, v in sums.items()}
    for k, v in sums.items():
        if out[k].device == v.device:
            torch.div(v, count, out=out[k])
        else:
            out[k].copy_(v / count, non_blocking=True)
    return {k: out[k] for k in sums}


def _copy_(out: list[Tensor], src: list[Tensor]) -> None:
    if out:
        torch._foreach_copy_(out, src)


def _check_into(into: Any, ref: Mapping[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
    """The tensors of `into` for the floating keys, checked: present, floating, the ingredients' shapes."""
    if not isinstance(into, Mapping):
        raise SoupError(f"`into` must map keys to tensors (e.g. a model's state_dict()), got {type(into).__name__}.")
    missing = [k for k in keys if k not in into]
    bad = [
        f"`{k}`" for k in keys
        if k in into and not (isinstance(into[k], Tensor) and into[k].is_floating_point()
                              and into[k].shape == ref[k].shape)
    ]
    if missing or bad:
        raise SoupError(
            f"`into` must hold a floating tensor of the ingredients' shape for each of their floating keys; "
            f"missing: {missing[:5] or 'none'}, wrong dtype or shape: {bad[:5] or 'none'}."
        )
    return {k: into[k].detach() for k in keys}  # same storage: parameters that require grad are written too
