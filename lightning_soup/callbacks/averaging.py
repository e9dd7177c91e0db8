"""Checkpoint averaging: the mean of the last ``window`` snapshots of one training run.

LAWA, "latest weight averaging" (Kaddour, *Stop Wasting My Time! Saving Days of ImageNet and BERT Training with
Latest Weight Averaging*, 2022; Sanyal et al., *Early Weight Averaging meets High Learning Rates for LLM
Pre-training*, 2023): averaging the last few checkpoints of a run generalises better than the last one.

How it works. A snapshot is the module's weights after every ``every_n_epochs``-th training epoch, or after every
``every_n_train_steps``-th optimizer step (``trainer.global_step``: gradient accumulation and manual optimization
count the way Lightning counts them). Taking one costs training a single copy of the weights into a reused host
buffer (pinned, on a side stream, when they live on CUDA: no host synchronisation), and nothing else: the snapshots
live in ``dirpath/snapshots/`` as safetensors files (``snapshots="disk"``, the default; the buffer is laid out as
the file, and a background thread at the lowest CPU priority writes it atomically with direct I/O, bypassing the
page cache so the kernel takes no cycles from training to copy and write back the bytes) or in host RAM
(``snapshots="cpu"``, the evicted snapshot's buffer reused), so device memory does not grow with ``window`` — it
holds nothing extra at all during training. No running sum is kept: the average is computed at the end of fit (and
for ``validate_average``) from the window's snapshots, oldest first, one snapshot at a time, in float32 — so an
evicted snapshot is never read back, and no add/evict rounding accumulates however many snapshots are taken.
``weights`` shapes the window: uniform (LAWA), or the merge weights of a learning-rate decay (WSM; see
:mod:`lightning_soup.merge._window` for the exact weights of each shape).

Resuming. The callback's checkpoint state is plain counters and file names; on ``trainer.fit(..., ckpt_path=...)``
the window continues from the snapshot files the checkpoint names, exactly as if training had not stopped.
Snapshot files that leave the window are deleted, unless one of the two most recent Lightning checkpoints, or any
checkpoint a ``ModelCheckpoint`` keeps, still names them. The state is checked when it is loaded (types, file names
confined to ``dirpath``), and the snapshots it names when training starts (keys, shapes, dtypes). In
``snapshots="cpu"`` mode the window's snapshots are written to disk when (and only when) a checkpoint is saved.

Distributed training. Under DDP-like replicated strategies the replicas are identical, so global rank zero alone
keeps the window (the other ranks keep only the counters), and nothing is communicated during
training — except with ``validate_average=True``, where rank zero's average is broadcast before every rank runs
the validation loop on it. At the end of fit rank zero computes the average, :func:`~._dist.broadcast_module_`
gives it to every rank, and only global rank zero writes files; every rank joins each collective, so nothing
deadlocks. The tensor code is shard-local (it works on :func:`~._tensors.module_tensors`), ready for FSDP2.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from torch import Tensor
from typing_extensions import override

from lightning_soup import storage
from lightning_soup._storage._image import FileImage
from lightning_soup.callbacks import _base, _dist, _tensors
from lightning_soup.errors import SoupError
from lightning_soup.merge import _inplace, _window
from lightning_soup.merge._core import acc_dtype

if TYPE_CHECKING:
    import pytorch_lightning as pl

SnapshotStorage = Literal["disk", "cpu"]
WindowWeights = Union[Literal["uniform", "linear", "cosine", "1-sqrt"], list[float]]
_STORAGES = ("disk", "cpu")
_SNAPSHOT_DIR = "snapshots"
_AVERAGE_FILE = "average.safetensors"
_STATE_VERSION = 1


class _SnapshotStore:
    """Rank zero's side of the window: the snapshots, and weighted means computed from them when asked.

    Training pays one copy per snapshot and nothing else: the module's tensors are copied into a reused host
    buffer (pinned, on a side stream, when they live on CUDA), and in ``"disk"`` mode a low-priority background
    thread writes that buffer to ``directory/<name>``; in ``"cpu"`` mode the buffer is the snapshot (the evicted
    snapshot's buffer is reused). No running sum is kept, so the evicted snapshot is never read back and there is
    no add/evict rounding: every mean is computed afresh from the window's snapshots, oldest first, in float32
    (float64 for float64 tensors), one snapshot (one tensor, from a file) at a time.

    Args:
        directory: where snapshot files go (``<name>`` → ``directory/<name>``).
        mode: ``"disk"`` keeps snapshots only in files; ``"cpu"`` keeps them in host RAM and writes files on demand.
        template: the module's tensors (``{key: tensor}``); fixes keys, dtypes, shapes and devices.
        direct: write snapshot files with direct I/O (no page cache: far fewer CPU cycles taken from training, but
            reading them back then comes from the disk); see :class:`~lightning_soup._storage._image.FileImage`.
    """

    def __init__(self, directory: Path, mode: str, template: Mapping[str, Tensor], direct: bool = True) -> None:
        self.directory = directory
        self.mode = mode
        self.keys = list(template)
        self.float_keys, floats = _tensors.floating_items(template)
        self.device = floats[0].device if floats else torch.device("cpu")
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._ram: dict[str, FileImage] = {}  # mode "cpu": name -> its host copy (laid out as its file)
        self._spare: list[FileImage] = []  # mode "cpu": host buffers reserved at the start, not yet used
        self._ready: dict[str, Any] = {}  # name -> CUDA event recorded after its device-to-host copy
        self._on_disk: set[str] = set()
        self.direct = direct
        self._image: FileImage | None = None  # mode "disk": the file's bytes, which the writer writes as they are
        self._pending: concurrent.futures.Future[None] | None = None
        self._writing: str | None = None  # the snapshot whose file the writer may still be writing
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="lightning_soup-snapshots", initializer=_base.background_priority
        )
        self._lock = threading.Lock()
        self.reads: list[str] = []  # every snapshot read back, in order (tests and benchmarks count them)

    # ----------------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def push(
        self, name: str, live: Mapping[str, Tensor], evicted: str | None = None, recipe: Mapping[str, Any] | None = None
    ) -> None:
        """Add the module's current tensors as snapshot ``name``; snapshot ``evicted`` leaves the window.

        The hot path: one copy pass, no host synchronisation with the device, nothing read back.

        Args:
            name: the new snapshot's name.
            live: the module's live tensors (not modified; copied to host memory).
            evicted: the snapshot leaving the window (its host buffers are reused in ``"cpu"`` mode; its file is
                deleted by the caller through :meth:`delete_files`).
            recipe: metadata recorded in the snapshot file.
        """
        tensors = [live[k] for k in self.keys]
        if self.mode == "cpu":
            image = self._ram.pop(evicted, None) if evicted is not None else None
            self._ready.pop(evicted, None)
            if image is None and self._spare:
                image = self._spare.pop()
            self._ram[name] = image = image or self._new_image(tensors)
            self._ready[name] = self._copy_out(tensors, image)
            self._on_disk.discard(name)
            return
        self.flush()  # the writer is done with the staging buffer (normally long ago: a whole epoch passed)
        self._image = self._image or self._new_image(tensors)
        event = self._copy_out(tensors, self._image)
        self._pending = self._executor.submit(self._write, name, event, dict(recipe or {}))
        self._writing = name

    def _new_image(self, tensors: list[Tensor]) -> FileImage:
        """A host buffer for one snapshot: a single allocation (pinned on CUDA), laid out as the snapshot's file.

        One large allocation, rather than one per tensor, is mapped outside the allocator's heap, where long-lived
        buffers would otherwise sit among training's short-lived tensors.
        """
        return FileImage({k: (t.dtype, tuple(t.shape)) for k, t in zip(self.keys, tensors)}, pin_memory=self._cuda)

    def _copy_out(self, tensors: list[Tensor], image: FileImage) -> Any:
        """Copy ``tensors`` into ``image``; on CUDA, return the event that completes the copy (else None)."""
        into = [image.tensors[k] for k in self.keys]
        if not self._cuda:
            torch._foreach_copy_(into, tensors)
            return None
        # A side stream copies device-to-host into pinned memory asynchronously, after the work queued so far; the
        # training stream waits for it on the device (never the host) before its next kernels, which may write
        # these very tensors.
        assert self._stream is not None
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            torch._foreach_copy_(into, tensors, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        main.wait_event(event)
        return event

    def _write(self, name: str, event: Any, recipe: dict[str, Any]) -> None:
        assert self._image is not None
        _wait(event)
        self._image.write(self.directory / name, recipe=recipe, direct=self.direct)
        with self._lock:
            self._on_disk.add(name)

    # ------------------------------------------------------------------------------------------------------ means
    @torch.no_grad()
    def weighted_mean_into_(
        self, out: Sequence[Tensor], names: Sequence[str], weights: Sequence[float], newest_is_out: bool = False
    ) -> None:
        """``out = Σⱼ weights[j] · snapshot names[j]`` over the floating tensors (weights summing to 1).

        Accumulated in float32 (float64 for float64 tensors) on ``out``'s devices, reading one snapshot at a time
        (one tensor at a time from files); snapshots with weight 0 are not read.

        Args:
            out: the module's floating tensors, in ``float_keys`` order; overwritten in their own dtypes.
            names: the window's snapshots, oldest first.
            weights: one weight per snapshot.
            newest_is_out: ``out`` holds the newest snapshot already (right after :meth:`push`): use it, read nothing.
        """
        out = list(out)
        acc = [torch.zeros_like(t, dtype=acc_dtype(t.dtype)) for t in out]
        terms = list(zip(names, weights))
        if newest_is_out and terms:
            _name, weight = terms.pop()
            if weight:
                _inplace.add_scaled_(acc, out, weight)
        for name, weight in terms:
            if weight:
                self._add_snapshot_(acc, name, weight)
        _inplace.assign_(out, acc)

    def _add_snapshot_(self, acc: list[Tensor], name: str, weight: float) -> None:
        self.reads.append(name)
        if self.mode == "cpu" and name in self._ram:
            host = self._ram[name].tensors
            floats = [host[k] for k in self.float_keys]
            # Pinned host memory uploads asynchronously; the buffer is not reused before the stream has read it
            # (the next device-to-host copy into it is queued after this on the side stream, see _copy_out).
            _inplace.add_scaled_(acc, [t.to(a.device, non_blocking=True) for t, a in zip(floats, acc)], weight)
            return
        if name == self._writing:
            self.flush()  # older files are complete: each write starts only after the previous one finished
        with storage.open_state_dict(self.directory / name) as lazy:
            names = {_tensors.canonical_key(k): k for k in lazy}  # older versions kept compiled modules' `_orig_mod.`
            for a, key in zip(acc, self.float_keys):
                a.add_(lazy[names[key]].to(a.device), alpha=weight)

    def load(self, name: str) -> dict[str, Tensor]:
        """All of snapshot ``name``'s tensors on the host, e.g. for its integer buffers."""
        self.reads.append(name)
        if self.mode == "cpu" and name in self._ram:
            _wait(self._ready.get(name))
            return dict(self._ram[name].tensors)
        self.flush()
        return dict(_tensors.canonical(storage.load_state_dict(self.directory / name)))

    def reserve(self, window: int, template: Mapping[str, Tensor]) -> None:
        """Mode ``"cpu"``: allocate (and touch) the host memory of a full window now, at the start of training.

        A snapshot then never pays for fresh memory during training (zeroing 100 MB of new pages costs tens of
        milliseconds on the training thread), and a window that does not fit in host RAM fails before training
        rather than epochs into it. Pinned memory is resident once allocated; pageable memory is touched.
        """
        if self.mode != "cpu":
            return
        tensors = [template[k] for k in self.keys]
        for _ in range(window - len(self._ram) - len(self._spare)):
            image = self._new_image(tensors)
            if not self._cuda:
                image.touch()
            self._spare.append(image)

    # ---------------------------------------------------------------------------------------------------- storage
    def adopt(self, names: Sequence[str]) -> None:
        """Snapshots ``names`` exist as files already (a resumed run's window)."""
        with self._lock:
            self._on_disk.update(names)

    def persist(self, names: Sequence[str], recipes: Mapping[str, Mapping[str, Any]]) -> None:
        """Make sure snapshots ``names`` exist as files (a checkpoint is about to name them)."""
        self.flush()
        for n in names:
            if n in self._on_disk or n not in self._ram:
                continue
            _wait(self._ready.get(n))
            self._ram[n].write(self.directory / n, recipe=dict(recipes.get(n, {})), direct=self.direct)
            self._on_disk.add(n)

    def delete_files(self, names: Sequence[str]) -> None:
        """Remove snapshot files (after any pending write, so a new file exists before an old one goes)."""
        if names:
            self._pending_then(lambda: self._unlink(list(names)))

    def _unlink(self, names: list[str]) -> None:
        for n in names:
            (self.directory / n).unlink(missing_ok=True)
            with self._lock:
                self._on_disk.discard(n)

    def _pending_then(self, fn: Any) -> None:
        previous = self._pending

        def job() -> None:
            if previous is not None:
                previous.result()
            fn()

        self._pending = self._executor.submit(job)

    def flush(self) -> None:
        """Wait for the background file writes; re-raise their error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish pending writes and release every buffer."""
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)
            self._ram.clear()
            self._spare.clear()
            self._ready.clear()
            self._image = None


