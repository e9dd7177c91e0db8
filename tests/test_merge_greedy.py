"""greedy_soup with a fake evaluate: accept/reject sequence, ties, min mode, NaN scores, single reads."""

from __future__ import annotations

import math

import pytest
import torch
from _merge_helpers import (
    FLOAT_KEYS,
    INT_KEYS,
    CountingMapping,
    LazyMapping,
    acc_of,
    assert_rounded,
    f64,
    random_state_dict,
)

from lightning_soup import SoupError
from lightning_soup.merge import greedy_soup


def _ingredients(values):
    return [{"w": torch.tensor([float(v)]), "steps": torch.tensor(i)} for i, v in enumerate(values)]


def _distance_to(target):
    return lambda sd: -abs(float(sd["w"][0]) - target)


def test_accept_reject_sequence() -> None:
    items = [CountingMapping(sd) for sd in _ingredients([1.0, 3.0, 9.0, 2.5])]
    seen = []

    def evaluate(sd):
        seen.append(float(sd["w"][0]))
        return _distance_to(2.0)(sd)

    soup, recipe = greedy_soup(items, evaluate, scores=[-1.0, -1.0, -7.0, -0.5])
    # order by score, equal scores in input order: 3, 0, 1, 2
    assert [r["index"] for r in recipe] == [3, 0, 1, 2]
    assert [r["accepted"] for r in recipe] == [True, True, True, False]
    assert [r["score"] for r in recipe] == [-0.5, -1.0, -1.0, -7.0]
    expected_soup_scores = [-0.5, -0.25, -(6.5 / 3 - 2), -(6.5 / 3 - 2)]
    assert [r["soup_score"] for r in recipe] == pytest.approx(expected_soup_scores)
    assert not any(r["skipped"] for r in recipe)
    assert set(recipe[0]) == {"index", "score", "accepted", "soup_score", "skipped"}
    assert seen == pytest.approx([1.75, 6.5 / 3, 15.5 / 4])  # (sum + x) / (k + 1), singles not re-evaluated
    torch.testing.assert_close(soup["w"], torch.tensor([6.5 / 3]))
    assert torch.equal(soup["steps"], torch.tensor(3))  # integer buffers from the best ingredient
    assert [m.times_read for m in items] == [1, 1, 1, 1]


def test_equal_score_is_accepted_and_worse_is_not() -> None:
    items = _ingredients([1.0, 2.0, 3.0])
    _, recipe = greedy_soup(items, lambda sd: 0.5, scores=[0.5, 0.5, 0.5])
    assert [r["accepted"] for r in recipe] == [True, True, True]
    _, recipe = greedy_soup(items, lambda sd: 0.5 - 1e-9, scores=[0.5, 0.4, 0.3])
    assert [r["accepted"] for r in recipe] == [True, False, False]
    assert [r["soup_score"] for r in recipe] == [0.5, 0.5, 0.5]


def test_min_mode() -> None:
    items = _ingredients([1.0, 3.0, 9.0, 2.5])
    loss = lambda sd: abs(float(sd["w"][0]) - 2.0)  # noqa: E731
    soup, recipe = greedy_soup(items, loss, mode="min", scores=[1.0, 1.0, 7.0, 0.5])
    assert [r["index"] for r in recipe] == [3, 0, 1, 2]
    assert [r["accepted"] for r in recipe] == [True, True, True, False]
    _, recipe = greedy_soup(items, lambda sd: 1.0, mode="min", scores=[1.0, 1.0, 1.0, 1.0])
    assert all(r["accepted"] for r in recipe)  # `<=`: equal loss is accepted
    _, recipe = greedy_soup(items, lambda sd: 1.0 + 1e-9, mode="min", scores=[1.0, 1.0, 1.0, 1.0])
    assert [r["accepted"] for r in recipe] == [True, False, False, False]


