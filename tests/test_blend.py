"""TaskArithmeticBlend: exact blends against float64 references, the validated sweep, anchors, resume, outputs."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_soup import SoupError
from lightning_soup.callbacks import _report
from lightning_soup.callbacks._constraint import parse_constraint
from tests._models import make_model, trainer_kwargs

# ------------------------------------------------------------------------------------------------ references


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_blend(
    anchor: dict[str, torch.Tensor],
    theta: dict[str, torch.Tensor],
    ratio: float,
    layer_ratios: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """anchor + r·(θ − anchor) in float64 per floating key (first matching pattern's r); θ's integer entries."""
    out = {}
    for key, t in theta.items():
        t = t.cpu()
        if not t.is_floating_point():
            out[key] = t.clone()
            continue
        r = next((v for p, v in (layer_ratios or {}).items() if fnmatch.fnmatchcase(key, p)), ratio)
        a = anchor[key].cpu().double()
        out[key] = (a + r * (t.double() - a)).to(t.dtype)
    return out


def assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tol: Any) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        a, e = actual[key].detach().cpu(), expected[key].detach().cpu()
        assert a.dtype == e.dtype, key
        if e.is_floating_point():
            torch.testing.assert_close(a, e, rtol=tol.get("rtol", 1e-6), atol=tol.get("atol", 1e-6), msg=key)
        else:
            assert torch.equal(a, e), key


def capture_class(pl: Any) -> type:
    """A callback that records the module's weights at fit start and at train end (before the blend runs)."""

    class Capture(pl.Callback):
        def __init__(self) -> None:
            self.at_fit_start: dict[str, torch.Tensor] | None = None
            self.at_train_end: dict[str, torch.Tensor] | None = None

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.at_fit_start = clone_state(pl_module)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.at_train_end = clone_state(pl_module)

    return Capture


def fit(flavour: SimpleNamespace, tmp_path: Path, blend: Any, *, model: Any = None, extra: list | None = None,
        ckpt_path: str | None = None, **trainer_overrides: Any) -> SimpleNamespace:
    """Fit a TinyClassifier with ``[Capture, *extra, blend]``; returns the model, trainer and captured weights."""
    model = model if model is not None else make_model(flavour.pl)
    trainer_overrides.setdefault("max_epochs", 2)
    before = clone_state(model)
    capture = capture_class(flavour.pl)()
    callbacks = [capture, *(extra or []), blend]
    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path, **trainer_overrides), callbacks=callbacks)
    trainer.fit(model, ckpt_path=ckpt_path)
    return SimpleNamespace(model=model, trainer=trainer, before=before, theta=capture.at_train_end,
                           at_fit_start=capture.at_fit_start)


def validate_metrics(flavour: SimpleNamespace, tmp_path: Path, state: dict[str, torch.Tensor],
                     **model_kwargs: Any) -> dict[str, float]:
    """What ``trainer.validate`` reports for ``state`` loaded into a fresh model."""
    model = make_model(flavour.pl, seed=123, **model_kwargs)
    model.load_state_dict(state)
    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path / "validate"))
    results = trainer.validate(model, verbose=False)
    merged: dict[str, float] = {}
    for per_loader in results:
        merged.update({k: float(v) for k, v in per_loader.items()})
    return merged


def report(dirpath: Path) -> dict[str, Any]:
    return json.loads((dirpath / "blend.json").read_text())


def recipe_of(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["lightning_soup"])


# ------------------------------------------------------------------------------------------------ construction


