"""Bad inputs, across the three callbacks and the CLI: each is refused (or skipped) early, with a message that names
the argument, metric, key or file and says what to do, and without touching the user's files or weights."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from lightning_soup import SoupError
from lightning_soup.cli import main as cli
from tests._models import make_data, make_model, tiny_classifier_class, trainer_kwargs

STEPS_PER_EPOCH = 6  # 96 training samples, batch 16


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- constructor arguments

CONSTRUCTOR_CASES = [
    ("CheckpointAveraging", {"window": 0}, ["`window`", "an int >= 1", "got 0"]),
    ("CheckpointAveraging", {"window": 2.5}, ["`window`", "got 2.5"]),
    ("CheckpointAveraging", {"every_n_train_steps": 0}, ["`every_n_train_steps`", ">= 1 or None"]),
    ("CheckpointAveraging", {"snapshots": "gpu"}, ["`snapshots`", "'disk' or 'cpu'", "'gpu'"]),
    ("GreedySoup", {"monitor": "val/acc", "mode": "best"}, ["`mode`", "'min' or 'max'", "'best'"]),
    ("GreedySoup", {"monitor": ""}, ["`monitor`", "name of a logged metric"]),
    ("GreedySoup", {"monitor": "val/acc", "max_ingredients": 0}, ["`max_ingredients`", "got 0"]),
    ("TaskArithmeticBlend", {"mode": "up"}, ["`mode`", "'min' or 'max'", "'up'"]),
    ("TaskArithmeticBlend", {"ratio": []}, ["`ratio`", "non-empty list"]),
    ("TaskArithmeticBlend", {"ratio": float("nan")}, ["`ratio`", "finite"]),
    ("TaskArithmeticBlend", {"ratio": [0.25, 0.5]}, ["`ratio` lists 2 values", "`monitor` must name"]),
    (
        "TaskArithmeticBlend",
        {"ratio": [0.25, 0.5], "monitor": "val/acc", "constraint": "val/acc => 0.9"},
        ["val/acc => 0.9", "metric>=x"],
    ),
    ("TaskArithmeticBlend", {"constraint": "val/acc>=high"}, ["val/acc>=high", "metric>=x"]),
    ("TaskArithmeticBlend", {"layer_ratios": {"net.*": "half"}}, ["`layer_ratios`", "net.*"]),
    ("TaskArithmeticBlend", {"anchor": ""}, ["`anchor`", '"initial" or a path']),
]


@pytest.mark.parametrize(("name", "kwargs", "fragments"), CONSTRUCTOR_CASES)
def test_invalid_constructor_argument_is_named(
    flavour: SimpleNamespace, name: str, kwargs: dict, fragments: list
) -> None:
    with pytest.raises(SoupError) as info:
        getattr(flavour.soup, name)(**kwargs)
    message = str(info.value)
    assert message.startswith(f"Invalid {name} arguments"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    ("name", "kwargs", "arguments"),
    [
        (
            "CheckpointAveraging",
            {"window": 0, "every_n_epochs": -1, "snapshots": "x"},
            ["window", "every_n_epochs", "snapshots"],
        ),
        ("GreedySoup", {"monitor": "", "mode": "x", "every_n_epochs": 0}, ["monitor", "mode", "every_n_epochs"]),
        ("TaskArithmeticBlend", {"ratio": [], "mode": "x", "constraint": "a ~ 1"}, ["ratio", "mode", "a ~ 1"]),
    ],
)
def test_every_invalid_argument_is_reported_at_once(name: str, kwargs: dict, arguments: list) -> None:
    import lightning_soup

    with pytest.raises(SoupError) as info:
        getattr(lightning_soup, name)(**kwargs)
    assert all(a in str(info.value) for a in arguments), str(info.value)


# ------------------------------------------------------------------------------------------ monitored metrics


def test_unknown_soup_monitor_lists_the_logged_metrics_at_the_first_validation(
    flavour: SimpleNamespace, tmp_path: Path
) -> None:
    model = make_model(flavour.pl)
    cb = flavour.soup.GreedySoup(monitor="val/accuracy")
    with pytest.raises(SoupError) as info:
        flavour.pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path)).fit(model)
    message = str(info.value)
    assert "'val/accuracy'" in message and "'val/acc'" in message and "'val/loss'" in message
    assert "self.log('val/accuracy'" in message  # what to do
    assert model.training_steps == STEPS_PER_EPOCH  # the first validation, not the end of fit


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": [0.5, 1.0], "monitor": "val/accuracy"},
        {"ratio": [0.5, 1.0], "monitor": "val/acc", "constraint": "val/safety_acc>=0.9"},
    ],
)
def test_unknown_blend_metric_fails_in_the_sanity_check(flavour: SimpleNamespace, tmp_path: Path, kwargs: dict) -> None:
    model = make_model(flavour.pl)
    cb = flavour.soup.TaskArithmeticBlend(**kwargs)
    trainer = flavour.pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, num_sanity_val_steps=1))
    with pytest.raises(SoupError, match=r"not found among the validation metrics: \['val/acc', 'val/loss'\]"):
        trainer.fit(model)
    assert model.training_steps == 0


def scored_class(pl: Any) -> type:
    """TinyClassifier that logs ``val/score`` (its accuracy), replaced by ``bad_score`` in epoch ``bad_epoch``."""

    class Scored(tiny_classifier_class(pl)):  # type: ignore[misc]
        bad_epoch = -1
        bad_score = float("nan")

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx, dataloader_idx)
            x, y = batch
            score = (self(x).argmax(1) == y).float().mean()
            if self.trainer.current_epoch == self.bad_epoch and not self.trainer.sanity_checking:
                score = torch.full_like(score, self.bad_score)
            self.log("val/score", score)

    return Scored


@pytest.mark.parametrize("bad_score", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_validation_score_skips_the_ingredient_with_a_warning(tmp_path: Path, bad_score: float) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    torch.manual_seed(0)
    model = scored_class(pl)()
    model.bad_epoch, model.bad_score = 1, bad_score
    cb = soup.GreedySoup(monitor="val/score", verbose=False)
    with pytest.warns(UserWarning, match=r"GreedySoup skips the weights of epoch 1 \(step 12\): val/score is"):
        pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path)).fit(model)
    recipe = json.loads((tmp_path / "soup" / "soup.json").read_text())
    rows = {r["epoch"]: r for r in recipe["ingredients"]}
    assert rows[1]["status"] == "skipped" and not rows[1]["accepted"]
    assert "non-finite val/score" in rows[1]["reason"]
    assert not (tmp_path / "soup" / "ingredients" / "epoch=1-step=12.safetensors").exists()
    assert {rows[0]["status"], rows[2]["status"]} <= {"accepted", "rejected"}
    assert math.isfinite(recipe["soup_score"])


def test_non_finite_weights_skip_the_ingredient_with_a_warning(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    class Poison(pl.Callback):
        """NaN in one weight during epoch 1's validation only (listed after GreedySoup, which sees it)."""

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 1 and not trainer.sanity_checking:
                self.saved = pl_module.net[0].weight.detach().clone()
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 1 and not trainer.sanity_checking:
                with torch.no_grad():
                    pl_module.net[0].weight.copy_(self.saved)

    model = make_model(pl)
    cb = soup.GreedySoup(monitor="val/acc", verbose=False)
    with pytest.warns(UserWarning, match=r"skips the weights of epoch 1 \(step 12\): they contain NaN or inf"):
        pl.Trainer(callbacks=[cb, Poison()], **trainer_kwargs(tmp_path)).fit(model)
    rows = {r["epoch"]: r for r in json.loads((tmp_path / "soup" / "soup.json").read_text())["ingredients"]}
    assert rows[1]["status"] == "skipped" and rows[1]["reason"] == "non-finite weights"
    soup_weights = load_file(str(tmp_path / "soup" / "soup.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in soup_weights.values() if v.is_floating_point())


# -------------------------------------------------------------------------------------------------- anchors


def anchor_file(kind: str, folder: Path, pl: Any) -> Path:
    """A bad anchor of the given kind."""
    good = weights(make_model(pl))
    path = folder / f"{kind}.safetensors"
    if kind == "missing":
        return path
    if kind == "corrupt":
        path.write_bytes(os.urandom(256))
    elif kind == "truncated":
        save_file(good, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "incompatible":
        save_file(weights(make_model(pl, hidden=8)), str(path))
    elif kind == "missing-keys":
        save_file({k: v for k, v in good.items() if not k.startswith("net.3.")}, str(path))
    elif kind in ("nan", "inf"):
        good["net.3.weight"][1, 2] = float(kind)
        save_file(good, str(path))
    elif kind == "ckpt-without-state_dict":
        path = path.with_suffix(".ckpt")
        torch.save({"epoch": 3, "global_step": 30}, path)
    return path


ANCHOR_CASES = {
    "missing": ["does not exist", "Pass a .safetensors file"],
    "corrupt": ["not a readable safetensors file", "re-create or re-download it"],
    "truncated": ["truncated", "re-create or re-download it"],
    "incompatible": ["'net.0.weight'", "(16, 8)", "(8, 8)", "HINT"],
    "missing-keys": ["net.3.weight", "net.3.bias"],
    "nan": ["NaN or infinite values in ['net.3.weight']", "Use a healthy checkpoint"],
    "inf": ["NaN or infinite values in ['net.3.weight']", "Use a healthy checkpoint"],
    "ckpt-without-state_dict": [
        "no `state_dict` entry",
        "`epoch`, `global_step`",
        "Pass a checkpoint written by Lightning",
    ],
}


@pytest.mark.parametrize("kind", list(ANCHOR_CASES))
def test_bad_anchor_fails_before_the_first_training_step(tmp_path: Path, kind: str) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    path = anchor_file(kind, tmp_path, pl)
    model = make_model(pl)
    before = weights(model)
    cb = soup.TaskArithmeticBlend(anchor=str(path), ratio=0.5)
    with pytest.raises(SoupError) as info:
        pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path)).fit(model)
    message = str(info.value)
    assert message.startswith(f"TaskArithmeticBlend(anchor={str(path)!r})"), message
    for fragment in ANCHOR_CASES[kind]:
        assert fragment in message, (fragment, message)
    assert model.training_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())


