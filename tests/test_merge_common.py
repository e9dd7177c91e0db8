"""Properties every `lightning_soup.merge` function shares: inputs untouched, dtypes/devices, integer buffers,
fresh outputs, key-by-key == whole dict, lazy inputs read once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _merge_helpers import (
    FLOAT_KEYS,
    INT_KEYS,
    CountingMapping,
    LazyMapping,
    assert_unchanged,
    random_state_dict,
    snapshot,
)

from lightning_soup import merge

# one input in several dtypes per key, so "the dtype of the tensor the result replaces" is visible
VARIANTS = [
    {},
    {"temperature": torch.bfloat16, "conv.bias": torch.float16, "fc.bias": torch.float32, "fc.weight": torch.float32},
    {"embed.weight": torch.float64, "bn.weight": torch.float32, "head.weight": torch.bfloat16},
]


def inputs() -> list[dict[str, torch.Tensor]]:
    return [random_state_dict(10 + i, VARIANTS[i]) for i in range(3)]


def _tv(sds: list[dict]) -> list[dict]:
    # task vectors built by hand (not with our task_vector), floating keys only
    return [{k: sd[k].double() - sds[0][k].double() for k in FLOAT_KEYS} for sd in sds[1:]]


@dataclass
class Case:
    name: str
    call: Callable[[list[Any]], dict]
    dtype_from: int | None  # index of the input whose floating dtypes the output keeps; None: float32/64
    ints_from: int | None  # index of the input whose non-floating tensors are copied; None: none returned


def _evaluate(sd: dict) -> float:
    return -float(sum(v.double().abs().sum() for k, v in sd.items() if v.is_floating_point()))


CASES = [
    Case("uniform_soup", lambda s: merge.uniform_soup(s), 0, 0),
    Case("weighted_average", lambda s: merge.weighted_average(s, [1.0, 2.0, 3.0]), 0, 0),
    Case("task_vector", lambda s: merge.task_vector(s[1], s[0]), None, None),
    Case("task_arithmetic", lambda s: merge.task_arithmetic(s[0], _tv(s), [0.5, -0.25]), 0, 0),
    Case("interpolate", lambda s: merge.interpolate(s[0], s[1], 0.3), 1, 1),
    Case("interpolate_layers", lambda s: merge.interpolate(s[0], s[1], 0.3, {"conv.*": 0.9, "*.bias": -0.5}), 1, 1),
    Case("ties", lambda s: merge.ties(s[0], s[1:], 0.5, 0.8), 0, 1),
    Case("dare", lambda s: merge.dare(s[0], s[1:], 0.5, 1.2, seed=3), 0, 1),
    Case("slerp", lambda s: merge.slerp(s[0], s[1], 0.3), 1, 1),
    Case("tsv_merge", lambda s: merge.tsv_merge(s[0], s[1:], 0.8), 0, 0),
    Case("iso_c", lambda s: merge.iso_c(s[0], s[1:], 1.2), 0, 0),
    Case("iso_cts", lambda s: merge.iso_cts(s[0], s[1:], 1.2, common_fraction=0.5), 0, 0),
    Case("model_stock", lambda s: merge.model_stock(s[0], s[1:]), 0, 0),
    Case("greedy_soup", lambda s: merge.greedy_soup(s, _evaluate, scores=[1.0, 3.0, 2.0])[0], 1, 1),
]
IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inputs_unchanged_and_outputs_fresh(case: Case) -> None:
    sds = inputs()
    before = [snapshot(sd) for sd in sds]
    out = case.call(sds)
    for b, sd in zip(before, sds):
        assert_unchanged(b, sd)
    # writing into the result never reaches an input
    pointers = {t.data_ptr() for sd in sds for t in sd.values()}
    assert not pointers & {t.data_ptr() for t in out.values()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_keys_dtypes_devices_and_integer_buffers(case: Case) -> None:
    sds = inputs()
    out = case.call(sds)
    if case.ints_from is None:
        assert list(out) == FLOAT_KEYS
    else:
        assert list(out) == list(sds[0])  # same keys, in order
        for k in INT_KEYS:  # copied from the documented source, never averaged
            assert out[k].dtype == sds[case.ints_from][k].dtype
            assert torch.equal(out[k], sds[case.ints_from][k]), k
    for k in FLOAT_KEYS:
        if case.dtype_from is None:
            expected = torch.float64 if torch.float64 in (sds[0][k].dtype, sds[1][k].dtype) else torch.float32
        else:
            expected = sds[case.dtype_from][k].dtype
        assert out[k].dtype == expected, k
        assert out[k].device == sds[0][k].device
        assert out[k].shape == sds[0][k].shape
        assert torch.isfinite(out[k]).all()


@pytest.mark.filterwarnings("ignore:`layer_ratios` patterns")  # a single key matches only some patterns
@pytest.mark.parametrize("case", [c for c in CASES if c.name != "greedy_soup"], ids=IDS[:-1])
def test_key_by_key_equals_whole_dict(case: Case) -> None:
    sds = inputs()
    whole = case.call(sds)
    tvs = _tv(sds)
    pieces: dict[str, torch.Tensor] = {}
    for key in reversed(list(sds[0])):  # one key at a time, in reverse order: nothing depends on position
        if case.name == "task_arithmetic":
            one_tvs = [{key: tv[key]} if key in tv else {} for tv in tvs]
            one = merge.task_arithmetic({key: sds[0][key]}, one_tvs, [0.5, -0.25])
        else:
            one = case.call([{key: sd[key]} for sd in sds])
        pieces.update(one)
    assert set(pieces) == set(whole)
    for k in whole:
        assert pieces[k].dtype == whole[k].dtype
        assert torch.equal(pieces[k], whole[k]), k


LAZY = {"uniform_soup": 3, "weighted_average": 3, "interpolate": 2, "interpolate_layers": 2, "ties": 3, "dare": 3,
        "slerp": 2, "greedy_soup": 3, "tsv_merge": 3, "iso_c": 3, "iso_cts": 3, "model_stock": 3}


@pytest.mark.parametrize("case", [c for c in CASES if c.name in LAZY], ids=list(LAZY))
def test_lazy_inputs_are_read_once(case: Case) -> None:
    counted = [CountingMapping(sd) for sd in inputs()]
    plain = case.call(inputs())
    out = case.call(counted)
    used = LAZY[case.name]
    assert [m.times_read for m in counted] == [1] * used + [0] * (3 - used)
    for k in plain:
        assert torch.equal(out[k], plain[k])


def test_task_vector_and_task_arithmetic_read_lazy_inputs_once() -> None:
    base, ft = CountingMapping(random_state_dict(0)), CountingMapping(random_state_dict(1))
    tv = CountingMapping(merge.task_vector(ft, base))
    assert (base.times_read, ft.times_read) == (1, 1)
    merge.task_arithmetic(base, [tv, tv], 0.5)
    assert (base.times_read, tv.times_read) == (2, 2)


def test_lazy_mapping_mismatch_fails_before_reading_data() -> None:
    a = LazyMapping(random_state_dict(0))
    other = random_state_dict(1)
    other["fc.weight"] = torch.zeros(6, 7, dtype=torch.float64)
    b = LazyMapping(other)
    with pytest.raises(merge._checks.SoupError, match="fc.weight"):
        merge.uniform_soup([a, b])
    assert set(a.reads.values()) == {0} and set(b.reads.values()) == {0}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_matches_cpu_and_stays_on_device(case: Case) -> None:
    sds = inputs()
    cpu = case.call(sds)
    gpu = case.call([{k: v.cuda() for k, v in sd.items()} for sd in sds])
    for k in cpu:
        assert gpu[k].device.type == "cuda" and gpu[k].dtype == cpu[k].dtype
        if cpu[k].is_floating_point():
            torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-2 if cpu[k].itemsize < 4 else 1e-5, atol=1e-5)
        else:
            assert torch.equal(gpu[k].cpu(), cpu[k])
