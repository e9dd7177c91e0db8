"""Checkpoint averaging, a greedy soup and a blend on FSDP2-sharded weights.

``ModelParallelStrategy`` with ``torch.distributed.fsdp.fully_shard`` in ``configure_model``: every rank keeps the
running sums, snapshots and ingredients of its own shards (``soup/*/rank{R}/``) with no communication during
training; only the final files (``average``, ``soup``, ``blended``) are gathered, one tensor at a time.

Runs on CPU with 2 processes (gloo) as is; on GPUs pass ``--accelerator cuda --devices N``:

    python examples/fsdp2_soup.py
    python examples/fsdp2_soup.py --accelerator cuda --devices 8
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_soup import CheckpointAveraging, GreedySoup, TaskArithmeticBlend


def dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(1))


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU()) for _ in range(4))
        self.head = nn.Linear(32, 10)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)  # one all-gather per block in forward, one reduce-scatter in backward
        fully_shard(self, mesh=mesh)  # the root holds the head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(2048, seed=1), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset(512, seed=2), batch_size=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--root", default="runs/fsdp2_soup")
    args = parser.parse_args()

    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        max_epochs=args.epochs,
        default_root_dir=args.root,
        logger=False,
        enable_checkpointing=False,
        callbacks=[
            CheckpointAveraging(window=3),
            GreedySoup(monitor="val/acc", mode="max"),
            TaskArithmeticBlend(anchor="initial", ratio=[0.5, 0.75, 1.0], monitor="val/acc"),
        ],
    )
    trainer.fit(MLP())
    # Every rank now holds its shards of the blended soup; the full files are in <root>/soup/.


if __name__ == "__main__":
    main()
