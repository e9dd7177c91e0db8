"""The module's tensors as the callbacks see them: live views, loading weights in, writing them out.

Three facts about real fine-tuning models shape this view:

* **Keys** are those of ``state_dict()`` without ``torch.compile``'s ``_orig_mod.`` segment (a module compiled
  inside the LightningModule writes ``model._orig_mod.x``): files written here load into the plain model, and files
  with either spelling are read.
* **Tied weights** (GPT-2 / Llama ``tie_word_embeddings``: one tensor under ``transformer.wte.weight`` and
  ``lm_head.weight``) are one storage: :func:`kept_tensors` lists each storage once, so a merge updates it once.
  Output files still carry every key ``state_dict()`` has.
* **What training changes** is what the callbacks keep (:func:`kept_tensors`): parameters with
  ``requires_grad=True`` and buffers. A LoRA run's frozen base is never snapshotted or re-read; it comes from the
  module whenever a full file is written.

Nothing here does merge arithmetic (that is :mod:`lightning_soup.merge`) or imports Lightning.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_soup import storage
from lightning_soup.callbacks._dist import _is_dtensor, is_sharded
from lightning_soup.errors import SoupError
from lightning_soup.merge import _inplace


_COMPILED = "_orig_mod"


def canonical_key(key: str) -> str:
    """``key`` without the ``_orig_mod`` segments ``torch.compile`` adds (the key of the plain model).

    Example:
        >>> canonical_key("model._orig_mod.h.0.weight")
        'model.h.0.weight'
    """
    if _COMPILED not in key:
        return key
    return ".".join(part for part in key.split(".") if part != _COMPILED)


def canonical(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` with :func:`canonical_key` keys (files written by compiled modules, or by older versions).

    ``state`` itself when no key needs a change, so a lazy mapping is not read here.
    """
    if not any(_COMPILED in k for k in state):
        return state
    return {canonical_key(k): state[k] for k in state}


def module_tensors(pl_module: Any) -> dict[str, Tensor]:
    """The module's ``state_dict()`` entries as live tensors: writing into them changes the module.

    Keys are :func:`canonical_key` ones. Tied weights appear under each of their keys (the same tensor); use
    :func:`kept_tensors` for arithmetic. DTensors are replaced by their local shard, so every computation on the
    result is shard-local.
    """
    return {canonical_key(k): (v.to_local() if _is_dtensor(v) else v) for k, v in pl_module.state_dict().items()}


def _storage_id(t: Tensor) -> Any:
    if _is_dtensor(t):
        t = t.to_local()
    if t.device.type == "meta":
        return id(t)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def unique_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with each storage once (the first key of tied weights), so in-place arithmetic runs once on it.

    Example:
        >>> import torch
        >>> w = torch.zeros(2)
        >>> list(unique_tensors({"wte.weight": w, "lm_head.weight": w, "b": torch.zeros(2)}))
        ['wte.weight', 'b']
    """
    seen: set[Any] = set()
    out: dict[str, Tensor] = {}
    for k, v in tensors.items():
        sid = _storage_id(v)
        if sid not in seen:
            seen.add(sid)
            out[k] = v
    return out


_KEPT = "_lightning_soup_kept"  # the module's kept keys for the current fit (see kept_keys)


def kept_keys(pl_module: Any) -> set[str]:
    """Canonical keys of what training changes: parameters with ``requires_grad=True``, and every buffer.

    Fixed for a fit at its first use (:func:`forget_kept_keys` at setup starts afresh), so that every snapshot,
    ingredient and anchor of one fit holds the same entries. A parameter unfrozen later in the fit (e.g. by
    ``BackboneFinetuning``) is not kept — it takes its trained value in every result — and is warned about once.
    """
    trainable = {n for n, p in pl_module.named_parameters(remove_duplicate=False) if p.requires_grad}
    buffers = {n for n, b in pl_module.named_buffers(remove_duplicate=False) if b is not None}
    current = {canonical_key(k) for k in trainable | buffers}
    cached = pl_module.__dict__.get(_KEPT)
    if cached is None:
        pl_module.__dict__[_KEPT] = (current, False)
        return current
    kept, warned = cached
    new = sorted(current - kept)
    if new and not warned:
        pl_module.__dict__[_KEPT] = (kept, True)
        if getattr(pl_module, "global_rank", 0) == 0:
            warnings.warn(
                f"{len(new)} parameters became trainable after the soup callbacks started keeping weights (frozen "
                f"then): {new[:5]}{' ...' if len(new) > 5 else ''}. Averages, soups and blends keep them at their "
                "trained values. Unfreeze before fit starts to have them merged.",
                UserWarning,
                stacklevel=2,
            )
    return kept


def forget_kept_keys(pl_module: Any) -> None:
    """Start a new fit's kept set (the callbacks call it at setup)."""
    pl_module.__dict__.pop(_KEPT, None)