def test_constructor_reports_every_problem_at_once(flavour: SimpleNamespace) -> None:
    with pytest.raises(SoupError) as info:
        flavour.soup.TaskArithmeticBlend(
            ratio=[0.1, float("nan")], mode="maximum", constraint="val/acc=0.9", layer_ratios={"net.*": "one"}
        )
    message = str(info.value)
    for fragment in ("`ratio`", "`mode`", "'maximum'", "`constraint`", "'val/acc=0.9'", "metric>=x", "`layer_ratios`"):
        assert fragment in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ratio": []}, "non-empty list"),
        ({"ratio": float("inf")}, "finite"),
        ({"ratio": "0.5"}, "`ratio`"),
        ({"ratio": True}, "`ratio`"),
        ({"ratio": [0.0, 1.0]}, "`monitor` must name"),
        ({"ratio": [0.5, 0.5], "monitor": "val/acc"}, "more than once"),
        ({"monitor": ""}, "`monitor`"),
        ({"mode": "best"}, "can be 'min' or 'max'"),
        ({"constraint": "val/acc ~ 0.9"}, "metric<x"),
        ({"constraint": ["val/acc>=0.9", "and"]}, "'and'"),
        ({"constraint": "val/acc>=inf"}, "could not be parsed"),
        ({"layer_ratios": {"": 1.0}}, "`layer_ratios`"),
        ({"layer_ratios": {"net.*": float("nan")}}, "`layer_ratios`"),
        ({"layer_ratios": [("net.*", 1.0)]}, "`layer_ratios`"),
        ({"anchor": ""}, "`anchor`"),
    ],
)
def test_constructor_rejects(kwargs: dict[str, Any], fragment: str) -> None:
    from lightning_soup import TaskArithmeticBlend

    with pytest.raises(SoupError, match="Invalid TaskArithmeticBlend arguments") as info:
        TaskArithmeticBlend(**kwargs)
    assert fragment in str(info.value)


def test_constructor_accepts_config_values(tmp_path: Path) -> None:
    from lightning_soup import TaskArithmeticBlend

    # A path anchor is only checked when fit starts, so a config may name a file that does not exist yet.
    blend = TaskArithmeticBlend(
        anchor=str(tmp_path / "later.safetensors"), ratio=[0, 0.5, 1], monitor="val/acc", mode="min",
        constraint=["val/a>=0.9", "val/b<1 and val/c>-2"], layer_ratios={"head.*": 1}, dirpath=str(tmp_path),
    )
    assert blend.ratios == [0.0, 0.5, 1.0]
    assert [str(b) for b in blend.constraint] == ["val/a>=0.9", "val/b<1", "val/c>-2"]
    assert blend.layer_ratios == {"head.*": 1.0}
    assert "later.safetensors" in blend.state_key and str(tmp_path) in blend.state_key
    assert TaskArithmeticBlend().state_key != TaskArithmeticBlend(dirpath=str(tmp_path)).state_key


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a>=0.9", [("a", ">=", 0.9)]),
        ("val/acc/dataloader_idx_0 >= 0.5, val/loss<2", [("val/acc/dataloader_idx_0", ">=", 0.5), ("val/loss", "<", 2.0)]),
        ("a>1 and b<=-1e-3", [("a", ">", 1.0), ("b", "<=", -1e-3)]),
        (["a<1", "b>2, c>=3"], [("a", "<", 1.0), ("b", ">", 2.0), ("c", ">=", 3.0)]),
        (None, []),
    ],
)
def test_parse_constraint(spec: Any, expected: list[tuple[str, str, float]]) -> None:
    assert [(b.metric, b.op, b.threshold) for b in parse_constraint(spec)] == expected


def test_constraint_violation_is_normalised() -> None:
    (ge,) = parse_constraint("a>=0.8")
    (lt,) = parse_constraint("b<0")
    assert ge.violation(0.6) == pytest.approx(0.25) and ge.violation(0.9) == 0.0
    assert lt.violation(0.5) == pytest.approx(0.5) and lt.violation(-1.0) == 0.0
    assert not ge.satisfied(float("nan")) and ge.violation(float("nan")) == math.inf
    (gt,) = parse_constraint("a>0.8")
    assert not gt.satisfied(0.8) and ge.satisfied(0.8)


# ------------------------------------------------------------------------------------------------ exact blends


