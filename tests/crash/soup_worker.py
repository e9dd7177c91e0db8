"""One ``trainer.fit`` with all three soup callbacks, killed with SIGKILL at a chosen point, or resumed, or whole.

``tests/test_reliability.py`` runs :func:`run` in a child process (forked from pytest, so torch and Lightning are
not imported again; or as a script: ``python tests/crash/soup_worker.py OUT [--kill-at POINT] [--resume]``) and
compares the files it leaves in ``OUT``:

* ``OUT/root/soup/``: the callbacks' ``dirpath`` (``average``, ``soup``, ``blended``, ``final`` and ``anchor``
  ``.safetensors``, ``soup.json``, ``blend.json``, ``snapshots/``, ``ingredients/``);
* ``OUT/root/ckpt/last.ckpt``: ``ModelCheckpoint(save_last=True)``, saved every epoch;
* ``OUT/captured_final.safetensors``: the module's weights when training ended, captured by a test callback that
  runs before any soup callback changes them (written with ``safetensors.torch.save_file``, not our storage);
* ``OUT/module.safetensors``: the module's weights after ``fit`` returned; ``OUT/result.json``: counters.

Training is deterministic on the CPU: every process seeds the same way, one thread, ``deterministic=True``,
``num_workers=0``, and the training data order is a function of the epoch alone (a sampler with ``set_epoch``,
which Lightning calls at every epoch start), so a run resumed from an epoch-end checkpoint sees exactly the batches
an uninterrupted run sees. (A plain ``shuffle=True`` draws its order from the global RNG, which Lightning
checkpoints do not save: a resumed run then trains on another order.)

Kill points (``--kill-at``), all in the third and last epoch (epoch 2), so that ``last.ckpt`` exists:

* ``mid_epoch``: after batch 2 of epoch 2 (resume replays epoch 2 from the epoch-1 checkpoint);
* ``validation``: after the second validation batch of epoch 2;
* ``after_snapshot``: at the end of epoch 2, right after ``CheckpointAveraging`` took its snapshot (the file may
  still be in flight) and ``GreedySoup`` its ingredient, before ``ModelCheckpoint`` saves epoch 2 (it saves in
  ``on_train_epoch_end``, after every other callback): resume replays epoch 2 from the epoch-1 checkpoint;
* ``end_soup``: during the end-of-fit greedy soup, in the validation of its first candidate (after
  ``final.safetensors`` and ``average.safetensors`` were written), i.e. after the last checkpoint;
* ``end_blend``: during the blend's ratio sweep (after ``soup.safetensors`` was written);
* ``write:<path under dirpath>``: half-way through writing that file's tensor data (e.g.
  ``write:soup.safetensors``, ``write:snapshots/epoch=1-step=12.safetensors``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

if __package__ in (None, ""):  # run as a script: make `tests._models` and `lightning_soup` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests._models import make_data, tiny_classifier_class

FLAVOURS = {
    "pytorch_lightning": ("pytorch_lightning", "lightning_soup"),
    "lightning": ("lightning.pytorch", "lightning_soup.lightning"),
}
KILL_POINTS = ("mid_epoch", "validation", "after_snapshot", "end_soup", "end_blend")
MAX_EPOCHS = 3
WINDOW = 2
MAX_INGREDIENTS = 2
RATIOS = [0.25, 0.5, 0.75]  # 1.0 is left out so that the result depends on the anchor
VAL_BATCHES = 3  # 40 validation samples, batch 16


def kill_now() -> None:
    """Die the way a preempted job or an OOM-killed process does: no cleanup, no exception, no atexit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class EpochSampler(Sampler):
    """A shuffle that depends on the epoch only (``set_epoch``), like ``DistributedSampler``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed + 1000 * self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def model_class(pl: Any) -> type:
    base = tiny_classifier_class(pl)

    class Model(base):  # type: ignore[misc,valid-type]
        #: validation_step calls left before the process kills itself (None: never).
        kill_countdown: int | None = None

        def train_dataloader(self) -> DataLoader:
            data = make_data(self.hparams.n_train, seed=0)
            return DataLoader(data, batch_size=self.hparams.batch_size, sampler=EpochSampler(len(data)))

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            if self.kill_countdown is not None:
                self.kill_countdown -= 1
                if self.kill_countdown <= 0:
                    kill_now()
            super().validation_step(batch, batch_idx, dataloader_idx)

    return Model


def callback_classes(pl: Any) -> tuple[type, type]:
    class Capture(pl.Callback):
        """Listed first: saves the trained weights at ``on_train_end`` before any soup callback replaces them."""

        def __init__(self, path: Path) -> None:
            self.path = path

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            from safetensors.torch import save_file

            save_file({k: v.detach().clone().contiguous() for k, v in pl_module.state_dict().items()}, str(self.path))

    class Killer(pl.Callback):
        """SIGKILLs the process at ``point``; ``late`` instances sit between ``GreedySoup`` and the blend."""

        def __init__(self, point: str | None, late: bool) -> None:
            self.point, self.late = point, late

        @property
        def state_key(self) -> str:
            return f"Killer{self.late}"

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.point == "mid_epoch" and not self.late and trainer.current_epoch == 2 and batch_idx == 2:
                kill_now()

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
            batch_idx = args[2] if len(args) > 2 else kwargs["batch_idx"]
            if (
                self.point == "validation"
                and not self.late
                and not trainer.sanity_checking
                and trainer.current_epoch == 2
                and batch_idx == 1
            ):
                kill_now()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.point == "after_snapshot" and self.late and trainer.current_epoch == 2:
                kill_now()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            # Arm a kill inside the next validation passes: the soup's candidates (early) or the blend's sweep (late).
            if self.point == "end_soup" and not self.late:
                pl_module.kill_countdown = 2  # the second batch of the first candidate
            if self.point == "end_blend" and self.late:
                pl_module.kill_countdown = VAL_BATCHES + 2  # the second batch of the second ratio

    return Capture, Killer


def kill_while_writing(target: str, dirpath: Path) -> None:
    """Patch the storage writer so the process dies half-way through the tensor data of ``dirpath/target``."""
    import fcntl

    from lightning_soup._storage import _format

    final = dirpath / target
    prefix = f".{final.name}.tmp-"
    real = _format.write_at
    header_end = {}

    def write_at(fd: int, view: memoryview, offset: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.parent == final.parent and path.name.startswith(prefix):
            if offset == 0:  # the header (and, for a snapshot written whole, the data after it)
                header_end[path] = 8 + int.from_bytes(view[:8], "little")
            if offset + len(view) > header_end.get(path, 0) and len(view) > 1:  # tensor data: write half, die
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                os.pwrite(fd, view[: len(view) // 2], offset)
                os.fsync(fd)
                kill_now()
        real(fd, view, offset)

    _format.write_at = write_at


def run(
    out: str | os.PathLike,
    kill_at: str | None = None,
    resume: bool = False,
    flavour: str = "pytorch_lightning",
    max_epochs: int = MAX_EPOCHS,
) -> None:
    """Fit (or resume) into ``out``; see the module docstring for the files and ``kill_at`` values."""
    out = Path(out)
    pl_name, soup_name = FLAVOURS[flavour]
    pl = importlib.import_module(pl_name)
    soup = importlib.import_module(soup_name)
    # A forked child inherits the test process's globals: set every one the result depends on.
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    random.seed(0)
    torch.manual_seed(0)

    root = out / "root"
    dirpath = root / "soup"
    if kill_at is not None and kill_at.startswith("write:"):
        kill_while_writing(kill_at.removeprefix("write:"), dirpath)
    elif kill_at is not None and kill_at not in KILL_POINTS:
        raise ValueError(f"unknown kill point {kill_at!r}; use one of {KILL_POINTS} or write:<file>")
    Capture, Killer = callback_classes(pl)
    callbacks = [
        Capture(out / "captured_final.safetensors"),
        Killer(kill_at, late=False),
        soup.CheckpointAveraging(window=WINDOW, verbose=False),
        soup.GreedySoup(monitor="val/acc", max_ingredients=MAX_INGREDIENTS, verbose=False),
        Killer(kill_at, late=True),
        soup.TaskArithmeticBlend(anchor="initial", ratio=RATIOS, monitor="val/loss", mode="min"),
        pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1),
    ]
    model = model_class(pl)()  # seeded above: the same initial weights in every process
    trainer = pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    ckpt = root / "ckpt" / "last.ckpt" if resume else None
    trainer.fit(model, ckpt_path=ckpt)

    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "module.safetensors"))
    result = {"training_steps": model.training_steps, "global_step": trainer.global_step}
    (out / "result.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--flavour", default="pytorch_lightning", choices=sorted(FLAVOURS))
    parser.add_argument("--max-epochs", type=int, default=MAX_EPOCHS)
    args = parser.parse_args(argv)
    run(args.out, kill_at=args.kill_at, resume=args.resume, flavour=args.flavour, max_epochs=args.max_epochs)


if __name__ == "__main__":
    main()