def kept_tensors(pl_module: Any) -> dict[str, Tensor]:
    """The live tensors the callbacks keep: trainable parameters and buffers, each storage once, in
    ``state_dict()`` order, with canonical keys (local shards for DTensors).

    Frozen parameters (a LoRA run's base model) are left out: they never change during training, so snapshots,
    ingredients, running sums and anchors need not hold them, and they come from the module when a full file is
    written (:func:`write_module_weights`).
    """
    keep = kept_keys(pl_module)
    return unique_tensors({k: v for k, v in module_tensors(pl_module).items() if k in keep})


def floating_items(tensors: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    """The keys and values of the floating-point entries, in order."""
    keys = [k for k, v in tensors.items() if v.is_floating_point()]
    return keys, [tensors[k] for k in keys]


def load_into_module_(pl_module: Any, state: Mapping[str, Tensor], partial: bool = False) -> None:
    """Copy ``state`` (any device or dtype) into the module's live tensors, in place.

    Keys may carry ``_orig_mod.`` segments or not, whether the module is compiled or not. Each storage is written
    once (tied weights take the value of their first key in ``state``).

    Args:
        pl_module: the module.
        state: the weights; all of the module's keys, or with ``partial`` a subset (e.g. :func:`kept_tensors`'
            keys: the rest of the module is left as it is).
        partial: accept a subset of the module's keys.

    Raises:
        SoupError: the keys or shapes of ``state`` do not match the module's.
    """
    live = module_tensors(pl_module)
    state = canonical(state)
    missing = [] if partial else sorted(live.keys() - state.keys())
    unexpected = sorted(state.keys() - live.keys())
    if missing or unexpected:
        raise SoupError(
            f"These weights do not fit the module: missing keys {missing or 'none'}, unexpected keys "
            f"{unexpected or 'none'}. Were they saved from a different model?"
        )
    bad = [
        f"`{k}`: {tuple(state[k].shape)} vs module {tuple(live[k].shape)}"
        for k in state
        if state[k].shape != live[k].shape
    ]
    if bad:
        hint = (
            " The module is sharded, so these are this rank's local shards: per-rank files only fit a run with the "
            "same number of processes and the same sharding (full weights: use `read_local_shards`)."
            if is_sharded(pl_module)
            else ""
        )
        raise SoupError("These weights do not fit the module, shapes differ: " + "; ".join(bad) + "." + hint)
    keys = list(unique_tensors({k: live[k] for k in state}))
    keys = [k for k in keys if _storage_id(state[k]) != _storage_id(live[k])]  # already the module's own tensor
    with torch.no_grad():
        _inplace.assign_([live[k] for k in keys], [state[k] for k in keys])


def write_module_weights(
    trainer: Any, pl_module: Any, path: str | os.PathLike, recipe: Mapping[str, Any], kept_only: bool = False
) -> Path:
    """Write the module's current full weights to ``path`` atomically from global rank zero. Every rank calls it.

    Keys are those of ``state_dict()`` without ``_orig_mod.`` segments, tied weights under each of their keys, so
    the file loads with ``model.load_state_dict(load_file(path))`` into the plain (uncompiled) model. With
    ``kept_only`` only :func:`kept_tensors`' entries are written (an ``"initial"`` anchor of a LoRA run is its
    adapter). Sharded (DTensor) entries are gathered one tensor at a time (a collective every rank joins), so no
    rank holds the full model; replicated entries are written from rank zero's copy without any communication.
    """
    path = Path(path)
    state = canonical(pl_module.state_dict())  # a compiled module's files load into the plain model
    if kept_only:
        # every key of a kept tensor, tied ones included, so the file still pairs with full ones (CLI `blend`)
        keep = kept_keys(pl_module)
        state = {k: v for k, v in state.items() if k in keep}
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