@pytest.mark.parametrize("ratio", [0.3, 1.5])
def test_initial_anchor_fixed_ratio_is_exact(flavour: SimpleNamespace, tmp_path: Path, ratio: float) -> None:
    blend = flavour.soup.TaskArithmeticBlend(ratio=ratio)
    run = fit(flavour, tmp_path, blend)
    assert run.model.training_steps > 0
    expected = reference_blend(run.before, run.theta, ratio)
    assert_state_close(clone_state(run.model), expected)
    # The trained weights really moved: the blend is not a no-op.
    assert not torch.allclose(run.theta["net.0.weight"], expected["net.0.weight"])

    soup = tmp_path / "soup"
    assert_state_close(load_file(soup / "anchor.safetensors"), run.before, rtol=0, atol=0)
    assert_state_close(load_file(soup / "final.safetensors"), run.theta, rtol=0, atol=0)
    blended = load_file(soup / "blended.safetensors")
    assert_state_close(blended, clone_state(run.model), rtol=0, atol=0)
    fresh = make_model(flavour.pl, seed=5)
    fresh.load_state_dict(blended)  # the documented way to use the output
    recipe = recipe_of(soup / "blended.safetensors")
    assert recipe["ratio"] == ratio and recipe["anchor"].startswith("initial")
    assert report(soup)["ratio"] == ratio and report(soup)["fallback"] is False
    assert not (soup / "anchor.pending.safetensors").exists()


def test_layer_ratios_first_match_wins(flavour: SimpleNamespace, tmp_path: Path) -> None:
    layer_ratios = {"net.3.*": 1.0, "net.0.weight": 0.0, "net.*.bias": 0.75}
    blend = flavour.soup.TaskArithmeticBlend(ratio=0.25, layer_ratios=layer_ratios)
    run = fit(flavour, tmp_path, blend)
    actual = clone_state(run.model)
    assert_state_close(actual, reference_blend(run.before, run.theta, 0.25, layer_ratios))
    assert torch.equal(actual["net.3.weight"], run.theta["net.3.weight"])  # ratio 1: the trained head
    assert torch.equal(actual["net.0.weight"], run.before["net.0.weight"])  # ratio 0: the anchor
    assert recipe_of(tmp_path / "soup" / "blended.safetensors")["layer_ratios"] == layer_ratios


def test_unmatched_layer_pattern_warns(flavour: SimpleNamespace, tmp_path: Path) -> None:
    blend = flavour.soup.TaskArithmeticBlend(ratio=0.5, layer_ratios={"encoder.*": 0.0})
    with pytest.warns(UserWarning, match="match no floating-point key"):
        fit(flavour, tmp_path, blend, max_epochs=1)


def _write_anchor(kind: str, state: dict[str, torch.Tensor], path: Path) -> Path:
    if kind == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file(state, str(path))
    elif kind == "sharded":  # a Hugging Face style folder: two shards and the index that maps keys to them
        path.mkdir()
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, str(path / name))
        weight_map = {k: name for name, part in shards.items() for k in part}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:  # what trainer.save_checkpoint writes: the weights under "state_dict"
        path = path.with_suffix(".ckpt")
        torch.save({"state_dict": state, "epoch": 3, "global_step": 30}, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "sharded", "ckpt"])
def test_file_anchor_is_exact_and_keeps_module_integer_buffers(
    flavour: SimpleNamespace, tmp_path: Path, kind: str
) -> None:
    anchor_state = clone_state(make_model(flavour.pl, seed=42))
    anchor_state["net.1.num_batches_tracked"] = torch.tensor(999)  # non-floating: must not be used
    anchor = _write_anchor(kind, anchor_state, tmp_path / "base")
    blend = flavour.soup.TaskArithmeticBlend(anchor=str(anchor), ratio=0.4)
    run = fit(flavour, tmp_path, blend)
    actual = clone_state(run.model)
    assert_state_close(actual, reference_blend(anchor_state, run.theta, 0.4))
    assert int(actual["net.1.num_batches_tracked"]) == int(run.theta["net.1.num_batches_tracked"]) != 999
    assert not (tmp_path / "soup" / "anchor.safetensors").exists()  # a file anchor is not copied
    assert recipe_of(tmp_path / "soup" / "blended.safetensors")["anchor"] == str(anchor)


# ------------------------------------------------------------------------------------------------ the sweep

RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]
MONITOR = "val/loss/dataloader_idx_1"
OTHER = "val/loss/dataloader_idx_0"


def _independent_metrics(flavour: SimpleNamespace, tmp_path: Path, anchor: dict, theta: dict) -> list[dict[str, float]]:
    return [
        validate_metrics(flavour, tmp_path, reference_blend(anchor, theta, r), two_val_loaders=True) for r in RATIOS
    ]