def _wait(event: Any) -> None:
    """Wait on the host for a CUDA event by polling (sleeping between polls): a background thread must not spin
    on a core that training needs, and ``cudaEventSynchronize`` spins by default."""
    if event is None:
        return
    while not event.query():
        time.sleep(0.0005)


def _snapshot_mismatch(folder: Path, names: Sequence[str], live: Mapping[str, Tensor]) -> str | None:
    """Why a snapshot file the checkpoint names lacks one of the kept tensors ``live`` or differs there, or None.

    Reads headers only. A snapshot replaced by another model's weights would otherwise fail deep in the running sum
    (or, with broadcastable shapes, be silently averaged in).
    """
    for name in names:
        path = storage.confined(folder, name)
        try:
            with storage.open_state_dict(path) as lazy:
                # (older versions kept compiled modules' `_orig_mod.` in the keys)
                found = {_tensors.canonical_key(k): (tuple(v.shape), v.dtype) for k, v in lazy.meta().items()}
        except SoupError as e:
            return f"Cannot resume CheckpointAveraging: the snapshot {str(path)!r} is unreadable ({e})."
        missing = sorted(k for k in live if k not in found)
        differ = sorted(k for k in live if k in found and found[k] != (tuple(live[k].shape), live[k].dtype))
        if differ or missing:
            return (
                f"Cannot resume CheckpointAveraging: the snapshot {str(path)!r} does not fit the module (other "
                f"shapes/dtypes {differ or 'none'}, missing keys {missing or 'none'}). Was it replaced by another "
                "model's weights, or the model changed since the checkpoint? Restore it, or use a new `dirpath`."
            )
    return None


