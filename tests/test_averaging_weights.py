"""CheckpointAveraging(weights=...): the window's weights against float64 references written here (WSM decay
shapes and explicit lists), in full and partial windows, across a resume, and for validate_average."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_soup import SoupError
from lightning_soup.callbacks.averaging import _CheckpointAveraging
from lightning_soup.merge._window import window_weights
from lightning_soup.storage import read_recipe
from tests._models import make_model, trainer_kwargs
from tests.test_averaging import capture_class, crash_class, fit, module_state, no_shuffle_model

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def flavour() -> SimpleNamespace:
    """One Lightning flavour: the weights are flavour-independent maths (test_averaging covers both flavours)."""
    return SimpleNamespace(
        name="pytorch_lightning",
        pl=importlib.import_module("pytorch_lightning"),
        soup=importlib.import_module("lightning_soup"),
    )

# The decay shapes, written out independently of the package: f(0) = 1, f(1) = 0.
DECAY = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
    "1-sqrt": lambda x: 1 - math.sqrt(x),
}


def reference_weights(weights: Any, n: int) -> list[float]:
    """float64 WSM merge weights of a window holding n snapshots, oldest first.

    The decay over the n - 1 updates between the snapshots is w_i = f(i / n), i = 1 .. n - 1, and DESIGN's map
    gives c_0 = 1 - w_1, c_j = w_j - w_(j+1), c_(n-1) = w_(n-1). A list: its newest n entries, normalised.
    """
    if weights == "uniform":
        return [1 / n] * n
    if isinstance(weights, str):
        w = [DECAY[weights](i / n) for i in range(1, n)]
        if n == 1:
            return [1.0]
        return [1 - w[0]] + [w[j - 1] - w[j] for j in range(1, n - 1)] + [w[-1]]
    last = [float(v) for v in weights[len(weights) - n :]]
    return [v / sum(last) for v in last]


def weighted_reference(snapshots: list[dict[str, torch.Tensor]], c: list[float]) -> dict[str, torch.Tensor]:
    """float64 Σ c_j θ_j over the last len(c) snapshots' floating entries; integer entries from the newest."""
    last = snapshots[len(snapshots) - len(c) :]
    out = {}
    for key, value in last[-1].items():
        out[key] = sum(cj * s[key].double() for cj, s in zip(c, last)) if value.is_floating_point() else value.clone()
    return out


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        got = actual[key]
        if not want.is_floating_point():
            assert torch.equal(got, want), key
            continue
        tol = 4 * EPS32 * max(1.0, want.abs().max().item())
        err = (got.double() - want).abs().max().item()
        assert err <= tol, f"{key}: max error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("shape", ["uniform", "linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_named_shapes_match_the_wsm_map(shape: str, n: int) -> None:
    got = window_weights(shape, n)
    want = reference_weights(shape, n)
    assert len(got) == n and all(c >= 0 for c in got)
    assert sum(got) == pytest.approx(1.0, abs=1e-12)
    assert got == pytest.approx(want, abs=1e-12)


def test_shapes_differ_as_documented() -> None:
    # Linear decay is the uniform mean (WSM); cosine is symmetric and peaks mid-window; 1-sqrt decreases.
    assert window_weights("linear", 5) == pytest.approx([0.2] * 5, abs=1e-12)
    cosine = window_weights("cosine", 5)
    assert cosine == pytest.approx(cosine[::-1], abs=1e-12) and max(cosine) == cosine[2]
    one_sqrt = window_weights("1-sqrt", 5)
    assert all(a > b for a, b in zip(one_sqrt, one_sqrt[1:]))


def test_explicit_list_full_and_partial_window() -> None:
    assert window_weights([1, 1, 2], 3) == pytest.approx([0.25, 0.25, 0.5])
    assert window_weights([1, 1, 2], 2) == pytest.approx([1 / 3, 2 / 3])  # the newest entries
    with pytest.raises(SoupError, match="all zero"):
        window_weights([1, 0, 0], 2)


