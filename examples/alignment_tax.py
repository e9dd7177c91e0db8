"""Paying less alignment tax: blend a fine-tune back toward its base under a "keep task A" constraint.

A model is trained on task A (think: the safety behaviour you already shipped) and saved as ``base.safetensors``.
It is then fine-tuned on task B only (the new skill), which erodes task A: the "alignment tax" or catastrophic
forgetting. ``TaskArithmeticBlend`` ends the fine-tune by setting the weights to ``base + r·(θ − base)`` with the
ratio ``r`` chosen on validation: the best task-B accuracy among the ratios that keep task-A accuracy above a floor
(WiSE-FT, Wortsman et al. 2022; task arithmetic, Ilharco et al. 2023).

Data: two synthetic 4-class problems (scikit-learn's ``make_classification``, seeded, no download) in the same
20-dimensional input space. One MLP trunk feeds one 4-logit head per task; fine-tuning on B moves the shared trunk,
which is what costs task A. Validation has one dataloader per task, logged as ``val/a_acc`` and ``val/b_acc``.

Run ``python examples/alignment_tax.py`` (about 20 s on a laptop CPU); ``--help`` lists the flags. It prints the
callback's table of every ratio, a before/after summary measured with ``trainer.validate``, and writes
``blend.png`` (metric against ratio, constraint drawn) and ``blend.json`` into ``<--out>/soup``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_soup import TaskArithmeticBlend

N_FEATURES = 20
TASKS = ("a", "b")
RATIOS = [round(i / 10, 1) for i in range(11)]  # 0.0, 0.1, ..., 1.0
BASE_FLOOR = 0.85  # the task-A model must reach this task-A validation accuracy before anything is blended


def make_tasks(seed: int = 0) -> dict[str, TensorDataset]:
    """``{"a_train", "a_val", "b_train", "b_val"}`` → ``TensorDataset(x (n, 20) float32, y (n,) int64)``.

    Task A's labels are 0–3 and task B's 4–7; both live in the same standardised input space.
    """
    from sklearn.datasets import make_classification

    out = {}
    for i, task in enumerate(TASKS):
        x, y = make_classification(
            n_samples=1600, n_features=N_FEATURES, n_informative=12, n_redundant=4, n_classes=4,
            n_clusters_per_class=2, class_sep=1.5, random_state=seed + 17 * i,
        )  # fmt: skip
        x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.int64)
        out[f"{task}_train"] = TensorDataset(x[:1200], y[:1200])
        out[f"{task}_val"] = TensorDataset(x[1200:], y[1200:])
    return out


class TwoTaskMLP(pl.LightningModule):
    """20 → hidden → hidden → 8 MLP (logits 0–3 are task A's head, 4–7 task B's); trains on ``train_task`` only.

    Validation logs ``val/a_acc``, ``val/a_loss``, ``val/b_acc``, ``val/b_loss`` (``add_dataloader_idx=False``:
    the first validation dataloader is task A's, the second task B's).
    """

    def __init__(self, data: dict[str, TensorDataset], train_task: str = "a", hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.data = data
        self.train_task = train_task
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 8)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (n, 20) → (n, 8) logits

    def task_logits(self, x: Tensor, task: str) -> Tensor:
        """The 4 logits of ``task``'s head: (n, 20) → (n, 4)."""
        offset = 4 * TASKS.index(task)
        return self(x)[:, offset : offset + 4]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.task_logits(x, self.train_task), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        task = TASKS[dataloader_idx]
        logits = self.task_logits(x, task)
        self.log(f"val/{task}_acc", (logits.argmax(1) == y).float().mean(), add_dataloader_idx=False)
        self.log(f"val/{task}_loss", nn.functional.cross_entropy(logits, y), add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.data[f"{self.train_task}_train"], batch_size=64, shuffle=True, generator=generator)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.data[f"{task}_val"], batch_size=256) for task in TASKS]


def make_trainer(out: Path, epochs: int, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=str(out), accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=list(callbacks), deterministic=True,
    )  # fmt: skip


def accuracies(model: TwoTaskMLP, out: Path) -> dict[str, float]:
    """``{"a": val/a_acc, "b": val/b_acc}`` as ``trainer.validate`` reports them."""
    results = make_trainer(out, 1).validate(model, verbose=False)
    merged = {k: v for per_loader in results for k, v in per_loader.items()}
    return {task: float(merged[f"val/{task}_acc"]) for task in TASKS}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/alignment_tax"), help="output folder")
    parser.add_argument("--base-epochs", type=int, default=8, help="epochs of task-A training")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of task-B fine-tuning")
    parser.add_argument(
        "--keep", type=float, default=0.9, help="constraint: keep at least this fraction of the base's task-A accuracy"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*|.*LeafSpec.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # keep the output to the tables
    console = Console()
    pl.seed_everything(args.seed, verbose=False)
    data = make_tasks(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. Task A: the behaviour to keep. Its weights are the anchor file.
    model = TwoTaskMLP(data, train_task="a")
    make_trainer(args.out, args.base_epochs).fit(model)
    base_path = args.out / "base.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(base_path))
    base = accuracies(model, args.out)
    if not base["a"] >= BASE_FLOOR:  # NaN fails too
        raise SystemExit(
            f"STOP: the task-A model's task-A validation accuracy is {base['a']:.3f}, below the {BASE_FLOOR} this "
            "example needs before anything is blended (chance is 0.25). Train it longer (--base-epochs)."
        )
    floor = round(args.keep * base["a"], 4)
    console.print(f"Task A model: task A accuracy {base['a']:.3f}, task B {base['b']:.3f} → anchor {base_path}")

    # 2. Fine-tune on task B only; the blend runs when fit ends and leaves its choice in `model`.
    model.train_task = "b"
    blend = TaskArithmeticBlend(
        anchor=str(base_path), ratio=RATIOS, monitor="val/b_acc", mode="max", constraint=f"val/a_acc>={floor}",
        dirpath=str(args.out / "soup"),
    )  # fmt: skip
    make_trainer(args.out, args.epochs, [blend]).fit(model)

    # 3. Before/after, from the files the callback wrote and trainer.validate on the blended module.
    finetuned = TwoTaskMLP(data)
    finetuned.load_state_dict(load_file(args.out / "soup" / "final.safetensors"))
    rows = {"base (task A)": base, "fine-tuned (task B)": accuracies(finetuned, args.out)}
    rows[f"blended (r={blend.result['ratio']:g})"] = accuracies(model, args.out)
    summary = Table(title=f"Alignment tax: constraint val/a_acc >= {floor} ({args.keep:.0%} of the base)")
    summary.add_column("weights")
    summary.add_column("task A acc", justify="right")
    summary.add_column("task B acc", justify="right")
    for name, acc in rows.items():
        summary.add_row(name, f"{acc['a']:.3f}", f"{acc['b']:.3f}")
    console.print(summary)
    report = json.loads((args.out / "soup" / "blend.json").read_text())
    tax = rows["base (task A)"]["a"] - rows["fine-tuned (task B)"]["a"]
    kept = list(rows.values())[-1]
    console.print(
        f"Fine-tuning cost {tax:.3f} of task-A accuracy; the blend keeps task A at {kept['a']:.3f} "
        f"(constraint met: {report['constraint_met']}) with task B at {kept['b']:.3f}. "
        f"Plot: {args.out / 'soup' / 'blend.png'}"
    )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