class _CheckpointAveraging(_base.SoupCallback):
    """Average the last ``window`` snapshots of training (LAWA) and load the average into the module at the end.

    A snapshot is taken after every ``every_n_epochs``-th training epoch, or — when ``every_n_train_steps`` is set,
    which replaces the epoch schedule — after every ``every_n_train_steps``-th optimizer step. Device memory holds
    nothing extra during training; the snapshots live in ``dirpath/snapshots/`` (or host RAM with
    ``snapshots="cpu"``). At the end of fit the average (floating tensors, including BatchNorm running statistics,
    averaged with the window's ``weights``; integer buffers taken from the newest snapshot) is written to
    ``dirpath/average.safetensors``, with its recipe in the metadata, and loaded into the module. The raw weights are
    kept in ``dirpath/final.safetensors``.

    Args:
        window: how many of the latest snapshots to average.
        every_n_epochs: take a snapshot after every n-th training epoch (ignored with ``every_n_train_steps``;
            None, as in ``ModelCheckpoint``: no epoch schedule).
        every_n_train_steps: take a snapshot after every n-th optimizer step instead.
        dirpath: output folder; default ``<trainer.default_root_dir>/soup``.
        snapshots: ``"disk"`` keeps the window's snapshots in safetensors files, ``"cpu"`` in host RAM (written to
            disk only when a Lightning checkpoint needs them for resuming; the whole window's host memory is
            reserved when training starts, so a window that does not fit fails then, not epochs later).
        validate_average: after every snapshot, run the validation loop on the current average (the newest
            snapshot included) and log its metrics as ``average/<metric>`` (e.g. ``average/val/acc``), for loggers
            and ``trainer.callback_metrics``. ``ModelCheckpoint``/``EarlyStopping`` keep monitoring the raw
            weights' metrics, untouched. Costs one validation pass per snapshot (and reading the window's older
            snapshots: from host RAM, or from files that are usually still in the page cache).
        weights: the window's weights: ``"uniform"`` (the plain mean, LAWA), a decay shape ``"linear"``,
            ``"cosine"`` or ``"1-sqrt"`` (the merge weights that emulate that learning-rate decay over the window,
            WSM: ``cⱼ = f(j/n) − f((j+1)/n)`` for the n snapshots held, oldest first, where f is the decay from 1
            to 0; ``"linear"`` gives the uniform mean), or a list of ``window`` non-negative numbers, oldest first
            (normalised; a window not yet full uses the newest entries). The weights used are in the recipe and
            the summary.
        verbose: print a summary table at the end of fit (global rank zero).

    Raises:
        SoupError: an argument is invalid (all problems are reported at once).

    Example:
        >>> from lightning_soup import CheckpointAveraging
        >>> averaging = CheckpointAveraging(window=3, every_n_train_steps=100)  # Trainer(callbacks=[averaging])
        >>> averaging.state_key
        "CheckpointAveraging{'window': 3, 'every_n_epochs': 1, 'every_n_train_steps': 100, 'dirpath': None}"
        >>> CheckpointAveraging(window=0, snapshots="gpu")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        lightning_soup.errors.SoupError: Invalid CheckpointAveraging arguments: `window` must be an int >= 1, got 0; ...
    """

    _produces_weights = True
    _outputs = (_AVERAGE_FILE, _SNAPSHOT_DIR)

    def __init__(
        self,
        window: int = 5,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        dirpath: str | None = None,
        snapshots: SnapshotStorage = "disk",
        validate_average: bool = False,
        weights: WindowWeights = "uniform",
        verbose: bool = True,
    ) -> None:
        problems = []

        def positive_int(name: str, value: Any, optional: bool = False) -> None:
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                allowed = "an int >= 1" + (" or None" if optional else "")
                problems.append(f"`{name}` must be {allowed}, got {value!r}")

        positive_int("window", window)
        positive_int("every_n_epochs", every_n_epochs, optional=True)  # None: no epoch schedule (YAML null)
        positive_int("every_n_train_steps", every_n_train_steps, optional=True)
        if every_n_epochs is None and every_n_train_steps is None:
            problems.append("`every_n_epochs` and `every_n_train_steps` are both None, so no snapshot would ever be "
                            "taken; set one of them")
        if dirpath is not None and not isinstance(dirpath, (str, Path)):
            problems.append(f"`dirpath` must be a path string or None, got {dirpath!r}")
        if snapshots not in _STORAGES:
            problems.append(f"`snapshots` can be {' or '.join(repr(s) for s in _STORAGES)}, got {snapshots!r}")
        for flag, value in (("validate_average", validate_average), ("verbose", verbose)):
            if not isinstance(value, bool):
                problems.append(f"`{flag}` must be True or False, got {value!r}")
        weights_problem = _window.check_window_weights(weights, window)
        if weights_problem is not None:
            problems.append(weights_problem)
        if problems:
            raise SoupError("Invalid CheckpointAveraging arguments: " + "; ".join(problems) + ".")

        self.window = window
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self._dirpath_arg = None if dirpath is None else str(dirpath)
        self.snapshots = snapshots
        self.validate_average = validate_average
        self.weights: str | list[float] = weights if isinstance(weights, str) else [float(w) for w in weights]
        self.verbose = verbose
        self._store: _SnapshotStore | None = None
        self._reset()

    # ------------------------------------------------------------------------------------------------------ state
    def _reset(self) -> None:
        # Replicated on every rank (plain types): the window's records, oldest first, and the schedule counters.
        self._records: list[dict[str, Any]] = []
        self._warned: set[Any] = set()
        self._taken = 0  # snapshots taken so far in this run (including evicted ones)
        self._last_epoch = -1  # epoch of the last epoch-schedule snapshot
        self._last_step = 0  # global_step of the last step-schedule snapshot
        self._retained: list[str] = []  # evicted files a recent checkpoint still names
        self._checkpointed: list[list[str]] = []  # the window's files at the two latest checkpoints
        self._dir: Path | None = None
        self.average_path: Path | None = None
        self.recipe: dict[str, Any] | None = None
        self._lora_error: float | None = None  # LoRA pairs: the average's rank-r relative error on ΔW

    @property
    def state_key(self) -> str:
        # The class name, not the flavour's qualname, so checkpoints resume across pytorch_lightning/lightning.
        args = {
            "window": self.window,
            "every_n_epochs": self.every_n_epochs,
            "every_n_train_steps": self.every_n_train_steps,
            "dirpath": self._dirpath_arg,
        }
        return f"CheckpointAveraging{args!r}"

    @override
    def state_dict(self) -> dict[str, Any]:
        files = [r["file"] for r in self._records]
        # A checkpoint now names these files: keep them on disk until two newer checkpoints exist.
        self._checkpointed = [*self._checkpointed[-1:], files]
        return {
            "version": _STATE_VERSION,
            "records": [dict(r) for r in self._records],
            "taken": self._taken,
            "last_epoch": self._last_epoch,
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoint state is untrusted: every value is checked here, once, before any file it names is touched.
        self._records = self._parse_records(state_dict)
        value = _base.state_value
        self._taken = value(self, state_dict, "taken", int, len(self._records))
        self._last_epoch = value(self, state_dict, "last_epoch", int, -1)
        self._last_step = value(self, state_dict, "last_step", int, 0)
        self._checkpointed = [[r["file"] for r in self._records]]
        self._retained = []

    def _parse_records(self, state_dict: Any) -> list[dict[str, Any]]:
        """The window's records from checkpoint state, checked (names inside the snapshot folder, int counters).

        Raises:
            SoupError: the state is malformed or names a file outside ``dirpath/snapshots``.
        """
        value = _base.state_value
        records = value(self, state_dict, "records", list, [])
        if len(records) > self.window:
            raise _base.corrupt_state(self, f"{len(records)} records for a window of {self.window}")
        parsed = [
            {
                "file": _base.state_file_name(self, value(self, r, "file", str)),
                "epoch": value(self, r, "epoch", int),
                "step": value(self, r, "step", int),
            }
            for r in records
        ]
        files = [r["file"] for r in parsed]
        if len(set(files)) != len(files):  # one snapshot counted twice would skew the average
            raise _base.corrupt_state(self, f"a snapshot is listed more than once: {files}")
        return parsed

    # ------------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or _base.skip_fast_dev_run(trainer, self):
            return
        self._close_store()
        self._reset()  # a new fit starts a new window; a resumed fit loads its state right after setup
        if self.validate_average and trainer.limit_val_batches == 0:
            raise SoupError(
                "`CheckpointAveraging(validate_average=True)` runs your validation loop on the average, but validation "
                "is disabled (`Trainer(limit_val_batches=0)`). Enable validation or set `validate_average=False`."
            )
        self._dir = self.prepare_dirpath(trainer)
        if _dist.owns_state(trainer, pl_module):  # rank zero under DDP; every rank (its own folder) when sharded
            storage.remove_stale_temp_files(self._snapshot_dir(trainer, pl_module))  # half-written snapshots of a dead run

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem = None
        if _dist.owns_state(trainer, pl_module):  # rank zero under DDP; every rank (its own shards) when sharded
            snapshot_dir = self._snapshot_dir(trainer, pl_module)
            # (Record names were checked when the state was loaded; confined again on the way to the file system.)
            missing = [r["file"] for r in self._records if not storage.confined(snapshot_dir, r["file"]).is_file()]
            if missing:
                problem = (
                    f"Cannot resume CheckpointAveraging: the checkpoint names snapshot files that are missing from "
                    f"{str(snapshot_dir)!r}: {missing}. Restore them, pass the `dirpath` the run used, or start "
                    "the average afresh by removing this callback's state from the checkpoint."
                )
            else:
                # What training changes, each storage once: a frozen base is never copied, tied weights are one entry.
                kept = _tensors.kept_tensors(pl_module)
                # validate_average reads the window back every snapshot: keep its files in the page cache then.
                self._store = _SnapshotStore(snapshot_dir, self.snapshots, kept, direct=not self.validate_average)
                names = [r["file"] for r in self._records]
                problem = _snapshot_mismatch(snapshot_dir, names, kept)
                if problem is None:
                    self._store.adopt(names)  # nothing to rebuild: means are read at the end
                    self._store.reserve(self.window, kept)
            if problem is not None:
                self._close_store(raise_errors=False)
        _dist.raise_on_every_rank(trainer, problem)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        # global_step counts optimizer steps: under gradient accumulation it stays put for several batches.
        if n is None or step <= self._last_step or step % n != 0:
            return
        self._last_step = step
        self._snapshot(trainer, pl_module, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_train_steps is not None or epoch <= self._last_epoch or (epoch + 1) % self.every_n_epochs:
            return
        self._last_epoch = epoch
        self._snapshot(trainer, pl_module, on_epoch=True)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The checkpoint names the window's files: they must be complete on disk before it is.
        if self._store is not None:
            recipes = {r["file"]: self._file_recipe(r) for r in self._records}
            self._store.persist(list(recipes), recipes)

    @override
    @_base.restores_raw_weights
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dirpath = self._dir if self._dir is not None else self.dirpath_for(trainer)
        _base.save_final_weights(trainer, pl_module, dirpath)
        if not self._records:
            _dist.warn_on_rank_zero(
                trainer,
                "CheckpointAveraging took no snapshot (training stopped before the first one was due: "
                f"{self._schedule_text()}), so the module keeps its trained weights and no average is written.",
            )
            self._close_store()
            return
        self.recipe = self._recipe()
        problem, error = None, None
        if self._store is not None:
            try:
                self._load_average_(pl_module)
            except Exception as e:  # e.g. a snapshot file removed or unreadable: tell every rank, not only this one
                problem, error = f"CheckpointAveraging could not compute the average: {e}", e
        # Every rank learns whether every owner succeeded before entering the next collective, so none waits forever.
        _dist.raise_on_every_rank(trainer, problem, error)
        _dist.broadcast_module_(trainer, pl_module, kept_only=True)
        if self._lora_error is not None:
            self.recipe["lora_relative_error"] = self._lora_error  # rank zero's: the one that writes
        self.average_path = _tensors.write_module_weights(trainer, pl_module, dirpath / _AVERAGE_FILE, self.recipe)
        if self.verbose:
            from lightning_soup.callbacks._report import averaging_table

            _dist.print_on_rank_zero(trainer, averaging_table(self.recipe, self.average_path))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_store(raise_errors=False)
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close_store(raise_errors=False)
        super().teardown(trainer, pl_module, stage)

    # ---------------------------------------------------------------------------------------------------- helpers
    def _load_average_(self, pl_module: Any) -> None:
        """Rank zero: put the window's weighted mean into the module; integer buffers from the newest snapshot."""
        assert self._store is not None
        store = self._store
        store.flush()
        live = _tensors.module_tensors(pl_module)
        names = [r["file"] for r in self._records]
        store.weighted_mean_into_([live[k] for k in store.float_keys], names, self._window_weights(len(names)))
        self._lora_error = self._lora_mean_into_(live)
        newest = store.load(self._records[-1]["file"])
        integer = {k: v for k, v in newest.items() if not v.is_floating_point()}
        with torch.no_grad():
            _inplace.assign_([live[k] for k in integer], list(integer.values()))
        self._close_store()

    def _lora_mean_into_(self, live: Mapping[str, Tensor]) -> float | None:
        """Overwrite the LoRA pairs of ``live`` (which got the mean of their factors) with the best rank-r pairs for
        the window's (weighted) mean ΔW = B·A, computed from the window's factors (tiny); their relative error, or
        None."""
        from lightning_soup.merge.lora import combine_into_, lora_keys

        assert self._store is not None
        store = self._store
        factor_keys = sorted(lora_keys(store.float_keys))
        if not factor_keys:
            return None
        window = []
        for record in self._records:
            if store.mode == "cpu":
                snapshot = store.load(record["file"])
                window.append({k: snapshot[k] for k in factor_keys})
            else:
                store.flush()
                with storage.open_state_dict(store.directory / record["file"]) as lazy:
                    names = {_tensors.canonical_key(k): k for k in lazy}
                    window.append({k: lazy[names[k]] for k in factor_keys})
        weights = self._window_weights(len(window))
        return combine_into_({k: live[k] for k in factor_keys}, window, weights).relative_error

    def _snapshot_dir(self, trainer: Any, pl_module: Any) -> Path:
        """``dirpath/snapshots`` (rank zero's) under DDP, ``dirpath/snapshots/rank{R}`` (this rank's shards) when sharded."""
        root = self._dir if self._dir is not None else self.dirpath_for(trainer)
        return _dist.rank_dir(trainer, pl_module, root, _SNAPSHOT_DIR)

    def _snapshot(self, trainer: Any, pl_module: Any, on_epoch: bool) -> None:
        record = {
            "file": f"epoch={trainer.current_epoch}-step={trainer.global_step}.safetensors",
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
        }
        evicted = self._records.pop(0)["file"] if len(self._records) == self.window else None
        self._records.append(record)
        self._taken += 1
        if self._store is not None:
            self._store.push(record["file"], _tensors.module_tensors(pl_module), evicted, self._file_recipe(record))
            self._delete_unneeded(trainer, evicted)
        if self.validate_average:
            self._log_average_metrics(trainer, pl_module, on_epoch)

    def _delete_unneeded(self, trainer: Any, evicted: str | None) -> None:
        """Delete evicted snapshot files, except those one of the two latest checkpoints or a checkpoint that a
        ``ModelCheckpoint`` keeps names (for resuming)."""
        assert self._store is not None
        candidates = self._retained + ([evicted] if evicted is not None else [])
        if not candidates:
            return
        window = {r["file"] for r in self._records}
        needed = window.union(*self._checkpointed)
        if any(n not in needed for n in candidates):  # a kept Lightning checkpoint may still name them
            needed |= _base.files_named_by_kept_checkpoints(
                trainer, self, lambda state: [r["file"] for r in self._parse_records(state)]
            )
        self._retained = [n for n in candidates if n in needed]
        self._store.delete_files([n for n in candidates if n not in needed])

    def _log_average_metrics(self, trainer: Any, pl_module: Any, on_epoch: bool) -> None:
        """Run the validation loop on the current average and log its metrics as ``average/<name>``."""
        from lightning_soup.callbacks import _evaluate

        # The raw weights go back, bit for bit, after the pass (a transient copy while it runs).
        with _evaluate.preserved_weights(pl_module):
            if self._store is not None:
                live = _tensors.module_tensors(pl_module)
                names = [r["file"] for r in self._records]
                # The module holds the newest snapshot right now: only the older ones are read.
                weights = self._window_weights(len(names))
                floats = [live[k] for k in self._store.float_keys]
                self._store.weighted_mean_into_(floats, names, weights, newest_is_out=True)
                self._lora_mean_into_(live)
            # the other ranks keep no sum: they validate rank zero's
            _dist.broadcast_module_(trainer, pl_module, kept_only=True)
            metrics = _evaluate.evaluate(trainer, pl_module)
        for name, value in metrics.items():
            pl_module.log(
                f"average/{name}",
                float(value),
                on_step=not on_epoch,
                on_epoch=on_epoch,
                batch_size=1,
                sync_dist=False,
                add_dataloader_idx=False,  # `name` already carries the suffix when there are several dataloaders
            )

    def _window_weights(self, count: int) -> list[float]:
        """The weights of the window's ``count`` snapshots, oldest first (see :mod:`lightning_soup.merge._window`)."""
        try:
            return _window.window_weights(self.weights, count)
        except SoupError as e:
            # Only an explicit list can fail here: its newest `count` entries are all zero in a partial window.
            if (count, "warned") not in self._warned:
                self._warned.add((count, "warned"))
                warnings.warn(f"CheckpointAveraging: {e} Using the uniform mean of the {count} snapshots.",
                              stacklevel=2)
            return _window.window_weights("uniform", count)

    def _file_recipe(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"method": "snapshot", "epoch": record["epoch"], "global_step": record["step"]}

    def _schedule_text(self) -> str:
        if self.every_n_train_steps is not None:
            return f"every_n_train_steps={self.every_n_train_steps}"
        return f"every_n_epochs={self.every_n_epochs}"

    def _recipe(self) -> dict[str, Any]:
        return {
            "method": "checkpoint_averaging",
            "window": self.window,
            "every_n_epochs": None if self.every_n_train_steps is not None else self.every_n_epochs,
            "every_n_train_steps": self.every_n_train_steps,
            "count": len(self._records),
            "snapshots_taken": self._taken,
            "weights": self.weights,
            "averaged": [
                {"epoch": r["epoch"], "global_step": r["step"], "weight": c}
                for r, c in zip(self._records, self._window_weights(len(self._records)))
            ],
        }

    def _close_store(self, raise_errors: bool = True) -> None:
        store, self._store = self._store, None
        if store is None:
            return
        try:
            store.close()
        except Exception:
            if raise_errors:
                raise
