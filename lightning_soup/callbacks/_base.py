"""Plumbing shared by the three callbacks: where files go, which rank writes, how weights enter and leave the module.

Nothing here does merge arithmetic (that is :mod:`lightning_soup.merge`); nothing here imports Lightning. The
callbacks are mixins bound to ``pytorch_lightning.Callback`` or ``lightning.pytorch.Callback`` elsewhere, so the
trainer and module are used duck-typed.

Distributed model (documented in the README):

* Replicated strategies (DDP, ddp_spawn, multi-node): replicas are identical, so global rank zero alone keeps
  snapshots and writes files; a result reaches the other ranks with :func:`broadcast_module_` (one broadcast per
  tensor, no shared filesystem assumed).
* Sharded strategies (FSDP2 ``fully_shard``): :func:`module_tensors` returns each rank's local shards, so running
  sums and candidates are shard-local; :func:`write_module_weights` gathers one tensor at a time for the final
  files, so no rank ever holds the full model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_soup import storage
from lightning_soup.errors import SoupError
from lightning_soup.merge import _inplace

if TYPE_CHECKING:
    from rich.console import RenderableType

_SCRATCH = "_lightning_soup"  # per-trainer attribute shared by every soup callback of one fit

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


class SoupCallback:
    """Mixin with what every soup callback shares; the implementations subclass it, the flavours add ``Callback``."""

    #: True for callbacks whose result replaces the module's weights (averaging, soup); a blend runs after them.
    _produces_weights: ClassVar[bool] = False
    _dirpath_arg: str | None = None

    def dirpath_for(self, trainer: Any) -> Path:
        """The output folder: ``dirpath`` or ``<trainer.default_root_dir>/soup``."""
        if self._dirpath_arg is not None:
            return Path(self._dirpath_arg).expanduser()
        return Path(trainer.default_root_dir) / "soup"

    def prepare_dirpath(self, trainer: Any) -> Path:
        """Create the output folder on rank zero, check it is writable and clear our stale temp files.

        Every rank calls it (at ``setup``) so that an unwritable folder fails everywhere before training starts.

        Raises:
            SoupError: ``dirpath`` cannot be created or written.
        """
        path = self.dirpath_for(trainer)
        problem = None
        if trainer.is_global_zero:
            problem = _check_writable_dir(path, argument=f"`{type(self).__name__.lstrip('_')}(dirpath=...)`")
            if problem is None:
                storage.remove_stale_temp_files(path)
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise SoupError(problem)
        return path


def _check_writable_dir(path: Path, argument: str = "`dirpath`") -> str | None:
    """Return why ``path`` cannot be used as an output folder, or None when it can."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return (
            f"{argument} {str(path)!r} is not a writable folder ({e.strerror or e}). "
            "Choose a folder you can write to, or fix its permissions, before training."
        )
    return None


def is_fitting(trainer: Any) -> bool:
    """True inside ``trainer.fit``; the callbacks do nothing in ``validate``/``test``/``predict``."""
    return trainer.state.fn == "fit"


def world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1))


def is_sharded(pl_module: Any) -> bool:
    """True when the module's parameters are DTensor shards (FSDP2 ``fully_shard``)."""
    return any(_is_dtensor(p) for p in pl_module.parameters())


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
    bad = [f"`{k}`: {tuple(state[k].shape)} vs module {tuple(v.shape)}" for k, v in live.items() if state[k].shape != v.shape]
    if bad:
        raise SoupError("These weights do not fit the module, shapes differ: " + "; ".join(bad))
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


def save_final_weights(trainer: Any, pl_module: Any, dirpath: str | os.PathLike) -> Path:
    """Back up the raw trained weights to ``dirpath/final.safetensors``, once per fit. Every rank calls it.

    Call it at the start of ``on_train_end``, before changing the module. With several soup callbacks in one fit,
    the first call writes the file and later calls (which may find the module already replaced by an average or a
    soup) copy that first file into their own ``dirpath`` instead of saving the module again.
    """
    target = Path(dirpath) / "final.safetensors"
    scratch = trainer.__dict__.setdefault(_SCRATCH, {})
    token = (id(pl_module), trainer.global_step, trainer.current_epoch)
    saved = scratch.get("final")
    if saved is not None and saved[0] == token:
        first = saved[1]
        if trainer.is_global_zero and first.resolve() != target.resolve():
            with storage.atomic_write(target) as tmp:
                shutil.copyfile(first, tmp)
        trainer.strategy.barrier("lightning_soup.save_final_weights")
        return target
    recipe = {"method": "final", "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    write_module_weights(trainer, pl_module, target, recipe)
    scratch["final"] = (token, target)
    return target


def broadcast_module_(trainer: Any, pl_module: Any) -> None:
    """Give every rank global rank zero's module weights (replicated strategies). Every rank calls it.

    A no-op on one process and for sharded modules, whose shards are already each rank's own.
    """
    if world_size(trainer) <= 1 or is_sharded(pl_module):
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    with torch.no_grad():
        for tensor in module_tensors(pl_module).values():
            torch.distributed.broadcast(tensor, src=0)


def producers(trainer: Any) -> list[Any]:
    """The callbacks in ``trainer.callbacks`` whose result replaces the module's weights."""
    return [c for c in trainer.callbacks if getattr(c, "_produces_weights", False)]


def move_after_producers(trainer: Any, callback: Any) -> None:
    """Move ``callback`` right after the last weight producer, so its ``on_train_end`` sees their result.

    Lightning calls hooks in ``trainer.callbacks`` order, read afresh for every hook, so reordering at ``setup``
    makes a blend independent of the order the user listed the callbacks in.
    """
    callbacks = trainer.callbacks
    last = max((i for i, c in enumerate(callbacks) if getattr(c, "_produces_weights", False)), default=-1)
    mine = next(i for i, c in enumerate(callbacks) if c is callback)
    if mine < last:
        callbacks.pop(mine)
        callbacks.insert(last, callback)


def print_on_rank_zero(trainer: Any, renderable: RenderableType) -> None:
    """Print a rich renderable once, from global rank zero."""
    if trainer.is_global_zero:
        from rich.console import Console

        Console().print(renderable)


def warn_on_rank_zero(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        warnings.warn(message, UserWarning, stacklevel=3)
