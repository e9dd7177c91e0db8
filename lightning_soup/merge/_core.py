"""Plumbing shared by the merge functions: input preparation, dtype/device grouping, bounded batches.

The merge functions work key by key, but the arithmetic runs as ``torch._foreach_*`` calls over lists of tensors
grouped by (device, output dtype, accumulation dtype), so one kernel launch covers many tensors on accelerators
and no Python code runs per element.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_soup.merge._checks import check_compatible, check_state_dict

#: Upper bound on the temporary float32 copies made at once when inputs need a dtype conversion.
BATCH_BYTES = 256 * 2**20


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (bf16 / fp16 / fp32 accumulate in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def materialize(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Read every tensor exactly once (lazy mappings load on access); plain dicts are used as they are."""
    return state_dict if isinstance(state_dict, dict) else dict(state_dict.items())


def has_metadata(state_dict: Mapping[str, Any]) -> bool:
    """Whether shapes and dtypes can be checked without reading tensors: a dict, or a mapping with ``meta()``."""
    return isinstance(state_dict, dict) or callable(getattr(state_dict, "meta", None))


def prepare(state_dicts: Sequence[Any], names: Sequence[str]) -> list[Mapping[str, Tensor]]:
    """Type-check, check compatibility (on metadata first when available) and read each input once."""
    for sd, name in zip(state_dicts, names):
        check_state_dict(sd, name)
    early = all(has_metadata(sd) for sd in state_dicts)
    if early:
        check_compatible(state_dicts, names)  # lazy mappings through meta(): fails before reading any data
    loaded = [materialize(sd) for sd in state_dicts]
    if not early or any(a is not b for a, b in zip(loaded, state_dicts)):
        check_compatible(loaded, names)  # what was read can differ from what a lazy mapping announced
    return loaded


def copy_non_floating(source: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    """Fresh copies of integer/bool buffers (never averaged), so the result never aliases an input."""
    return {k: source[k].clone() for k in keys}


def move(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`t` in `dtype` on `device`, without a copy when it already is."""
    if t.dtype == dtype and t.device == device:
        return t
    return t.to(device=device, dtype=dtype)


class Group(NamedTuple):
    device: torch.device
    out_dtype: torch.dtype
    acc_dtype: torch.dtype
    #: every input already has `acc_dtype` and sits on `device`: no conversion, no temporaries
    direct: bool


def group_keys(
    keys: Sequence[str], out: Mapping[str, Tensor], inputs: Sequence[Mapping[str, Tensor]]
) -> dict[Group, list[str]]:
    """Group floating keys by the device and dtype of `out`'s tensor and the accumulation dtype of all inputs."""
    groups: dict[Group, list[str]] = {}
    for k in keys:
        ref = out[k]
        dtypes = [sd[k].dtype for sd in inputs]
        acc = acc_dtype(ref.dtype, *dtypes)
        direct = all(sd[k].dtype == acc and sd[k].device == ref.device for sd in inputs)
        groups.setdefault(Group(ref.device, ref.dtype, acc, direct), []).append(k)
    return groups


def batches(keys: Sequence[str], ref: Mapping[str, Tensor], dtype: torch.dtype) -> Iterator[list[str]]:
    """Split `keys` into runs whose tensors in `dtype` take at most :data:`BATCH_BYTES` (at least one key each)."""
    size = torch.empty((), dtype=dtype).element_size()
    run: list[str] = []
    used = 0
    for k in keys:
        nbytes = ref[k].numel() * size
        if run and used + nbytes > BATCH_BYTES:
            yield run
            run, used = [], 0
        run.append(k)
        used += nbytes
    if run:
        yield run


def cast(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """`tensors` in `dtype` (the list itself when it already is)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]
