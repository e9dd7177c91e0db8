"""The module's tensors as the callbacks see them: live views, loading weights in, writing them out.

Nothing here does merge arithmetic (that is :mod:`lightning_soup.merge`) or imports Lightning.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_soup import storage
from lightning_soup.callbacks._dist import _is_dtensor, is_sharded
from lightning_soup.errors import SoupError
from lightning_soup.merge import _inplace


def module_tensors(pl_module: Any) -> dict[str, Tensor]:
    """The module's ``state_dict()`` entries as live tensors: writing into them changes the module.

    DTensors are replaced by their local shard, so every computation on the result is shard-local.
    """
    return {k: (v.to_local() if _is_dtensor(v) else v) for k, v in pl_module.state_dict().items()}


def floating_items(tensors: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    """The keys and values of the floating-point entries, in order."""
    keys = [k for k, v in tensors.items() if v.is_floating_point()]
    return keys, [tensors[k] for k in keys]


def load_into_module_(pl_module: Any, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (any device or dtype) into the module's live tensors, in place.

    Raises:
        SoupError: the keys or shapes of ``state`` do not match the module's.
    """
    live = module_tensors(pl_module)
    missing = sorted(live.keys() - state.keys())
    unexpected = sorted(state.keys() - live.keys())
    if missing or unexpected:
        raise SoupError(
            f"These weights do not fit the module: missing keys {missing or 'none'}, unexpected keys "
            f"{unexpected or 'none'}. Were they saved from a different model?"
        )
    bad = [
        f"`{k}`: {tuple(state[k].shape)} vs module {tuple(v.shape)}"
        for k, v in live.items()
        if state[k].shape != v.shape
    ]
    if bad:
        hint = (
            " The module is sharded, so these are this rank's local shards: per-rank files only fit a run with the "
            "same number of processes and the same sharding (full weights: use `read_local_shards`)."
            if is_sharded(pl_module)
            else ""
        )
        raise SoupError("These weights do not fit the module, shapes differ: " + "; ".join(bad) + "." + hint)
    keys = list(live)
    with torch.no_grad():
        _inplace.assign_([live[k] for k in keys], [state[k] for k in keys])


def write_module_weights(trainer: Any, pl_module: Any, path: str | os.PathLike, recipe: Mapping[str, Any]) -> Path:
    """Write the module's current full weights to ``path`` atomically from global rank zero. Every rank calls it.

    Sharded (DTensor) entries are gathered one tensor at a time (a collective every rank joins), so no rank holds
    the full model; replicated entries are written from rank zero's copy without any communication.
    """
    path = Path(path)
    state = pl_module.state_dict()
    with contextlib.ExitStack() as stack, torch.no_grad():
        writer = None
        if trainer.is_global_zero:
            specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
            # The writer commits on a clean exit and removes its temporary file on an exception.
            writer = stack.enter_context(storage.SafetensorsWriter(path, specs, recipe=dict(recipe)))
        for key, value in state.items():
            full = value.full_tensor() if _is_dtensor(value) else value
            if writer is not None:
                writer.write(key, full.detach().to("cpu"))
            del full
    trainer.strategy.barrier("lightning_soup.write_module_weights")
    return path
