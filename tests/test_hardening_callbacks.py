"""The callbacks under untrusted checkpoint state, interrupted ends of fit, reuse, shared folders and Lightning's
conventions (fast_dev_run, every_n_epochs=None, ModelCheckpoint top-k, 64-bit precision). Issue 17."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_soup import SoupError
from lightning_soup.callbacks._base import LOCK_FILE
from lightning_soup.callbacks.averaging import _CheckpointAveraging
from lightning_soup.callbacks.blend import _TaskArithmeticBlend
from lightning_soup.callbacks.greedy_soup import _GreedySoup
from tests._models import make_model, tiny_classifier_class, trainer_kwargs


@pytest.fixture
def lit() -> SimpleNamespace:
    """The ``lightning.pytorch`` flavour (these checks are flavour-independent; both share one implementation)."""
    import lightning.pytorch as pl

    import lightning_soup.lightning as soup

    return SimpleNamespace(pl=pl, soup=soup)


def state_of(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        assert torch.equal(actual[key].cpu(), want.cpu()), key


def fit(lit: SimpleNamespace, root: Path, callbacks: list, model: Any = None, ckpt_path: Any = None, **kw: Any) -> Any:
    model = model if model is not None else make_model(lit.pl)
    trainer = lit.pl.Trainer(callbacks=callbacks, **trainer_kwargs(root, **kw))
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def capture_class(pl: Any) -> type:
    class Capture(pl.Callback):
        """Records the module's weights at fit start, after every training epoch, and when training ends."""

        def __init__(self) -> None:
            self.start: dict[str, torch.Tensor] = {}
            self.epochs: list[dict[str, torch.Tensor]] = []
            self.end: dict[str, torch.Tensor] = {}

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = state_of(pl_module)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.epochs.append(state_of(pl_module))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.end = state_of(pl_module)

    return Capture


# ------------------------------------------------------------------------------------- untrusted callback state

_OUTSIDE = ["../../victim.safetensors", "/tmp/victim.safetensors", "snapshots/../../victim.safetensors", "", 7]


@pytest.mark.parametrize("name", _OUTSIDE)
@pytest.mark.parametrize("where", ["averaging", "greedy-kept", "greedy-online", "greedy-retained"])
def test_state_naming_a_file_outside_dirpath_is_refused(where: str, name: Any) -> None:
    if where == "averaging":
        callback: Any = _CheckpointAveraging(window=2)
        state = {"records": [{"file": name, "epoch": 0, "step": 6}]}
    else:
        callback = _GreedySoup(monitor="val/acc")
        entry = {"epoch": 0, "step": 6, "score": 0.5, "file": name, "status": "kept", "reason": None}
        state = {"entries": [entry] if where == "greedy-kept" else [], "online": None, "retained": []}
        if where == "greedy-online":
            state["online"] = {"file": name, "count": 1, "score": 0.5, "first": 0}
        elif where == "greedy-retained":
            state["retained"] = [name]
    detail = "refusing to read or delete" if isinstance(name, str) else "(must be str|refusing to read)"
    with pytest.raises(SoupError, match=rf"(CheckpointAveraging|GreedySoup): its state .*{detail}"):
        callback.load_state_dict(state)


