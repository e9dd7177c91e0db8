"""CheckpointAveraging: the average equals the float64 mean of independently captured snapshots, resumes exactly,
keeps memory flat, and stays out of validate/test/predict."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_soup import SoupError
from lightning_soup.callbacks.averaging import _CheckpointAveraging, _SnapshotStore
from lightning_soup.storage import read_recipe
from tests._models import make_model, trainer_kwargs

EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------------- references


def capture_class(pl: Any) -> type:
    """A test-only callback that copies ``state_dict()`` at the points the averaging schedule names.

    The step schedule is captured from the optimizer's own step post-hook (counting real ``optimizer.step()``
    calls), independently of ``trainer.global_step``.
    """

    class Capture(pl.Callback):
        def __init__(self, every_n_epochs: int = 1, every_n_steps: int | None = None) -> None:
            self.every_n_epochs = every_n_epochs
            self.every_n_steps = every_n_steps
            self.snapshots: list[dict[str, torch.Tensor]] = []
            self.steps = 0
            self._handle: Any = None

        def _copy(self, pl_module: Any) -> None:
            self.snapshots.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if self.every_n_steps is None:
                return

            def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
                self.steps += 1
                if self.steps % self.every_n_steps == 0:
                    self._copy(pl_module)

            self._handle = trainer.optimizers[0].register_step_post_hook(hook)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.every_n_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
                self._copy(pl_module)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self._handle is not None:
                self._handle.remove()
            self.final = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    return Capture


def expected_average(snapshots: list[dict[str, torch.Tensor]], window: int) -> dict[str, torch.Tensor]:
    """float64 mean of the last ``window`` snapshots' floating entries; integer entries from the newest."""
    last = snapshots[-window:]
    out = {}
    for key, value in last[-1].items():
        if value.is_floating_point():
            out[key] = torch.stack([s[key].double() for s in last]).mean(0)
        else:
            out[key] = value.clone()
    return out


