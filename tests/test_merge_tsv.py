"""TSV-Merge against a float64 NumPy/SciPy reference of the paper's formula, plus its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _spectral import MATRICES, SHAPES, T, assert_close, make_inputs, np64, polar, ref_tsv, svd, taus_of

from lightning_soup import SoupError
from lightning_soup.merge import task_arithmetic, tsv_merge


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 2e-5), (torch.float64, 1e-11), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_matches_reference(dtype: torch.dtype, rtol: float, alpha: float) -> None:
    base, fts = make_inputs(0, dtype)
    out = tsv_merge(base, fts, alpha=alpha)
    assert list(out) == list(base)
    for k in SHAPES:
        ref = np64(base[k]) + alpha * ref_tsv(taus_of(base, fts, k))
        assert out[k].dtype == dtype and out[k].device == base[k].device
        assert_close(out[k], ref, base[k], rtol, key=k)
    for k in ("bn.num_batches_tracked", "position_ids"):  # integer buffers: base's, never merged
        assert torch.equal(out[k], base[k]) and out[k].data_ptr() != base[k].data_ptr()


def test_more_fine_tunes_than_rank_keeps_one_direction_each() -> None:
    # 'thin.weight' is 2 x 7 with T = 3: k = 1, three directions in a 2-D column space (documented behaviour)
    base, fts = make_inputs(1)
    delta = np64(tsv_merge(base, fts)["thin.weight"]) - np64(base["thin.weight"])
    np.testing.assert_allclose(delta, ref_tsv(taus_of(base, fts, "thin.weight")), atol=1e-5)
    assert np.linalg.matrix_rank(delta, tol=1e-4) == 2


def test_one_by_one_weight_is_the_mean() -> None:
    base = {"w": torch.tensor([[1.0]])}
    fts = [{"w": torch.tensor([[x]])} for x in (3.0, -1.0, 2.5)]
    torch.testing.assert_close(tsv_merge(base, fts)["w"], torch.tensor([[1.0 + (2.0 - 2.0 + 1.5) / 3]]))


def test_orthogonal_low_rank_task_vectors_add_up() -> None:
    # rank-k task vectors (k = 6 // 3 = 2) with orthogonal row and column spaces do not interfere: TSV is task
    # arithmetic. (Rank below k would not do: the null directions filling the top k are arbitrary and get mixed in.)
    eye = torch.eye(6, dtype=torch.float64)
    base = {"w": torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    taus = [
        {"w": (1.0 + i) * torch.outer(eye[2 * i], eye[5 - 2 * i]) - 0.5 * torch.outer(eye[2 * i + 1], eye[4 - 2 * i])}
        for i in range(3)
    ]
    fts = [{"w": base["w"] + tv["w"]} for tv in taus]
    expected = task_arithmetic(base, taus, 1.0)["w"]
    torch.testing.assert_close(tsv_merge(base, fts)["w"], expected, rtol=0, atol=1e-12)


def test_one_fine_tune_is_returned() -> None:
    base, fts = make_inputs(2, torch.float64, count=1)
    out = tsv_merge(base, fts)
    for k in SHAPES:
        torch.testing.assert_close(out[k], fts[0][k], rtol=0, atol=1e-12)


def test_alpha_zero_returns_base_and_inputs_are_unchanged() -> None:
    base, fts = make_inputs(3, torch.bfloat16)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *fts)]
    out = tsv_merge(base, fts, alpha=0.0)
    for k in base:
        assert torch.equal(out[k], base[k]), k
    for b, sd in zip(before, (base, *fts)):
        assert all(torch.equal(b[k], sd[k]) for k in sd)


def test_key_by_key_equals_whole_dict() -> None:
    base, fts = make_inputs(4)
    whole = tsv_merge(base, fts, alpha=0.7)
    for k in reversed(list(base)):
        one = tsv_merge({k: base[k]}, [{k: ft[k]} for ft in fts], alpha=0.7)
        assert torch.equal(one[k], whole[k]), k


def test_empty_matrix_and_zero_task_vectors() -> None:
    base = {"e": torch.zeros(0, 4), "w": torch.ones(3, 5)}
    out = tsv_merge(base, [{k: v.clone() for k, v in base.items()}] * T)
    assert out["e"].shape == (0, 4)
    assert torch.equal(out["w"], base["w"])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"alpha": float("nan")}, "`alpha`"), ({"finetuned": []}, "`finetuned` is empty")],
)
def test_bad_arguments(kwargs: dict, fragment: str) -> None:
    base, fts = make_inputs(5)
    with pytest.raises(SoupError, match=fragment):
        tsv_merge(**{"base": base, "finetuned": fts, **kwargs})


def test_mismatched_keys_and_shapes_are_named() -> None:
    base, fts = make_inputs(6)
    fts[1] = dict(fts[1], **{"square.weight": torch.zeros(12, 11)})
    del fts[2]["bias"]
    with pytest.raises(SoupError) as info:
        tsv_merge(base, fts)
    assert "square.weight" in str(info.value) and "'bias'" in str(info.value) and "finetuned[2]" in str(info.value)


@pytest.mark.parametrize("key", [k for k in MATRICES if min(SHAPES[k]) >= T])
def test_update_has_the_concatenated_singular_values(key: str) -> None:
    # what a user can check on a merged model: Δ's singular values are the kept Sᵢ[:k] whenever Tk <= min(m, n)
    base, fts = make_inputs(7, torch.float64)
    delta = np64(tsv_merge(base, fts)[key]) - np64(base[key])
    m, n = SHAPES[key]
    k = min(m, n) // T
    kept = np.sort(np.concatenate([svd(t)[1][:k] for t in taus_of(base, fts, key)]))[::-1]
    np.testing.assert_allclose(svd(delta)[1][: T * k], kept, rtol=1e-10)


def test_low_rank_task_vectors_have_one_merge() -> None:
    # LoRA-like rank-2 updates with k = 20 // 3 = 6: the top-6 of each holds 4 arbitrary null directions, which
    # would sway the orthogonalisation at random; they are left out, giving the rank-2-per-task merge exactly
    g = torch.Generator().manual_seed(9)
    base = {"w": torch.randn(24, 20, generator=g, dtype=torch.float64)}
    factors = [
        (torch.randn(24, 2, generator=g, dtype=torch.float64), torch.randn(2, 20, generator=g, dtype=torch.float64))
        for _ in range(T)
    ]
    fts = [{"w": base["w"] + b @ a} for b, a in factors]
    out = np64(tsv_merge(base, fts)["w"]) - np64(base["w"])
    parts = [svd(np64(b @ a)) for b, a in factors]
    u = np.concatenate([p[0][:, :2] for p in parts], 1)
    vh = np.concatenate([p[2][:2] for p in parts], 0)
    expected = polar(u) @ np.diag(np.concatenate([p[1][:2] for p in parts])) @ polar(vh)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c", "iso_cts"])
def test_an_svd_that_fails_to_converge_in_float32_is_retried_in_float64(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """LAPACK's float32 gesdd can fail to converge on real task vectors: the merge retries in float64 instead of
    raising, and gives the float64 reference to float32 rounding."""
    from lightning_soup import merge

    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(12, 9, generator=gen)}
    fts = [{"w": base["w"] + 0.1 * torch.randn(12, 9, generator=gen)} for _ in range(2)]
    expected = getattr(merge, method)({"w": base["w"].double()}, [{"w": f["w"].double()} for f in fts])["w"]
    real_svd = torch.linalg.svd

    def flaky_svd(x: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    out = getattr(merge, method)(base, fts)["w"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
