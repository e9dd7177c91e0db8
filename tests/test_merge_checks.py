"""Compatibility messages: every problem listed at once, keys and shapes named, hints that say what to do."""

from __future__ import annotations

import pytest
import torch
from _merge_helpers import random_state_dict

from lightning_soup import SoupError
from lightning_soup.merge import interpolate, uniform_soup
from lightning_soup.merge._checks import check_compatible


def test_missing_and_unexpected_keys_listed_per_input() -> None:
    a = {"x": torch.zeros(1), "y": torch.zeros(1), "z": torch.zeros(1)}
    b = {"x": torch.zeros(1), "extra": torch.zeros(1)}
    c = {"x": torch.zeros(1), "y": torch.zeros(1)}
    with pytest.raises(SoupError) as info:
        uniform_soup([a, b, c])
    msg = str(info.value)
    assert "`state_dicts[1]` is missing 2 keys of `state_dicts[0]`: 'y', 'z'" in msg
    assert "`state_dicts[1]` has 1 unexpected key not in `state_dicts[0]`: 'extra'" in msg
    assert "`state_dicts[2]` is missing 1 key of `state_dicts[0]`: 'z'" in msg


def test_long_key_lists_are_truncated() -> None:
    a = {f"k{i}": torch.zeros(1) for i in range(50)}
    with pytest.raises(SoupError, match=r"is missing 49 keys of `a`: 'k1', .*'k20', \.\.\. and 29 more"):
        check_compatible([a, {"k0": torch.zeros(1)}], ["a", "b"])


def test_prefix_hint() -> None:
    a = {"layer.weight": torch.zeros(2), "layer.bias": torch.zeros(2)}
    b = {"model." + k: v for k, v in a.items()}
    with pytest.raises(SoupError, match=r"the keys of `model` are those of `anchor` with the prefix 'model\.' added"):
        interpolate(a, b, 0.5)
    with pytest.raises(SoupError, match=r"the keys of `anchor` are those of `model` with the prefix 'model\.' added"):
        interpolate(b, a, 0.5)


def test_all_shape_mismatches_named_with_both_shapes() -> None:
    a = random_state_dict(0)
    b = {**a, "conv.weight": torch.zeros(4, 3, 5, 5), "conv.bias": torch.zeros(8)}
    with pytest.raises(SoupError) as info:
        uniform_soup([a, b])
    msg = str(info.value)
    assert "'conv.weight': `state_dicts[0]` has shape (4, 3, 3, 3), `state_dicts[1]` has shape (4, 3, 5, 5)" in msg
    assert "'conv.bias': `state_dicts[0]` has shape (4,), `state_dicts[1]` has shape (8,)" in msg
    assert "vocabular" not in msg


@pytest.mark.parametrize(
    "key", ["model.embed_tokens.weight", "transformer.wte.weight", "lm_head.weight", "classifier.bias", "proj.weight"]
)
def test_vocabulary_hint(key) -> None:
    shape = (100,) if key.endswith("bias") else (100, 8)
    other = (120,) + shape[1:]
    with pytest.raises(SoupError, match=r"(?s)first dimension differs.*vocabularies \(tokenizers\)"):
        uniform_soup([{key: torch.zeros(shape)}, {key: torch.zeros(other)}])


def test_no_vocabulary_hint_for_other_dims() -> None:
    with pytest.raises(SoupError) as info:
        uniform_soup([{"embed.weight": torch.zeros(100, 8)}, {"embed.weight": torch.zeros(100, 16)}])
    assert "vocabular" not in str(info.value)


def test_floating_versus_integer_kind_mismatch() -> None:
    match = r"'n': `state_dicts\[0\]` has dtype torch.float32, `state_dicts\[1\]` has dtype torch.int64"
    with pytest.raises(SoupError, match=match):
        uniform_soup([{"n": torch.zeros(1)}, {"n": torch.zeros(1, dtype=torch.int64)}])


def test_keys_and_shapes_reported_together() -> None:
    a = {"x": torch.zeros(1), "y": torch.zeros(2)}
    b = {"y": torch.zeros(3)}
    with pytest.raises(SoupError, match=r"(?s)missing 1 key.*'x'.*'y': .*has shape \(2,\).*has shape \(3,\)"):
        uniform_soup([a, b])


def test_meta_tensors_are_enough() -> None:
    a = {"w": torch.empty(3, 4, device="meta")}
    check_compatible([a, {"w": torch.empty(3, 4, dtype=torch.bfloat16, device="meta")}])
    with pytest.raises(SoupError, match=r"\(3, 4\).*\(4, 4\)"):
        check_compatible([a, {"w": torch.empty(4, 4, device="meta")}])


def test_empty_inputs() -> None:
    with pytest.raises(SoupError, match="empty"):
        check_compatible([])
    with pytest.raises(SoupError, match=r"`a`, `c` are empty \(no tensors\)"):
        check_compatible([{}, {"w": torch.zeros(1)}, {}], ["a", "b", "c"])