def test_non_finite_scores_are_skipped_and_never_read() -> None:
    items = [CountingMapping(sd) for sd in _ingredients([1.0, 3.0, 9.0, 2.5])]
    soup, recipe = greedy_soup(items, _distance_to(2.0), scores=[math.nan, -1.0, math.inf, -0.5])
    assert [(r["index"], r["skipped"], r["accepted"], r["soup_score"]) for r in recipe[2:]] == [
        (0, True, False, None), (2, True, False, None)
    ]
    assert [(r["index"], r["accepted"]) for r in recipe[:2]] == [(3, True), (1, False)]  # 2.75 is worse than 2.5
    assert [m.times_read for m in items] == [0, 1, 0, 1]
    torch.testing.assert_close(soup["w"], torch.tensor([2.5]))


def test_nan_candidate_score_is_rejected() -> None:
    items = _ingredients([1.0, 2.0])
    _, recipe = greedy_soup(items, lambda sd: math.nan, scores=[1.0, 0.0])
    assert [r["accepted"] for r in recipe] == [True, False]


def test_scores_none_evaluates_each_ingredient_first() -> None:
    items = [CountingMapping(sd) for sd in _ingredients([1.0, 3.0, 9.0, 2.5])]
    calls = []

    def evaluate(sd):
        calls.append(float(sd["w"][0]))
        return _distance_to(2.0)(sd)

    _, recipe = greedy_soup(items, evaluate)
    assert calls[:4] == [1.0, 3.0, 9.0, 2.5]  # singles, in input order
    assert len(calls) == 4 + 3
    assert [r["score"] for r in recipe] == [-0.5, -1.0, -1.0, -7.0]
    assert [m.times_read for m in items] == [2, 2, 2, 2]  # documented: once to score, once to mix


def test_candidates_are_exact_means_in_the_original_dtypes() -> None:
    dtypes = {"conv.weight": torch.bfloat16, "fc.weight": torch.float32}
    items = [random_state_dict(i, dtypes if i else {}, offset=2.0) for i in range(4)]
    candidates = []

    def evaluate(sd):
        candidates.append(sd)
        return 10.0  # better than every own score: everything is accepted

    soup, recipe = greedy_soup(items, evaluate, scores=[4.0, 3.0, 2.0, 1.0])
    assert all(r["accepted"] for r in recipe)
    for n, cand in enumerate(candidates + [soup], start=2):
        n = min(n, 4)
        for k in FLOAT_KEYS:
            ref = sum(f64(sd[k]) for sd in items[:n]) / n
            assert cand[k].dtype == items[0][k].dtype
            mag = sum(f64(sd[k]).abs() for sd in items[:n]) / n
            assert_rounded(cand[k], ref, mag, acc_of(items[0][k].dtype), key=k)
        for k in INT_KEYS:
            assert torch.equal(cand[k], items[0][k])


def test_errors() -> None:
    items = _ingredients([1.0, 2.0])
    with pytest.raises(SoupError, match="`ingredients` is empty"):
        greedy_soup([], lambda sd: 0.0, scores=[])
    with pytest.raises(SoupError, match=r"`mode` must be 'max' or 'min', got 'maximize'"):
        greedy_soup(items, lambda sd: 0.0, mode="maximize", scores=[1.0, 2.0])
    with pytest.raises(SoupError, match=r"`scores` has 3 values but there are 2 ingredients"):
        greedy_soup(items, lambda sd: 0.0, scores=[1.0, 2.0, 3.0])
    with pytest.raises(SoupError, match=r"Every ingredient's score is NaN or infinite"):
        greedy_soup(items, lambda sd: 0.0, scores=[math.nan, -math.inf])
    with pytest.raises(SoupError, match=r"`scores\[1\]` must be a number, got 'high'"):
        greedy_soup(items, lambda sd: 0.0, scores=[1.0, "high"])
    with pytest.raises(SoupError, match=r"must be a number, got \{'acc': 1.0\}"):
        greedy_soup(items, lambda sd: {"acc": 1.0}, scores=[1.0, 2.0])
    with pytest.raises(SoupError, match="`evaluate` must be a callable"):
        greedy_soup(items, None, scores=[1.0, 2.0])
    bad = [*items, {"w": torch.zeros(2), "steps": torch.tensor(0)}]
    match = r"'w': `ingredients\[0\]` has shape \(1,\), `ingredients\[2\]` has shape \(2,\)"
    calls = []
    with pytest.raises(SoupError, match=match):
        greedy_soup(bad, lambda sd: calls.append(sd) or 0.0)
    assert calls == []  # checked before evaluating anything
    # a mapping without metadata is checked when it is read
    lazy_bad = [CountingMapping(sd) for sd in bad]
    match = r"'w': `ingredients\[1\]` has shape \(1,\), `ingredients\[2\]` has shape \(2,\)"
    with pytest.raises(SoupError, match=match):
        greedy_soup(lazy_bad, lambda sd: 0.0, scores=[1.0, 2.0, 0.5])


