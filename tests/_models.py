"""Tiny deterministic models and trainer settings shared by the callback tests."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 8
N_CLASSES = 3


def make_data(n: int = 96, seed: int = 0, shift: float = 0.0) -> TensorDataset:
    """A separable-but-noisy 3-class problem; ``shift`` moves the inputs (a second, different validation set)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g) + shift
    w = torch.randn(N_FEATURES, N_CLASSES, generator=torch.Generator().manual_seed(1234))
    y = (x @ w + 0.5 * torch.randn(n, N_CLASSES, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


@functools.cache
def tiny_classifier_class(pl: ModuleType) -> type:
    """``TinyClassifier`` subclassing ``pl.LightningModule`` for the given Lightning package."""

    class TinyClassifier(pl.LightningModule):
        """Linear → BatchNorm1d → ReLU → Linear; logs ``val/loss`` and ``val/acc`` per epoch.

        Args:
            two_val_loaders: a second, shifted validation set (metrics get ``/dataloader_idx_N`` suffixes).
            torchmetrics_acc: log a ``torchmetrics.Accuracy`` object as ``val/tm_acc`` too.
            batch_size: training and validation batch size.
            lr: SGD learning rate.
        """

        def __init__(
            self,
            two_val_loaders: bool = False,
            torchmetrics_acc: bool = False,
            batch_size: int = 16,
            lr: float = 0.2,
            n_train: int = 96,
            hidden: int = 16,
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.Linear(N_FEATURES, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES)
            )
            self.tm_acc = torchmetrics.Accuracy(task="multiclass", num_classes=N_CLASSES) if torchmetrics_acc else None
            self.training_steps = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.training_steps += 1
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            x, y = batch
            logits = self(x)
            self.log("val/loss", nn.functional.cross_entropy(logits, y))
            self.log("val/acc", (logits.argmax(1) == y).float().mean())
            if self.tm_acc is not None and dataloader_idx == 0:
                self.tm_acc(logits, y)
                self.log("val/tm_acc", self.tm_acc, add_dataloader_idx=False)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_data(self.hparams.n_train, seed=0), batch_size=self.hparams.batch_size, shuffle=True)

        def val_dataloader(self) -> DataLoader | list[DataLoader]:
            # 40 samples with batch 16: a short last batch, so batch-size weighting matters.
            first = DataLoader(make_data(40, seed=1), batch_size=self.hparams.batch_size)
            if not self.hparams.two_val_loaders:
                return first
            return [first, DataLoader(make_data(24, seed=2, shift=0.5), batch_size=self.hparams.batch_size)]

    return TinyClassifier


def make_model(pl: ModuleType, seed: int = 0, **kwargs: Any) -> Any:
    """A freshly seeded ``TinyClassifier`` for the given Lightning package."""
    torch.manual_seed(seed)
    return tiny_classifier_class(pl)(**kwargs)


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Fast, deterministic CPU trainer settings with nothing written but what the test asks for."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs
