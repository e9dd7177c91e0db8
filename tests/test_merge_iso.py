"""Iso-C and Iso-CTS against float64 NumPy/SciPy references of the paper's formulas, plus their invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _spectral import (
    MATRICES,
    SHAPES,
    T,
    assert_close,
    make_inputs,
    np64,
    polar,
    ref_iso_c,
    ref_iso_cts,
    svd,
    taus_of,
)

from lightning_soup import SoupError
from lightning_soup.merge import iso_c, iso_cts
from lightning_soup.merge.iso_cts import subspace_sizes


DTYPES = [(torch.float32, 2e-5), (torch.float64, 1e-11), (torch.bfloat16, 2e-5)]


@pytest.mark.parametrize(("dtype", "rtol"), DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_iso_c_matches_reference(dtype: torch.dtype, rtol: float, alpha: float) -> None:
    base, fts = make_inputs(0, dtype)
    out = iso_c(base, fts, alpha=alpha)
    assert list(out) == list(base)
    for k in SHAPES:
        ref = np64(base[k]) + alpha * ref_iso_c(taus_of(base, fts, k))
        assert out[k].dtype == dtype
        assert_close(out[k], ref, base[k], rtol, key=k)
    for k in ("bn.num_batches_tracked", "position_ids"):
        assert torch.equal(out[k], base[k])


@pytest.mark.parametrize(("dtype", "rtol"), [(d, 2.5 * r) for d, r in DTYPES])  # a common-subspace edge moves a bit
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_matches_reference(dtype: torch.dtype, rtol: float, fraction: float) -> None:
    base, fts = make_inputs(1, dtype)
    out = iso_cts(base, fts, alpha=1.3, common_fraction=fraction)
    assert list(out) == list(base)
    for k in SHAPES:
        ref = np64(base[k]) + 1.3 * ref_iso_cts(taus_of(base, fts, k), fraction)
        assert out[k].dtype == dtype
        assert_close(out[k], ref, base[k], rtol, key=k)
    for k in ("bn.num_batches_tracked", "position_ids"):
        assert torch.equal(out[k], base[k])


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (768, 8, 0.8, (616, 19)),  # ViT-B: 614 common, 154 left, 19 per task, the common space takes the remainder
        (16, 3, 0.8, (13, 1)),  # round(4/3) = 1
        (12, 3, 0.0, (0, 4)),  # no common subspace: TSV with a flat spectrum
        (4, 2, 0.75, (4, 0)),  # round(0.5) = 0 (half to even, as Python's round in the reference): Iso-C
        (5, 2, 0.5, (1, 2)),  # round(1.5) = 2
        (2, 3, 0.0, (2, 0)),  # the reference would ask for 3 task directions in a rank-2 matrix; capped
    ],
)
def test_subspace_sizes(rank: int, tasks: int, fraction: float, expected: tuple[int, int]) -> None:
    assert subspace_sizes(rank, tasks, fraction) == expected


def test_task_specific_directions_are_used() -> None:
    # 'square.weight' (12 x 12, T = 3) at f = 0.5: 6 common + 2 per task, so Iso-CTS differs from Iso-C
    base, fts = make_inputs(2, torch.float64)
    a, b = iso_cts(base, fts, common_fraction=0.5)["square.weight"], iso_c(base, fts)["square.weight"]
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("key", MATRICES)
def test_iso_cts_is_iso_c_without_room_for_tasks(key: str) -> None:
    base, fts = make_inputs(3)
    one = {key: base[key]}, [{key: ft[key]} for ft in fts]
    torch.testing.assert_close(iso_cts(*one, common_fraction=1.0)[key], iso_c(*one)[key], rtol=0, atol=1e-5)
    if min(SHAPES[key]) < T:  # 'thin.weight' (2 x 7): T > min(m, n), Iso-C at any fraction
        torch.testing.assert_close(iso_cts(*one, common_fraction=0.0)[key], iso_c(*one)[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_flat_spectrum(method) -> None:
    # what a user can check on a merged model: every singular value of a full-rank Δ is the same
    base, fts = make_inputs(4, torch.float64)
    for k in MATRICES:
        s = svd(np64(method(base, fts)[k]) - np64(base[k]))[1]
        np.testing.assert_allclose(s, s[0], rtol=1e-9)


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_alpha_zero_inputs_unchanged_and_key_by_key(method) -> None:
    base, fts = make_inputs(5, torch.bfloat16)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *fts)]
    zero = method(base, fts, alpha=0.0)
    assert all(torch.equal(zero[k], base[k]) for k in base)
    whole = method(base, fts, alpha=0.9)
    for b, sd in zip(before, (base, *fts)):
        assert all(torch.equal(b[k], sd[k]) for k in sd)
    for k in reversed(list(base)):
        one = method({k: base[k]}, [{k: ft[k]} for ft in fts], alpha=0.9)
        assert torch.equal(one[k], whole[k]), k


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_one_fine_tune(method) -> None:
    # one task vector: Iso-C and Iso-CTS both give its polar factor times its mean singular value
    base, fts = make_inputs(6, torch.float64, count=1)
    out = method(base, fts)
    for k in SHAPES:
        (tau,) = taus_of(base, fts, k)
        delta = svd(tau)[1].mean() * polar(tau) if tau.ndim == 2 else tau
        np.testing.assert_allclose(np64(out[k]), np64(base[k]) + delta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", [iso_c, iso_cts])
def test_zero_task_vectors_and_empty_matrix(method) -> None:
    base = {"e": torch.zeros(4, 0), "w": torch.ones(3, 5), "b": torch.ones(3)}
    out = method(base, [{k: v.clone() for k, v in base.items()}] * T)
    assert out["e"].shape == (4, 0)
    assert torch.equal(out["w"], base["w"]) and torch.equal(out["b"], base["b"])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"alpha": float("inf")}, "`alpha`"),
        ({"common_fraction": 1.5}, r"`common_fraction` must be a number in \[0, 1\], got 1.5"),
        ({"common_fraction": "0.8"}, "`common_fraction`"),
        ({"finetuned": [{}]}, "empty"),
    ],
)
def test_iso_cts_bad_arguments(kwargs: dict, fragment: str) -> None:
    base, fts = make_inputs(7)
    with pytest.raises(SoupError, match=fragment):
        iso_cts(**{"base": base, "finetuned": fts, **kwargs})


@pytest.mark.parametrize("fraction", [None, 0.8, 0.5, 0.0])
def test_low_rank_task_vectors_have_one_merge(fraction) -> None:
    # LoRA-like rank-2 updates: the sum has rank 6 < 20, the projected task vectors are ~0; the arbitrary null
    # directions LAPACK returns are left out, so the result is the float64 reference built without them
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.randn(24, 20, generator=g, dtype=torch.float64)}
    fts = [{"w": base["w"] + torch.randn(24, 2, generator=g, dtype=torch.float64)
            @ torch.randn(2, 20, generator=g, dtype=torch.float64)} for _ in range(T)]
    taus = taus_of(base, fts, "w")
    if fraction is None:
        out, ref = iso_c(base, fts)["w"], ref_iso_c(taus)
    else:
        out, ref = iso_cts(base, fts, common_fraction=fraction)["w"], ref_iso_cts(taus, fraction)
    np.testing.assert_allclose(np64(out), np64(base["w"]) + ref, rtol=0, atol=1e-10)
    assert np.linalg.matrix_rank(np64(out) - np64(base["w"]), tol=1e-8) == 6
