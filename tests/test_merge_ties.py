"""TIES-merging: a hand-worked example with sign conflicts and a per-entry float64 reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from _merge_helpers import FLOAT_KEYS, INT_KEYS, acc_of, assert_rounded, f64, random_state_dict

from lightning_soup import SoupError
from lightning_soup.merge import ties

ties_module = importlib.import_module("lightning_soup.merge.ties")


def test_hand_worked_example() -> None:
    base = {"w": torch.ones(6)}
    deltas = [
        [3.0, -1.0, 2.0, 0.5, -4.0, 1.0],
        [-2.0, -2.0, 1.0, 0.1, 4.0, -1.0],
        [1.5, 3.0, -3.0, 0.2, -1.0, -1.0],
    ]
    fts = [{"w": 1.0 + torch.tensor(d)} for d in deltas]
    # density 0.5 keeps 3 of 6 entries per task vector:
    #   [3, 0, 2, 0, -4, 0], [-2, -2, 0, 0, 4, 0], [1.5, 3, -3, 0, 0, 0]
    # sums [2.5, 1, -1, 0, 0, 0] elect signs [+, +, -, +, +, +] (a zero sum counts as positive; entry 1 is +
    # although two of its three kept deltas are negative: the sum decides, not the count)
    # disjoint means [(3+1.5)/2, 3, -3, 0 (nothing kept), 4 (only the agreeing +4), 0]
    out = ties(base, fts, density=0.5, scale=0.5)["w"]
    torch.testing.assert_close(out, torch.tensor([2.125, 2.5, -0.5, 1.0, 3.0, 1.0]), rtol=0, atol=0)


def _reference(base, fts, density, scale):
    """Per-entry TIES in float64, straight from the paper's three steps."""
    b = f64(base).reshape(-1)
    n = b.numel()
    k = max(1, math.floor(density * n))
    trimmed = []
    for ft in fts:
        d = f64(ft).reshape(-1) - b
        keep = set(sorted(range(n), key=lambda j: -abs(float(d[j])))[:k])
        trimmed.append([float(d[j]) if j in keep else 0.0 for j in range(n)])
    merged = []
    for j in range(n):
        column = [t[j] for t in trimmed]
        sign = 1.0 if sum(column) >= 0 else -1.0
        agreeing = [x for x in column if x != 0 and math.copysign(1.0, x) == sign]
        merged.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return (b + scale * torch.tensor(merged, dtype=torch.float64)).reshape(base.shape)


@pytest.mark.parametrize(("density", "scale"), [(1.0, 1.0), (0.3, 1.0), (0.5, 0.7), (1e-6, -1.5)])
def test_matches_reference(density, scale) -> None:
    base = random_state_dict(0, {"conv.weight": torch.bfloat16})
    fts = [random_state_dict(i, {"fc.bias": torch.float32} if i == 2 else {}) for i in (1, 2, 3)]
    out = ties(base, fts, density, scale)
    for k in FLOAT_KEYS:
        ref = _reference(base[k], [ft[k] for ft in fts], density, scale)
        mag = f64(base[k]).abs() + abs(scale) * sum((f64(ft[k]) - f64(base[k])).abs() for ft in fts)
        assert out[k].dtype == base[k].dtype
        assert_rounded(out[k], ref, mag, acc_of(base[k].dtype, *(ft[k].dtype for ft in fts)), key=k)
    for k in INT_KEYS:
        assert torch.equal(out[k], fts[0][k])


def test_tiny_density_keeps_one_entry_per_task_vector() -> None:
    base = {"w": torch.zeros(100)}
    ft = {"w": torch.linspace(-1, 2, 100)}
    out = ties(base, [ft], density=1e-9)["w"]
    assert int((out != 0).sum()) == 1 and float(out[-1]) == 2.0


def test_deterministic() -> None:
    base = {"w": torch.zeros(1000)}
    fts = [{"w": torch.randint(-3, 4, (1000,)).float()} for _ in range(3)]  # many ties in magnitude
    a, b = ties(base, fts, 0.1), ties(base, fts, 0.1)
    assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("slice_size", "small"), [(7, 1 << 16), (1 << 20, 0), (1 << 20, 1 << 16)])
def test_tied_magnitudes_keep_exactly_k_lowest_indices(monkeypatch, dtype, slice_size, small) -> None:
    # magnitudes 1..4 only: the cut falls inside a run of equal magnitudes, which spans many slices when the
    # slices are 7 entries long; exactly k entries are kept, the lowest flat indices among the tied ones. Both
    # ways of finding the cut: the radix select (small=0) and the selection small tensors use.
    monkeypatch.setattr(ties_module, "_SLICE", slice_size)
    monkeypatch.setattr(ties_module, "_SMALL", small)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randint(-8, 8, (40, 25), generator=g).to(dtype)}
    values = torch.tensor([-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0])
    fts = [{"w": base["w"] + values[torch.randint(0, 8, (40, 25), generator=g)].to(dtype)} for _ in range(3)]
    for density in (0.1, 0.37, 0.5, 0.999):
        k = max(1, math.floor(density * 1000))
        kept = ties(base, fts[:1], density)["w"] != base["w"]  # one task vector: the kept entries are the nonzero
        assert int(kept.sum()) == k
        out = ties(base, fts, density, scale=0.5)["w"]
        ref = _reference(base["w"], [ft["w"] for ft in fts], density, 0.5)
        assert out.dtype == dtype
        # a different choice of kept entries moves an output by >= 0.5/3; this only allows rounding
        atol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 0.05}[dtype]
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("density", "match"),
    [
        (0, r"`density` must be in \(0, 1\] \(the fraction of each task vector kept\), got 0\."),
        (1.5, r"got 1.5"),
        (-0.1, r"got -0.1"),
        (math.nan, r"got nan"),
        ("0.5", r"got '0.5' \(str\)"),
    ],
)
def test_bad_density(density, match) -> None:
    sd = random_state_dict(0)
    with pytest.raises(SoupError, match=match):
        ties(sd, [sd], density)


def test_bad_scale_and_inputs() -> None:
    sd = random_state_dict(0)
    with pytest.raises(SoupError, match=r"`scale` must be a finite real number, got inf"):
        ties(sd, [sd], 0.5, scale=math.inf)
    with pytest.raises(SoupError, match="`finetuned` is empty"):
        ties(sd, [], 0.5)
    with pytest.raises(SoupError, match="`finetuned` must be a sequence of state dicts, got a single mapping"):
        ties(sd, sd, 0.5)
    other = {**sd, "embed.weight": torch.zeros(12, 6)}
    match = r"'embed.weight': `base` has shape \(11, 6\), `finetuned\[1\]` has shape \(12, 6\)"
    with pytest.raises(SoupError, match=match):
        ties(sd, [sd, other], 0.5)