def _first_best(indices: list[int], scores: list[float], mode: str) -> int:
    """The best index by ``mode``; ties go to the larger ratio (RATIOS ascend, so the later index)."""
    best = indices[0]
    for i in indices[1:]:
        if (scores[i] >= scores[best]) if mode == "max" else (scores[i] <= scores[best]):
            best = i
    return best


@pytest.mark.slow
def test_sweep_picks_what_trainer_validate_picks(flavour: SimpleNamespace, tmp_path: Path) -> None:
    # Unconstrained: the best monitor value over all ratios, as an independent trainer.validate sees it.
    blend = flavour.soup.TaskArithmeticBlend(ratio=RATIOS, monitor=MONITOR, mode="min")
    run = fit(flavour, tmp_path / "free", blend, model=make_model(flavour.pl, two_val_loaders=True))
    independent = _independent_metrics(flavour, tmp_path, run.before, run.theta)
    scores = [m[MONITOR] for m in independent]
    best = _first_best(list(range(len(RATIOS))), scores, "min")
    result = report(tmp_path / "free" / "soup")
    assert result["ratio"] == RATIOS[best]
    for candidate, metrics in zip(result["candidates"], independent):
        assert candidate["metrics"].keys() >= {MONITOR, OTHER}
        for name in (MONITOR, OTHER):
            assert candidate["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6)
    assert_state_close(clone_state(run.model), reference_blend(run.before, run.theta, RATIOS[best]))

    # A constraint on the other loader's loss that the unconstrained best violates: the threshold sits halfway
    # between the best's value and the nearest value of another ratio, on the side that excludes the best.
    other = [m[OTHER] for m in independent]
    j = min((i for i in range(len(RATIOS)) if i != best), key=lambda i: abs(other[i] - other[best]))
    op = ">=" if other[j] > other[best] else "<="
    threshold = (other[j] + other[best]) / 2
    feasible = [i for i in range(len(RATIOS)) if (other[i] >= threshold if op == ">=" else other[i] <= threshold)]
    assert best not in feasible and feasible
    expected = _first_best(feasible, scores, "min")

    blend = flavour.soup.TaskArithmeticBlend(
        ratio=RATIOS, monitor=MONITOR, mode="min", constraint=f"{OTHER}{op}{threshold!r}"
    )
    run2 = fit(flavour, tmp_path / "bound", blend, model=make_model(flavour.pl, two_val_loaders=True))
    assert_state_close(run2.theta, run.theta, rtol=0, atol=0)  # deterministic: same trained weights
    result = report(tmp_path / "bound" / "soup")
    assert result["ratio"] == RATIOS[expected] != RATIOS[best]
    assert result["constraint_met"] is True and result["fallback"] is False
    assert [c["meets_constraint"] for c in result["candidates"]] == [i in feasible for i in range(len(RATIOS))]
    assert_state_close(clone_state(run2.model), reference_blend(run2.before, run2.theta, RATIOS[expected]))
    recipe = recipe_of(tmp_path / "bound" / "soup" / "blended.safetensors")
    assert recipe["ratio"] == RATIOS[expected] and len(recipe["scores"]) == len(RATIOS)


def test_fallback_when_no_ratio_satisfies_the_constraint(flavour: SimpleNamespace, tmp_path: Path) -> None:
    blend = flavour.soup.TaskArithmeticBlend(
        ratio=RATIOS, monitor="val/loss", mode="min", constraint="val/acc>=1.5 and val/loss<=0"
    )
    with pytest.warns(UserWarning, match="no ratio .* satisfies"):
        run = fit(flavour, tmp_path, blend)
    result = report(tmp_path / "soup")
    assert result["fallback"] is True and result["constraint_met"] is False
    metrics = [c["metrics"] for c in result["candidates"]]
    # The smallest total normalised violation: (1.5 − acc)/1.5 + loss/1 (threshold 0 → absolute), loss breaks ties.
    violation = [(1.5 - m["val/acc"]) / 1.5 + max(m["val/loss"], 0.0) for m in metrics]
    expected = min(range(len(RATIOS)), key=lambda i: (violation[i], metrics[i]["val/loss"]))
    assert result["ratio"] == RATIOS[expected]
    assert_state_close(clone_state(run.model), reference_blend(run.before, run.theta, RATIOS[expected]))


def test_single_ratio_with_monitor_is_evaluated_and_logged(flavour: SimpleNamespace, tmp_path: Path) -> None:
    logger = flavour.pl.loggers.CSVLogger(str(tmp_path), name="logs")
    blend = flavour.soup.TaskArithmeticBlend(ratio=0.5, monitor="val/acc", constraint="val/loss<100")
    run = fit(flavour, tmp_path, blend, logger=logger)
    result = report(tmp_path / "soup")
    independent = validate_metrics(flavour, tmp_path, clone_state(run.model))
    assert result["candidates"][0]["score"] == pytest.approx(independent["val/acc"], abs=1e-6)
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"blend/ratio", "blend/val/acc", "blend/val/loss"} <= set(header)
    last = dict(zip(header, rows[-1].split(",")))
    assert float(last["blend/ratio"]) == 0.5
    assert float(last["blend/val/acc"]) == pytest.approx(independent["val/acc"], abs=1e-6)


