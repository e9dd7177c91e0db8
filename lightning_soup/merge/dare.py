"""DARE: Drop And REscale (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", ICML 2024).

Each task-vector entry is dropped with probability ``1 − density`` and the survivors are rescaled by
``1 / density``, which keeps the expected task vector unchanged. The drop mask of fine-tune ``i`` and key ``k``
comes from a CPU generator seeded with ``crc32(seed, i, k)``: the result is the same for a given seed whether the
state dicts are merged whole or one key at a time, in any key order, and on any device.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.merge._checks import check_density, check_real, check_seed, check_state_dict, check_state_dicts
from lightning_soup.merge._core import acc_dtype, copy_non_floating, move, prepare
from lightning_soup.merge._related import check_related
from lightning_soup.merge.lora import _refuse_pairs

__all__ = ["dare"]


def dare(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    density: float,
    scale: float = 1.0,
    seed: int = 0,
    *,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """DARE-merge fine-tunes of a common base: ``base + scale·Σᵢ maskᵢ ⊙ (finetunedᵢ − base) / density``.

    Every entry of every task vector is kept independently with probability `density`.

    Args:
        base: the common base state dict.
        finetuned: one or more fine-tuned state dicts (same keys and shapes as `base`).
        density: keep probability, in ``(0, 1]``; 1 keeps everything (plain task arithmetic).
        scale: multiplier of the summed task vectors; any finite real.
        seed: any integer; the same seed gives the same result, also when merging key by key.
        allow_unrelated: merge even fine-tunes that do not look fine-tuned from `base`.

    Returns:
        A new state dict with `base`'s keys; floating tensors in `base`'s dtype and on its device (computed in
        float32 or better), non-floating tensors copied from ``finetuned[0]``.

    Raises:
        SoupError: (unless `allow_unrelated`) for a fine-tune that does not look fine-tuned from `base` (see
            :mod:`lightning_soup.merge._related`); for incompatible state dicts, an empty `finetuned`,
            `density` outside ``(0, 1]``, a non-finite `scale` or a non-integer `seed`.

    Example:
        >>> import torch
        >>> base, ft = {"w": torch.zeros(4)}, {"w": torch.ones(4)}
        >>> dare(base, [ft], density=1.0)
        {'w': tensor([1., 1., 1., 1.])}
        >>> out = dare(base, [ft], density=0.5, seed=1)["w"]
        >>> bool(((out == 0) | (out == 2)).all())
        True
    """
    bs = check_state_dict(base, "base")
    _refuse_pairs(bs, "base", "dare")
    fts = check_state_dicts(finetuned, "finetuned")
    density = check_density(density)
    scale = check_real(scale, "scale")
    seed = check_seed(seed)
    names = ["base"] + [f"finetuned[{i}]" for i in range(len(fts))]
    bs, *fts = prepare([bs, *fts], names)
    if not allow_unrelated:
        check_related(bs, fts, names[1:], "base")

    result = copy_non_floating(fts[0], [k for k, t in bs.items() if not t.is_floating_point()])
    for k, b in bs.items():
        if not b.is_floating_point():
            continue
        acc = acc_dtype(b.dtype, *(ft[k].dtype for ft in fts))
        b_acc = b.to(acc)
        out = b_acc.clone()
        for i, ft in enumerate(fts):
            delta = move(ft[k], acc, b.device) - b_acc
            if density < 1.0:
                delta.mul_(drop_mask(b.shape, seed, i, k, density).to(b.device))
            out.add_(delta, alpha=scale / density)
        result[k] = out.to(b.dtype)
    return {k: result[k] for k in bs}


def drop_mask(shape: torch.Size, seed: int, index: int, key: str, density: float) -> Tensor:
    """The CPU keep-mask of fine-tune `index` for `key`: True with probability `density`.

    The generator is seeded with ``crc32(f"{seed}\\0{index}\\0{key}")``, so the mask depends on nothing else (not on
    the other keys, the device or the dtype).
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(zlib.crc32(f"{seed}\0{index}\0{key}".encode()))
    return torch.rand(shape, generator=generator) < density