# -------------------------------------------------------------------------------------------------- the CLI


def test_cli_incompatible_files_name_the_files_the_key_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pytorch_lightning as pl

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(weights(make_model(pl)), str(a))
    save_file(weights(make_model(pl, hidden=8)), str(b))
    out = tmp_path / "out.safetensors"
    assert cli(["average", str(a), str(b), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(a) in err and str(b) in err, err
    assert "'net.0.bias'" in err or "'net.0.weight'" in err
    assert "same model" in err and "lightning-soup inspect" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("kind", ["ckpt-without-state_dict", "truncated", "missing-keys"])
def test_cli_bad_input_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    import pytorch_lightning as pl

    good = tmp_path / "good.safetensors"
    save_file(weights(make_model(pl)), str(good))
    bad = anchor_file(kind, tmp_path, pl)
    out = tmp_path / "out.safetensors"
    assert cli(["blend", "--anchor", str(good), "--model", str(bad), "--ratio", "0.5", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and err.startswith("lightning-soup: error: "), err
    assert not out.exists()


# ---------------------------------------------------------------------------------------- validation disabled


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("GreedySoup", {"monitor": "val/acc"}),
        ("TaskArithmeticBlend", {"ratio": [0.5, 1.0], "monitor": "val/acc"}),
        ("TaskArithmeticBlend", {"constraint": "val/acc>=0.5"}),
        ("CheckpointAveraging", {"validate_average": True}),
    ],
)
def test_callbacks_that_validate_refuse_disabled_validation_before_training(
    flavour: SimpleNamespace, tmp_path: Path, name: str, kwargs: dict
) -> None:
    model = make_model(flavour.pl)
    cb = getattr(flavour.soup, name)(**kwargs)
    trainer = flavour.pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, limit_val_batches=0))
    with pytest.raises(SoupError, match=r"`Trainer\(limit_val_batches=0\)`") as info:
        trainer.fit(model)
    message = str(info.value)
    assert name in message and ("Enable validation" in message or "Set `limit_val_batches` > 0" in message), message
    assert model.training_steps == 0


