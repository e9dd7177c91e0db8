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
    fixed = copy_non_floating(best, [k for k, t in best.items() if not t.is_floating_point()])
    sums = {k: best[k].to(acc_dtype(best[k].dtype), copy=True) for k in float_keys}
    count = 1
    soup = {k: fixed[k] if k in fixed else best[k].clone() for k in best}
    soup_score = own[first]
    pairs = lora_pairs(best.keys())
    factor_keys = [k for p in pairs for k in (p.a_key, p.b_key)]
    members = [{k: best[k] for k in factor_keys}] if pairs else []  # the soup's factors: ΔW is not a sum of them
    lora_error = 0.0
    del best
    recipe: list[dict[str, Any]] = [
        {"index": first, "score": own[first], "accepted": True, "soup_score": soup_score, "skipped": False}
    ]
    if pairs:
        recipe[0]["lora_relative_error"] = 0.0

    for i in order[1:]:
        sd = materialize(items[i])
        check_compatible([ref_layout, sd], [names[first], names[i]])
        new_sums = _add(sums, sd, float_keys)
        new_members = [*members, {k: sd[k] for k in factor_keys}] if pairs else []
        del sd
        candidate = _mean(new_sums, ref_layout, count + 1)
        candidate.update({k: v.clone() for k, v in fixed.items()})
        if pairs:
            n = len(new_members)
            lora, report = _merge_pairs(new_members, pairs, [[1.0 / n] * n] * len(pairs))
            candidate.update(lora)
        candidate = {k: candidate[k] for k in ref_layout}
        score = _score(evaluate(candidate), f"evaluate(candidate with ingredients[{i}])")
        accepted = not math.isnan(score) and better(score, soup_score)
        if accepted:
            sums, count, soup, soup_score = new_sums, count + 1, candidate, score
            members = new_members
            if pairs:
                lora_error = report.relative_error
        del new_sums, candidate, new_members
        recipe.append({"index": i, "score": own[i], "accepted": accepted, "soup_score": soup_score, "skipped": False})
        if pairs:
            recipe[-1]["lora_relative_error"] = lora_error  # the soup's after this turn

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


def _add(sums: dict[str, Tensor], sd: Mapping[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
    """``sums + sd`` as fresh tensors, one ``_foreach_add`` per (dtype, device) group."""
    out: dict[str, Tensor] = {}
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for k in keys:
        groups.setdefault((sums[k].dtype, sums[k].device), []).append(k)
    for (dtype, device), gkeys in groups.items():
        other = [move(sd[k], sd[k].dtype, device) for k in gkeys]
        if all(o.dtype == dtype for o in other):
            out.update(zip(gkeys, torch._foreach_add([sums[k] for k in gkeys], other)))
        else:
            fresh = [sums[k].clone() for k in gkeys]
            torch._foreach_add_(fresh, other)  # in-place adds promote bf16/fp16 to the sum's dtype
            out.update(zip(gkeys, fresh))
    return out


def _mean(sums: dict[str, Tensor], ref: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """``sums / count`` in the dtypes of `ref`, rounded once."""
    same = [k for k, v in sums.items() if v.dtype == ref[k].dtype]
    out = dict(zip(same, torch._foreach_div([sums[k] for k in same], count))) if same else {}
    for k, v in sums.items():
        if v.dtype != ref[k].dtype:
            # mixed dtypes run one kernel per tensor in PyTorch anyway; out= divides in float32, casts on store
            out[k] = torch.div(v, count, out=torch.empty(v.shape, dtype=ref[k].dtype, device=v.device))
    return out
