"""Reliability of the three callbacks together: SIGKILL and resume, atomic outputs, small checkpoints, disk errors.

The crash cases run ``tests/crash/soup_worker.py`` (``CheckpointAveraging`` + ``GreedySoup`` + ``TaskArithmeticBlend``
+ ``ModelCheckpoint(save_last=True)``) in child processes that SIGKILL themselves at a chosen point, resume them
with ``trainer.fit(..., ckpt_path=last)``, and compare every output file with an uninterrupted run's, bit for bit.
Every child has a timeout. The in-process cases use the shared ``TinyClassifier``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_soup import SoupError
from lightning_soup._storage import _atomic, _format
from tests._models import make_model, trainer_kwargs
from tests.crash import soup_worker
from tests.crash._child import run_child, tail

KILLED = -signal.SIGKILL
WEIGHT_FILES = ("final", "average", "soup", "blended", "anchor")


# ---------------------------------------------------------------------------------------------------- helpers


def soup_dir(out: Path) -> Path:
    return out / "root" / "soup"


def last_ckpt(out: Path) -> Path:
    return out / "root" / "ckpt" / "last.ckpt"


def temp_files(folder: Path) -> list[Path]:
    """Our atomic writes' temporaries (``.<name>.tmp-<pid>-<tag>...``) anywhere under ``folder``."""
    return sorted(p for p in folder.rglob("*") if _atomic.is_temp_name(p.name))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), (a, b)
    different = [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
    assert not different, f"{a.name}: {different} differ from the uninterrupted run"


def initial_weights() -> dict[str, torch.Tensor]:
    """The worker's initial weights, made here independently (same seed, same class)."""
    import pytorch_lightning as pl

    with torch.random.fork_rng():  # leave the test process's RNG as it was
        torch.manual_seed(0)
        return {k: v.detach().clone() for k, v in soup_worker.model_class(pl)().state_dict().items()}


def run_ok(out: Path, **kwargs: Any) -> Path:
    code, log = run_child(out, **kwargs)
    assert code == 0, f"soup_worker {kwargs} exited with {code}:\n{tail(log)}"
    return log


def run_killed(out: Path, **kwargs: Any) -> Path:
    code, log = run_child(out, **kwargs)
    assert code == KILLED, f"soup_worker {kwargs} was meant to die by SIGKILL, exited with {code}:\n{tail(log)}"
    assert not (out / "result.json").exists()
    return log


def assert_equals_uninterrupted(out: Path, baseline: Path) -> None:
    """Every output of ``out`` equals the uninterrupted run's; no temporary file is left."""
    for name in WEIGHT_FILES:
        assert_same_weights(soup_dir(out) / f"{name}.safetensors", soup_dir(baseline) / f"{name}.safetensors")
    # The module ends with the blend; the raw weights kept in final.safetensors are the trained ones.
    assert_same_weights(out / "module.safetensors", soup_dir(out) / "blended.safetensors")
    assert_same_weights(out / "captured_final.safetensors", soup_dir(out) / "final.safetensors")
    recipe = json.loads((soup_dir(out) / "soup.json").read_text())
    assert recipe == json.loads((soup_dir(baseline) / "soup.json").read_text())
    blend = json.loads((soup_dir(out) / "blend.json").read_text())
    base_blend = json.loads((soup_dir(baseline) / "blend.json").read_text())
    assert blend["ratio"] == base_blend["ratio"]
    assert blend["candidates"] == base_blend["candidates"]
    assert temp_files(soup_dir(out)) == []


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of the worker, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_ok(out)
    return out


# ------------------------------------------------------------------------------------------- crash and resume


# Killed after the last checkpoint (`end_*`: ModelCheckpoint saves in the last epoch's `on_train_epoch_end`, before
# `on_train_end`), a run resumes from a checkpoint whose fit loop is finished: Lightning skips the loop and with it
# `on_train_start`/`on_train_end`; the callbacks then finish the end-of-fit work in `on_fit_end`.
CRASH_POINTS = list(soup_worker.KILL_POINTS)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_then_resume_equals_uninterrupted(baseline: Path, tmp_path: Path, point: str) -> None:
    run_killed(tmp_path, kill_at=point)
    # Killed in the last epoch (2): the newest checkpoint is epoch 1's, or epoch 2's once that epoch ended.
    resumed_from = torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"]
    assert resumed_from == (18 if point.startswith("end_") else 12)
    run_ok(tmp_path, resume=True)
    assert_equals_uninterrupted(tmp_path, baseline)
    # The "initial" anchor is the weights the first fit started from, not those the resumed fit started from.
    anchor = load_file(str(soup_dir(tmp_path) / "anchor.safetensors"))
    initial = initial_weights()
    assert anchor.keys() == initial.keys()
    assert all(torch.equal(anchor[k], initial[k]) for k in initial)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_writing_the_average_resumes_to_the_same_files(baseline: Path, tmp_path: Path) -> None:
    """Killed in CheckpointAveraging's end-of-fit write, after the last checkpoint: the resumed fit writes it all."""
    run_killed(tmp_path, kill_at="write:average.safetensors")
    assert not (soup_dir(tmp_path) / "average.safetensors").exists()
    assert not (soup_dir(tmp_path) / "soup.safetensors").exists()
    assert torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"] == 18  # the finished run's checkpoint
    run_ok(tmp_path, resume=True)
    assert_equals_uninterrupted(tmp_path, baseline)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_fresh_interpreter_resumes_like_the_rest(
    baseline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker as a plain script in a new interpreter (no fork): killed there, resumed in a forked child."""
    monkeypatch.setenv("SOUP_CRASH_SPAWN", "1")
    run_killed(tmp_path, kill_at="validation")
    monkeypatch.delenv("SOUP_CRASH_SPAWN")
    run_ok(tmp_path, resume=True)
    assert_equals_uninterrupted(tmp_path, baseline)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_flavour_resumes_to_the_same_files(baseline: Path, tmp_path: Path) -> None:
    """`lightning.pytorch` and `pytorch_lightning` runs of the same seed give the same files, killed or not."""
    run_killed(tmp_path, kill_at="mid_epoch", flavour="lightning")
    run_ok(tmp_path, resume=True, flavour="lightning")
    assert_equals_uninterrupted(tmp_path, baseline)


def callback_state(ckpt: Path, name: str) -> dict[str, Any]:
    states = torch.load(ckpt, weights_only=True)["callbacks"]
    return next(v for k, v in states.items() if k.startswith(name + "{"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["snapshot", "ingredient", "anchor"])
def test_resume_with_a_missing_state_file_names_it(baseline: Path, tmp_path: Path, kind: str) -> None:
    shutil.copytree(baseline / "root", tmp_path / "root")
    ckpt = last_ckpt(tmp_path)
    if kind == "snapshot":
        name = "snapshots/" + callback_state(ckpt, "CheckpointAveraging")["records"][0]["file"]
    elif kind == "ingredient":
        name = next(e["file"] for e in callback_state(ckpt, "GreedySoup")["entries"] if e["status"] == "kept")
    else:
        assert callback_state(ckpt, "TaskArithmeticBlend")["anchor_saved"] is True
        name = "anchor.safetensors"
    (soup_dir(tmp_path) / name).unlink()
    # One more epoch than the checkpoint's run, so that training would resume (a finished loop is skipped).
    code, log = run_child(tmp_path, resume=True, max_epochs=soup_worker.MAX_EPOCHS + 1)
    text = tail(log)
    assert code == 1, text
    error = next(line for line in text.splitlines() if "SoupError:" in line)
    assert Path(name).name in error, error
    assert "Restore" in error or "restore" in error, error  # what to do
    assert not (tmp_path / "result.json").exists()


def test_uninterrupted_run_keeps_the_trained_weights(baseline: Path) -> None:
    """final.safetensors equals the weights at the end of training, captured by an independent callback."""
    assert_same_weights(baseline / "captured_final.safetensors", soup_dir(baseline) / "final.safetensors")
    final = load_file(str(soup_dir(baseline) / "final.safetensors"))
    blended = load_file(str(soup_dir(baseline) / "blended.safetensors"))
    assert any(not torch.equal(final[k], blended[k]) for k in final if final[k].is_floating_point())


# ---------------------------------------------------------------------------------------------- atomic outputs


def write_marker(path: Path) -> str:
    """A valid but recognisable previous version of ``path``; returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"marker": torch.arange(5.0)}, str(path))
    return sha256(path)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "target",
    [
        "snapshots/epoch=1-step=12.safetensors",  # CheckpointAveraging, written by its background thread
        "ingredients/epoch=1-step=12.safetensors",  # GreedySoup, at validation end
        "soup.safetensors",  # end of fit
    ],
)
def test_sigkill_mid_write_keeps_the_previous_file(baseline: Path, tmp_path: Path, target: str) -> None:
    final = soup_dir(tmp_path) / target
    before = write_marker(final)
    run_killed(tmp_path, kill_at=f"write:{target}")
    # The final name still holds the previous version, whole; the half-written bytes are in a temporary beside it.
    assert sha256(final) == before
    partial = [p for p in temp_files(soup_dir(tmp_path)) if p.parent == final.parent]
    assert len(partial) == 1 and partial[0].name.startswith(f".{final.name}.tmp-"), partial
    # The next start removes the dead process's temporaries (every folder the callbacks write in) and finishes.
    run_ok(tmp_path, resume=True)
    assert temp_files(soup_dir(tmp_path)) == []
    if target.startswith(("snapshots/", "ingredients/")):  # killed during training: the resumed run completes it
        assert_equals_uninterrupted(tmp_path, baseline)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_mid_write_without_previous_file_leaves_no_file(tmp_path: Path) -> None:
    """Without a previous version, the final name does not exist after a kill mid-write (no partial file)."""
    target = "ingredients/epoch=0-step=6.safetensors"
    run_killed(tmp_path, kill_at=f"write:{target}", max_epochs=1)
    assert not (soup_dir(tmp_path) / target).exists()
    assert [p.name.split(".tmp-")[0] for p in temp_files(soup_dir(tmp_path))] == [".epoch=0-step=6.safetensors"]


