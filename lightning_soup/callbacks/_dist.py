"""Distributed plumbing shared by the callbacks: which strategies run, which rank keeps state and writes, how
weights and errors reach every rank.

Nothing here imports Lightning; the trainer is used duck-typed.

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
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_soup import storage
from lightning_soup.errors import SoupError

if TYPE_CHECKING:
    from rich.console import RenderableType

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


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
    'one device (`SingleDeviceStrategy`), the DDP family (`strategy="ddp"`, `"ddp_spawn"`, `"ddp_fork"`, '
    '`"ddp_notebook"`, with any number of nodes) and `ModelParallelStrategy` with FSDP2 '
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

    from lightning_soup.callbacks._tensors import canonical, canonical_key

    # keys without torch.compile's `_orig_mod.` segment, on both sides: files load whether the module is compiled
    state = canonical(pl_module.state_dict())
    keys = list(state) if keys is None else [canonical_key(k) for k in keys]
    distributed = world_size(trainer) > 1 and dist.is_available() and dist.is_initialized()
    out: dict[str, Tensor] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        reader = None
        specs: Any = None
        if trainer.is_global_zero or not distributed:
            try:
                reader = stack.enter_context(storage.open_state_dict(path))
                names = {canonical_key(k): k for k in reader}
                file_meta = reader.meta()
                meta = {c: file_meta[k] for c, k in names.items()}
                bad = [k for k in keys if k not in meta or tuple(meta[k].shape) != tuple(state[k].shape)]
                found = {k: "missing" if k not in meta else f"{tuple(meta[k].shape)}" for k in bad}
                specs = (
                    {k: meta[k].dtype for k in keys}
                    if not bad
                    else "; ".join(f"`{k}`: {found[k]} vs module {tuple(state[k].shape)}" for k in bad)
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
                full = reader[names[key]].to(device=device)
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


def broadcast_module_(trainer: Any, pl_module: Any, kept_only: bool = False) -> None:
    """Give every rank global rank zero's module weights. Every rank calls it.

    Replicated modules (DDP): every entry, one broadcast per tensor (tied weights once). Sharded modules (FSDP2):
    the shards are each rank's own, so only the entries that are not DTensors (buffers such as BatchNorm
    statistics, which FSDP2 does not synchronise) are broadcast, so that every rank ends with what rank zero
    writes. With ``kept_only`` only what training changes is sent (the callbacks never change frozen parameters,
    so those are equal on every rank already). A no-op on one process.
    """
    if world_size(trainer) <= 1:
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from lightning_soup.callbacks._tensors import canonical_key, kept_keys, unique_tensors

    state = pl_module.state_dict()
    if kept_only:
        keep = kept_keys(pl_module)
        state = {k: v for k, v in state.items() if canonical_key(k) in keep}
    with torch.no_grad():
        for value in unique_tensors(state).values():
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


def print_on_rank_zero(trainer: Any, renderable: RenderableType) -> None:
    """Print a rich renderable once, from global rank zero. A plain string is printed as text, not markup: messages
    hold paths and metric names (a ``[/]`` in a checkpoint path must not raise rich's MarkupError)."""
    if trainer.is_global_zero:
        from rich.console import Console
        from rich.text import Text

        Console().print(Text(renderable) if isinstance(renderable, str) else renderable)


def warn_on_rank_zero(trainer: Any, message: str) -> None:
    if trainer.is_global_zero:
        warnings.warn(message, UserWarning, stacklevel=3)