_CORRUPT = [
    (lambda: _CheckpointAveraging(window=2), {"records": [{"epoch": 0, "step": 6}]}, "'file' is missing"),
    (lambda: _CheckpointAveraging(window=2), {"records": "epoch=0-step=6.safetensors"}, "'records' must be list"),
    (lambda: _CheckpointAveraging(window=2), {"records": [], "taken": "3"}, "'taken' must be int"),
    (lambda: _CheckpointAveraging(window=1), {"records": [{"file": "a", "epoch": 0, "step": 1}] * 2}, "2 records"),
    (lambda: _GreedySoup(monitor="val/acc"), {"entries": [{"epoch": 0, "step": 6, "score": 0.5}]}, "'status'"),
    (lambda: _GreedySoup(monitor="val/acc"), {"entries": [["epoch", 0]]}, "not a dict"),
    (lambda: _CheckpointAveraging(window=2), {"records": [{"file": "a", "epoch": 0, "step": 1}] * 2}, "more than once"),
    (lambda: _GreedySoup(monitor="val/acc"),
     {"entries": [{"epoch": e, "step": e, "score": 0.5, "file": "ingredients/a", "status": "kept"} for e in (0, 1)]},
     "more than once"),
    (lambda: _GreedySoup(monitor="val/acc"), {"online": {"file": "online/x.safetensors", "count": "2", "score": 1.0,
                                                          "first": 0}}, "'count' must be int"),
    (lambda: _TaskArithmeticBlend(), {"anchor_saved": "yes"}, "'anchor_saved' must be bool"),
    (lambda: _TaskArithmeticBlend(), ["not", "a", "dict"], "expected a dict"),
]


@pytest.mark.parametrize(("make", "state", "detail"), _CORRUPT)
def test_corrupted_state_is_a_soup_error_naming_the_callback_and_the_way_out(make: Any, state: Any,
                                                                             detail: str) -> None:
    callback = make()
    with pytest.raises(SoupError) as info:
        callback.load_state_dict(state)
    message = str(info.value)
    assert type(callback).__name__.lstrip("_") in message and detail in message
    assert "Resume from another checkpoint" in message and callback.state_key in message


def test_resumed_checkpoint_naming_a_victim_file_leaves_it_alone(lit: SimpleNamespace, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    def make_callbacks() -> list:
        return [
            lit.soup.CheckpointAveraging(window=1, verbose=False),
            lit.pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True),
        ]

    fit(lit, tmp_path, make_callbacks(), max_epochs=2, enable_checkpointing=True, limit_val_batches=0)
    victim = tmp_path / "victim.safetensors"
    save_file({"secret": torch.ones(2)}, victim)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("CheckpointAveraging")]
    ckpt["callbacks"][key]["records"][0]["file"] = "../../victim.safetensors"
    torch.save(ckpt, ckpt_dir / "crafted.ckpt")
    with pytest.raises(SoupError, match="victim"):
        fit(lit, tmp_path, make_callbacks(), ckpt_path=ckpt_dir / "crafted.ckpt", max_epochs=4,
            enable_checkpointing=True, limit_val_batches=0)
    assert torch.equal(load_file(victim)["secret"], torch.ones(2))


def test_snapshot_replaced_by_another_models_weights_is_a_soup_error(lit: SimpleNamespace, tmp_path: Path) -> None:
    def make_callbacks() -> list:
        return [
            lit.soup.CheckpointAveraging(window=2, verbose=False),
            lit.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
        ]

    fit(lit, tmp_path, make_callbacks(), max_epochs=2, enable_checkpointing=True, limit_val_batches=0)
    snapshot = tmp_path / "soup" / "snapshots" / "epoch=1-step=12.safetensors"
    save_file({k: v.contiguous() for k, v in make_model(lit.pl, hidden=4).state_dict().items()}, snapshot)
    with pytest.raises(SoupError, match=r"epoch=1-step=12\.safetensors.* does not fit the module"):
        fit(lit, tmp_path, make_callbacks(), ckpt_path=tmp_path / "ckpt" / "last.ckpt", max_epochs=3,
            enable_checkpointing=True, limit_val_batches=0)


# ------------------------------------------------------------------------------------------ anchors and reuse