def test_lazy_ingredients_are_checked_before_any_evaluation() -> None:
    bad = {"w": torch.zeros(2), "steps": torch.tensor(0)}
    items = [LazyMapping(sd) for sd in [*_ingredients([1.0, 2.0]), bad]]
    calls = []
    with pytest.raises(SoupError, match="'w'"):
        greedy_soup(items, lambda sd: calls.append(1) or 0.0, scores=[1.0, 2.0, 0.5])
    assert calls == [] and all(set(m.reads.values()) == {0} for m in items)


def test_evaluate_may_return_a_tensor() -> None:
    soup, recipe = greedy_soup(_ingredients([1.0, 3.0]), lambda sd: torch.tensor(1.0), scores=[torch.tensor(1.0), 0.5])
    assert recipe[1]["soup_score"] == 1.0 and isinstance(recipe[1]["soup_score"], float)
    assert isinstance(recipe[0]["score"], float)


# ------------------------------------------------------------------------------------------ candidates built in place


def _into_like(sd):
    return {k: torch.full_like(v, float("nan")) for k, v in sd.items() if v.is_floating_point()}


@pytest.mark.parametrize("conv_dtype", [torch.float32, torch.bfloat16], ids=["fp32-lerp", "bf16-sum"])
def test_into_builds_every_candidate_in_place_and_ends_holding_the_soup(conv_dtype) -> None:
    """With `into` (the callbacks pass the module's tensors), every candidate is written into the same tensors:
    nothing is allocated per candidate. The candidates and the soup are still the members' means, rounded once."""
    items = [random_state_dict(i, {"conv.weight": conv_dtype}, offset=2.0) for i in range(5)]
    before = [{k: v.clone() for k, v in sd.items()} for sd in items]
    into = _into_like(items[0])
    ptrs = {k: v.data_ptr() for k, v in into.items()}
    # own scores: 4 (best), 3, 2, 1, 0; candidates: accept, reject, accept, reject
    verdicts = iter([10.0, -10.0, 10.0, -10.0])
    seen = []

    def evaluate(sd):
        assert all(sd[k].data_ptr() == ptrs[k] for k in into), "a candidate was not built in `into`"
        seen.append({k: v.clone() for k, v in sd.items()})
        return next(verdicts)

    soup, recipe = greedy_soup(items, evaluate, scores=[4.0, 3.0, 2.0, 1.0, 0.0], into=into)
    assert [r["accepted"] for r in recipe] == [True, True, False, True, False]
    members_at = [[0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 3, 4]]  # each candidate's members
    for cand, members in zip([*seen, None], [*members_at, [0, 1, 3]]):
        cand = soup if cand is None else cand
        for k in FLOAT_KEYS:
            ref = sum(f64(items[j][k]) for j in members) / len(members)
            mag = sum(f64(items[j][k]).abs() for j in members) / len(members)
            assert cand[k].dtype == items[0][k].dtype
            assert_rounded(cand[k], ref, mag, acc_of(items[0][k].dtype), key=k)
        for k in INT_KEYS:
            assert torch.equal(cand[k], items[0][k])
    assert all(soup[k].data_ptr() == into[k].data_ptr() == ptrs[k] for k in into)  # the soup is in `into`
    assert all(torch.equal(a[k], b[k]) for a, b in zip(items, before) for k in a)  # the inputs are untouched
    # The same decisions and soup as without `into`.
    verdicts = iter([10.0, -10.0, 10.0, -10.0])
    plain, plain_recipe = greedy_soup(items, lambda sd: next(verdicts), scores=[4.0, 3.0, 2.0, 1.0, 0.0])
    assert plain_recipe == recipe
    for k in FLOAT_KEYS:
        torch.testing.assert_close(soup[k].double(), plain[k].double(), rtol=1e-6, atol=1e-6)


