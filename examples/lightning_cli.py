"""The three lightning_soup callbacks added to a LightningCLI trainer from YAML (``examples/config.yaml``).

    python examples/lightning_cli.py fit --config examples/config.yaml
    python examples/lightning_cli.py fit --config examples/config.yaml --trainer.max_epochs=3   # any override

The story is the one of ``forgetting_digits.py``, in a few lines: before ``fit`` the model learns digits 0–4 (a short
plain-PyTorch pretraining, standing in for loading a pretrained checkpoint, which ``--model.pretrained PATH`` does
instead), then ``fit`` fine-tunes it on digits 5–9 while validation reports ``val/new_acc`` (digits 5–9) and
``val/old_acc`` (digits 0–4), the metrics the callbacks in the config monitor. The results land in
``<trainer.default_root_dir>/soup`` (average.safetensors, soup.safetensors, blended.safetensors, blend.png, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, however this file is started
from _common import DigitsSteps, digits_mlp  # noqa: E402


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8×8 digits: train on ``new_digits``; validate on them and on the other ("old") digits.

    Args:
        new_digits: the digits of the fine-tune; the others are the old task.
        batch_size: training batch size.
        seed: the train/val split (stratified, half each) and the shuffling.
    """

    def __init__(self, new_digits: Sequence[int] = (5, 6, 7, 8, 9), batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.parts: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        if self.parts:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)
        x, y = torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)
        new = torch.isin(y, torch.tensor(list(self.hparams.new_digits)))
        for task, mask in (("new", new), ("old", ~new)):
            index = mask.nonzero().squeeze(1).numpy()
            train, val = train_test_split(index, train_size=0.5, stratify=labels[index], random_state=self.hparams.seed)
            self.parts[f"{task}_train"] = TensorDataset(x[train], y[train])
            self.parts[f"{task}_val"] = TensorDataset(x[val], y[val])

    def pretrain_dataloader(self) -> DataLoader:
        """The old digits' training split: what the base model learned."""
        return self._loader("old_train", 32, shuffle=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader("new_train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader("new_val", 256), self._loader("old_val", 256)]  # order = DigitsClassifier.val_tasks

    def _loader(self, part: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(self.parts[part], batch_size=batch_size, shuffle=shuffle, generator=generator)


class DigitsClassifier(DigitsSteps, pl.LightningModule):
    """64 → hidden → hidden → 10 MLP with BatchNorm; logs ``val/new_acc``, ``val/old_acc`` and the two losses.

    Args:
        hidden: width of the hidden layers.
        lr: SGD learning rate (momentum 0.9).
        pretrained: a ``.safetensors`` file of this model's weights to start from (skips the pretraining).
    """

    val_tasks = ("new", "old")

    def __init__(self, hidden: int = 128, lr: float = 0.02, pretrained: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = digits_mlp(hidden)
        if pretrained is not None:
            from safetensors.torch import load_file

            self.load_state_dict(load_file(pretrained))


def pretrain(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 0.05) -> None:
    """A plain PyTorch training loop: the "base model" that the fine-tune starts from."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


class ForgettingCLI(LightningCLI):
    """LightningCLI that pretrains the model on the old digits before ``fit`` unless it loaded ``pretrained``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--pretrain_epochs", type=int, default=10, help="epochs on the old digits before fit")

    def before_fit(self) -> None:
        epochs = self.config[self.subcommand]["pretrain_epochs"]
        if self.model.hparams.pretrained is None and epochs > 0:
            pl.seed_everything(self.config[self.subcommand]["seed_everything"], verbose=False)
            self.datamodule.setup("fit")
            pretrain(self.model, self.datamodule.pretrain_dataloader(), epochs)


def main(args: Any = None) -> ForgettingCLI:
    """``args``: a list of command-line arguments (default ``sys.argv[1:]``), as for ``LightningCLI``."""
    return ForgettingCLI(DigitsClassifier, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