@pytest.mark.parametrize(
    ("weights", "match"),
    [("exp", "`weights` can be"), ([1, 2], "one number per snapshot"), ([1, -1, 0], "non-negative"),
     ([0, 0, 0], "all be zero"), ([1, float("nan"), 1], "finite")],
)
def test_invalid_weights_are_refused_at_construction(weights: Any, match: str) -> None:
    with pytest.raises(SoupError, match=match):
        _CheckpointAveraging(window=3, weights=weights)


# ------------------------------------------------------------------------------------------------------- in fit


@pytest.mark.parametrize(
    ("weights", "window", "epochs"),
    [("cosine", 4, 6), ("1-sqrt", 4, 3), ([0.0, 1.0, 2.0, 5.0], 4, 6), ([3.0, 0.0, 1.0, 2.0], 4, 3)],
    ids=["cosine-full", "1-sqrt-partial", "list-full", "list-partial"],
)
def test_weighted_average_equals_reference(
    flavour: Any, tmp_path: Path, weights: Any, window: int, epochs: int
) -> None:
    capture = capture_class(flavour.pl)()
    averaging = flavour.soup.CheckpointAveraging(window=window, weights=weights, verbose=False)
    model, _ = fit(flavour, tmp_path, [capture, averaging], max_epochs=epochs)

    n = min(window, epochs)
    c = reference_weights(weights, n)
    expected = weighted_reference(capture.snapshots, c)
    written = load_file(tmp_path / "soup" / "average.safetensors")
    assert_close(written, expected)
    assert_close(module_state(model), expected)
    # Not the uniform mean: the weights changed the result.
    uniform = weighted_reference(capture.snapshots, [1 / n] * n)
    assert (written["net.0.weight"].double() - uniform["net.0.weight"]).abs().max() > 1e-4
    recipe = read_recipe(tmp_path / "soup" / "average.safetensors")
    assert recipe["weights"] == weights
    assert [r["weight"] for r in recipe["averaged"]] == pytest.approx(c, abs=1e-12)


def test_summary_shows_the_weights(flavour: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fit(flavour, tmp_path, [flavour.soup.CheckpointAveraging(window=3, weights="1-sqrt")], max_epochs=3)
    out = " ".join(capsys.readouterr().out.split())
    assert "weights='1-sqrt'" in out
    for c in reference_weights("1-sqrt", 3):
        assert f"{c:.4f}" in out


@pytest.mark.slow
def test_resume_mid_window_equals_uninterrupted(flavour: Any, tmp_path: Path) -> None:
    """Crash with two snapshots in a window of four (cosine weights); the resumed run ends with the same file."""
    pl = flavour.pl
    extra = {"limit_val_batches": 0}

    def callbacks(root: Path) -> list:
        return [
            flavour.soup.CheckpointAveraging(window=4, weights="cosine", verbose=False),
            pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
        ]

    capture = capture_class(pl)()
    fit(flavour, tmp_path / "a", [capture, *callbacks(tmp_path / "a")], model=no_shuffle_model(flavour),
        max_epochs=5, enable_checkpointing=True, **extra)
    root = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(flavour, root, [*callbacks(root), crash_class(pl)(2)], model=no_shuffle_model(flavour), max_epochs=5,
            enable_checkpointing=True, **extra)
    fit(flavour, root, callbacks(root), model=no_shuffle_model(flavour), ckpt_path=root / "ckpt" / "last.ckpt",
        max_epochs=5, enable_checkpointing=True, **extra)

    a = load_file(tmp_path / "a" / "soup" / "average.safetensors")
    b = load_file(root / "soup" / "average.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_close(b, weighted_reference(capture.snapshots, reference_weights("cosine", 4)))


@pytest.mark.parametrize(("weights", "epochs"), [("1-sqrt", 3), ([1.0, 0.0, 2.0], 5)], ids=["partial", "list"])
def test_validate_average_scores_the_weighted_average(flavour: Any, tmp_path: Path, weights: Any, epochs: int) -> None:
    """The logged average/* metrics are the validation of the float64 reference weighted average."""
    pl = flavour.pl
    capture = capture_class(pl)()
    averaging = flavour.soup.CheckpointAveraging(window=3, weights=weights, validate_average=True, verbose=False)
    _, trainer = fit(flavour, tmp_path, [capture, averaging], max_epochs=epochs)

    n = min(3, epochs)
    reference = weighted_reference(capture.snapshots, reference_weights(weights, n))
    model = make_model(pl)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in reference.items()})
    report = pl.Trainer(**trainer_kwargs(tmp_path)).validate(model, verbose=False)[0]
    logged = trainer.callback_metrics
    assert float(logged["average/val/loss"]) == pytest.approx(report["val/loss"], abs=1e-5)
    assert float(logged["average/val/acc"]) == pytest.approx(report["val/acc"], abs=1e-6)


