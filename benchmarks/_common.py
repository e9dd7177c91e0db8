"""Pieces the benchmarks share: the MLP they train and a sampler of a child process's peak ``RssAnon``.

Not a benchmark itself; the ``bench_*.py`` scripts import it from their own folder. It imports neither torch nor
Lightning at import time (``bench_cli_memory.py`` must stay far below what it measures).
"""

from __future__ import annotations

import threading
import time
from typing import Any


def mlp_base() -> Any:
    """A ``LightningModule`` base class: ``depth`` Linear/BatchNorm/ReLU blocks of ``width``, a 10-way head.

    It has ``forward`` and a cross-entropy ``training_step``; subclasses add validation, optimizer and data.
    Built on call, so that importing this module does not import Lightning.
    """
    import pytorch_lightning as pl
    import torch
    from torch import nn

    class MLPBase(pl.LightningModule):
        def __init__(self, width: int, depth: int) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
            self.net = nn.Sequential(*layers, nn.Linear(width, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

    return MLPBase


def status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``"RssAnon"``, ...); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class PeakRssAnon:
    """Samples process ``pid``'s ``RssAnon`` every ``interval`` seconds in a thread while the ``with`` block runs.

    ``peak_kb``: the largest value seen (0 if none).
    """

    def __init__(self, pid: int, interval: float = 0.001) -> None:
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            value = status_kb(self.pid, "RssAnon")
            if value is not None:
                self.peak_kb = max(self.peak_kb, value)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRssAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
