"""Plumbing shared by the three callbacks: where files go, which rank writes, how weights enter and leave the module.

Nothing here does merge arithmetic (that is :mod:`lightning_soup.merge`); nothing here imports Lightning. The
callbacks are mixins bound to ``pytorch_lightning.Callback`` or ``lightning.pytorch.Callback`` elsewhere, so the
trainer and module are used duck-typed.

Distributed model (documented in the README):

* Supported strategies (:func:`check_strategy`): one device, the DDP family (``ddp``, ``ddp_spawn``, ``ddp_fork``,
  ``ddp_notebook``, several nodes) and ``ModelParallelStrategy`` with FSDP2 ``fully_shard``. FSDP1 and DeepSpeed
  are refused at ``setup``.
* Replicated strategies (DDP): replicas are identical, so global rank zero alone keeps snapshots
  (:func:`owns_state`) and writes files; a result reaches the other ranks with :func:`broadcast_module_` (one
  broadcast per tensor, no shared filesystem assumed).
* Sharded strategies (``ModelParallelStrategy``): :func:`module_tensors` returns each rank's local shards, so
  running sums, snapshots and candidates are shard-local and need no communication; every rank keeps its own
  state (:func:`owns_state` is True everywhere) in its own folder (:func:`rank_dir`). :func:`write_module_weights`
  gathers one tensor at a time for the final files, so no rank ever holds the full model; buffers, which FSDP2
  does not synchronise, are taken from rank zero (:func:`broadcast_module_`).
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

        Every rank calls it (at ``setup``) so that an unwritable folder fails everywhere before training starts. It
        also refuses unsupported strategies (:func:`check_strategy`), before anything is written.

        Raises:
            SoupError: the strategy is not supported, or ``dirpath`` cannot be created or written.
        """
        check_strategy(trainer, self)
        # A new fit: forget the previous fit's end-of-fit marks (see `on_fit_end`, `save_final_weights`).
        scratch = trainer.__dict__.setdefault(_SCRATCH, {})
        for key in ("final", "train_end_skipped"):
            scratch.pop(key, None)
        path = self.dirpath_for(trainer)
        problem = None
        if trainer.is_global_zero:
            problem = _check_writable_dir(path, argument=f"`{type(self).__name__.lstrip('_')}(dirpath=...)`")
            if problem is None:
                # A killed run leaves temporaries in the callbacks' subfolders too (snapshots/, ingredients/,
                # online/rank{R}/): clean dirpath and two levels below it.
                children = [p for p in path.iterdir() if p.is_dir()]
                for folder in [path, *children, *(q for p in children for q in p.iterdir() if q.is_dir())]:
                    storage.remove_stale_temp_files(folder)
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise SoupError(problem)
        return path

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Finish a resumed fit whose checkpoint was saved after training had already finished.

        ``ModelCheckpoint`` saves the last epoch's checkpoint in ``on_train_epoch_end``, before ``on_train_end``
        builds the average, the soup or the blend. A run killed after that checkpoint and resumed from it does not
        train: Lightning sees the finished fit loop and skips it, with ``on_train_start`` and ``on_train_end``. Here,
        after the strategy's teardown, the callback runs its own ``on_train_start`` and ``on_train_end`` on the
        trainer's device, so the resumed fit ends with the same files and weights as an uninterrupted one.
        """
        if not is_fitting(trainer) or trainer.ckpt_path is None:
            return
        scratch = trainer.__dict__.setdefault(_SCRATCH, {})
        # Decided once per fit by the first soup callback here, before any of them finishes: every soup callback's
        # on_train_end starts with save_final_weights, which leaves "final" in the scratch.
        if not scratch.setdefault("train_end_skipped", "final" not in scratch):
            return
        _finish_skipped_fit(self, trainer, pl_module)


def _finish_skipped_fit(callback: Any, trainer: Any, pl_module: Any) -> None:
    """Run ``callback``'s ``on_train_start`` and ``on_train_end`` after the strategy's teardown. Every rank calls it.

    Teardown moved a replicated module back to the CPU (DDP also drops its wrapper) but keeps the process group,
    which the end-of-fit collectives and the validation passes need; a sharded (FSDP2) module stays on its devices.
    The module goes to the trainer's device for the work and back to where teardown left it after.
    """
    import torch.distributed as dist

    name = type(callback).__name__.lstrip("_")
    if world_size(trainer) > 1 and not (dist.is_available() and dist.is_initialized()):
        warn_on_rank_zero(
            trainer,
            f"{name}: the end-of-fit work did not run because training had already finished in the checkpoint "
            f"{str(trainer.ckpt_path)!r} and the strategy's teardown destroyed the process group, so no output file "
            "was written and the module keeps its trained weights. Combine the snapshots, ingredients or anchor kept "
            "in `dirpath` offline with the `lightning-soup` CLI.",
        )
        return
    root = torch.device(trainer.strategy.root_device)
    previous = next((t.device for t in module_tensors(pl_module).values()), root)
    move = not is_sharded(pl_module) and previous != root
    print_on_rank_zero(
        trainer,
        f"{name}: training had already finished in the checkpoint {str(trainer.ckpt_path)!r}, saved before the end "
        "of fit; running the end-of-fit work now.",
    )
    if move:
        pl_module.to(root)
    try:
        callback.on_train_start(trainer, pl_module)
        callback.on_train_end(trainer, pl_module)
    finally:
        if move:
            pl_module.to(previous)


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
    """True when the module's weights are DTensor shards (FSDP2 ``fully_shard``, tensor parallelism).

    Looks at ``state_dict()``, not ``parameters()``: after an evaluation forward FSDP2 leaves the root module's
    parameters unsharded (plain tensors) until something reshards them, while ``state_dict()`` always has the shards.
    Meaningful once the module is configured (from ``on_fit_start``); see :func:`keeps_state_per_rank` for ``setup``.
    """
    return any(_is_dtensor(v) for v in pl_module.state_dict().values())


def reshard_(pl_module: Any) -> None:
    """Put every FSDP2 module back in its sharded state, freeing gathered parameters (a no-op without FSDP2).

    FSDP2 does not reshard the root module after a forward pass that has no backward (an evaluation), and the next
    forward then reuses the gathered copy. Weights written into the shards in between would be ignored by that
    forward, so call this after evaluating and before writing into tensors obtained before the evaluation.
    :func:`module_tensors` (``state_dict()``) reshards on its own.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in pl_module.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# Strategies by class name (no Lightning import here; a user's subclass inherits its family's verdict).