# ------------------------------------------------------------------------------------------- reads and memory


def test_only_window_snapshots_are_ever_read(flavour: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a run with many evictions (and validate_average reading the window each epoch), every snapshot read back
    is in the window at the time of the read, and training itself reads none."""
    from lightning_soup.callbacks import averaging as module

    averaging = flavour.soup.CheckpointAveraging(window=2, weights="1-sqrt", validate_average=True, verbose=False)
    reads: list[tuple[str, list[str], str]] = []
    real_add, real_load = module._SnapshotStore._add_snapshot_, module._SnapshotStore.load

    def window() -> list[str]:
        return [r["file"] for r in averaging._records]

    def spy_add(self: Any, acc: Any, name: str, weight: float) -> None:
        reads.append((name, window(), "_add_snapshot_"))
        real_add(self, acc, name, weight)

    def spy_load(self: Any, name: str) -> Any:
        reads.append((name, window(), "load"))
        return real_load(self, name)

    monkeypatch.setattr(module._SnapshotStore, "_add_snapshot_", spy_add)
    monkeypatch.setattr(module._SnapshotStore, "load", spy_load)
    fit(flavour, tmp_path, [averaging], max_epochs=6)
    assert reads, "the average was never read"
    assert all(name in window for name, window, _ in reads), reads
    # validate_average reads the window's older snapshot once per epoch (the newest is in the module); the end of
    # fit reads the window and the newest snapshot's integer buffers.
    assert sum(1 for *_, m in reads if m == "_add_snapshot_") == 5 + 2


@pytest.mark.parametrize("mode", ["disk", "cpu"])
def test_memory_held_between_snapshots_is_flat_in_window(tmp_path: Path, mode: str) -> None:
    """Bytes the store holds between snapshots: one host buffer with disk snapshots whatever the window (the
    device holds nothing), the window itself in host RAM with snapshots="cpu" (by design)."""
    from lightning_soup.callbacks.averaging import _SnapshotStore

    template = {"w": torch.zeros(256, 64), "b": torch.zeros(64), "n": torch.zeros((), dtype=torch.long)}
    one = sum(t.numel() * t.element_size() for t in template.values())
    held = {}
    for window in (2, 16):
        store = _SnapshotStore(tmp_path / f"{mode}{window}", mode, template)
        (tmp_path / f"{mode}{window}").mkdir()
        names: list[str] = []
        for i in range(window + 3):
            name = f"s{i}.safetensors"
            evicted = names.pop(0) if len(names) == window else None
            names.append(name)
            store.push(name, {k: v + i for k, v in template.items()}, evicted)
            if evicted is not None:
                store.delete_files([evicted])
        store.flush()
        images = [*([store._image] if store._image else []), *store._ram.values()]
        buffers = [t for image in images for t in image.tensors.values()]
        held[window] = sum(t.numel() * t.element_size() for t in buffers)
        store.close()
    if mode == "disk":
        assert held == {2: one, 16: one}
    else:
        assert held == {2: 2 * one, 16: 16 * one}
