"""Real Lightning checkpoints (written by ModelCheckpoint) read by the storage layer, for both flavours."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lightning_soup import storage
from tests._models import make_model, trainer_kwargs


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_reads_the_state_dict_of_a_model_checkpoint_file(tmp_path: Path, package: str) -> None:
    pl = importlib.import_module(package)
    model = make_model(pl, torchmetrics_acc=True)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint])
    )
    trainer.fit(model)
    path = Path(checkpoint.last_model_path)
    assert path.suffix == ".ckpt"
    expected = model.state_dict()

    # weights_only=True accepts what Lightning writes (hyper-parameters, loops, optimizer and callback states)
    with storage.open_state_dict(path) as lazy:
        assert list(lazy) == list(expected)
        for key, value in expected.items():
            assert torch.equal(lazy[key], value), key

    # `prefix` gives the inner torch module's own keys: loadable into a plain nn.Module, via safetensors
    out = storage.save_state_dict(storage.open_state_dict(path, prefix="net"), tmp_path / "net.safetensors")
    fresh = make_model(pl, seed=1).net
    fresh.load_state_dict(safetensors.torch.load_file(out))
    for key, value in model.net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
