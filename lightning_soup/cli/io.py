"""What the CLI commands share: opening inputs (with ``--prefix``), the device, progress display, prefetching."""

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

    def __getitem__(self, key: str) -> Tensor:
        return self._lazy[self._keys[key]]

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


def open_inputs(stack: contextlib.ExitStack, paths: Sequence[tuple[str, str]], prefix: str | None) -> list[Input]:
    """Open every ``(role, path)`` lazily (headers only), closing them with ``stack``.

    Raises:
        SoupError: an input is missing, corrupt, truncated or a ``.ckpt`` without a state dict (storage's message,
            naming the file); ``--prefix`` matches no input; an input has no tensors.
    """
    inputs = []
    for role, path in paths:
        lazy = stack.enter_context(storage.open_state_dict(path))
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
