"""Helpers shared by the worker scripts in ``tests/dist`` (run as separate processes by ``tests/_launch.py``)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from _models import tiny_classifier_class

FLAVOURS = {
    "pytorch_lightning": ("pytorch_lightning", "lightning_soup"),
    "lightning": ("lightning.pytorch", "lightning_soup.lightning"),
}


def out_dir() -> Path:
    return Path(os.environ["SOUP_TEST_OUT"])


def flavour(name: str) -> tuple[ModuleType, ModuleType]:
    """The Lightning package and the lightning_soup module bound to it."""
    pl_name, soup_name = FLAVOURS[name]
    return importlib.import_module(pl_name), importlib.import_module(soup_name)


def write_result(rank: int, result: dict[str, Any], name: str = "rank") -> None:
    path = out_dir() / f"{name}{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, path)


def finish() -> None:
    """End a worker whose results are written: wait for every rank, then tear the process group down.

    Without ``destroy_process_group`` Gloo's worker threads outlive the interpreter and a rank can abort with
    SIGABRT ("terminate called without an active exception") while exiting, after its work succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sharded_classifier_class(pl: ModuleType) -> type:
    """``TinyClassifier`` whose ``configure_model`` applies FSDP2 ``fully_shard`` to each Linear and the root.

    The last Linear has 3 output rows, so on 2 ranks its shards are uneven (2 rows and 1 row).
    """
    from torch.distributed.fsdp import fully_shard

    base = tiny_classifier_class(pl)

    class ShardedClassifier(base):  # type: ignore[misc,valid-type]
        def configure_model(self) -> None:
            if any(True for _ in self._fsdp_roots()):
                return  # already sharded (a later validate/test re-enters configure_model)
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def _fsdp_roots(self) -> Iterator[Any]:
            from torch.distributed.fsdp import FSDPModule

            return (m for m in self.modules() if isinstance(m, FSDPModule))

    return ShardedClassifier


def model_parallel_strategy(pl: ModuleType, nprocs: int = 2) -> Any:
    return pl.strategies.ModelParallelStrategy(data_parallel_size=nprocs, tensor_parallel_size=1)


def trainer_kwargs(root: Path, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(root),
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full ``state_dict`` on the CPU: DTensor shards gathered (a collective every rank joins)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        out[k] = v.detach().to("cpu").clone()
    return out


class CollectiveCounter:
    """Counts the calls that would move whole weights between ranks, while :attr:`active`.

    Patched: ``DTensor.full_tensor``/``redistribute``, ``distribute_tensor``, the DTensor functional all-gather,
    ``torch.distributed.{all_gather, all_gather_object, gather, gather_object, scatter}``, ``all_reduce`` of
    non-scalars (Lightning syncs logged scalars) and ``get_model_state_dict``/``get_state_dict``. ``broadcast``
    of floating tensors is recorded by size in :attr:`broadcast_numel` (decisions travel as byte/long tensors;
    buffers, which FSDP2 does not synchronise, may legitimately be broadcast). FSDP2's own per-layer parameter
    all-gather in forward (``all_gather_into_tensor``) is not counted: it is the training itself.
    """

    def __init__(self) -> None:
        self.active = False
        self.calls: dict[str, int] = {}
        self.broadcast_numel: list[int] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str, counts: Any = None) -> None:
        original = getattr(owner, name)
        counter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if counter.active and (counts is None or counts(*args, **kwargs)):
                counter.calls[name] = counter.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, original))

    def install(self) -> CollectiveCounter:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.checkpoint.state_dict as dcp_sd
        import torch.distributed.tensor as dt
        from torch.distributed.tensor import DTensor

        def floating(tensor: Any, *args: Any, **kwargs: Any) -> bool:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.broadcast_numel.append(tensor.numel())
            return False

        def non_scalar(tensor: Any, *args: Any, **kwargs: Any) -> bool:
            return isinstance(tensor, torch.Tensor) and tensor.numel() > 1

        self._wrap(DTensor, "full_tensor")
        self._wrap(DTensor, "redistribute")
        self._wrap(dt, "distribute_tensor")
        self._wrap(funcol, "all_gather_tensor")
        for name in ("all_gather", "all_gather_object", "gather", "gather_object", "scatter"):
            self._wrap(dist, name)
        self._wrap(dist, "broadcast", floating)
        self._wrap(dist, "all_reduce", non_scalar)
        self._wrap(dcp_sd, "get_model_state_dict")
        self._wrap(dcp_sd, "get_state_dict")
        return self

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active
