"""`_evaluate`: scoring weights with the user's validation loop during fit, invisibly to everything else."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _models import make_model, trainer_kwargs

from lightning_soup import SoupError
from lightning_soup.callbacks._evaluate import evaluate, preserved_weights, resolve_monitor, swapped_weights


def _validate(flavour: SimpleNamespace, root: Path, model: Any, **overrides: Any) -> dict[str, float]:
    """What a fresh ``trainer.validate`` reports for the model's weights, merged over dataloaders."""
    trainer = flavour.pl.Trainer(**trainer_kwargs(root, **overrides))
    merged: dict[str, float] = {}
    for result in trainer.validate(model, verbose=False):
        merged.update(result)
    return merged


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Other weights of the same model (BatchNorm statistics included), so scores differ from the trained ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=g, dtype=v.dtype)
            out[k] = (v + 0.3 * noise).abs() if "running_var" in k else v + 0.3 * noise
        else:
            out[k] = v.clone()
    return out


def _snapshot(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("limit", [1.0, 2])
def test_scores_equal_trainer_validate(flavour: SimpleNamespace, tmp_path: Path, limit: float | int) -> None:
    """Same float32 batch-size-weighted reduction, torchmetrics object, two dataloaders, limit_val_batches."""
    seen: dict[str, Any] = {}

    class Probe(flavour.pl.Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            seen["trained"] = _snapshot(pl_module)
            seen["trained_metrics"] = evaluate(trainer, pl_module)
            seen["candidate"] = _perturbed(seen["trained"], seed=7)
            with swapped_weights(pl_module, seen["candidate"]):
                seen["candidate_metrics"] = evaluate(trainer, pl_module)
            seen["after"] = _snapshot(pl_module)

    model = make_model(flavour.pl, two_val_loaders=True, torchmetrics_acc=True)
    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=limit), callbacks=[Probe()])
    trainer.fit(model)

    assert all(torch.equal(seen["after"][k], v) for k, v in seen["trained"].items())  # the swap was undone
    expected_keys = {
        "val/loss/dataloader_idx_0", "val/acc/dataloader_idx_0", "val/tm_acc",
        "val/loss/dataloader_idx_1", "val/acc/dataloader_idx_1",
    }
    assert set(seen["trained_metrics"]) == expected_keys
    assert seen["trained_metrics"] == _validate(flavour, tmp_path / "v1", model, limit_val_batches=limit)

    other = make_model(flavour.pl, two_val_loaders=True, torchmetrics_acc=True)
    other.load_state_dict(seen["candidate"])
    reference = _validate(flavour, tmp_path / "v2", other, limit_val_batches=limit)
    assert seen["candidate_metrics"] == reference
    assert seen["candidate_metrics"] != seen["trained_metrics"]  # the candidate really was scored


class _Recorder:
    """A logger that records every call (built per flavour: Lightning checks the base class)."""

    @staticmethod
    def make(pl: Any) -> Any:
        class Recorder(pl.loggers.Logger):
            def __init__(self) -> None:
                super().__init__()
                self.records: list[tuple[int | None, dict[str, float]]] = []

            @property
            def name(self) -> str:
                return "recorder"

            @property
            def version(self) -> int:
                return 0

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
                pass

            def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
                self.records.append((step, dict(metrics)))

        return Recorder()


def _run(flavour: SimpleNamespace, root: Path, probe: Any | None) -> dict[str, Any]:
    pl = flavour.pl
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), monitor="val/loss", save_top_k=2)
    stopping = pl.callbacks.EarlyStopping(monitor="val/loss", patience=10)
    logger = _Recorder.make(pl)
    callbacks = [checkpoint, stopping] if probe is None else [probe, checkpoint, stopping]
    model = make_model(pl, torchmetrics_acc=True)
    trainer = pl.Trainer(
        **trainer_kwargs(
            root, max_epochs=3, enable_checkpointing=True, num_sanity_val_steps=1, logger=logger, log_every_n_steps=1
        ),
        callbacks=callbacks,
    )
    trainer.fit(model)
    return {
        "weights": _snapshot(model),
        "records": logger.records,
        "best_k": {Path(k).name: float(v) for k, v in checkpoint.best_k_models.items()},
        "best": float(checkpoint.best_model_score),
        "stopping": (stopping.wait_count, float(stopping.best_score)),
        "fit_loop": trainer.fit_loop.state_dict(),
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "logged_metrics": {k: float(v) for k, v in trainer.logged_metrics.items()},
    }