def test_disabled_validation_fails_at_setup(flavour: SimpleNamespace, tmp_path: Path) -> None:
    model = make_model(flavour.pl)
    blend = flavour.soup.TaskArithmeticBlend(ratio=[0.5, 1.0], monitor="val/acc")
    with pytest.raises(SoupError, match="limit_val_batches"):
        fit(flavour, tmp_path, blend, model=model, limit_val_batches=0)
    assert model.training_steps == 0


def test_unknown_monitor_fails_at_the_first_validation(flavour: SimpleNamespace, tmp_path: Path) -> None:
    model = make_model(flavour.pl)
    blend = flavour.soup.TaskArithmeticBlend(ratio=[0.5, 1.0], monitor="val/accuracy")
    with pytest.raises(SoupError, match="val/accuracy"):
        fit(flavour, tmp_path, blend, model=model, num_sanity_val_steps=2)
    assert model.training_steps == 0


def test_two_val_loaders_with_a_sanity_check(flavour: SimpleNamespace, tmp_path: Path) -> None:
    # Lightning shows no metrics during the sanity check when there are several validation dataloaders: the
    # metric-name check must wait for the first real validation instead of failing.
    model = make_model(flavour.pl, two_val_loaders=True)
    blend = flavour.soup.TaskArithmeticBlend(ratio=[0.0, 1.0], monitor="val/acc/dataloader_idx_1")
    fit(flavour, tmp_path, blend, model=model, num_sanity_val_steps=2)
    assert report(tmp_path / "soup")["ratio"] in (0.0, 1.0)
    typo = flavour.soup.TaskArithmeticBlend(ratio=[0.0, 1.0], monitor="val/acc/dataloader_idx_9")
    with pytest.raises(SoupError, match="dataloader_idx_9"):
        fit(flavour, tmp_path / "typo", typo, model=make_model(flavour.pl, two_val_loaders=True),
            num_sanity_val_steps=2, max_epochs=1)


# ------------------------------------------------------------------------------------------------ outputs