_REPLICATED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
_SHARDED_STRATEGIES = ("ModelParallelStrategy",)
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed partitions parameters and optimizer state outside `state_dict()` (ZeRO)",
    "FSDPStrategy": "FSDP1 flattens parameters into `FlatParameter`s whose shards do not map onto `state_dict()` keys",
    "XLAStrategy": "multi-device XLA synchronises through `torch_xla`, not `torch.distributed`",
}
SUPPORTED_STRATEGIES = (
    "one device (`SingleDeviceStrategy`), the DDP family (`strategy=\"ddp\"`, `\"ddp_spawn\"`, `\"ddp_fork\"`, "
    "`\"ddp_notebook\"`, with any number of nodes) and `ModelParallelStrategy` with FSDP2 "
    "(`torch.distributed.fsdp.fully_shard` applied in `configure_model`)"
)


def _strategy_family(strategy: Any) -> str | None:
    names = [c.__name__ for c in type(strategy).__mro__]
    for name in names:  # most derived first: DeepSpeedStrategy and XLAStrategy subclass DDPStrategy
        if name in _REFUSED_STRATEGIES or name in _REPLICATED_STRATEGIES or name in _SHARDED_STRATEGIES:
            return name
    return None


def check_strategy(trainer: Any, callback: Any = None) -> None:
    """Refuse strategies whose weights the callbacks cannot read shard by shard. Call it in ``setup``.

    Args:
        trainer: the trainer about to fit.
        callback: the calling callback, named in the message.

    Raises:
        SoupError: the strategy is FSDP1, DeepSpeed, multi-device XLA or not one the callbacks know, naming the
            supported ones and what to use instead.
    """
    strategy = trainer.strategy
    family = _strategy_family(strategy)
    if family in _REPLICATED_STRATEGIES or family in _SHARDED_STRATEGIES:
        return
    who = f"`{type(callback).__name__.lstrip('_')}`" if callback is not None else "lightning_soup's callbacks"
    why = _REFUSED_STRATEGIES.get(family or "", "it is not one the callbacks know how to read weights from")
    hint = (
        " For sharded training use `ModelParallelStrategy` and call `fully_shard` on your layers and the module in "
        "`LightningModule.configure_model` (FSDP2): every rank then averages its own shards with no communication."
        if family in ("FSDPStrategy", "DeepSpeedStrategy")
        else ""
    )
    raise SoupError(
        f"{who} does not support `{type(strategy).__name__}`: {why}. Supported strategies: {SUPPORTED_STRATEGIES}."
        + hint
    )