@pytest.mark.parametrize("anchor", ["soup/final.safetensors", "ckpt/last.ckpt"])
def test_an_anchor_this_fit_overwrites_is_the_earlier_fits_weights(lit: SimpleNamespace, tmp_path: Path,
                                                                   anchor: str) -> None:
    def checkpointing() -> list:
        return [lit.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]

    capture = capture_class(lit.pl)()
    fit(lit, tmp_path, [capture, lit.soup.CheckpointAveraging(window=2, verbose=False), *checkpointing()],
        max_epochs=2, limit_val_batches=0, enable_checkpointing=True)
    earlier = capture.end  # the earlier fit's raw weights: in final.safetensors and in last.ckpt
    blend = lit.soup.TaskArithmeticBlend(anchor=str(tmp_path / anchor), ratio=0.0)  # ratio 0: the module = anchor
    capture = capture_class(lit.pl)()
    model, _ = fit(lit, tmp_path, [capture, blend, *checkpointing()], model=make_model(lit.pl, seed=5),
                   max_epochs=1, limit_val_batches=0, enable_checkpointing=True)
    floating = {k for k, v in earlier.items() if v.is_floating_point()}
    assert_same({k: v for k, v in state_of(model).items() if k in floating}, {k: earlier[k] for k in floating})
    assert_same(load_file(tmp_path / "soup" / "final.safetensors"), capture.end)  # this fit's raw weights
    assert not list((tmp_path / "soup").glob("anchor.held*"))


@pytest.mark.parametrize("same_root", [True, False])
def test_a_reused_blend_anchors_on_the_new_fits_start(lit: SimpleNamespace, tmp_path: Path, same_root: bool) -> None:
    blend = lit.soup.TaskArithmeticBlend(ratio=0.0)  # ratio 0: the module ends at the fit's initial weights
    fit(lit, tmp_path / "one", [blend], model=make_model(lit.pl, seed=1), max_epochs=1, limit_val_batches=0)
    second = make_model(lit.pl, seed=2)
    initial = state_of(second)
    fit(lit, tmp_path / ("one" if same_root else "two"), [blend], model=second, max_epochs=1, limit_val_batches=0)
    floating = {k for k, v in initial.items() if v.is_floating_point()}
    assert_same({k: v for k, v in state_of(second).items() if k in floating}, {k: initial[k] for k in floating})


# ----------------------------------------------------------------------------------------------- shared dirpath