def test_plot_is_written(flavour: SimpleNamespace, tmp_path: Path) -> None:
    blend = flavour.soup.TaskArithmeticBlend(
        ratio=[0.0, 0.5, 1.0], monitor="val/acc", constraint="val/loss<=5"
    )
    import matplotlib

    backend = matplotlib.get_backend()
    fit(flavour, tmp_path, blend, max_epochs=1)
    png = (tmp_path / "soup" / "blend.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert matplotlib.get_backend() == backend  # no global pyplot state touched
    if "matplotlib.pyplot" in sys.modules:
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


def test_without_matplotlib_the_json_is_still_written(
    flavour: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    blend = flavour.soup.TaskArithmeticBlend(ratio=[0.0, 1.0], monitor="val/acc")
    with pytest.warns(UserWarning, match=r"pip install lightning-soup\[plot\]"):
        fit(flavour, tmp_path, blend, max_epochs=1)
    assert not (tmp_path / "soup" / "blend.png").exists()
    assert len(report(tmp_path / "soup")["candidates"]) == 2


def test_report_renderers_are_pure() -> None:
    candidates = [
        {"ratio": r, "metrics": {"val/a": 1 - r, "val/b": r}, "meets_constraint": 1 - r >= 0.4} for r in (0.0, 0.5, 1.0)
    ]
    table = _report.blend_table(candidates, chosen=1, monitor="val/b", constraint=["val/a>=0.4"], anchor="initial")
    assert table.row_count == 3
    assert [c.header for c in table.columns] == ["ratio", "val/b", "val/a", "constraint", "chosen"]
    figure = _report.blend_figure(candidates, chosen=1, metrics=["val/b", "val/a"], bounds=[("val/a", ">=", 0.4)])
    ax_b, ax_a = figure.axes
    assert [line.get_ydata()[0] for line in ax_a.lines if line.get_linestyle() == ":"] == [0.4]
    assert not [line for line in ax_b.lines if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in ax_a.lines if line.get_linestyle() == "--"] == [0.5]


def test_callback_does_nothing_in_validate_and_predict(flavour: SimpleNamespace, tmp_path: Path) -> None:
    model = make_model(flavour.pl)
    before = clone_state(model)
    blend = flavour.soup.TaskArithmeticBlend(ratio=[0.0, 1.0], monitor="val/acc", anchor=str(tmp_path / "none.ckpt"))
    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[blend])
    trainer.validate(model, verbose=False)
    trainer.predict(model, dataloaders=torch.utils.data.DataLoader(torch.zeros(4, 8), batch_size=2))
    assert_state_close(clone_state(model), before, rtol=0, atol=0)
    assert not (tmp_path / "soup").exists()


# ------------------------------------------------------------------------------------------------ bad anchors


def _bad_anchor(kind: str, state: dict[str, torch.Tensor], tmp_path: Path) -> tuple[Path, str]:
    state = dict(state)
    path = tmp_path / "anchor.safetensors"
    if kind == "missing":
        return tmp_path / "nowhere.safetensors", "nowhere.safetensors"
    if kind == "missing_key":
        del state["net.3.bias"]
        fragment = "net.3.bias"
    elif kind == "extra_key":
        state["net.9.weight"] = torch.zeros(2)
        fragment = "net.9.weight"
    elif kind == "wrong_shape":
        state["net.0.weight"] = torch.zeros(17, 8)
        fragment = "net.0.weight"
    elif kind == "nan":
        state["net.1.running_var"] = state["net.1.running_var"].clone()
        state["net.1.running_var"][3] = float("nan")
        fragment = "net.1.running_var"
    elif kind == "corrupt":
        path.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
        return path, "anchor.safetensors"
    elif kind == "ckpt_without_state_dict":
        path = tmp_path / "anchor.ckpt"
        torch.save({"epoch": 1}, path)
        return path, "anchor.ckpt"
    save_file(state, str(path))
    return path, fragment


@pytest.mark.parametrize(
    "kind", ["missing", "missing_key", "extra_key", "wrong_shape", "nan", "corrupt", "ckpt_without_state_dict"]
)
def test_bad_anchor_fails_before_the_first_training_step(
    flavour: SimpleNamespace, tmp_path: Path, kind: str
) -> None:
    model = make_model(flavour.pl)
    path, fragment = _bad_anchor(kind, clone_state(make_model(flavour.pl, seed=1)), tmp_path)
    blend = flavour.soup.TaskArithmeticBlend(anchor=str(path), ratio=0.5)
    with pytest.raises(SoupError) as info:
        fit(flavour, tmp_path, blend, model=model)
    assert fragment in str(info.value)
    assert model.training_steps == 0


# ------------------------------------------------------------------------------------------------ resume


def _late_restoring_strategy(pl: Any) -> Any:
    """A single-device strategy that restores checkpoints after ``on_fit_start``, as FSDP and DeepSpeed do."""

    class LateRestore(pl.strategies.SingleDeviceStrategy):
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    return LateRestore(device=torch.device("cpu"))


@pytest.mark.parametrize("late_restore", [False, True])
def test_resume_blends_toward_the_first_initial_weights(
    flavour: SimpleNamespace, tmp_path: Path, late_restore: bool
) -> None:
    pl = flavour.pl
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)

    def strategy() -> dict[str, Any]:
        return {"strategy": _late_restoring_strategy(pl)} if late_restore else {}

    first_model = make_model(pl, seed=0)
    initial = clone_state(first_model)
    blend = flavour.soup.TaskArithmeticBlend(ratio=0.5)
    fit(flavour, tmp_path, blend, model=first_model, extra=[checkpoints], enable_checkpointing=True, max_epochs=2,
        **strategy())
    anchor_file = tmp_path / "soup" / "anchor.safetensors"
    assert_state_close(load_file(anchor_file), initial, rtol=0, atol=0)

    # A fresh process: another module instance (other random weights) resumes from the checkpoint.
    resumed = make_model(pl, seed=7)
    blend = flavour.soup.TaskArithmeticBlend(ratio=0.5)
    run = fit(flavour, tmp_path, blend, model=resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=4,
              **strategy())
    assert_state_close(load_file(anchor_file), initial, rtol=0, atol=0)
    assert_state_close(clone_state(run.model), reference_blend(initial, run.theta, 0.5))
    assert not (tmp_path / "soup" / "anchor.pending.safetensors").exists()


