"""task_vector / task_arithmetic / interpolate against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from _merge_helpers import FLOAT_KEYS, INT_KEYS, acc_of, assert_rounded, f64, random_state_dict

from lightning_soup import SoupError
from lightning_soup.merge import interpolate, task_arithmetic, task_vector

MIXED = {
    "temperature": torch.bfloat16,
    "conv.weight": torch.float16,
    "fc.weight": torch.float32,
    "embed.weight": torch.float64,
}


def test_task_vector() -> None:
    base, ft = random_state_dict(0), random_state_dict(1, MIXED)
    tv = task_vector(ft, base)
    assert list(tv) == FLOAT_KEYS
    for k in FLOAT_KEYS:
        acc = acc_of(ft[k].dtype, base[k].dtype)
        assert tv[k].dtype == acc
        assert_rounded(tv[k], f64(ft[k]) - f64(base[k]), f64(ft[k]).abs() + f64(base[k]).abs(), acc, key=k)


def test_task_vector_of_identical_models_is_zero() -> None:
    sd = random_state_dict(0)
    assert all(bool((v == 0).all()) for v in task_vector(sd, sd).values())


@pytest.mark.parametrize("scales", [0.5, [1.0, -0.7, 0.25], (2, 0, -3)])
def test_task_arithmetic(scales) -> None:
    base = random_state_dict(0, offset=2.0)
    fts = [random_state_dict(i, MIXED if i == 2 else {}) for i in (1, 2, 3)]
    tvs = [{k: (f64(ft[k]) - f64(base[k])).to(torch.bfloat16 if i == 1 else torch.float32) for k in FLOAT_KEYS}
           for i, ft in enumerate(fts)]
    lams = [scales] * 3 if isinstance(scales, float) else list(scales)
    out = task_arithmetic(base, tvs, scales)
    for k in FLOAT_KEYS:
        ref = f64(base[k]) + sum(lam * f64(tv[k]) for lam, tv in zip(lams, tvs))
        mag = f64(base[k]).abs() + sum(abs(lam) * f64(tv[k]).abs() for lam, tv in zip(lams, tvs))
        assert out[k].dtype == base[k].dtype
        assert_rounded(out[k], ref, mag, acc_of(base[k].dtype), key=k)
    for k in INT_KEYS:
        assert torch.equal(out[k], base[k])


def test_task_arithmetic_round_trip_and_negation() -> None:
    base, ft = random_state_dict(0), random_state_dict(1)
    tv = task_vector(ft, base)
    back = task_arithmetic(base, [tv], 1.0)
    removed = task_arithmetic(ft, [tv], -1.0)
    for k in FLOAT_KEYS:
        tol = dict(rtol=1e-2, atol=1e-2) if base[k].itemsize < 4 else {}
        torch.testing.assert_close(back[k], ft[k], **tol)
        torch.testing.assert_close(removed[k], base[k], **tol)


def test_task_vectors_may_hold_integer_buffers_or_not() -> None:
    base, ft = random_state_dict(0), random_state_dict(1)
    tv = task_vector(ft, base)
    with_ints = {**tv, "bn.num_batches_tracked": torch.tensor(5)}
    a, b = task_arithmetic(base, [tv], 0.5), task_arithmetic(base, [with_ints], 0.5)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert torch.equal(b["bn.num_batches_tracked"], base["bn.num_batches_tracked"])


def test_task_vector_errors() -> None:
    base, ft = random_state_dict(0), random_state_dict(1)
    tv = task_vector(ft, base)
    missing = {k: v for k, v in tv.items() if k != "conv.weight"}
    with pytest.raises(SoupError, match=r"`task_vectors\[1\]` is missing 1 floating key of `base`: 'conv.weight'"):
        task_arithmetic(base, [tv, missing], 1.0)
    extra = {**tv, "lora.A": torch.zeros(2)}
    with pytest.raises(SoupError, match=r"`task_vectors\[0\]` has 1 key not in `base`: 'lora.A'"):
        task_arithmetic(base, [extra], 1.0)
    wrong = {**tv, "conv.weight": torch.zeros(4, 3, 3)}
    match = r"'conv.weight': `base` has shape \(4, 3, 3, 3\), `task_vectors\[0\]` has shape \(4, 3, 3\)"
    with pytest.raises(SoupError, match=match):
        task_arithmetic(base, [wrong], 1.0)
    ints = {**tv, "conv.bias": torch.zeros(4, dtype=torch.int64)}
    with pytest.raises(SoupError, match=r"`task_vectors\[0\]`\['conv.bias'\] has dtype torch.int64"):
        task_arithmetic(base, [ints], 1.0)
    with pytest.raises(SoupError, match=r"`scales` has 1 values but there are 2 task vectors"):
        task_arithmetic(base, [tv, tv], [1.0])
    with pytest.raises(SoupError, match=r"scales\[1\]=nan"):
        task_arithmetic(base, [tv, tv], [1.0, math.nan])
    with pytest.raises(SoupError, match=r"`scales` must be a finite real number, got inf"):
        task_arithmetic(base, [tv], math.inf)
    with pytest.raises(SoupError, match=r"`scales` must be one number or a sequence"):
        task_arithmetic(base, [tv], "0.5")
    with pytest.raises(SoupError, match="`task_vectors` is empty"):
        task_arithmetic(base, [], 1.0)
    with pytest.raises(SoupError, match="`task_vectors` must be a sequence of state dicts, got a single mapping"):
        task_arithmetic(base, tv, 1.0)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0, -0.5, 1.7])
def test_interpolate(ratio) -> None:
    anchor, model = random_state_dict(0, MIXED), random_state_dict(1)
    out = interpolate(anchor, model, ratio)
    for k in FLOAT_KEYS:
        a, m = f64(anchor[k]), f64(model[k])
        ref = a + ratio * (m - a)
        mag = a.abs() + abs(ratio) * (m.abs() + a.abs())
        assert out[k].dtype == model[k].dtype
        assert_rounded(out[k], ref, mag, acc_of(anchor[k].dtype, model[k].dtype), key=k)
        if ratio == 1.0:
            assert torch.equal(out[k], model[k]) or anchor[k].dtype != model[k].dtype
        if ratio == 0.0 and anchor[k].dtype == model[k].dtype:
            assert torch.equal(out[k], anchor[k])
    for k in INT_KEYS:
        assert torch.equal(out[k], model[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpolate_low_precision_rounds_once(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a, m = (torch.randn(10_000, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    out = interpolate({"w": a}, {"w": m}, 0.37, allow_unrelated=True)["w"]  # independent draws: unrelated
    ref = f64(a) + 0.37 * (f64(m) - f64(a))
    assert_rounded(out, ref, f64(a).abs() + f64(m).abs())


def test_interpolate_layer_ratios_first_match_wins() -> None:
    anchor = {"enc.0.w": torch.zeros(2), "enc.1.w": torch.zeros(2), "head.w": torch.zeros(2), "head.b": torch.zeros(2)}
    model = {k: torch.ones(2) for k in anchor}
    out = interpolate(anchor, model, 0.5, {"head.*": 1.0, "*.b": 0.0, "enc.0.*": 0.25})
    assert {k: float(v[0]) for k, v in out.items()} == {"enc.0.w": 0.25, "enc.1.w": 0.5, "head.w": 1.0, "head.b": 1.0}


def test_interpolate_warns_about_patterns_that_match_nothing() -> None:
    sd = {"layer.weight": torch.zeros(2)}
    with pytest.warns(UserWarning, match=r"\['decoder\.\*'\] match no key"):
        interpolate(sd, sd, 0.5, {"layer.*": 0.1, "decoder.*": 0.2})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": math.nan}, r"`ratio` must be a finite real number, got nan"),
        ({"ratio": "0.5"}, r"`ratio` must be a finite real number, got '0.5' \(str\)"),
        ({"ratio": True}, r"`ratio` must be a finite real number, got True"),
        (
            {"ratio": 0.5, "layer_ratios": {"fc.*": math.inf}},
            r"`layer_ratios\['fc.\*'\]` must be a finite real number, got inf",
        ),
        ({"ratio": 0.5, "layer_ratios": {3: 0.1}}, r"`layer_ratios` patterns must be strings"),
        ({"ratio": 0.5, "layer_ratios": [("fc.*", 0.1)]}, r"`layer_ratios` must map fnmatch patterns to ratios"),
    ],
)
def test_interpolate_bad_arguments(kwargs, match) -> None:
    sd = random_state_dict(0)
    with pytest.raises(SoupError, match=match):
        interpolate(sd, sd, **kwargs)


def test_interpolate_accepts_numpy_and_tensor_ratios() -> None:
    np = pytest.importorskip("numpy")
    sd0, sd1 = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    assert float(interpolate(sd0, sd1, np.float32(0.25))["w"][0]) == 0.25
    assert float(interpolate(sd0, sd1, torch.tensor(0.75))["w"][0]) == 0.75