@pytest.mark.slow
def test_invisible_to_training_callbacks_loggers_and_progress(flavour: SimpleNamespace, tmp_path: Path) -> None:
    """Extra validation passes during fit change nothing a user could observe (not even the training RNG)."""
    calls: list[str] = []

    class Probe(flavour.pl.Callback):
        def _probe(self, trainer: Any, pl_module: Any, hook: str) -> None:
            if trainer.sanity_checking:
                return
            before = {
                "callback": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "logged": {k: float(v) for k, v in trainer.logged_metrics.items()},
                "pbar": dict(trainer.progress_bar_metrics),
                "stage": trainer.state.stage,
                "modes": [m.training for m in pl_module.modules()],
                "grad": torch.is_grad_enabled(),
                "tm": {k: v.clone() for k, v in pl_module.tm_acc.metric_state.items()},
                "val_progress": trainer.fit_loop.epoch_loop.val_loop.batch_progress.state_dict(),
            }
            with swapped_weights(pl_module, _perturbed(_snapshot(pl_module), seed=len(calls))):
                metrics = evaluate(trainer, pl_module)
            assert "val/loss" in metrics and math.isfinite(metrics["val/loss"])
            assert {k: float(v) for k, v in trainer.callback_metrics.items()} == before["callback"]
            assert {k: float(v) for k, v in trainer.logged_metrics.items()} == before["logged"]
            assert dict(trainer.progress_bar_metrics) == before["pbar"]
            assert trainer.state.stage == before["stage"]
            assert [m.training for m in pl_module.modules()] == before["modes"]
            assert torch.is_grad_enabled() == before["grad"]
            assert all(torch.equal(pl_module.tm_acc.metric_state[k], v) for k, v in before["tm"].items())
            assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.state_dict() == before["val_progress"]
            calls.append(hook)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self._probe(trainer, pl_module, "on_validation_end")

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self._probe(trainer, pl_module, "on_train_epoch_end")

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._probe(trainer, pl_module, "on_train_end")

    plain = _run(flavour, tmp_path / "plain", None)
    probed = _run(flavour, tmp_path / "probed", Probe())
    assert calls.count("on_validation_end") == 3 and calls.count("on_train_end") == 1
    assert all(torch.equal(probed["weights"][k], v) for k, v in plain["weights"].items())
    for key in ("records", "best_k", "best", "stopping", "fit_loop", "callback_metrics", "logged_metrics"):
        assert probed[key] == plain[key], key


def test_evaluate_restores_user_metric_state_for_on_validation_end(flavour: SimpleNamespace, tmp_path: Path) -> None:
    """A module reading its torchmetrics object in its own on_validation_end sees the real validation's state."""
    pl = flavour.pl
    seen: dict[str, list[float]] = {"module": [], "callback_metrics": []}
    base = type(make_model(pl, torchmetrics_acc=True))

    class Module(base):  # type: ignore[misc,valid-type]
        def on_validation_end(self) -> None:
            if not self.trainer.sanity_checking:
                seen["module"].append(float(self.tm_acc.compute()))
                seen["callback_metrics"].append(float(self.trainer.callback_metrics["val/tm_acc"]))

    class Probe(pl.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            with swapped_weights(pl_module, _perturbed(_snapshot(pl_module), seed=1)):
                evaluate(trainer, pl_module)

    torch.manual_seed(0)
    model = Module(torchmetrics_acc=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[Probe()]).fit(model)
    # The module's hook runs in our pass too (as in trainer.validate), then in the real one: 2 per epoch.
    assert len(seen["module"]) == 4
    assert seen["module"] == seen["callback_metrics"]


def test_validation_disabled_is_an_error(flavour: SimpleNamespace, tmp_path: Path) -> None:
    class Probe(flavour.pl.Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            evaluate(trainer, pl_module)

    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0), callbacks=[Probe()])
    with pytest.raises(SoupError, match=r"Validation is disabled.*limit_val_batches"):
        trainer.fit(make_model(flavour.pl))


def test_outside_fit_is_an_error(flavour: SimpleNamespace, tmp_path: Path) -> None:
    class Probe(flavour.pl.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            evaluate(trainer, pl_module)

    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[Probe()])
    with pytest.raises(SoupError, match="during fit"):
        trainer.validate(make_model(flavour.pl), verbose=False)


def test_resolve_monitor_lists_metrics_and_hints() -> None:
    assert resolve_monitor({"val/acc": torch.tensor(0.5)}, "val/acc") == 0.5
    with pytest.raises(SoupError) as info:
        resolve_monitor({"val/loss": 1.0, "val/acc/dataloader_idx_0": 0.5}, "val/acc")
    message = str(info.value)
    assert "'val/acc/dataloader_idx_0', 'val/loss'" in message
    assert "HINT: Did you call `self.log('val/acc', ...)`" in message
    with pytest.raises(SoupError, match=r"\[none\]"):
        resolve_monitor({}, "val/acc")


def test_swapped_weights_restores_exactly_even_on_error(flavour: SimpleNamespace) -> None:
    model = make_model(flavour.pl)
    model.net[1].num_batches_tracked.fill_(5)
    before = _snapshot(model)
    other = _perturbed(before, seed=3)
    other["net.1.num_batches_tracked"] = torch.tensor(99)
    with pytest.raises(RuntimeError, match="boom"), swapped_weights(model, other):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in other.items())
        raise RuntimeError("boom")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    with preserved_weights(model):
        with torch.no_grad():
            model.net[0].weight.add_(1.0)
    assert torch.equal(model.net[0].weight, before["net.0.weight"])

    with pytest.raises(SoupError, match="missing keys"), swapped_weights(model, {"net.0.weight": other["net.0.weight"]}):
        pass
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