@pytest.mark.parametrize("late_restore", [False, True])
def test_resume_without_callback_state_warns_and_anchors_at_the_resumed_weights(
    flavour: SimpleNamespace, tmp_path: Path, late_restore: bool
) -> None:
    pl = flavour.pl
    def strategy() -> dict[str, Any]:
        return {"strategy": _late_restoring_strategy(pl)} if late_restore else {}

    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(flavour, tmp_path, flavour.soup.TaskArithmeticBlend(ratio=0.5), extra=[checkpoints],
        enable_checkpointing=True, max_epochs=1, **strategy())
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    in_checkpoint = torch.load(ckpt, weights_only=True)["state_dict"]
    # Another dirpath: another state key, so the checkpoint holds no state for this callback.
    blend = flavour.soup.TaskArithmeticBlend(ratio=0.5, dirpath=str(tmp_path / "other"))
    with pytest.warns(UserWarning, match="holds no state of this callback"):
        run = fit(flavour, tmp_path, blend, model=make_model(pl, seed=7), ckpt_path=str(ckpt), max_epochs=2,
                  **strategy())
    assert_state_close(load_file(tmp_path / "other" / "anchor.safetensors"), in_checkpoint, rtol=0, atol=0)
    assert_state_close(clone_state(run.model), reference_blend(in_checkpoint, run.theta, 0.5))
    assert not (tmp_path / "other" / "anchor.pending.safetensors").exists()


def test_resume_without_the_initial_anchor_file_fails_naming_it(flavour: SimpleNamespace, tmp_path: Path) -> None:
    pl = flavour.pl
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(flavour, tmp_path, flavour.soup.TaskArithmeticBlend(ratio=0.5), extra=[checkpoints],
        enable_checkpointing=True, max_epochs=1)
    (tmp_path / "soup" / "anchor.safetensors").unlink()
    resumed = make_model(pl, seed=7)
    with pytest.raises(SoupError, match="anchor.safetensors"):
        fit(flavour, tmp_path, flavour.soup.TaskArithmeticBlend(ratio=0.5), model=resumed,
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=3)
    assert resumed.training_steps == 0