def test_greedy_soup_without_a_validation_loop_fails_before_training(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    class NoValidation(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 3)
            self.training_steps = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.training_steps += 1
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_data(32), batch_size=16)

    model = NoValidation()
    with pytest.raises(SoupError, match="needs a validation loop to score ingredients.*define `validation_step`"):
        pl.Trainer(callbacks=[soup.GreedySoup(monitor="val/acc")], **trainer_kwargs(tmp_path)).fit(model)
    assert model.training_steps == 0


def test_greedy_soup_with_empty_validation_data_warns_and_keeps_the_weights(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    class EmptyValidation(tiny_classifier_class(pl)):  # type: ignore[misc]
        def val_dataloader(self) -> list:
            return []

    torch.manual_seed(0)
    model = EmptyValidation()
    with pytest.warns(UserWarning, match="GreedySoup has no ingredient to make a soup from"):
        pl.Trainer(callbacks=[soup.GreedySoup(monitor="val/acc")], **trainer_kwargs(tmp_path, max_epochs=1)).fit(model)
    assert not (tmp_path / "soup" / "soup.safetensors").exists()
    final = load_file(str(tmp_path / "soup" / "final.safetensors"))
    assert all(torch.equal(v, final[k]) for k, v in weights(model).items())


def test_blend_without_monitor_needs_no_validation(tmp_path: Path) -> None:
    """The documented fallback: a single ratio without `monitor`/`constraint` works with validation disabled."""
    import pytorch_lightning as pl

    import lightning_soup as soup

    model = make_model(pl)
    initial = weights(model)
    pl.Trainer(
        callbacks=[soup.TaskArithmeticBlend(ratio=0.5)], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0)
    ).fit(model)
    final = load_file(str(tmp_path / "soup" / "final.safetensors"))
    for k, v in weights(model).items():
        if v.is_floating_point():
            want = initial[k].double() + 0.5 * (final[k].double() - initial[k].double())
            assert torch.allclose(v.double(), want, atol=1e-6), k


