"""The base class of the three callbacks and their fit lifecycle: where files go, the end-of-fit backup of the raw
weights, finishing a resumed fit that skipped training, the order of producers and the blend.

Distributed plumbing is in :mod:`._dist`, the module's tensors in :mod:`._tensors`. Nothing here imports Lightning:
the callbacks are mixins bound to ``pytorch_lightning.Callback`` or ``lightning.pytorch.Callback`` elsewhere, so the
trainer and module are used duck-typed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_soup import storage
from lightning_soup.callbacks._dist import check_strategy, is_sharded, print_on_rank_zero, warn_on_rank_zero, world_size
from lightning_soup.callbacks._tensors import forget_kept_keys, module_tensors, write_module_weights
from lightning_soup.errors import SoupError

_SCRATCH = "_lightning_soup"  # per-trainer attribute shared by every soup callback of one fit


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
        if getattr(trainer, "lightning_module", None) is not None:
            forget_kept_keys(trainer.lightning_module)  # what training changes is fixed anew for this fit
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