def keeps_state_per_rank(trainer: Any, pl_module: Any = None) -> bool:
    """True when every rank keeps its own snapshots (sharded training), False when rank zero's serve all.

    Valid from ``setup`` on: it looks at the strategy (``ModelParallelStrategy``), because in ``setup`` the module
    is not sharded yet (Lightning calls ``configure_model`` after the callbacks' ``setup``); a module whose
    parameters are already DTensors counts too.
    """
    if _strategy_family(trainer.strategy) in _SHARDED_STRATEGIES:
        return True
    return pl_module is not None and is_sharded(pl_module)


def owns_state(trainer: Any, pl_module: Any = None) -> bool:
    """Whether this rank keeps snapshots, running sums and ingredients.

    Global rank zero under replicated strategies (the replicas are identical: the others keep nothing and get the
    result with :func:`broadcast_module_`); every rank under sharded strategies (each keeps the state of its own
    shards, in :func:`rank_dir`). Use it where a DDP-only callback would test ``trainer.is_global_zero`` before
    snapshotting; keep ``trainer.is_global_zero`` for output files, json and printing.
    """
    return bool(trainer.is_global_zero) or keeps_state_per_rank(trainer, pl_module)


def rank_dir(trainer: Any, pl_module: Any, dirpath: str | os.PathLike, name: str) -> Path:
    """The folder for this rank's private state files (snapshots, ingredients, running sums), created.

    ``dirpath/name`` under replicated strategies (only rank zero uses it), ``dirpath/name/rank{R}`` under sharded
    ones, where every rank writes and reads only its own shards: no shared filesystem is needed, and nothing is
    gathered. Store file names relative to this folder in ``state_dict()``: a checkpoint holds rank zero's callback
    state, which every rank loads on resume.
    """
    folder = Path(dirpath) / name
    if keeps_state_per_rank(trainer, pl_module):
        folder = folder / f"rank{int(trainer.global_rank)}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def local_shard(full: Tensor, like: Tensor) -> Tensor:
    """The part of the full tensor ``full`` that this rank holds of the DTensor ``like`` (a view; plain tensors pass).

    Raises:
        SoupError: ``full`` does not have ``like``'s global shape.
    """
    if not _is_dtensor(like):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise SoupError(f"expected a full tensor of shape {tuple(like.shape)}, got {tuple(full.shape)}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    piece = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    local = like.to_local()
    if tuple(piece.shape) != tuple(local.shape):  # placements a plain slice cannot express (e.g. strided shards)
        raise SoupError(
            f"cannot cut this rank's shard {tuple(local.shape)} out of a full tensor with placements {like.placements}"
        )
    return piece


def read_local_shards(
    trainer: Any, pl_module: Any, path: str | os.PathLike, keys: list[str] | None = None
) -> dict[str, Tensor]:
    """This rank's part of a full-weights file (``.safetensors``, sharded folder or ``.ckpt``). Every rank calls it.

    Shard-local like :func:`module_tensors`: DTensor entries come back as this rank's local shard, others whole,
    each on the device of the module's tensor, in the file's dtype. Only global rank zero reads the file (other
    nodes need not see it), one tensor at a time; it scatters each sharded entry (every rank receives only its
    shard) and broadcasts each replicated one. On one process the file is simply read.

    Args:
        trainer: the trainer (for the rank and the strategy's broadcast).
        pl_module: the module whose ``state_dict()`` keys, shapes and placements the file must match.
        path: the file or folder to read.
        keys: the entries to read (default: every key of the module's ``state_dict()``).

    Raises:
        SoupError: the file is missing a key or has another shape (raised on every rank).
    """
    import torch.distributed as dist

    state = pl_module.state_dict()
    keys = list(state) if keys is None else list(keys)
    distributed = world_size(trainer) > 1 and dist.is_available() and dist.is_initialized()
    out: dict[str, Tensor] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        reader = None
        specs: Any = None
        if trainer.is_global_zero or not distributed:
            try:
                reader = stack.enter_context(storage.open_state_dict(path))
                meta = reader.meta()
                bad = [k for k in keys if k not in meta or tuple(meta[k].shape) != tuple(state[k].shape)]
                found = {k: "missing" if k not in meta else f"{tuple(meta[k].shape)}" for k in bad}
                specs = {k: meta[k].dtype for k in keys} if not bad else "; ".join(
                    f"`{k}`: {found[k]} vs module {tuple(state[k].shape)}" for k in bad
                )
            except SoupError as e:
                specs = str(e)
        if distributed:
            specs = trainer.strategy.broadcast(specs)
        if isinstance(specs, str):
            raise SoupError(f"{str(path)!r} does not fit the module: {specs}")
        for key in keys:
            like = state[key]
            sharded = _is_dtensor(like)
            device = like.to_local().device if sharded else like.device
            if reader is not None:
                full = reader[key].to(device=device)
            else:
                full = torch.empty(tuple(like.shape), dtype=specs[key], device=device)
            if sharded and distributed:
                from torch.distributed.tensor import distribute_tensor

                out[key] = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=0).to_local()
            elif sharded:
                out[key] = local_shard(full, like).clone()
            else:
                if distributed:
                    dist.broadcast(full, src=0)
                out[key] = full
            del full
    return out


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
    """Give every rank global rank zero's module weights. Every rank calls it.

    Replicated modules (DDP): every entry, one broadcast per tensor. Sharded modules (FSDP2): the shards are each
    rank's own, so only the entries that are not DTensors (buffers such as BatchNorm statistics, which FSDP2 does
    not synchronise) are broadcast, so that every rank ends with what rank zero writes. A no-op on one process.
    """
    if world_size(trainer) <= 1:
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    with torch.no_grad():
        for value in pl_module.state_dict().values():
            if not _is_dtensor(value):
                torch.distributed.broadcast(value, src=0)


def raise_on_every_rank(trainer: Any, problem: str | None, error: BaseException | None = None) -> None:
    """Raise the same :class:`SoupError` on every rank when any rank found a problem. Every rank calls it.

    Use it where ranks check their own files or shards (sharded state, per-rank folders), so that a problem seen by
    one rank stops all of them together instead of leaving the others waiting in the next collective. Costs one
    scalar all-reduce, plus one broadcast of the message from the lowest failing rank when there is one.

    Args:
        trainer: the trainer (for the rank, world size and strategy).
        problem: this rank's error message, or None.
        error: this rank's exception, chained as the cause where it happened.

    Raises:
        SoupError: on every rank, with the message of the lowest rank that had a problem.
    """
    import torch.distributed as dist

    if world_size(trainer) > 1 and dist.is_available() and dist.is_initialized():
        size = world_size(trainer)
        device = getattr(trainer.strategy, "root_device", torch.device("cpu"))
        first = torch.tensor([int(trainer.global_rank) if problem is not None else size], device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        src = int(first.item())
        if src == size:
            return
        message = trainer.strategy.broadcast(problem, src=src)
        if problem is None:
            problem, error = message, None
    if problem is not None:
        raise SoupError(problem) from error


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