def test_state_is_plain_and_loads_with_weights_only(flavour: SimpleNamespace, tmp_path: Path) -> None:
    blend = flavour.soup.TaskArithmeticBlend(ratio=[0.0, 1.0], monitor="val/acc")
    fit(flavour, tmp_path, blend, max_epochs=1)
    torch.save(blend.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["anchor_saved"] is True and state["result"]["ratio"] in (0.0, 1.0)
    other = flavour.soup.TaskArithmeticBlend(ratio=[0.0, 1.0], monitor="val/acc")
    other.load_state_dict(state)
    assert other.state_dict() == blend.state_dict()


# ------------------------------------------------------------------------------------------------ with producers


@pytest.mark.parametrize("blend_first", [True, False])
@pytest.mark.parametrize("producer", ["CheckpointAveraging", "GreedySoup"])
def test_blends_the_producer_result_whatever_the_order(
    flavour: SimpleNamespace, tmp_path: Path, producer: str, blend_first: bool
) -> None:
    if producer == "CheckpointAveraging":
        made = flavour.soup.CheckpointAveraging(window=3)
        produced = "average.safetensors"
    else:
        made = flavour.soup.GreedySoup(monitor="val/acc")
        produced = "soup.safetensors"
    blend = flavour.soup.TaskArithmeticBlend(ratio=0.5)
    model = make_model(flavour.pl)
    initial = clone_state(model)
    pl = flavour.pl
    capture = capture_class(pl)()
    callbacks = [capture, blend, made] if blend_first else [capture, made, blend]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4), callbacks=callbacks)
    trainer.fit(model)
    result = load_file(tmp_path / "soup" / produced)
    if producer == "CheckpointAveraging":  # a real average, not the last weights
        assert not torch.equal(result["net.0.weight"], capture.at_train_end["net.0.weight"])
    assert_state_close(clone_state(model), reference_blend(initial, result, 0.5))
    assert_state_close(load_file(tmp_path / "soup" / "final.safetensors"), capture.at_train_end, rtol=0, atol=0)


@pytest.mark.gpu
def test_sweep_on_cuda(flavour: SimpleNamespace, tmp_path: Path) -> None:
    layer_ratios = {"net.3.*": 1.0}
    blend = flavour.soup.TaskArithmeticBlend(ratio=[0.0, 0.5, 1.0], monitor="val/acc", layer_ratios=layer_ratios)
    run = fit(flavour, tmp_path, blend, accelerator="gpu", devices=1, deterministic=False)
    assert run.theta is not None and run.theta["net.0.weight"].is_cuda
    ratio = report(tmp_path / "soup")["ratio"]
    assert_state_close(clone_state(run.model), reference_blend(run.before, run.theta, ratio, layer_ratios))
    assert_state_close(load_file(tmp_path / "soup" / "blended.safetensors"), clone_state(run.model), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ DDP

_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import pytorch_lightning as pl
    sys.path.insert(0, sys.argv[2])
    from lightning_soup import TaskArithmeticBlend
    from tests._models import make_model, trainer_kwargs

    out = sys.argv[1]
    model = make_model(pl, seed=0)
    blend = TaskArithmeticBlend(ratio=[0.0, 0.5, 1.0], monitor="val/loss", mode="min", dirpath=out + "/soup")
    trainer = pl.Trainer(**trainer_kwargs(out, strategy="ddp", devices=2, max_epochs=2), callbacks=[blend])
    trainer.fit(model)
    rank = trainer.global_rank
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"ratio": blend.result["ratio"], "scores": [c["score"] for c in blend.result["candidates"]]}, f)
    """
)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_two_cpu_processes_agree(tmp_path: Path, free_port: int) -> None:
    script = tmp_path / "ddp_blend.py"
    script.write_text(_DDP_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port), "PYTHONPATH": str(root)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(root)], env=env, capture_output=True, text=True, timeout=220
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]
    ratio = results[0]["ratio"]
    scores = results[0]["scores"]
    assert ratio == [0.0, 0.5, 1.0][min(range(3), key=lambda i: (scores[i], i))]
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_state_close(weights[0], weights[1], rtol=0, atol=0)
    soup = tmp_path / "soup"
    expected = reference_blend(load_file(soup / "anchor.safetensors"), load_file(soup / "final.safetensors"), ratio)
    assert_state_close(weights[0], expected)
    assert_state_close(load_file(soup / "blended.safetensors"), weights[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the example


@pytest.mark.slow
def test_alignment_tax_example_runs(tmp_path: Path) -> None:
    import runpy

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "alignment_tax.py"))
    rows = example["main"](["--out", str(tmp_path), "--epochs", "2"])
    base, finetuned, blended = rows.values()
    result = report(tmp_path / "soup")
    assert (tmp_path / "soup" / "blend.png").exists()
    assert blended["a"] >= float(result["constraint"][0].split(">=")[1]) or result["fallback"]
    assert finetuned["a"] < base["a"] and finetuned["b"] > base["b"]  # fine-tuning on B really cost task A
