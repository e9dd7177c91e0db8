"""What the CLI commands share: opening inputs (with ``--prefix``), the device, progress display, prefetching.

The checks every command gets live here, in one place: inputs whose dtypes cannot be merged (quantised int8/uint8
weights, float8) are refused from the headers by :func:`open_inputs`, and every tensor read through
:class:`Input` is checked for NaN/inf, naming the file and the key, before anything is published.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_soup import storage
from lightning_soup.errors import SoupError

T = TypeVar("T")


def normalise_prefix(prefix: str | None) -> str:
    """``"model"`` and ``"model."`` both mean the keys under ``model.``."""
    if not prefix:
        return ""
    return prefix if prefix.endswith(".") else prefix + "."


class Input(Mapping[str, Tensor]):
    """One input checkpoint, read lazily, with ``--prefix`` applied.

    ``--prefix model.`` keeps the keys under ``model.`` and strips it, in every input that has such keys; an input
    without any (a ``.safetensors`` exported from the inner network, next to a Lightning ``.ckpt``) is used as it
    is, so that the formats mix freely. The compatibility check then compares the resulting keys exactly.
    """

    def __init__(self, path: str, role: str, lazy: storage.LazyStateDict, prefix: str) -> None:
        self.path = path
        self.role = role
        self._lazy = lazy
        stem = normalise_prefix(prefix)
        inner = {k[len(stem) :]: k for k in lazy if stem and k.startswith(stem)}
        self.prefix = stem if inner else ""
        self._keys: dict[str, str] = inner if inner else {k: k for k in lazy}
        self._meta: dict[str, Tensor] | None = None

    @property
    def name(self) -> str:
        return self.path

    @property
    def files(self) -> list[Path]:
        """Every file this input reads (a sharded folder's index and shards)."""
        return list(self._lazy.files)

    def __getitem__(self, key: str) -> Tensor:
        tensor = self._lazy[self._keys[key]]
        check_finite(tensor, self.path, key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def meta(self) -> dict[str, Tensor]:
        """Shapes and dtypes (meta tensors), read once from the headers."""
        if self._meta is None:
            full = self._lazy.meta()
            self._meta = {k: full[inner] for k, inner in self._keys.items()}
        return self._meta

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.meta().values())


_CHUNK = 1 << 24  # elements per finiteness check: the temporary mask stays at 16 MB whatever the tensor


def check_finite(tensor: Tensor, path: str, key: str, *, output: bool = False) -> None:
    """Refuse NaN/inf in an input tensor: merged, it would silently spread into the output (even ``--ratio 0``:
    ``0 · NaN`` is NaN). With ``output``, ``tensor`` is a merged result about to be written (``path`` the output):
    finite inputs can still overflow a narrow ``--dtype`` or a large scale.

    Raises:
        SoupError: naming the file, the key and how many entries are not finite.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    flat = tensor.reshape(-1)

    def finite(chunk: Tensor) -> Tensor:
        return torch.isfinite(chunk.float() if chunk.element_size() == 1 else chunk)  # no isfinite for float8

    if all(bool(finite(chunk).all()) for chunk in flat.split(_CHUNK)):
        return
    bad = sum(int((~finite(chunk)).sum()) for chunk in flat.split(_CHUNK))
    if output:
        raise SoupError(
            f"{path}: the merged `{key}` has {bad} NaN or infinite value(s) out of {flat.numel()} in "
            f"{str(tensor.dtype).removeprefix('torch.')} (an overflow); nothing was written. Use a wider --dtype or "
            "smaller scales"
        )
    raise SoupError(
        f"{path}: tensor `{key}` holds {bad} NaN or infinite value(s) out of {flat.numel()}; lightning-soup never "
        "merges non-finite weights (they would spread into the output). Use a healthy checkpoint, e.g. an earlier one"
    )


#: dtypes a merge command refuses: quantised integer weights (a merge would copy one input's) and float8
_QUANTISED = (torch.int8, torch.uint8)
_FLOAT8 = tuple(getattr(torch, n) for n in dir(torch) if n.startswith("float8_"))


def check_mergeable_dtypes(inputs: Sequence[Input]) -> None:
    """Refuse, from the headers, tensors that no merge method can merge: int8/uint8 (quantised) weights and float8.

    Integer buffers of other dtypes (int64 step counters, int32 indices, bool masks) keep the DESIGN semantics:
    taken from one input.

    Raises:
        SoupError: naming the first such file and key and what to do.
    """
    for i in inputs:
        for key, meta in i.meta().items():
            dtype = meta.dtype
            if dtype in _QUANTISED:
                raise SoupError(
                    f"{i.path}: tensor `{key}` is {str(dtype).removeprefix('torch.')}, quantised weights that cannot "
                    "be merged (they would be copied from one input unchanged). Dequantise the checkpoints to "
                    "float16/bfloat16/float32 first"
                )
            if dtype in _FLOAT8:
                raise SoupError(
                    f"{i.path}: tensor `{key}` is {str(dtype).removeprefix('torch.')}, which lightning-soup cannot "
                    "merge. Convert the checkpoints to bfloat16/float16/float32 first"
                )


def open_inputs(
    stack: contextlib.ExitStack,
    paths: Sequence[tuple[str, str]],
    prefix: str | None,
    *,
    merging: bool = True,
    opener: Callable[[str], Any] = storage.open_state_dict,
) -> list[Input]:
    """Open every ``(role, path)`` lazily (headers only), closing them with ``stack``.

    Args:
        merging: the command merges the inputs, so dtypes no merge can handle are refused
            (:func:`check_mergeable_dtypes`); ``inspect`` passes False.
        opener: opens one path as a lazy state dict (``--merge-into`` reads adapter folders as dense models).

    Raises:
        SoupError: an input is missing, corrupt, truncated, not a regular file, or a ``.ckpt`` without a state dict
            (storage's message, naming the file); ``--prefix`` matches no input; an input has no tensors; with
            ``merging``, an input holds quantised or float8 tensors.
    """
    inputs = []
    for role, path in paths:
        lazy = stack.enter_context(opener(path))
        inputs.append(Input(path, role, lazy, prefix or ""))
    stem = normalise_prefix(prefix)
    if stem and not any(i.prefix for i in inputs):
        tops = list(dict.fromkeys(k.split(".", 1)[0] + ("." if "." in k else "") for k in inputs[0]))[:5]
        raise SoupError(
            f"--prefix {prefix}: no key of any input starts with {stem!r}; the keys of {inputs[0].path} start with "
            f"{', '.join(repr(t) for t in tops) or 'nothing (it is empty)'}"
        )
    for i in inputs:
        if len(i) == 0:
            raise SoupError(f"{i.path}: it holds no tensors")
    if merging:
        check_mergeable_dtypes(inputs)
    return inputs


def device_of(name: str) -> torch.device:
    """``--device``, checked: it must parse and, for an accelerator, be available."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SoupError(f"--device {name}: not a device; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "meta":
        raise SoupError(f"--device {name}: meta tensors hold no data; use cpu or an accelerator")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SoupError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SoupError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SoupError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def prefetch(items: Iterable[T], load: Callable[[T], Any], depth: int = 1) -> Iterator[tuple[T, Any]]:
    """``(item, load(item))`` in order, loading up to ``depth`` items ahead on a background thread.

    Reading the next tensors from disk (which releases the GIL) overlaps with the arithmetic on the current ones;
    at most ``depth + 1`` items' data are in memory at once.
    """
    it = iter(items)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lightning-soup-read") as pool:
        pending: deque[tuple[T, concurrent.futures.Future]] = deque()
        try:
            for item in it:
                pending.append((item, pool.submit(load, item)))
                if len(pending) > depth:
                    break
            while pending:
                item, future = pending.popleft()
                result = future.result()
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append((nxt, pool.submit(load, nxt)))  # type: ignore[arg-type]
                yield item, result
                del result
        finally:
            for _, future in pending:
                future.cancel()


_END = object()


def hash_inputs(inputs: Sequence[Input], progress: Progress) -> list[str]:
    """SHA-256 of every input (a sharded folder's manifest digest, see :func:`storage.sha256_file`), in parallel."""
    unique = list(dict.fromkeys(i.path for i in inputs))
    total = sum(_disk_size(p) for p in unique)
    task = progress.add("hashing inputs", total)
    workers = max(1, min(len(unique), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lightning-soup-hash") as pool:
        futures = {p: pool.submit(storage.sha256_file, p) for p in unique}
        digests = {}
        for p, future in futures.items():
            digests[p] = future.result()
            progress.advance(task, _disk_size(p))
    progress.done(task)
    return [digests[i.path] for i in inputs]


def _disk_size(path: str) -> int:
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            return sum(c.stat().st_size for c in p.iterdir() if c.is_file())
        return p.stat().st_size
    except OSError:
        return 0


class Progress:
    """A rich progress display on stderr when it is a terminal and not ``--quiet``; otherwise silent."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._progress = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add(self, description: str, total: int) -> Any:
        return None if self._progress is None else self._progress.add_task(description, total=total)

    def advance(self, task: Any, amount: int, description: str | None = None) -> None:
        if self._progress is not None:
            if description is None:
                self._progress.advance(task, amount)
            else:
                self._progress.update(task, advance=amount, description=description)

    def done(self, task: Any) -> None:
        if self._progress is not None:
            self._progress.remove_task(task)


def wants_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def note(message: str, quiet: bool) -> None:
    """A status line on stderr (not with ``--quiet``)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
