"""CUDA paths: snapshots taken with no host synchronisation (``torch.cuda.set_sync_debug_mode("error")`` around the
hot path), in stream order (the next kernels that write the weights wait for the copy), and averages and soups on
the device equal to float64 references. Skipped without a CUDA device (see conftest)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_soup.callbacks.averaging import _SnapshotStore
from tests._models import make_model, trainer_kwargs

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Any synchronising CUDA call inside raises (PyTorch's sync debug mode)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_snapshot_is_asynchronous_and_in_stream_order(tmp_path: Path, mode: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    live = {"w": torch.randn(1024, 1024, device="cuda", generator=g), "n": torch.zeros((), dtype=torch.long,
                                                                                       device="cuda")}
    store = _SnapshotStore(tmp_path, mode, live)
    store.push("s0.safetensors", live)  # the first snapshot allocates the pinned buffers (once)
    expected = []
    names = ["s0.safetensors"]
    for i in range(1, 6):
        # Queue a lot of work that changes the weights, then snapshot, then change them again at once: the copy
        # must see the first change and not the second, with no host synchronisation in between.
        live["w"].mul_(1.5).add_(float(i))
        expected.append(live["w"].double().cpu())  # (a synchronising read, outside the checked region)
        name = f"s{i}.safetensors"
        evicted = names.pop(0) if len(names) == 2 else None
        names.append(name)
        with no_host_sync():
            store.push(name, live, evicted)
            live["w"].add_(1000.0)  # the training stream's next kernel writes the weights
        if evicted is not None:
            store.delete_files([evicted])
        live["w"].sub_(1000.0)
    for name, want in zip(names, expected[-2:]):
        got = store.load(name)["w"].double()
        assert torch.equal(got, want), name
    store.close()


class _Strict:
    """Mixin for a callback class: its epoch-end hook (the snapshot) runs under the sync debug mode, from the
    second epoch on (the first snapshot allocates pinned host memory once)."""

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        context = no_host_sync() if trainer.current_epoch > 0 else contextlib.nullcontext()
        with context:
            super().on_train_epoch_end(trainer, pl_module)  # type: ignore[misc]


@pytest.mark.parametrize("snapshots", ["cpu", "disk"])
def test_fit_on_cuda_weighted_average_equals_reference(tmp_path: Path, snapshots: str) -> None:
    pl = importlib.import_module("pytorch_lightning")
    from lightning_soup import CheckpointAveraging

    class Strict(_Strict, CheckpointAveraging):
        pass

    class Capture(pl.Callback):
        def __init__(self) -> None:
            self.snapshots: list[dict[str, torch.Tensor]] = []

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.snapshots.append({k: v.detach().double().cpu() for k, v in pl_module.state_dict().items()})

    capture = Capture()
    averaging = Strict(window=3, weights="cosine", snapshots=snapshots, verbose=False)
    model = make_model(pl)
    trainer = pl.Trainer(callbacks=[averaging, capture],
                         **trainer_kwargs(tmp_path, max_epochs=5, accelerator="gpu", devices=1, deterministic=False))
    trainer.fit(model)

    # cosine over 3 snapshots: f(j/3) - f((j+1)/3), f(x) = (1 + cos(pi x)) / 2
    c = [0.25, 0.5, 0.25]
    written = load_file(tmp_path / "soup" / "average.safetensors")
    for key, value in written.items():
        if not value.is_floating_point():
            continue
        want = sum(cj * s[key] for cj, s in zip(c, capture.snapshots[-3:]))
        tol = 4 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())
        assert (value.double() - want).abs().max().item() <= tol, key


def test_greedy_soup_builds_candidates_on_the_device(tmp_path: Path) -> None:
    pl = importlib.import_module("pytorch_lightning")
    from lightning_soup import GreedySoup
    from lightning_soup.callbacks import greedy_soup

    devices: list[torch.device] = []
    real = greedy_soup._candidate_device

    def spy(pl_module: Any, count: int) -> torch.device:
        devices.append(real(pl_module, count))
        return devices[-1]

    greedy_soup._candidate_device = spy
    try:
        soup = GreedySoup(monitor="val/loss", mode="min", verbose=False)
        kwargs = trainer_kwargs(tmp_path, max_epochs=3, accelerator="gpu", devices=1, deterministic=False)
        trainer = pl.Trainer(callbacks=[soup], **kwargs)
        trainer.fit(make_model(pl))
    finally:
        greedy_soup._candidate_device = real
    assert devices and devices[0].type == "cuda"
    assert soup.recipe is not None and soup.recipe["accepted"] >= 1
