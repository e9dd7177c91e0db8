"""FSDP2 on CPU (gloo), 2 ranks: CheckpointAveraging + GreedySoup + TaskArithmeticBlend on sharded weights.

A capture callback gathers the full weights at every snapshot point (outside the counted window) so the test can
compute float64 references; a counter records every whole-weight collective between ``on_train_start`` and
``on_train_end`` (there must be none: snapshots and ingredients are shard-local). After fit each rank gathers its
module, and the soup's weights are validated again with ``trainer.validate``.
Usage: fsdp2_callbacks.py <flavour>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _common import (
    CollectiveCounter,
    finish,
    flavour,
    full_state,
    model_parallel_strategy,
    out_dir,
    sharded_classifier_class,
    trainer_kwargs,
    write_result,
)
from lightning_soup.callbacks import _dist, _tensors

pl, soup = flavour(sys.argv[1])
OUT = out_dir()
CAPTURE = OUT / "capture"
counter = CollectiveCounter().install()


class Count(pl.Callback):
    """First in the list: counting starts before and stops before every other callback's train start/end hook."""

    def on_train_start(self, trainer, pl_module):
        counter.active = True

    def on_train_end(self, trainer, pl_module):
        counter.active = False
        value = trainer.callback_metrics.get("average/val/loss")  # validate_average at the last snapshot
        self.average_loss = None if value is None else float(value)


class Capture(pl.Callback):
    """The full weights (gathered; not counted) at fit start and at every epoch's end, and rank zero's scores."""

    def __init__(self) -> None:
        self.scores: dict[int, float] = {}

    def _save(self, trainer, pl_module, name: str) -> None:
        with counter.paused():
            state = full_state(pl_module)
        if trainer.is_global_zero:
            CAPTURE.mkdir(exist_ok=True)
            save_file(state, str(CAPTURE / f"{name}.safetensors"))

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "initial")

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.scores[trainer.current_epoch] = float(trainer.callback_metrics["val/loss"])

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")


def state_files(root: Path) -> dict[str, dict[str, list[int]]]:
    """Every safetensors file under ``root``: its keys' shapes."""
    out = {}
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[str(path.relative_to(root))] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return out


def main() -> None:
    torch.manual_seed(0)
    model = sharded_classifier_class(pl)(lr=0.1)
    capture = Capture()
    count = Count()
    averaging = soup.CheckpointAveraging(window=2, validate_average=True)
    # val/loss is continuous: a candidate scored with any other weights (or rank 1's buffers) shows.
    greedy = soup.GreedySoup(monitor="val/loss", mode="min")
    blend = soup.TaskArithmeticBlend(anchor="initial", ratio=[0.25, 0.75], monitor="val/loss", mode="min")
    trainer = pl.Trainer(
        **trainer_kwargs(
            OUT, devices=2, max_epochs=3, strategy=model_parallel_strategy(pl),
            callbacks=[count, capture, blend, averaging, greedy],  # the blend listed first still runs last
        )
    )
    trainer.fit(model)
    counts, broadcast_numel = dict(counter.calls), list(counter.broadcast_numel)
    counter.uninstall()
    rank = trainer.global_rank
    save_file(full_state(model), str(OUT / f"module_rank{rank}.safetensors"))
    # The soup's weights, validated again: the score GreedySoup recorded must be what trainer.validate reports.
    soup_path = OUT / "soup" / "soup.safetensors"
    _tensors.load_into_module_(model, _dist.read_local_shards(trainer, model, soup_path))
    _dist.broadcast_module_(trainer, model)
    validated = trainer.validate(model, verbose=False)[0]
    write_result(
        rank,
        {
            "gathers_during_training": counts,
            "broadcast_numel_during_training": broadcast_numel,
            "scores": capture.scores,
            "recipe": greedy.recipe,
            "average_recipe": averaging.recipe,
            "average_val_loss": count.average_loss,
            "blend": blend.result,
            "validated_soup": validated,
            "files": state_files(OUT / "soup") if rank == 0 else None,
        },
    )


if __name__ == "__main__":
    main()
    finish()