# --------------------------------------------------------------------------------------- checkpoints and disk


def leaves(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in leaves(v)]
    return [obj]


def tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def test_checkpoint_holds_paths_and_counters_not_weights(baseline: Path) -> None:
    ckpt = torch.load(last_ckpt(baseline), weights_only=True)  # plain types: resumable with weights_only=True
    states = {
        k: v
        for k, v in ckpt["callbacks"].items()
        if k.split("{")[0] in ("CheckpointAveraging", "GreedySoup", "TaskArithmeticBlend")
    }
    assert len(states) == 3, list(ckpt["callbacks"])
    big = [(k, tuple(t.shape)) for k, v in states.items() for t in tensors_in(v) if t.numel() > 4]
    assert big == []
    odd = [leaf for leaf in leaves(states) if not isinstance(leaf, (str, int, float, bool, type(None)))]
    assert odd == [], odd  # names, counters, scores: plain types
    import io

    buffer = io.BytesIO()
    torch.save(states, buffer)
    model_bytes = sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())
    # The soup callbacks add a few KB of names and numbers, far less than one copy of the (tiny) model.
    assert len(buffer.getvalue()) < max(8192, model_bytes // 2), len(buffer.getvalue())


def model_bytes(model: Any) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_disk_use_is_bounded_by_window_and_max_ingredients(tmp_path: Path, checkpointing: bool) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    window, max_ingredients, epochs = 2, 2, 8
    callbacks: list[Any] = [
        soup.CheckpointAveraging(window=window, verbose=False),
        soup.GreedySoup(monitor="val/acc", max_ingredients=max_ingredients, verbose=False),
        soup.TaskArithmeticBlend(ratio=0.5),
    ]
    if checkpointing:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    model = make_model(pl)
    kw = trainer_kwargs(
        tmp_path, max_epochs=epochs, limit_train_batches=1, limit_val_batches=1, enable_checkpointing=checkpointing
    )
    pl.Trainer(callbacks=callbacks, **kw).fit(model)
    dirpath = tmp_path / "soup"
    snapshots = sorted(p.name for p in (dirpath / "snapshots").iterdir())
    ingredients = sorted(p.name for p in (dirpath / "ingredients").iterdir())
    # Without checkpoints exactly the window / the best ingredients; a checkpoint keeps what it names until two
    # newer checkpoints exist (at most one more file each when a checkpoint follows every snapshot).
    extra = 2 if checkpointing else 0
    assert window <= len(snapshots) <= window + extra, snapshots
    assert max_ingredients <= len(ingredients) <= max_ingredients + extra, ingredients
    total = sum(p.stat().st_size for p in dirpath.rglob("*") if p.is_file() and p.suffix == ".safetensors")
    copies = window + extra + max_ingredients + extra + 5  # + average, soup, final, anchor, blended
    assert total <= copies * (model_bytes(model) + 4096), (total, copies)


# Full disk: the writer raises ENOSPC for one file; the error names it and every existing output is intact.
def enospc_for(monkeypatch: pytest.MonkeyPatch, final: Path) -> None:
    real = _format.write_at

    def write_at(fd: int, view: memoryview, offset: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.parent == final.parent and path.name.startswith(f".{final.name}.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, view, offset)

    monkeypatch.setattr(_format, "write_at", write_at)


@pytest.mark.parametrize(
    ("callback", "target"),
    [
        ("CheckpointAveraging", "snapshots/epoch=0-step=2.safetensors"),  # background thread, during training
        ("CheckpointAveraging", "average.safetensors"),
        ("GreedySoup", "ingredients/epoch=0-step=2.safetensors"),  # during training
        ("GreedySoup", "soup.safetensors"),
        ("TaskArithmeticBlend", "anchor.pending.safetensors"),  # at fit start
        ("TaskArithmeticBlend", "blended.safetensors"),
        ("TaskArithmeticBlend", "final.safetensors"),
    ],
)
def test_full_disk_is_a_clear_error_and_corrupts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, callback: str, target: str
) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    args = {"GreedySoup": {"monitor": "val/acc", "verbose": False}, "CheckpointAveraging": {"verbose": False}}
    cb = getattr(soup, callback)(**args.get(callback, {}))
    dirpath = tmp_path / "soup"
    final = dirpath / target
    previous = {p: write_marker(dirpath / p) for p in {target, "final.safetensors"}}
    enospc_for(monkeypatch, final)
    kw = trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    model = make_model(pl)
    with pytest.raises(SoupError, match="disk is full") as info:
        pl.Trainer(callbacks=[cb], **kw).fit(model)
    if target == "anchor.pending.safetensors":
        assert model.training_steps == 0  # the initial weights are saved before training starts
    assert str(final) in str(info.value)
    assert "Free some space" in str(info.value)
    for name, digest in previous.items():
        if name != "final.safetensors" or target == "final.safetensors":
            assert sha256(dirpath / name) == digest, name
    assert temp_files(dirpath) == []


def not_a_folder(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "soup"


@pytest.mark.parametrize("callback", ["CheckpointAveraging", "GreedySoup", "TaskArithmeticBlend"])
@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
def test_unwritable_dirpath_fails_at_setup(flavour: Any, tmp_path: Path, callback: str, how: str) -> None:
    if how == "under-a-file":
        dirpath = not_a_folder(tmp_path)
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into a 0o500 folder; the under-a-file case covers root")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        dirpath = locked / "soup"
    kwargs = {"GreedySoup": {"monitor": "val/acc"}}.get(callback, {})
    cb = getattr(flavour.soup, callback)(dirpath=str(dirpath), **kwargs)
    model = make_model(flavour.pl)
    trainer = flavour.pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(SoupError, match=r"dirpath=.*is not a writable folder") as info:
        trainer.fit(model)
    assert str(dirpath) in str(info.value)
    assert model.training_steps == 0
