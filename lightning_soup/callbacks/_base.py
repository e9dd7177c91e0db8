"""The base class of the three callbacks and their fit lifecycle: where files go, the end-of-fit backup of the raw
weights, finishing a resumed fit that skipped training, the order of producers and the blend.

Distributed plumbing is in :mod:`._dist`, the module's tensors in :mod:`._tensors`. Nothing here imports Lightning:
the callbacks are mixins bound to ``pytorch_lightning.Callback`` or ``lightning.pytorch.Callback`` elsewhere, so the
trainer and module are used duck-typed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_soup import storage
from lightning_soup.callbacks._dist import check_strategy, is_sharded, print_on_rank_zero, warn_on_rank_zero, world_size
from lightning_soup.callbacks._tensors import forget_kept_keys, load_into_module_, module_tensors, write_module_weights
from lightning_soup.errors import SoupError

_SCRATCH = "_lightning_soup"  # per-trainer attribute shared by every soup callback of one fit
LOCK_FILE = ".lightning_soup.lock"  # in dirpath while a fit writes there; see `_acquire_dirpath`
_HELD_LOCKS: dict[str, Any] = {}  # lock path -> weakref to the trainer holding it, in this process


class SoupCallback:
    """Mixin with what every soup callback shares; the implementations subclass it, the flavours add ``Callback``."""

    #: True for callbacks whose result replaces the module's weights (averaging, soup); a blend runs after them.
    _produces_weights: ClassVar[bool] = False
    #: The files and folders in ``dirpath`` this callback alone writes: two callbacks may share a ``dirpath`` only
    #: when these do not overlap (``final.safetensors`` is shared on purpose).
    _outputs: ClassVar[tuple[str, ...]] = ()
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
        _check_outputs_unshared(trainer, self, path)
        problem = None
        if trainer.is_global_zero:
            problem = _check_writable_dir(path, argument=f"`{type(self).__name__.lstrip('_')}(dirpath=...)`")
            if problem is None:
                problem = _acquire_dirpath(trainer, path)
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

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """End of a fit that succeeded: release ``dirpath`` and the raw weights' backup."""
        if stage == "fit":
            _end_fit(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """End of a fit that failed (Lightning calls no ``teardown`` then): release ``dirpath`` and the backup."""
        _end_fit(trainer)


def _end_fit(trainer: Any) -> None:
    release_dirpaths(trainer)
    trainer.__dict__.get(_SCRATCH, {}).pop("raw", None)


def skip_fast_dev_run(trainer: Any, callback: Any) -> bool:
    """Under ``Trainer(fast_dev_run=...)`` take ``callback`` out of the fit and say so once; True when it did.

    Lightning suppresses checkpointing and logging in a fast dev run; the soup callbacks likewise write nothing and
    leave the weights alone. Call it first in ``setup``. The trainer's callback list is replaced, not mutated, so
    the ``setup`` loop Lightning is running still reaches every other callback.
    """
    if not getattr(trainer, "fast_dev_run", False):
        return False
    scratch = trainer.__dict__.setdefault(_SCRATCH, {})
    if not scratch.get("fast_dev_run_said"):
        scratch["fast_dev_run_said"] = True
        names = sorted({type(c).__name__.lstrip("_") for c in trainer.callbacks if isinstance(c, SoupCallback)})
        warn_on_rank_zero(
            trainer,
            f"{', '.join(names)}: `Trainer(fast_dev_run=...)` is set, so they do nothing in this fit: no snapshot, "
            "ingredient, anchor or output file is written and the module keeps its trained weights (Lightning "
            "likewise skips checkpointing and logging). Run without `fast_dev_run` to average, soup or blend.",
        )
    trainer.callbacks = [c for c in trainer.callbacks if c is not callback]
    return True


def restores_raw_weights(hook: Callable[..., None]) -> Callable[..., None]:
    """Decorate an ``on_train_end``: if it fails (any exception, KeyboardInterrupt included), the module gets the
    raw trained weights back before the error propagates, never a half-built candidate.

    One process: the raw weights are read back from ``final.safetensors`` (written first by every end-of-fit hook),
    so nothing extra is held. Several processes: a rank cannot count on reading rank zero's file, and a collective
    could hang on a failure seen by one rank only, so the first end-of-fit hook keeps a host copy of this rank's
    (shard-local) tensors until the fit ends.
    """

    @functools.wraps(hook)
    def wrapper(self: Any, trainer: Any, pl_module: Any) -> None:
        scratch = trainer.__dict__.setdefault(_SCRATCH, {})
        if world_size(trainer) > 1 and "final" not in scratch and "raw" not in scratch:
            with torch.no_grad():
                scratch["raw"] = {k: v.detach().to("cpu", copy=True) for k, v in module_tensors(pl_module).items()}
        try:
            hook(self, trainer, pl_module)
        except BaseException:
            _restore_raw_weights(trainer, pl_module, scratch)
            raise

    return wrapper


def _restore_raw_weights(trainer: Any, pl_module: Any, scratch: dict[str, Any]) -> None:
    raw = scratch.get("raw")
    final = scratch.get("final")
    try:
        if raw is not None:
            load_into_module_(pl_module, raw)
        elif final is not None:
            load_into_module_(pl_module, storage.load_state_dict(final[1]))
    except Exception as e:  # noqa: BLE001 - the original error matters more; say where the raw weights are
        where = f" They are in {str(final[1])!r}." if final is not None else ""
        warn_on_rank_zero(
            trainer, f"Could not put the raw trained weights back into the module after a failure ({e}).{where}"
        )


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
    callbacks = list(trainer.callbacks)
    last = max((i for i, c in enumerate(callbacks) if getattr(c, "_produces_weights", False)), default=-1)
    mine = next(i for i, c in enumerate(callbacks) if c is callback)
    if mine < last:
        callbacks.pop(mine)
        callbacks.insert(last, callback)
        # A new list, not the old one changed in place: Lightning is iterating over the old one to call `setup`,
        # and an in-place move would call this callback's `setup` twice and skip the next callback's.
        trainer.callbacks = callbacks


# ------------------------------------------------------------------------------------------- untrusted callback state
def corrupt_state(callback: Any, detail: str) -> SoupError:
    """The error for callback state in a checkpoint that this package did not write (or that was damaged)."""
    name = type(callback).__name__.lstrip("_")
    return SoupError(
        f"{name}: its state in the checkpoint being resumed is corrupted or was not written by lightning_soup "
        f"({detail}). Resume from another checkpoint, or delete `checkpoint['callbacks'][{callback.state_key!r}]` "
        "to start this callback afresh."
    )


def state_file_name(callback: Any, name: Any, folders: tuple[str, ...] = ()) -> str:
    """Check a file name read from checkpoint state: a plain relative name inside ``dirpath`` (or ``folders``).

    Callback state is untrusted input: a crafted or damaged checkpoint must not make a callback read or delete a
    file outside its ``dirpath`` (``../../victim``, an absolute path). The rule is :func:`storage.confined`'s (the
    one every reader and cleaner uses), plus the shape of the names the callback writes: ``<file>``, or
    ``<folder>/<file>`` with ``folder`` in ``folders``.

    Raises:
        SoupError: ``name`` is not a string, is absolute, has a ``..`` part or lies outside ``folders``.
    """
    from pathlib import PurePosixPath

    where = f"a plain file name in one of {list(folders)}" if folders else "a plain file name"
    try:
        storage.confined("dirpath", name, what="a file name recorded in the callback state")
    except SoupError as e:
        raise corrupt_state(callback, f"a recorded file name {name!r:.120} is not {where} inside `dirpath`; "
                            "refusing to read or delete it") from e
    parts = PurePosixPath(name).parts
    if len(parts) != (2 if folders else 1) or (folders and parts[0] not in folders) or "." in parts:
        raise corrupt_state(callback, f"a recorded file name {name!r:.120} is not {where} inside `dirpath`; "
                            "refusing to read or delete it")
    return name


def state_value(callback: Any, state: Any, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    """``state[key]``, checked to be of ``types`` (bools are not ints); ``default`` when missing, if given.

    Raises:
        SoupError: ``state`` is not a dict, ``key`` is missing without a default, or its value has another type.
    """
    if not isinstance(state, dict):
        raise corrupt_state(callback, f"expected a dict, got {type(state).__name__}")
    if key not in state:
        if default is ...:
            raise corrupt_state(callback, f"the key {key!r} is missing")
        return default
    value = state[key]
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        allowed = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        raise corrupt_state(callback, f"{key!r} must be {allowed}, got {type(value).__name__} {value!r:.80}")
    return value


# ------------------------------------------------------------------------------------------------ shared dirpath
def _check_outputs_unshared(trainer: Any, callback: Any, path: Path) -> None:
    """Refuse two callbacks of one fit that would write the same file in the same folder (one would silently win).

    Raises:
        SoupError: another soup callback of this trainer writes one of ``callback``'s outputs to ``path``.
    """
    mine = Path(os.path.abspath(path))
    for other in getattr(trainer, "callbacks", []):
        if other is callback or not isinstance(other, SoupCallback):
            continue
        if Path(os.path.abspath(other.dirpath_for(trainer))) != mine:
            continue
        shared = sorted(set(callback._outputs) & set(other._outputs))
        if shared:
            a, b = type(callback).__name__.lstrip("_"), type(other).__name__.lstrip("_")
            raise SoupError(
                f"{a} and {b} both write {shared} in the same `dirpath` {str(path)!r}, so one would overwrite the "
                "other's files. Give each its own `dirpath`."
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # unknown: assume it runs
    return True


def _acquire_dirpath(trainer: Any, path: Path) -> str | None:
    """Mark ``path`` as written by this fit (rank zero); return why another live fit holds it, or None.

    The lock file records the process id and host. It is stale, and replaced, when its process is gone (same host),
    or when it is this process's own and the trainer that took it no longer runs a fit. Several callbacks of one fit
    share the lock; it is released at ``teardown`` or ``on_exception`` (:func:`release_dirpaths`).
    """
    lock = path / LOCK_FILE
    key = os.path.abspath(lock)
    held = _HELD_LOCKS.get(key)
    holder = held() if held is not None else None
    if holder is trainer:
        return None
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(lock)
            if owner is not None and owner.get("host") == host and isinstance(owner.get("pid"), int):
                other = owner["pid"]
                ours_but_done = other == pid and (holder is None or not _running(holder))
                if not _pid_alive(other) or ours_but_done:
                    lock.unlink(missing_ok=True)  # stale: its fit is gone
                    continue
            elif owner is None and time.time() - _mtime(lock) > 60:
                lock.unlink(missing_ok=True)  # unreadable for a minute: not a fit starting right now
                continue
            who = "an unreadable lock" if owner is None else f"process {owner.get('pid')} on host {owner.get('host')!r}"
            return (
                f"Another fit is writing to `dirpath` {str(path)!r} ({who}, see {str(lock)!r}). Two fits in one "
                "folder would mix their snapshots, ingredients and anchors: give this fit its own `dirpath` (or "
                "`default_root_dir`), or wait for the other one. If no other fit runs, delete the lock file."
            )
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": pid, "host": host, "started": time.time()}, f)
        _HELD_LOCKS[key] = weakref.ref(trainer)
        trainer.__dict__.setdefault(_SCRATCH, {}).setdefault("locks", []).append(lock)
        return None
    return f"Could not take the lock {str(lock)!r} of `dirpath` {str(path)!r}; retry, or delete that file."


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _running(trainer: Any) -> bool:
    status = getattr(getattr(trainer, "state", None), "status", None)
    return str(getattr(status, "value", status)) == "running"


def release_dirpaths(trainer: Any) -> None:
    """Remove the ``dirpath`` locks this fit took (idempotent; every soup callback calls it at the end of fit)."""
    for lock in trainer.__dict__.get(_SCRATCH, {}).pop("locks", []):
        key = os.path.abspath(lock)
        held = _HELD_LOCKS.get(key)
        if held is not None and held() is trainer:
            del _HELD_LOCKS[key]
            with contextlib.suppress(OSError):
                lock.unlink()


# ----------------------------------------------------------------------------------------- kept Lightning checkpoints
def files_named_by_kept_checkpoints(trainer: Any, callback: Any, names: Callable[[Any], list[str]]) -> set[str]:
    """The file names ``callback``'s state records in every Lightning checkpoint still on disk that a checkpoint
    callback keeps (every ``*.ckpt`` in each ``ModelCheckpoint``'s ``dirpath``: its top-k, ``last``, and with
    ``monitor=None`` every file it did not delete; plus ``best_k_models``/``last_model_path`` wherever they are) or
    that this fit resumed from: resuming from any of them needs those files.

    Each checkpoint is read once (``weights_only=True``, memory-mapped: its tensors are not loaded), then cached by
    path, size and modification time. ``names`` turns the callback's state into the names it records; a checkpoint
    that cannot be read this way (a sharded checkpoint folder, foreign content) names nothing.
    """
    import stat

    paths: set[str] = set()
    for checkpoint_callback in getattr(trainer, "checkpoint_callbacks", None) or []:
        folder = getattr(checkpoint_callback, "dirpath", None)
        extension = getattr(checkpoint_callback, "FILE_EXTENSION", ".ckpt")
        if folder and os.path.isdir(folder):
            paths.update(str(p) for p in Path(folder).glob(f"*{extension}"))
        paths.update(str(p) for p in (getattr(checkpoint_callback, "best_k_models", None) or {}))
        for attr in ("best_model_path", "last_model_path"):
            if getattr(checkpoint_callback, attr, None):
                paths.add(str(getattr(checkpoint_callback, attr)))
    if getattr(trainer, "ckpt_path", None):
        paths.add(str(trainer.ckpt_path))
    cache = callback.__dict__.setdefault("_kept_checkpoint_names", {})
    found: set[str] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in cache:
            cache[key] = _names_in_checkpoint(path, callback, names)
        found.update(cache[key])
    return found


def _names_in_checkpoint(path: str, callback: Any, names: Callable[[Any], list[str]]) -> frozenset[str]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = checkpoint.get("callbacks", {}).get(callback.state_key)
        return frozenset(names(state)) if state is not None else frozenset()
    except Exception:  # noqa: BLE001 - not ours to judge here: resuming from it reports the problem
        return frozenset()


def background_priority() -> None:
    """Run the calling (background) thread at the lowest CPU priority, so that its work never takes a core from
    training or validation: it runs on cores they leave idle (all of them while a GPU computes). On Linux the nice
    value is per thread (``setpriority`` on its native id). Best effort elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
