"""DARE: float64 reference with the documented masks, reproducibility, statistics."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from _merge_helpers import FLOAT_KEYS, INT_KEYS, acc_of, assert_rounded, f64, random_state_dict

from lightning_soup import SoupError
from lightning_soup.merge import dare


def _mask(shape, seed, index, key, density):
    # the documented contract: a CPU generator seeded with crc32 of (seed, index, key), keep where rand < density
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}\0{index}\0{key}".encode()))
    return torch.rand(shape, generator=g) < density


@pytest.mark.parametrize(("density", "scale", "seed"), [(1.0, 1.0, 0), (0.3, 1.0, 0), (0.5, -0.4, 123), (0.9, 2.0, -7)])
def test_matches_reference(density, scale, seed) -> None:
    base = random_state_dict(0, {"fc.weight": torch.float32, "head.weight": torch.bfloat16})
    fts = [random_state_dict(i, {"conv.bias": torch.float64} if i == 1 else {}) for i in (1, 2)]
    out = dare(base, fts, density, scale, seed)
    for k in FLOAT_KEYS:
        ref, mag = f64(base[k]).clone(), f64(base[k]).abs()
        for i, ft in enumerate(fts):
            delta = f64(ft[k]) - f64(base[k])
            everything = torch.ones_like(delta, dtype=torch.bool)
            keep = _mask(base[k].shape, seed, i, k, density) if density < 1 else everything
            ref = ref + scale * torch.where(keep, delta, 0.0) / density
            mag = mag + abs(scale) * (f64(ft[k]).abs() + f64(base[k]).abs()) / density
        assert out[k].dtype == base[k].dtype
        assert_rounded(out[k], ref, mag, acc_of(base[k].dtype, *(ft[k].dtype for ft in fts)), key=k)
    for k in INT_KEYS:
        assert torch.equal(out[k], fts[0][k])


def test_reproducible_per_seed() -> None:
    base, fts = random_state_dict(0), [random_state_dict(1), random_state_dict(2)]
    a, b, c = dare(base, fts, 0.5, seed=1), dare(base, fts, 0.5, seed=1), dare(base, fts, 0.5, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in FLOAT_KEYS)


def test_drop_statistics() -> None:
    n, density = 1_000_000, 0.3
    base = {"w": torch.zeros(n)}
    fts = [{"w": torch.ones(n)}, {"w": torch.full((n,), 2.0)}]
    out = dare(base, fts[:1], density)["w"]
    kept = out != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(float(kept.float().mean()) - density) < 5 * sigma  # fraction of survivors ~ density
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / density))  # survivors rescaled by 1/density
    assert abs(float(out.mean()) - 1.0) < 5 * sigma / density  # unbiased: E[dare(τ)] = τ
    # each fine-tune has its own independent mask
    both = dare(base, fts, density)["w"] * density  # entries in {0, 1, 2, 3}
    overlap = float((both == 3).float().mean())
    assert abs(overlap - density**2) < 5 * math.sqrt(density**2 * (1 - density**2) / n)


def test_same_mask_for_any_dtype() -> None:
    base = {"w": torch.zeros(1000)}
    kept32 = dare(base, [{"w": torch.ones(1000)}], 0.5, seed=5)["w"] != 0
    base16, ft16 = {"w": torch.zeros(1000, dtype=torch.bfloat16)}, {"w": torch.ones(1000, dtype=torch.bfloat16)}
    kept16 = dare(base16, [ft16], 0.5, seed=5)["w"] != 0
    assert torch.equal(kept32, kept16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, r"`density` must be in \(0, 1\]"),
        ({"density": 1.01}, r"`density` must be in \(0, 1\].*got 1.01"),
        ({"density": 0.5, "scale": math.nan}, r"`scale` must be a finite real number, got nan"),
        ({"density": 0.5, "seed": 1.5}, r"`seed` must be an integer, got 1.5"),
        ({"density": 0.5, "seed": "1"}, r"`seed` must be an integer, got '1' \(str\)"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    sd = random_state_dict(0)
    with pytest.raises(SoupError, match=match):
        dare(sd, [sd], **kwargs)
