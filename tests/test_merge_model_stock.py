"""Model Stock against a float64 NumPy reference of the paper's ratio, hand-worked angles, and its invariants."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from _spectral import SHAPES, assert_close, make_inputs, np64, ref_model_stock, taus_of

from lightning_soup import SoupError
from lightning_soup.merge import model_stock


def _related(seed: int, dtype: torch.dtype, count: int = 3):
    """Fine-tunes that share a direction besides their own, as real ones do (positive cosines)."""
    base, fts = make_inputs(seed, dtype, count=count)
    for ft in fts:
        for k in SHAPES:
            ft[k] = (ft[k].double() + 0.1 * (1 + torch.arange(ft[k].numel()) % 3).reshape(SHAPES[k])).to(dtype)
    return base, fts


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-13), (torch.bfloat16, 1e-6)])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_matches_reference(dtype: torch.dtype, rtol: float, count: int) -> None:
    base, fts = _related(0, dtype, count)
    out = model_stock(base, fts)
    assert list(out) == list(base)
    for k in SHAPES:
        ref = ref_model_stock(np64(base[k]), [np64(ft[k]) for ft in fts])
        assert out[k].dtype == dtype
        assert_close(out[k], ref, base[k], rtol, key=k)
    for k in ("bn.num_batches_tracked", "position_ids"):
        assert torch.equal(out[k], base[k])


@pytest.mark.parametrize(("degrees", "t"), [(0, 1.0), (60, 2 / 3), (90, 0.0), (120, 0.0), (180, 0.0)])
def test_two_fine_tunes_at_an_angle(degrees: float, t: float) -> None:
    # N = 2: t = 2cosθ / (1 + cosθ); a negative cosine is clamped to 0 (documented): the base is kept
    a = math.radians(degrees)
    base = {"w": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}
    fts = [{"w": base["w"] + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)},
           {"w": base["w"] + torch.tensor([2 * math.cos(a), 2 * math.sin(a), 0.0], dtype=torch.float64)}]
    mean = (fts[0]["w"] + fts[1]["w"]) / 2
    torch.testing.assert_close(model_stock(base, fts)["w"], t * mean + (1 - t) * base["w"], rtol=0, atol=1e-12)


def test_untrained_tensor_and_zero_task_vector() -> None:
    # a tensor no fine-tune changed stays the base; one fine-tune that did not change it counts as cosine 0
    base = {"frozen": torch.ones(4), "w": torch.zeros(2)}
    fts = [{"frozen": torch.ones(4), "w": torch.tensor([1.0, 0.0])},
           {"frozen": torch.ones(4), "w": torch.tensor([1.0, 0.0])},
           {"frozen": torch.ones(4), "w": torch.zeros(2)}]
    out = model_stock(base, fts)
    assert torch.equal(out["frozen"], base["frozen"])
    c = (1 + 0 + 0) / 3  # pairs (0, 1), (0, 2), (1, 2)
    t = 3 * c / (1 + 2 * c)
    torch.testing.assert_close(out["w"], torch.tensor([t * 2 / 3, 0.0]))


def test_inputs_unchanged_and_key_by_key() -> None:
    base, fts = make_inputs(2, torch.bfloat16)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *fts)]
    whole = model_stock(base, fts)
    for b, sd in zip(before, (base, *fts)):
        assert all(torch.equal(b[k], sd[k]) for k in sd)
    for k in reversed(list(base)):
        assert torch.equal(model_stock({k: base[k]}, [{k: ft[k]} for ft in fts])[k], whole[k]), k


def test_needs_two_fine_tunes() -> None:
    base, fts = make_inputs(3, count=1)
    with pytest.raises(SoupError, match="needs at least 2 fine-tunes"):
        model_stock(base, fts)


def test_ratio_is_computed_per_tensor() -> None:
    base, fts = _related(4, torch.float64)
    out = model_stock(base, fts)
    ts = []
    for k in ("square.weight", "bias"):
        taus = taus_of(base, fts, k)
        moved = (np64(out[k]) - np64(base[k])).ravel()
        ts.append(moved @ np.mean(taus, axis=0).ravel() / np.linalg.norm(np.mean(taus, axis=0)) ** 2)
    assert 0 < ts[0] < 1 and 0 < ts[1] < 1 and abs(ts[0] - ts[1]) > 1e-2  # two tensors, two ratios


def test_slices_add_up_to_the_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    # the Gram matrix and the sum are accumulated slice by slice: 7-entry slices give the reference too
    base, fts = _related(5, torch.float32)
    monkeypatch.setattr(importlib.import_module("lightning_soup.merge.model_stock"), "_SLICE", 7)
    out = model_stock(base, fts)
    for k in SHAPES:
        assert_close(out[k], ref_model_stock(np64(base[k]), [np64(ft[k]) for ft in fts]), base[k], 1e-6, key=k)
