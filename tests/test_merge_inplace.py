"""The callbacks' in-place hot-path ops, against float64 references."""

from __future__ import annotations

import pytest
import torch
from _merge_helpers import assert_rounded, f64

from lightning_soup import SoupError
from lightning_soup.merge._inplace import accumulate_, assign_, assign_lerp_, assign_mean_, float32_copy, layer_weights

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _tensors(seed, dtypes, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (7,), (3, 5), (2, 3, 3, 3)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) + offset).to(d) for s, d in zip(shapes, dtypes)]


def test_float32_copy() -> None:
    src = _tensors(0, DTYPES)
    out = float32_copy(src)
    for o, s in zip(out, src):
        want = torch.float64 if s.dtype == torch.float64 else torch.float32  # float64 is never rounded to float32
        assert o.dtype == want and o.shape == s.shape and o.data_ptr() != s.data_ptr()
        assert torch.equal(o.double(), s.double())
    assert float32_copy([]) == []


def test_float32_copy_of_non_contiguous() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    (out,) = float32_copy([t])
    assert torch.equal(out, t)


def test_accumulate_add_and_sub() -> None:
    sums = _tensors(0, [torch.float32, torch.float32, torch.float64, torch.float32])
    start = [f64(s).clone() for s in sums]  # clone: f64() of a float64 tensor is the tensor itself
    add, sub = _tensors(1, DTYPES), _tensors(2, list(reversed(DTYPES)))
    accumulate_(sums, add, sub)
    for s, s0, a, b in zip(sums, start, add, sub):
        assert s.dtype in (torch.float32, torch.float64)
        assert_rounded(s, s0 + f64(a) - f64(b), s0.abs() + f64(a).abs() + f64(b).abs(), acc=s.dtype)
    accumulate_(sums, add)
    s0, a, b = start[1], f64(add[1]), f64(sub[1])
    assert_rounded(sums[1], s0 + 2 * a - b, s0.abs() + 2 * a.abs() + b.abs())


def test_accumulate_length_mismatch() -> None:
    with pytest.raises(SoupError, match=r"same length.*`sums`: 1, `add`: 2"):
        accumulate_([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)])


def test_assign_casts() -> None:
    out = [torch.zeros(3, dtype=d) for d in (torch.bfloat16, torch.float64)]
    src = [torch.tensor([1.0, 2.5, -3.0])] * 2
    assign_(out, src)
    assert out[0].dtype == torch.bfloat16 and torch.equal(out[0].float(), src[0])
    assert out[1].dtype == torch.float64 and torch.equal(out[1], src[1].double())


@pytest.mark.parametrize("count", [1, 3, 7])
def test_assign_mean(count) -> None:
    sums = _tensors(0, [torch.float32, torch.float32, torch.float64, torch.float32], offset=5.0)
    out = [torch.empty(s.shape, dtype=d) for s, d in zip(sums, DTYPES)]
    assign_mean_(out, sums, count)
    for o, s, d in zip(out, sums, DTYPES):
        assert o.dtype == d
        assert_rounded(o, f64(s) / count, acc=s.dtype)  # one rounding from the sum's dtype


@pytest.mark.parametrize("count", [0, -1, 2.0, True])
def test_assign_mean_bad_count(count) -> None:
    with pytest.raises(SoupError, match="`count` must be a positive int"):
        assign_mean_([torch.zeros(1)], [torch.zeros(1)], count)


@pytest.mark.parametrize("alias", ["none", "start", "end"])
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0, -0.5, "per-tensor"])
def test_assign_lerp_same_dtype(alias, weight) -> None:
    start, end = _tensors(0, DTYPES), _tensors(1, DTYPES)
    s0, e0 = [f64(t) for t in start], [f64(t) for t in end]
    weights = [0.0, 0.25, 1.0, 1.5] if weight == "per-tensor" else [weight] * 4
    out = {"none": [torch.empty_like(t) for t in start], "start": start, "end": end}[alias]
    assign_lerp_(out, start, end, weights if weight == "per-tensor" else weight)
    for o, a, b, w, d in zip(out, s0, e0, weights, DTYPES):
        assert o.dtype == d
        acc = torch.float64 if d == torch.float64 else torch.float32
        assert_rounded(o, a + w * (b - a), a.abs() + abs(w) * (a.abs() + b.abs()), acc=acc)
        if w == 0.0:
            assert torch.equal(f64(o), a)
        if w == 1.0:
            assert torch.equal(f64(o), b)


@pytest.mark.parametrize("alias", ["none", "start", "end"])
def test_assign_lerp_mixed_dtypes(alias) -> None:
    # e.g. a float32 anchor copy blended into bf16 module weights in place
    start = _tensors(0, [torch.float32, torch.float32, torch.float64, torch.float32])
    end = _tensors(1, DTYPES)
    s0, e0 = [f64(t) for t in start], [f64(t) for t in end]
    if alias == "start":
        out = start
    elif alias == "end":
        out = end
    else:
        out = [torch.empty(t.shape, dtype=d) for t, d in zip(start, reversed(DTYPES))]
    dtypes = [o.dtype for o in out]
    assign_lerp_(out, start, end, 0.3)
    for o, a, b, d in zip(out, s0, e0, dtypes):
        assert o.dtype == d
        assert_rounded(o, a + 0.3 * (b - a), a.abs() + b.abs())


def test_assign_lerp_bad_weights() -> None:
    t = [torch.zeros(1), torch.zeros(1)]
    with pytest.raises(SoupError, match="`weight` has 1 values for 2 tensors"):
        assign_lerp_(t, t, t, [0.5])
    with pytest.raises(SoupError, match="`weight` must be a finite real number, got nan"):
        assign_lerp_(t, t, t, float("nan"))


def test_layer_weights() -> None:
    keys = ["encoder.0.weight", "encoder.1.weight", "head.weight", "head.bias", "Head.bias"]
    assert layer_weights(keys, 0.5) == [0.5] * 5
    assert layer_weights(keys, 0.5, {"head.*": 1.0, "*.bias": 0.0, "encoder.[0]*": 0.2}) == [0.2, 0.5, 1.0, 1.0, 0.0]
    with pytest.raises(SoupError, match="`ratio` must be a finite real number, got inf"):
        layer_weights(keys, float("inf"))


def test_a_tied_tensor_listed_twice_is_updated_once() -> None:
    # GPT-2's tied embedding: one tensor under `transformer.wte.weight` and `lm_head.weight`
    tied, other = torch.tensor([2.0, 4.0]), torch.tensor([1.0])
    assign_mean_([tied, other, tied], [torch.tensor([6.0, 12.0]), torch.tensor([3.0]), torch.tensor([6.0, 12.0])], 3)
    assert tied.tolist() == [2.0, 4.0] and other.tolist() == [1.0]  # divided once, not twice
    anchor = [torch.zeros(2), torch.zeros(1), torch.zeros(2)]
    assign_lerp_([tied, other, tied], anchor, [tied, other, tied], 0.5)
    assert tied.tolist() == [1.0, 2.0] and other.tolist() == [0.5]  # moved by 0.5, not 0.75
