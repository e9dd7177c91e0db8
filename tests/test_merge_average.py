"""uniform_soup / weighted_average against float64 references."""

from __future__ import annotations

import pytest
import torch
from _merge_helpers import FLOAT_KEYS, INT_KEYS, acc_of, assert_rounded, f64, random_state_dict

from lightning_soup import SoupError
from lightning_soup.merge import uniform_soup, weighted_average


def _reference(sds, weights):
    total = sum(weights)
    ref = {k: sum(w * f64(sd[k]) for w, sd in zip(weights, sds)) / total for k in FLOAT_KEYS}
    mag = {k: sum(w * f64(sd[k]).abs() for w, sd in zip(weights, sds)) / total for k in FLOAT_KEYS}
    return ref, mag


@pytest.mark.parametrize(
    "weights", [None, [1.0, 1.0, 1.0, 1.0], [2.0, 0.5, 1.0, 3.5], [0.0, 1.0, 0.0, 2.0], [0, 0, 0, 7]]
)
def test_matches_float64_reference(weights) -> None:
    mixed = [{}, {"temperature": torch.bfloat16, "conv.weight": torch.float16}, {"fc.weight": torch.float32}, {}]
    sds = [random_state_dict(i, mixed[i], offset=3.0) for i in range(4)]
    out = uniform_soup(sds) if weights is None else weighted_average(sds, weights)
    ref, mag = _reference(sds, weights or [1.0] * 4)
    for k in FLOAT_KEYS:
        assert out[k].dtype == sds[0][k].dtype
        assert_rounded(out[k], ref[k], mag[k], acc_of(*(sd[k].dtype for sd in sds)), key=k)
    for k in INT_KEYS:
        assert torch.equal(out[k], sds[0][k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_many_low_precision_inputs_accumulate_in_float32(dtype) -> None:
    # eight inputs: rounding a bf16/fp16 running mean at every step would be off by several ulps
    g = torch.Generator().manual_seed(0)
    sds = [{"w": (torch.randn(4096, generator=g, dtype=torch.float64) + 5.0).to(dtype)} for _ in range(8)]
    out = uniform_soup(sds, allow_unrelated=True)["w"]  # independent draws: unrelated by design
    ref = sum(f64(sd["w"]) for sd in sds) / 8
    assert out.dtype == dtype
    assert_rounded(out, ref, acc=acc_of(dtype))


def test_single_input_is_a_copy() -> None:
    sd = random_state_dict(0)
    out = uniform_soup([sd])
    for k in sd:
        assert torch.equal(out[k], sd[k]) and out[k].data_ptr() != sd[k].data_ptr()


def test_zero_weight_first_input_still_sets_the_dtype() -> None:
    first = {"w": torch.tensor([8.0, 8.0], dtype=torch.bfloat16)}
    others = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    out = weighted_average([first, *others], [0.0, 1.0, 1.0])["w"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([2.0, 3.0], dtype=torch.bfloat16))


def test_weights_are_relative() -> None:
    sds = [random_state_dict(i) for i in range(3)]
    a, b = weighted_average(sds, [1, 2, 3]), weighted_average(sds, [10, 20, 30])
    for k in FLOAT_KEYS:
        torch.testing.assert_close(a[k], b[k])


def test_zero_weight_input_is_ignored_but_still_checked() -> None:
    sds = [random_state_dict(i) for i in range(3)]
    out = weighted_average(sds, [1.0, 0.0, 1.0])
    expected = uniform_soup([sds[0], sds[2]])
    for k in FLOAT_KEYS:
        torch.testing.assert_close(out[k], expected[k], rtol=0, atol=0)
    sds[1]["extra"] = torch.zeros(1)
    with pytest.raises(SoupError, match="extra"):
        weighted_average(sds, [1.0, 0.0, 1.0])


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, 2.0], r"`weights` has 2 values but there are 3 state dicts"),
        ([1.0, -1.0, 2.0], r"`weights` must be finite, non-negative.*weights\[1\]=-1.0"),
        ([float("nan"), 1.0, float("inf")], r"weights\[0\]=nan, weights\[2\]=inf"),
        ([0, 0, 0], r"`weights` sum to zero"),
        (1.0, r"`weights` must be a sequence of 3 numbers"),
        (["a", 1, 1], r"weights\[0\]='a'"),
    ],
)
def test_bad_weights(weights, match) -> None:
    sds = [random_state_dict(i) for i in range(3)]
    with pytest.raises(SoupError, match=match):
        weighted_average(sds, weights)


def test_bad_state_dicts() -> None:
    with pytest.raises(SoupError, match="`state_dicts` is empty"):
        uniform_soup([])
    with pytest.raises(SoupError, match=r"got a single mapping; wrap it in a list"):
        uniform_soup(random_state_dict(0))
    with pytest.raises(SoupError, match=r"`state_dicts\[1\]` is empty"):
        uniform_soup([random_state_dict(0), {}])
    with pytest.raises(SoupError, match=r"state_dicts\[1\] is int"):
        uniform_soup([random_state_dict(0), 3])
    ckpt = {"epoch": 3, "state_dict": random_state_dict(0)}
    with pytest.raises(SoupError, match=r"`state_dicts\[0\]`\['epoch'\] is int.*\['state_dict'\]"):
        uniform_soup([ckpt, ckpt])
