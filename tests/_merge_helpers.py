"""Random state dicts and float64 helpers for the `lightning_soup.merge` tests (no code under test is used here)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

#: key -> (shape, dtype): 0-d, 1-D, 2-D, 4-D conv, every floating dtype, integer and bool buffers
LAYOUT: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "temperature": ((), torch.float32),
    "embed.weight": ((11, 6), torch.float32),
    "conv.weight": ((4, 3, 3, 3), torch.float32),
    "conv.bias": ((4,), torch.float32),
    "bn.weight": ((4,), torch.bfloat16),
    "bn.running_mean": ((4,), torch.float16),
    "bn.num_batches_tracked": ((), torch.int64),
    "fc.weight": ((5, 7), torch.float64),
    "fc.bias": ((5,), torch.bfloat16),
    "head.weight": ((3, 5), torch.float16),
    "position_ids": ((9,), torch.int32),
    "attn.mask": ((3, 3), torch.bool),
}
FLOAT_KEYS = [k for k, (_, dt) in LAYOUT.items() if dt.is_floating_point]
INT_KEYS = [k for k, (_, dt) in LAYOUT.items() if not dt.is_floating_point]


def random_state_dict(
    seed: int, dtypes: Mapping[str, torch.dtype] | None = None, offset: float = 0.0
) -> dict[str, Tensor]:
    """A state dict with LAYOUT's keys; `dtypes` overrides some keys' dtype (e.g. bf16 in one input only)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, (shape, dtype) in LAYOUT.items():
        dtype = (dtypes or {}).get(key, dtype)
        if dtype == torch.bool:
            out[key] = torch.rand(shape, generator=g) > 0.5
        elif not dtype.is_floating_point:
            out[key] = torch.randint(0, 1000, shape, generator=g, dtype=dtype)
        else:
            out[key] = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    return out


def f64(t: Tensor) -> Tensor:
    return t.to(torch.float64, copy=True)  # never the input itself, so in-place ops cannot change a reference


def snapshot(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in sd.items()}


def assert_unchanged(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> None:
    assert list(before) == list(after)
    for k in before:
        assert after[k].dtype == before[k].dtype, k
        assert torch.equal(after[k], before[k]), f"input {k!r} was modified"


def assert_rounded(
    out: Tensor, ref: Tensor, mag: Tensor | None = None, acc: torch.dtype = torch.float32, key: str = ""
) -> None:
    """`out` is `ref` (float64) computed in `acc` and rounded once into out's dtype.

    Allowed error: half an ulp of out's dtype (the final rounding) plus 16 ulps of `acc` relative to `mag`, the
    sum of the magnitudes of the terms (so cancellation is allowed for). Accumulating in bf16/fp16 breaks this.
    """
    assert out.shape == ref.shape, (key, out.shape, ref.shape)
    mag = ref.abs() if mag is None else mag
    fo, fa = torch.finfo(out.dtype), torch.finfo(acc)
    bound = 0.5 * fo.eps * ref.abs() + 16 * fa.eps * mag + fo.smallest_normal * fo.eps
    err = (f64(out) - ref).abs()
    worst = (err - bound).max()
    assert bool((err <= bound).all()), f"{key}: max error {err.max():.3g} exceeds its bound by {worst:.3g}"


def acc_of(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


class CountingMapping(Mapping[str, Tensor]):
    """A read-only state dict that counts how often each value is read (like a lazy on-disk mapping)."""

    def __init__(self, data: Mapping[str, Tensor]) -> None:
        self._data = dict(data)
        self.reads: dict[str, int] = {k: 0 for k in data}

    def __getitem__(self, key: str) -> Tensor:
        self.reads[key] += 1
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def times_read(self) -> int:
        """How many complete reads of the state dict happened (every key read that many times)."""
        counts = set(self.reads.values())
        assert len(counts) == 1, f"keys were read unevenly: {self.reads}"
        return counts.pop()


class LazyMapping(CountingMapping):
    """A CountingMapping with a ``meta()`` like ``LazyStateDict``: shapes and dtypes without reading data."""

    def meta(self) -> dict[str, Tensor]:
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._data.items()}


def split_keys(sd: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{k: v} for k, v in sd.items()]
