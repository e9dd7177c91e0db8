"""GreedySoup's end of fit reads each ingredient once, in the background, while the previous candidate validates."""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soup._storage import _format
from tests.test_greedy_soup import assert_close_states, capture_class, make_model, mean64, trainer_kwargs


def test_ingredients_are_read_once_by_the_background_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pl = importlib.import_module("pytorch_lightning")
    soup_module = importlib.import_module("lightning_soup")
    reads: list[tuple[str, str]] = []  # (file name, thread name) per tensor read
    real_read = _format.read_tensor

    def spy(handle: Any, entry: Any, path: Path) -> torch.Tensor:
        reads.append((Path(path).name, threading.current_thread().name))
        return real_read(handle, entry, path)

    monkeypatch.setattr(_format, "read_tensor", spy)
    capture = capture_class(pl, "val/loss")()
    soup = soup_module.GreedySoup(monitor="val/loss", mode="min", dirpath=str(tmp_path / "soup"), verbose=False)
    model = make_model(pl)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4), callbacks=[capture, soup])
    trainer.fit(model)

    ingredient_reads = [(name, thread) for name, thread in reads if name.startswith("epoch=")]
    n_keys = len(model.state_dict())
    files = {name for name, _ in ingredient_reads}
    assert len(files) == 4
    # Every tensor of every ingredient read exactly once, all by the background reader.
    assert len(ingredient_reads) == 4 * n_keys
    assert {thread.rsplit("_", 1)[0] for _, thread in ingredient_reads} == {"lightning_soup-ingredients"}
    # The soup is still Wortsman's: its members' float64 mean.
    accepted = {(r["epoch"], r["step"]) for r in soup.recipe["ingredients"] if r["accepted"]}
    members = [s for s, step in zip(capture.states, capture.steps) if step in accepted]
    floating = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    expected = mean64(members)
    assert_close_states(floating, {k: expected[k] for k in floating})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_working_background_reader() -> None:
    """A process forked after a soup was built (ddp_fork, ddp_notebook, a test runner) inherits the reader object but
    not its thread: a read submitted in the child must still run instead of waiting forever."""
    greedy = importlib.import_module("lightning_soup.callbacks.greedy_soup")
    assert greedy._prefetcher().submit(lambda: 1).result(timeout=30) == 1  # the parent's reader thread now exists
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            code = 0 if greedy._prefetcher().submit(lambda: 2).result(timeout=20) == 2 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's background reader never ran")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child ended with status {status}"


def test_an_ingredient_is_released_once_the_soup_has_added_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host memory stays at a couple of ingredients however many there are: the reader hands each ingredient's
    tensors to the soup and keeps none, and reads the next one only while a candidate validates."""
    import gc
    import weakref

    pl = importlib.import_module("pytorch_lightning")
    soup_module = importlib.import_module("lightning_soup")
    greedy = importlib.import_module("lightning_soup.callbacks.greedy_soup")
    evaluation = importlib.import_module("lightning_soup.callbacks._evaluate")
    read: list[list[weakref.ref]] = []  # per ingredient read by the background reader, weak references to its tensors
    alive_at_evaluation: list[int] = []
    real_read_all, real_evaluate = greedy._Ingredient._read_all, evaluation.evaluate

    def read_all(self: Any) -> dict[str, torch.Tensor]:
        out = real_read_all(self)
        read.append([weakref.ref(t) for t in out.values() if t.is_floating_point()])
        return out

    def evaluate(trainer: Any, pl_module: Any) -> dict[str, float]:
        if read:  # during the soup (training's own validations read nothing)
            gc.collect()
            alive_at_evaluation.append(sum(any(r() is not None for r in refs) for refs in read))
        return real_evaluate(trainer, pl_module)

    monkeypatch.setattr(greedy._Ingredient, "_read_all", read_all)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    soup = soup_module.GreedySoup(monitor="val/loss", mode="min", dirpath=str(tmp_path / "soup"), verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=7), callbacks=[soup])
    trainer.fit(make_model(pl))
    assert len(read) == 7 and len(alive_at_evaluation) == 6
    # While a candidate validates: at most the ingredient read for the next candidate (and the one after it,
    # being read); every ingredient already added is gone.
    assert max(alive_at_evaluation) <= 2, alive_at_evaluation
