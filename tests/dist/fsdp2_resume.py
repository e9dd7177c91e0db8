"""FSDP2 on CPU (gloo), 2 ranks: crash after a distributed checkpoint, then resume in the same processes.

Lightning restores callback state under ``ModelParallelStrategy`` only after ``on_fit_start``, and every rank loads
rank zero's callback state; the per-rank snapshot and ingredient files must still line up with each rank's shards.
A capture callback gathers the full weights at fit start and every epoch end for the float64 references.
Usage: fsdp2_resume.py <flavour>
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from _common import (
    finish,
    flavour,
    full_state,
    model_parallel_strategy,
    out_dir,
    sharded_classifier_class,
    trainer_kwargs,
    write_result,
)

pl, soup = flavour(sys.argv[1])
OUT = out_dir()
CAPTURE = OUT / "capture"


class Crash(Exception):
    pass


class Capture(pl.Callback):
    def __init__(self, stop_at_epoch: int | None) -> None:
        self.stop_at_epoch = stop_at_epoch
        self.scores: dict[int, float] = {}

    def _save(self, trainer, pl_module, name: str) -> None:
        state = full_state(pl_module)
        if trainer.is_global_zero:
            CAPTURE.mkdir(exist_ok=True)
            save_file(state, str(CAPTURE / f"{name}.safetensors"))

    def on_train_start(self, trainer, pl_module):
        if self.stop_at_epoch is not None:
            self._save(trainer, pl_module, "initial")

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.stop_at_epoch:
            raise Crash  # on every rank, after the checkpoint of the previous epoch

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.scores[trainer.current_epoch] = float(trainer.callback_metrics["val/loss"])

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")


def fit(stop_at_epoch: int | None, ckpt_path: str | None) -> tuple:
    torch.manual_seed(0)
    model = sharded_classifier_class(pl)(lr=0.1)
    capture = Capture(stop_at_epoch)
    greedy = soup.GreedySoup(monitor="val/loss", mode="min")
    blend = soup.TaskArithmeticBlend(anchor="initial", ratio=0.5)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=OUT / "ckpt", save_last=True, save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        **trainer_kwargs(
            OUT, devices=2, max_epochs=4, strategy=model_parallel_strategy(pl), enable_checkpointing=True,
            callbacks=[capture, blend, soup.CheckpointAveraging(window=3), greedy, checkpoint],
        )
    )
    try:
        trainer.fit(model, ckpt_path=ckpt_path)
    except Crash:
        return trainer, model, capture, greedy, True
    return trainer, model, capture, greedy, False


def main() -> None:
    _, _, first, _, crashed = fit(stop_at_epoch=2, ckpt_path=None)
    assert crashed
    trainer, model, second, greedy, crashed = fit(stop_at_epoch=None, ckpt_path=str(OUT / "ckpt" / "last.ckpt"))
    assert not crashed
    rank = trainer.global_rank
    save_file(full_state(model), str(OUT / f"module_rank{rank}.safetensors"))
    write_result(rank, {"scores": {**first.scores, **second.scores}, "recipe": greedy.recipe})


if __name__ == "__main__":
    main()
    finish()