# ------------------------------------------------------------------------------------ validate, test, predict


def full_class(pl: Any) -> type:
    class Full(tiny_classifier_class(pl)):  # type: ignore[misc]
        def test_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("test/acc", (self(x).argmax(1) == y).float().mean())

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0])

        def test_dataloader(self) -> DataLoader:
            return DataLoader(make_data(40, seed=1), batch_size=16)

        def predict_dataloader(self) -> DataLoader:
            return DataLoader(make_data(40, seed=1), batch_size=16)

    return Full


def soup_callbacks(soup: Any, dirpath: Path) -> list:
    return [
        soup.CheckpointAveraging(window=2, dirpath=str(dirpath / "avg"), verbose=False),
        soup.GreedySoup(monitor="val/acc", dirpath=str(dirpath / "soup"), verbose=False),
        soup.TaskArithmeticBlend(ratio=[0.5, 1.0], monitor="val/loss", mode="min", dirpath=str(dirpath / "blend")),
    ]


def snapshot_tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("after_fit", [False, True])
def test_no_effect_in_validate_test_predict(flavour: SimpleNamespace, tmp_path: Path, after_fit: bool) -> None:
    """No error, no file, no change of weights; after a fit, the fit's files stay as they are."""
    pl = flavour.pl
    torch.manual_seed(0)
    model = full_class(pl)()
    out = tmp_path / "out"
    trainer = pl.Trainer(callbacks=soup_callbacks(flavour.soup, out), **trainer_kwargs(tmp_path, max_epochs=2))
    if after_fit:
        trainer.fit(model)
    files = snapshot_tree(out)
    before = weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model)
        trainer.test(model)
        predictions = trainer.predict(model)
    ours = [str(w.message) for w in caught if any(n in str(w.message) for n in ("Soup", "Averaging", "Blend"))]
    assert ours == []
    assert len(predictions) == 3
    assert snapshot_tree(out) == files
    assert after_fit or not out.exists()
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())