def assert_average(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    assert actual.keys() == expected.keys()
    eps = torch.finfo(dtype).eps
    for key, want in expected.items():
        got = actual[key]
        if not want.is_floating_point():
            assert torch.equal(got, want), key
            continue
        assert got.dtype == dtype, key
        # float32 accumulation of a handful of terms, then one rounding to `dtype`: a few ulps of the magnitude.
        tol = 4 * eps * max(1.0, want.abs().max().item())
        err = (got.double() - want).abs().max().item()
        assert err <= tol, f"{key}: max error {err:.3g} > {tol:.3g}"


def fit(flavour: Any, tmp_path: Path, callbacks: list, model: Any = None, ckpt_path: Any = None, **kw: Any) -> Any:
    model = model if model is not None else make_model(flavour.pl)
    trainer = flavour.pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def module_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- arguments, state


def test_invalid_arguments_reported_at_once() -> None:
    with pytest.raises(SoupError) as info:
        _CheckpointAveraging(window=0, every_n_epochs=True, every_n_train_steps=-3, snapshots="gpu")  # type: ignore
    message = str(info.value)
    for name in ("`window`", "`every_n_epochs`", "`every_n_train_steps`", "`snapshots`", "'gpu'", "'disk'"):
        assert name in message


def test_state_key_names_window_schedule_and_dirpath() -> None:
    a = _CheckpointAveraging(window=3, dirpath="out")
    assert a.state_key != _CheckpointAveraging(window=4, dirpath="out").state_key
    assert a.state_key != _CheckpointAveraging(window=3, dirpath="other").state_key
    assert a.state_key != _CheckpointAveraging(window=3, every_n_train_steps=10, dirpath="out").state_key
    assert a.state_key.startswith("CheckpointAveraging{")


# -------------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(("window", "every_n_epochs"), [(3, 1), (4, 2)])  # (4, 2): window > snapshots taken
def test_epoch_schedule_equals_mean_of_captured_snapshots(
    flavour: Any, tmp_path: Path, window: int, every_n_epochs: int
) -> None:
    capture = capture_class(flavour.pl)(every_n_epochs=every_n_epochs)
    averaging = flavour.soup.CheckpointAveraging(window=window, every_n_epochs=every_n_epochs, verbose=False)
    model, _ = fit(flavour, tmp_path, [capture, averaging], max_epochs=5, num_sanity_val_steps=2)

    assert len(capture.snapshots) == 5 // every_n_epochs  # the sanity check took none
    expected = expected_average(capture.snapshots, window)
    assert_average(module_state(model), expected)
    written = load_file(tmp_path / "soup" / "average.safetensors")
    assert_average(written, expected)
    # The average is not the last snapshot: the test could fail if the callback just kept the final weights.
    assert not torch.allclose(written["net.0.weight"], capture.final["net.0.weight"])
    # BatchNorm: running statistics are averaged, the step counter comes from the newest snapshot.
    assert written["net.1.num_batches_tracked"] == capture.snapshots[-1]["net.1.num_batches_tracked"]
    # The raw trained weights are backed up, and the module loads the written file as is.
    final = load_file(tmp_path / "soup" / "final.safetensors")
    assert all(torch.equal(final[k], v) for k, v in capture.final.items())
    make_model(flavour.pl).load_state_dict(written)

    recipe = read_recipe(tmp_path / "soup" / "average.safetensors")
    assert recipe["method"] == "checkpoint_averaging" and recipe["window"] == window
    epochs = [e for e in range(5) if (e + 1) % every_n_epochs == 0][-window:]
    assert [r["epoch"] for r in recipe["averaged"]] == epochs
    assert recipe["snapshots_taken"] == 5 // every_n_epochs
    # Evicted snapshot files are deleted: only the window is left on disk.
    assert len(list((tmp_path / "soup" / "snapshots").glob("*.safetensors"))) == len(epochs)


def test_step_schedule_counts_optimizer_steps_under_gradient_accumulation(flavour: Any, tmp_path: Path) -> None:
    # 96 samples / batch 16 = 6 batches per epoch; accumulating 2 → 3 optimizer steps per epoch, 9 in all.
    capture = capture_class(flavour.pl)(every_n_steps=2)
    averaging = flavour.soup.CheckpointAveraging(window=3, every_n_train_steps=2, verbose=False)
    model, trainer = fit(flavour, tmp_path, [capture, averaging], max_epochs=3, accumulate_grad_batches=2)

    assert capture.steps == trainer.global_step == 9
    assert len(capture.snapshots) == 4  # after optimizer steps 2, 4, 6, 8
    assert_average(module_state(model), expected_average(capture.snapshots, 3))
    recipe = read_recipe(tmp_path / "soup" / "average.safetensors")
    assert [r["global_step"] for r in recipe["averaged"]] == [4, 6, 8]


@pytest.mark.parametrize("schedule", [{"every_n_train_steps": 3}, {"every_n_epochs": 1}])
def test_max_steps(flavour: Any, tmp_path: Path, schedule: dict) -> None:
    # max_steps=10 with 6 steps per epoch: epoch 1 stops after 4 steps; its (partial) end is a snapshot too.
    steps = schedule.get("every_n_train_steps")
    capture = capture_class(flavour.pl)(every_n_steps=steps)
    averaging = flavour.soup.CheckpointAveraging(window=2, verbose=False, **schedule)
    model, trainer = fit(flavour, tmp_path, [capture, averaging], max_epochs=-1, max_steps=10)

    assert trainer.global_step == 10
    assert len(capture.snapshots) == (3 if steps else 2)
    assert_average(module_state(model), expected_average(capture.snapshots, 2))


def test_bfloat16_weights(flavour: Any, tmp_path: Path) -> None:
    capture = capture_class(flavour.pl)()
    averaging = flavour.soup.CheckpointAveraging(window=3, verbose=False)
    model, _ = fit(flavour, tmp_path, [capture, averaging], max_epochs=4, precision="bf16-true")

    assert capture.snapshots[0]["net.0.weight"].dtype == torch.bfloat16
    expected = expected_average(capture.snapshots, 3)
    assert_average(module_state(model), expected, dtype=torch.bfloat16)
    snapshot = load_file(next((tmp_path / "soup" / "snapshots").glob("*.safetensors")))
    assert snapshot["net.0.weight"].dtype == torch.bfloat16  # snapshots keep the weights' dtype, exactly


def test_snapshots_in_host_ram(flavour: Any, tmp_path: Path) -> None:
    capture = capture_class(flavour.pl)()
    averaging = flavour.soup.CheckpointAveraging(window=2, snapshots="cpu", verbose=False)
    model, _ = fit(flavour, tmp_path, [capture, averaging], max_epochs=4)

    assert_average(module_state(model), expected_average(capture.snapshots, 2))
    # No checkpoint asked for them, so no snapshot touched the disk.
    assert list((tmp_path / "soup" / "snapshots").iterdir()) == []


def test_no_snapshot_warns_and_keeps_weights(flavour: Any, tmp_path: Path) -> None:
    capture = capture_class(flavour.pl)()
    averaging = flavour.soup.CheckpointAveraging(window=2, every_n_epochs=5)
    with pytest.warns(UserWarning, match="took no snapshot"):
        model, _ = fit(flavour, tmp_path, [capture, averaging], max_epochs=2)
    assert all(torch.equal(v, capture.final[k]) for k, v in module_state(model).items())
    assert not (tmp_path / "soup" / "average.safetensors").exists()


def test_no_effect_in_validate_and_predict(flavour: Any, tmp_path: Path) -> None:
    model = make_model(flavour.pl)
    before = module_state(model)
    averaging = flavour.soup.CheckpointAveraging(window=2)
    trainer = flavour.pl.Trainer(callbacks=[averaging], **trainer_kwargs(tmp_path))
    trainer.validate(model, verbose=False)
    trainer.predict(model, dataloaders=torch.utils.data.DataLoader(torch.randn(20, 8), batch_size=8))
    assert all(torch.equal(v, before[k]) for k, v in module_state(model).items())
    assert not (tmp_path / "soup").exists()


def test_summary_printed(flavour: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fit(flavour, tmp_path, [flavour.soup.CheckpointAveraging(window=2)], max_epochs=3)
    out = " ".join(capsys.readouterr().out.split())  # the table wraps in a narrow captured terminal
    assert "CheckpointAveraging" in out and "mean of the last 2 of 3 snapshots" in out


# ------------------------------------------------------------------------------------------------------- drift


@pytest.mark.parametrize(("mode", "updates"), [("cpu", 600), ("disk", 120)])
def test_window_means_do_not_drift_and_never_read_evicted_snapshots(tmp_path: Path, mode: str, updates: int) -> None:
    """Hundreds of evictions on values that stress float32 (a large offset plus small variations): every window
    mean is as close to the float64 reference after the last eviction as after the first, and no snapshot is read
    back once it has left the window."""
    window = 7
    g = torch.Generator().manual_seed(0)
    template = {"w": torch.zeros(64), "b": torch.zeros(3, 5), "n": torch.zeros((), dtype=torch.long)}
    store = _SnapshotStore(tmp_path, mode, template)
    history: list[dict[str, torch.Tensor]] = []
    names: list[str] = []
    stray_reads: list[str] = []
    out = [torch.empty(64), torch.empty(3, 5)]
    worst = 0.0
    for i in range(updates):
        scale = 10.0 ** torch.randint(-3, 4, (), generator=g).item()
        snap = {
            "w": 1000.0 + scale * torch.randn(64, generator=g),
            "b": scale * torch.randn(3, 5, generator=g),
            "n": torch.tensor(i),
        }
        history.append(snap)
        name = f"s{i}.safetensors"
        evicted = names.pop(0) if len(names) == window else None
        names.append(name)
        reads = len(store.reads)
        store.push(name, snap, evicted)
        assert len(store.reads) == reads, "taking a snapshot read one back"
        if evicted is not None:
            store.delete_files([evicted])
        if i % 5 and i < updates - 1:
            continue  # take means every few snapshots (each reads the window), always at the end
        weights = [float(j + 1) for j in range(len(names))]  # a weighted window, oldest lightest
        total = sum(weights)
        reads = len(store.reads)
        store.weighted_mean_into_(out, names, [w / total for w in weights])
        stray_reads += [n for n in store.reads[reads:] if n not in names]
        for key, got in zip(("w", "b"), out):
            want = sum(w * h[key].double() for w, h in zip(weights, history[-len(names):])) / total
            magnitude = max(h[key].double().abs().max().item() for h in history[-len(names):])
            worst = max(worst, (got.double() - want).abs().max().item() / magnitude)
    # A fresh float32 sum of at most `window` terms every time: a few ulps of the window's magnitude, bounded
    # whatever the number of evictions (a running add/evict sum drifts by hundreds of ulps here).
    assert worst <= 4 * EPS32, worst / EPS32
    assert stray_reads == [], "a snapshot outside the window was read"
    assert int(store.load(names[-1])["n"]) == updates - 1
    if mode == "disk":
        store.flush()
        assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(names)
        # Between snapshots a CPU device holds one reused host buffer and nothing else, whatever the window.
        assert store._ram == {} and store._image is not None
    else:
        assert sorted(store._ram) == sorted(names)
    store.close()


# ------------------------------------------------------------------------------------------------------ resume


def no_shuffle_model(flavour: Any) -> Any:
    """TinyClassifier without shuffling, so that a resumed run sees the batches an uninterrupted one sees."""
    from torch.utils.data import DataLoader

    from tests._models import make_data

    model = make_model(flavour.pl)
    model.train_dataloader = lambda: DataLoader(make_data(96, seed=0), batch_size=16, shuffle=False)
    return model


def crash_class(pl: Any) -> type:
    class Crash(pl.Callback):
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == self.epoch:
                raise RuntimeError("simulated crash")

    return Crash


# With validation the last checkpoint is saved before the epoch-end snapshot (so the resumed run retakes it);
# without, after it. "cpu" snapshots reach the disk only when a checkpoint names them.
@pytest.mark.slow
@pytest.mark.parametrize(("snapshots", "validation"), [("disk", True), ("cpu", False)])
def test_crash_and_resume_equals_uninterrupted(flavour: Any, tmp_path: Path, snapshots: str, validation: bool) -> None:
    pl = flavour.pl
    extra = {} if validation else {"limit_val_batches": 0}

    def callbacks(root: Path) -> list:
        return [
            flavour.soup.CheckpointAveraging(window=2, snapshots=snapshots, verbose=False),
            pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
        ]

    straight = no_shuffle_model(flavour)
    fit(flavour, tmp_path / "a", callbacks(tmp_path / "a"), model=straight, max_epochs=5, enable_checkpointing=True,
        **extra)

    root = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(flavour, root, [*callbacks(root), crash_class(pl)(3)], model=no_shuffle_model(flavour), max_epochs=5,
            enable_checkpointing=True, **extra)
    # The checkpoint must load with weights_only=True: the callback state is plain types.
    ckpt = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    assert any(k.startswith("CheckpointAveraging") for k in ckpt["callbacks"])
    resumed = no_shuffle_model(flavour)
    fit(flavour, root, callbacks(root), model=resumed, ckpt_path=root / "ckpt" / "last.ckpt", max_epochs=5,
        enable_checkpointing=True, **extra)

    a = load_file(tmp_path / "a" / "soup" / "average.safetensors")
    b = load_file(root / "soup" / "average.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, a[k]) for k, v in module_state(resumed).items())
    assert read_recipe(root / "soup" / "average.safetensors")["averaged"] == [
        {"epoch": 3, "global_step": 24, "weight": 0.5},
        {"epoch": 4, "global_step": 30, "weight": 0.5},
    ]


def test_resume_with_missing_snapshot_files_names_them(flavour: Any, tmp_path: Path) -> None:
    pl = flavour.pl

    def callbacks() -> list:
        return [
            flavour.soup.CheckpointAveraging(window=2, verbose=False, every_n_epochs=1),
            pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
        ]

    fit(flavour, tmp_path, callbacks(), max_epochs=3, enable_checkpointing=True, limit_val_batches=0)
    (tmp_path / "soup" / "snapshots" / "epoch=1-step=12.safetensors").unlink()
    with pytest.raises(SoupError, match=r"missing.*epoch=1-step=12\.safetensors"):
        fit(flavour, tmp_path, callbacks(), ckpt_path=tmp_path / "ckpt" / "last.ckpt", max_epochs=4,
            enable_checkpointing=True, limit_val_batches=0)


def test_unreadable_snapshot_at_the_end_is_a_soup_error(flavour: Any, tmp_path: Path) -> None:
    class Vandal(flavour.pl.Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            (tmp_path / "soup" / "snapshots" / "epoch=1-step=12.safetensors").unlink()

    with pytest.raises(SoupError, match=r"could not compute the average.*epoch=1-step=12\.safetensors"):
        fit(flavour, tmp_path, [Vandal(), flavour.soup.CheckpointAveraging(window=2, verbose=False)], max_epochs=3)


def test_state_dict_is_plain(tmp_path: Path) -> None:
    cb = _CheckpointAveraging(window=2)
    cb._records = [{"file": "epoch=0-step=6.safetensors", "epoch": 0, "step": 6}]
    torch.save(cb.state_dict(), tmp_path / "s.pt")
    other = _CheckpointAveraging(window=2)
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert other.state_dict() == cb.state_dict()


# ------------------------------------------------------------------------------------------ validate_average


def test_validate_average_logs_average_metrics_without_touching_raw_ones(flavour: Any, tmp_path: Path) -> None:
    pl = flavour.pl
    seen: list[dict[str, float]] = []

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    averaging = flavour.soup.CheckpointAveraging(window=2, validate_average=True, verbose=False)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_top_k=1)
    model, trainer = fit(flavour, tmp_path, [averaging, Spy(), checkpoint], max_epochs=3, enable_checkpointing=True)

    metrics = trainer.callback_metrics
    assert "average/val/acc" in metrics and "average/val/loss" in metrics
    # The logged average metrics are what trainer.validate reports for the final average (the same window).
    report = trainer.validate(model, verbose=False)[0]
    assert float(metrics["average/val/acc"]) == pytest.approx(report["val/acc"], abs=1e-6)
    assert float(metrics["average/val/loss"]) == pytest.approx(report["val/loss"], abs=1e-6)
    # The raw weights' metrics are untouched: they match validating final.safetensors.
    raw = make_model(pl)
    raw.load_state_dict(load_file(tmp_path / "soup" / "final.safetensors"))
    raw_report = pl.Trainer(**trainer_kwargs(tmp_path)).validate(raw, verbose=False)[0]
    assert seen[-1]["val/acc"] == pytest.approx(raw_report["val/acc"], abs=1e-6)
    assert seen[-1]["val/loss"] == pytest.approx(raw_report["val/loss"], abs=1e-6)
    assert seen[-1]["val/loss"] != pytest.approx(seen[-1]["average/val/loss"], abs=1e-4)  # distinguishable
    assert float(checkpoint.best_model_score) == pytest.approx(max(s["val/acc"] for s in seen), abs=1e-6)


def test_validate_average_with_two_validation_dataloaders(flavour: Any, tmp_path: Path) -> None:
    # Metric names already carry "/dataloader_idx_N"; logging them again must not trip Lightning's suffix check.
    averaging = flavour.soup.CheckpointAveraging(window=2, validate_average=True, verbose=False)
    model = make_model(flavour.pl, two_val_loaders=True)
    model, trainer = fit(flavour, tmp_path, [averaging], model=model, max_epochs=2)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report = trainer.validate(model, verbose=False)  # the module now holds that same average
    for idx, metrics in enumerate(report):
        name = f"val/acc/dataloader_idx_{idx}"
        assert logged[f"average/{name}"] == pytest.approx(metrics[name], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------- DDP

DDP_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import pytorch_lightning as pl
    from lightning_soup import CheckpointAveraging
    from tests._models import make_model, trainer_kwargs

    out = sys.argv[1]

    class Capture(pl.Callback):
        def __init__(self):
            self.snapshots = []
        def on_train_epoch_end(self, trainer, pl_module):
            self.snapshots.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    capture = Capture()
    model = make_model(pl)
    kwargs = trainer_kwargs(out, devices=2, strategy="ddp", max_epochs=4, deterministic=False)
    averaging = CheckpointAveraging(window=3, validate_average=True, verbose=False)
    trainer = pl.Trainer(callbacks=[capture, averaging], **kwargs)
    trainer.fit(model)
    rank = trainer.global_rank
    torch.save({"module": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "snapshots": capture.snapshots,
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}, f"{out}/rank{rank}.pt")
    """
)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_two_processes(tmp_path: Path, free_port: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port), PYTHONPATH=str(Path.cwd()))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, cwd=Path(__file__).parent.parent,
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Both ranks end with the same average, the mean of rank zero's last three epoch-end snapshots.
    expected = expected_average(results[0]["snapshots"], 3)
    for result in results:
        assert_average(result["module"], expected)
    assert all(torch.equal(results[0]["module"][k], v) for k, v in results[1]["module"].items())
    # validate_average: every rank validated rank zero's average (the other ranks keep no sum).
    assert "average/val/acc" in results[1]["metrics"]
    written = load_file(tmp_path / "soup" / "average.safetensors")
    assert_average(written, expected)
    # Files are written once, by rank zero: three window snapshots, the average and the raw final weights.
    assert len(list((tmp_path / "soup" / "snapshots").iterdir())) == 3
    written_names = sorted(p.name for p in (tmp_path / "soup").iterdir())
    assert written_names == ["average.safetensors", "final.safetensors", "snapshots"]


def test_cpu_snapshots_use_the_window_reserved_at_the_start(tmp_path: Path) -> None:
    """`snapshots="cpu"`: the window's host memory is allocated (and touched) before training, so no snapshot pays
    for fresh pages on the training thread, and a window that does not fit fails before training."""
    template = {"w": torch.randn(64, 32), "b": torch.randn(32), "n": torch.tensor(3)}
    store = _SnapshotStore(tmp_path, "cpu", template)
    store.reserve(3, template)
    reserved = {id(image) for image in store._spare}
    assert len(reserved) == 3
    names: list[str] = []
    for i in range(7):
        evicted = names.pop(0) if len(names) == 3 else None
        names.append(f"s{i}.safetensors")
        store.push(names[-1], {k: v + i for k, v in template.items()}, evicted)
        assert {id(image) for image in store._ram.values()} <= reserved  # never a new allocation
    for i, name in zip(range(4, 7), names):
        assert torch.equal(store.load(name)["w"], template["w"] + i)
    store.close()
