"""SLERP: float64 reference, colinear and zero-norm fallbacks, the orthogonal case."""

from __future__ import annotations

import math

import pytest
import torch
from _merge_helpers import FLOAT_KEYS, INT_KEYS, acc_of, assert_rounded, f64, random_state_dict

from lightning_soup import SoupError
from lightning_soup.merge import slerp


def _reference(a, b, t):
    x, y = f64(a).reshape(-1), f64(b).reshape(-1)
    nx, ny = float(x.norm()), float(y.norm())
    cos = float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else 1.0
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)).reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0, -0.3, 1.4])
def test_matches_reference(t) -> None:
    a = random_state_dict(0, {"conv.weight": torch.bfloat16, "fc.weight": torch.float32})
    b = random_state_dict(1, {"embed.weight": torch.float64})
    out = slerp(a, b, t)
    for k in FLOAT_KEYS:
        ref = _reference(a[k], b[k], t)
        # coefficients are at most about |t| + |1 - t|; allow for the angle's rounding too
        mag = (abs(1 - t) + abs(t) + 1) * (f64(a[k]).abs() + f64(b[k]).abs()) * 4
        assert out[k].dtype == b[k].dtype
        assert_rounded(out[k], ref, mag, acc_of(a[k].dtype, b[k].dtype), key=k)
    for k in INT_KEYS:
        assert torch.equal(out[k], b[k])


def test_orthogonal_vectors_stay_on_the_circle() -> None:
    a, b = {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}
    for t in (0.0, 1 / 3, 0.5, 0.9, 1.0):
        w = slerp(a, b, t)["w"]
        expected = torch.tensor([3 * math.cos(t * math.pi / 2), 3 * math.sin(t * math.pi / 2)])
        torch.testing.assert_close(w, expected)
        assert math.isclose(float(w.norm()), 3.0, rel_tol=1e-6)


@pytest.mark.parametrize("factor", [2.0, -0.5, 1.0])
def test_colinear_falls_back_to_lerp(factor) -> None:
    x = torch.tensor([1.0, -2.0, 0.5, 4.0])
    a, b = {"w": x}, {"w": factor * x + 1e-6}  # |cos| ≈ 1
    out = slerp(a, b, 0.3)["w"]
    torch.testing.assert_close(out, 0.7 * x + 0.3 * b["w"])


def test_zero_norm_and_scalar_tensors_fall_back_to_lerp() -> None:
    a = {"zero": torch.zeros(3), "scalar": torch.tensor(2.0), "w": torch.tensor([1.0, 0.0])}
    b = {"zero": torch.tensor([1.0, 2.0, 3.0]), "scalar": torch.tensor(-4.0), "w": torch.tensor([0.0, 1.0])}
    out = slerp(a, b, 0.25)
    torch.testing.assert_close(out["zero"], 0.25 * b["zero"])
    torch.testing.assert_close(out["scalar"], torch.tensor(0.5))  # 0-d: cos = -1, colinear
    torch.testing.assert_close(out["w"], torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)]))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_just_below_threshold_uses_the_arc() -> None:
    # cos = 0.999 < 0.9995: slerp, whose midpoint is longer than the chord's
    theta = math.acos(0.999)
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    b = {"w": torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)}
    mid = slerp(a, b, 0.5)["w"]
    assert math.isclose(float(mid.norm()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("t", [math.nan, math.inf, "0.5", None, [0.5]])
def test_bad_t(t) -> None:
    sd = random_state_dict(0)
    with pytest.raises(SoupError, match=r"`t` must be a finite real number, got"):
        slerp(sd, sd, t)


@pytest.mark.parametrize(("cos", "arc"), [(0.9994, True), (0.9996, False), (-0.9996, False)])
def test_threshold_is_0_9995(cos, arc) -> None:
    theta = math.acos(cos)
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    b = {"w": torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)}
    mid = slerp(a, b, 0.5)["w"]
    expected = 1.0 if arc else math.cos(theta / 2)  # the chord's midpoint is shorter than the arc's
    assert math.isclose(float(mid.norm()), expected, rel_tol=1e-12)