def test_into_with_lora_pairs_holds_the_soups_pairs() -> None:
    g = torch.Generator().manual_seed(0)

    def adapter():
        return {
            "q.lora_A.default.weight": torch.randn(2, 6, generator=g),
            "q.lora_B.default.weight": torch.randn(5, 2, generator=g),
            "head.weight": torch.randn(3, 5, generator=g),
        }

    items = [adapter() for _ in range(3)]
    into = _into_like(items[0])
    plain, plain_recipe = greedy_soup(items, lambda sd: 10.0, scores=[3.0, 2.0, 1.0])
    soup, recipe = greedy_soup(items, lambda sd: 10.0, scores=[3.0, 2.0, 1.0], into=into)
    assert recipe == plain_recipe and all(r["accepted"] for r in recipe)
    # The pairs are the best rank-2 pairs for the mean ΔW (not the factors' means), as without `into`.
    assert recipe[-1]["lora_relative_error"] > 0
    for k in ("q.lora_A.default.weight", "q.lora_B.default.weight"):
        assert soup[k].data_ptr() == into[k].data_ptr()
        torch.testing.assert_close(into[k], plain[k], rtol=0, atol=0)
    ref = sum(sd["head.weight"].double() for sd in items) / 3
    torch.testing.assert_close(into["head.weight"].double(), ref, rtol=1e-6, atol=1e-6)


def test_into_must_fit_the_ingredients() -> None:
    items = [random_state_dict(i) for i in range(2)]
    key = FLOAT_KEYS[0]
    good = _into_like(items[0])
    cases = {
        "missing": {k: v for k, v in good.items() if k != key},
        "shape": {**good, key: torch.zeros(3, 3, 3)},
        "dtype": {**good, key: torch.zeros(items[0][key].shape, dtype=torch.int64)},
    }
    for into in cases.values():
        with pytest.raises(SoupError, match=r"`into`"):
            greedy_soup(items, lambda sd: 0.0, scores=[1.0, 0.0], into=into)
    with pytest.raises(SoupError, match=r"`into` must map keys"):
        greedy_soup(items, lambda sd: 0.0, scores=[1.0, 0.0], into=[torch.zeros(1)])


def test_into_a_models_parameters_leaves_the_soup_in_the_model() -> None:
    """`into` may be a module's own parameters (they require grad): the module ends up holding the soup."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    items = [{k: v.detach() + torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()} for _ in range(3)]
    verdicts = iter([1.0, -1.0])  # accept the second, reject the third
    soup, recipe = greedy_soup(
        items, lambda sd: next(verdicts), scores=[0.5, 0.4, 0.3], into=dict(model.named_parameters())
    )
    assert [r["accepted"] for r in recipe] == [True, True, False]
    for k, p in model.named_parameters():
        expected = (f64(items[0][k]) + f64(items[1][k])) / 2
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-6)
        assert p.requires_grad and soup[k].data_ptr() == p.data_ptr()