def _foreign_pid() -> int:
    """The pid of a process that ran and exited (nothing runs under it now, on this host)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("owner", ["live-other-process", "other-host"])
def test_a_dirpath_another_fit_writes_to_is_refused(lit: SimpleNamespace, tmp_path: Path, owner: str) -> None:
    (tmp_path / "soup").mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname() if owner == "live-other-process" else "elsewhere.example"
        (tmp_path / "soup" / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": host}))
        model = make_model(lit.pl)
        before = state_of(model)
        with pytest.raises(SoupError, match=r"Another fit is writing to `dirpath`"):
            fit(lit, tmp_path, [lit.soup.CheckpointAveraging(window=2)], model=model, max_epochs=1)
        assert_same(state_of(model), before)  # refused at setup: nothing trained, nothing written
        assert sorted(p.name for p in (tmp_path / "soup").iterdir()) == [LOCK_FILE]
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_replaced_and_the_lock_is_released_after_fit(lit: SimpleNamespace, tmp_path: Path) -> None:
    (tmp_path / "soup").mkdir()
    lock = tmp_path / "soup" / LOCK_FILE
    lock.write_text(json.dumps({"pid": _foreign_pid(), "host": socket.gethostname()}))
    fit(lit, tmp_path, [lit.soup.CheckpointAveraging(window=2, verbose=False)], max_epochs=1, limit_val_batches=0)
    assert (tmp_path / "soup" / "average.safetensors").is_file() and not lock.exists()
    # After a failed fit too (Lightning runs no `teardown` then, only `on_exception`).
    with pytest.raises(RuntimeError, match="boom"):
        fit(lit, tmp_path, [lit.soup.CheckpointAveraging(window=2, verbose=False), _crash(lit.pl)],
            max_epochs=1, limit_val_batches=0)
    assert not lock.exists()


def _crash(pl: Any) -> Any:
    class Crash(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            raise RuntimeError("boom")

    return Crash()


def test_two_fits_at_once_in_one_process_are_refused(lit: SimpleNamespace, tmp_path: Path) -> None:
    seen: list[BaseException] = []

    class StartsAnotherFit(lit.pl.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            try:
                fit(lit, tmp_path, [lit.soup.CheckpointAveraging(window=2, verbose=False)], max_epochs=1,
                    limit_val_batches=0)
            except SoupError as e:
                seen.append(e)

    fit(lit, tmp_path, [lit.soup.CheckpointAveraging(window=2, verbose=False), StartsAnotherFit()], max_epochs=1,
        limit_val_batches=0)
    assert len(seen) == 1 and "Another fit is writing" in str(seen[0])


@pytest.mark.parametrize(
    "make",
    [
        lambda soup: [soup.CheckpointAveraging(window=2), soup.CheckpointAveraging(window=3)],
        lambda soup: [soup.TaskArithmeticBlend(ratio=0.5), soup.TaskArithmeticBlend(anchor="base.ckpt", ratio=0.25)],
        lambda soup: [soup.GreedySoup(monitor="val/acc"), soup.GreedySoup(monitor="val/loss", mode="min")],
    ],
    ids=["averaging", "blend", "greedy"],
)
def test_two_callbacks_writing_the_same_file_are_refused_at_setup(lit: SimpleNamespace, tmp_path: Path,
                                                                  make: Any) -> None:
    model = make_model(lit.pl)
    before = state_of(model)
    with pytest.raises(SoupError, match=r"both write \[.*\] in the same `dirpath`"):
        fit(lit, tmp_path, make(lit.soup), model=model, max_epochs=1)
    assert_same(state_of(model), before)


def test_callbacks_with_different_outputs_share_a_dirpath_and_every_setup_runs(
    lit: SimpleNamespace, tmp_path: Path
) -> None:
    calls: list[str] = []

    class Averaging(lit.soup.CheckpointAveraging):
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            calls.append("averaging")
            super().setup(trainer, pl_module, stage)

    class Blend(lit.soup.TaskArithmeticBlend):
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            calls.append("blend")
            super().setup(trainer, pl_module, stage)

    # The blend moves itself after the producers at setup: that must not skip the averaging's own setup.
    fit(lit, tmp_path, [Blend(ratio=0.5), Averaging(window=2, verbose=False)], max_epochs=1, limit_val_batches=0)
    assert sorted(calls) == ["averaging", "blend"]
    assert {"average.safetensors", "blended.safetensors"} <= {p.name for p in (tmp_path / "soup").iterdir()}


# ----------------------------------------------------------------------------------------- failed ends of fit


def failing_model_class(pl: Any) -> type:
    class FailsInValidation(tiny_classifier_class(pl)):
        """Raises ``error`` in ``validation_step`` once ``armed`` (set when training ends)."""

        armed = False
        error: BaseException = RuntimeError("validation failed")

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            if self.armed:
                raise self.error
            super().validation_step(batch, batch_idx, dataloader_idx)

    return FailsInValidation


def arm_class(pl: Any) -> type:
    class Arm(pl.Callback):
        """Listed first: records the raw trained weights, then makes every later validation fail."""

        raw: dict[str, torch.Tensor] = {}

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            type(self).raw = state_of(pl_module)
            pl_module.armed = True

    return Arm


@pytest.mark.parametrize(
    ("which", "interrupt"),
    [("greedy", False), ("blend", False), ("blend", True), ("averaging+greedy", False)],
)
def test_a_failed_end_of_fit_leaves_the_raw_trained_weights(lit: SimpleNamespace, tmp_path: Path, which: str,
                                                            interrupt: bool) -> None:
    torch.manual_seed(0)
    model = failing_model_class(lit.pl)()
    model.error = KeyboardInterrupt() if interrupt else RuntimeError("validation failed")
    callbacks: list[Any] = [arm_class(lit.pl)()]
    if "averaging" in which:
        callbacks.append(lit.soup.CheckpointAveraging(window=2, verbose=False))
    if "greedy" in which:
        callbacks.append(lit.soup.GreedySoup(monitor="val/acc", verbose=False))
    if which == "blend":
        callbacks.append(lit.soup.TaskArithmeticBlend(ratio=[0.0, 0.5, 1.0], monitor="val/acc"))
    expected: type[BaseException] = SystemExit if interrupt else RuntimeError  # Lightning exits on Ctrl+C
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(expected):
            fit(lit, tmp_path, callbacks, model=model, max_epochs=3)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl+C after the first
    assert_same(state_of(model), callbacks[0].raw)


# ------------------------------------------------------------------------------------------ numerics, schedule


def test_64_bit_precision_averages_in_float64(lit: SimpleNamespace, tmp_path: Path) -> None:
    capture = capture_class(lit.pl)()
    model, _ = fit(lit, tmp_path, [capture, lit.soup.CheckpointAveraging(window=3, verbose=False)], max_epochs=3,
                   precision="64-true", limit_val_batches=0)
    average = load_file(tmp_path / "soup" / "average.safetensors")
    for key, got in average.items():
        if not got.is_floating_point():
            continue
        want = torch.stack([s[key].double() for s in capture.epochs]).mean(0)
        assert got.dtype == torch.float64, key
        # float64 sums of 3 terms: a few float64 ulps (a float32 sum is ~1e-8 off).
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14, msg=key)
        torch.testing.assert_close(model.state_dict()[key], want, rtol=1e-14, atol=1e-14, msg=key)


def test_every_n_epochs_none_means_no_epoch_schedule() -> None:
    with pytest.raises(SoupError, match="both None"):
        _CheckpointAveraging(every_n_epochs=None)
    steps = _CheckpointAveraging(every_n_epochs=None, every_n_train_steps=4)
    assert steps.every_n_epochs is None and steps.every_n_train_steps == 4


def test_every_n_epochs_none_with_a_step_schedule_averages_the_step_snapshots(
    lit: SimpleNamespace, tmp_path: Path
) -> None:
    fit(lit, tmp_path / "a", [lit.soup.CheckpointAveraging(window=2, every_n_train_steps=4, verbose=False)],
        model=make_model(lit.pl), max_epochs=2, limit_val_batches=0)
    fit(lit, tmp_path / "b", [lit.soup.CheckpointAveraging(window=2, every_n_epochs=None, every_n_train_steps=4,
                                                           verbose=False)],
        model=make_model(lit.pl), max_epochs=2, limit_val_batches=0)
    assert_same(load_file(tmp_path / "b" / "soup" / "average.safetensors"),
                load_file(tmp_path / "a" / "soup" / "average.safetensors"))


def test_resuming_from_an_older_top_k_checkpoint_works(lit: SimpleNamespace, tmp_path: Path) -> None:
    def make_callbacks() -> list:
        return [
            lit.soup.CheckpointAveraging(window=1, verbose=False),
            lit.soup.GreedySoup(monitor="val/acc", max_ingredients=1, verbose=False),
            lit.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}"),
        ]

    fit(lit, tmp_path, make_callbacks(), max_epochs=4, enable_checkpointing=True)
    # Every checkpoint is kept (top-k = all), so the files each one names must still be there.
    fit(lit, tmp_path, make_callbacks(), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt", max_epochs=2,
        enable_checkpointing=True)
    assert (tmp_path / "soup" / "average.safetensors").is_file() and (tmp_path / "soup" / "soup.json").is_file()


def test_files_no_kept_checkpoint_names_are_still_deleted(lit: SimpleNamespace, tmp_path: Path) -> None:
    ckpt = lit.pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=1, monitor="val/acc", mode="max")
    fit(lit, tmp_path, [lit.soup.CheckpointAveraging(window=1, verbose=False), ckpt], max_epochs=5,
        enable_checkpointing=True)
    snapshots = {p.name for p in (tmp_path / "soup" / "snapshots").iterdir()}
    kept = torch.load(ckpt.best_model_path, weights_only=True)["callbacks"]
    (state,) = [v for k, v in kept.items() if k.startswith("CheckpointAveraging")]
    named = {r["file"] for r in state["records"]}
    # The window (1), what the best checkpoint names, and what the two latest saves name: nothing else.
    assert named <= snapshots and len(snapshots) <= 3


# ------------------------------------------------------------------------------------- Lightning's conventions


def test_fast_dev_run_writes_nothing_and_says_so_once(lit: SimpleNamespace, tmp_path: Path) -> None:
    callbacks = [
        lit.soup.CheckpointAveraging(window=2),
        lit.soup.GreedySoup(monitor="val/acc"),
        lit.soup.TaskArithmeticBlend(ratio=[0.0, 1.0], monitor="val/acc"),
    ]
    capture = capture_class(lit.pl)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = fit(lit, tmp_path, [capture, *callbacks], fast_dev_run=True)
    said = [w for w in caught if "fast_dev_run" in str(w.message) and "CheckpointAveraging" in str(w.message)]
    assert len(said) == 1
    assert not (tmp_path / "soup").exists()
    assert_same(state_of(model), capture.end)


def constant_metric_model(pl: Any, **kwargs: Any) -> Any:
    class Constant(tiny_classifier_class(pl)):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx, dataloader_idx)
            self.log("val/const", 1.0)

    torch.manual_seed(0)
    return Constant(**kwargs)


@pytest.mark.parametrize("limits", [{"max_steps": 2}, {"max_epochs": 1}])
def test_blend_ties_go_to_the_trained_weights_with_a_warning(lit: SimpleNamespace, tmp_path: Path,
                                                             limits: dict) -> None:
    capture = capture_class(lit.pl)()
    blend = lit.soup.TaskArithmeticBlend(ratio=[0.0, 0.5, 1.0], monitor="val/const")
    with pytest.warns(UserWarning, match=r"ratios \[0.0, 0.5, 1.0\] score the same val/const .* largest, 1"):
        model, _ = fit(lit, tmp_path, [capture, blend], model=constant_metric_model(lit.pl), **limits)
    assert json.loads((tmp_path / "soup" / "blend.json").read_text())["ratio"] == 1.0
    assert_same(state_of(model), capture.end)


def test_the_pytorch_lightning_flavour_under_lightning_points_to_the_right_import(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        import lightning.pytorch
        import lightning_soup
        try:
            lightning_soup.CheckpointAveraging
        except UserWarning as e:
            print(e)
        """
    )
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert "lightning_soup.lightning.CheckpointAveraging" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------- adversarial review


def test_online_soup_with_bfloat16_weights(lit: SimpleNamespace, tmp_path: Path) -> None:
    # The online soup keeps float32 sums; its file check must not take them for another model's weights.
    model, _ = fit(lit, tmp_path, [lit.soup.GreedySoup(monitor="val/acc", online=True, verbose=False)], max_epochs=2,
                   precision="bf16-true")
    soup = load_file(tmp_path / "soup" / "soup.safetensors")
    assert soup["net.0.weight"].dtype == torch.bfloat16
    assert_same(state_of(model), soup)


def test_64_bit_precision_blend_sweep_keeps_float64(lit: SimpleNamespace, tmp_path: Path) -> None:
    # The sweep's copy of θ stays float64 (a float32 copy would round the trained weights at ratio 1).
    capture = capture_class(lit.pl)()
    blend = lit.soup.TaskArithmeticBlend(ratio=[0.5, 1.0], monitor="val/const")
    with pytest.warns(UserWarning, match="score the same"):
        model, _ = fit(lit, tmp_path, [capture, blend], model=constant_metric_model(lit.pl), max_epochs=1,
                       precision="64-true")
    assert capture.end["net.0.weight"].dtype == torch.float64
    assert_same(state_of(model), capture.end)
