"""The examples run end to end on reduced sizes, and every number they print is computed from the files written.

The digits demo's table is checked against accuracies recomputed here with an independent float64 forward pass
over each ``.safetensors`` file the callbacks wrote, on the test split; the blend file is checked against
``base + r·(soup − base)`` in float64. The LM example and the LightningCLI config get smoke runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the folder is not a package) once per session."""
    module_name = f"_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The examples use one intra-op thread (tiny models); restore the suite's setting afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--quick`` run of the digits demo: its JSON, its folder and the module."""
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("forgetting_digits")
    demo = load_example("forgetting_digits")
    try:
        returned = demo.main(["--quick", "--out", str(out), "--json", str(out / "table.json"), "--no-progress"])
    finally:
        torch.set_num_threads(before)
    table = json.loads((out / "table.json").read_text())
    return {"out": out, "table": table, "returned": returned, "demo": demo}


# ---------------------------------------------------------------------------------------- independent references
def mlp_logits_float64(state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The digits MLP in eval mode, written out by hand in float64: Linear → BatchNorm → ReLU, twice, → Linear."""
    s = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    h = x.double()
    for linear, norm in (("net.0", "net.1"), ("net.3", "net.4")):
        h = h @ s[f"{linear}.weight"].T + s[f"{linear}.bias"]
        h = (h - s[f"{norm}.running_mean"]) / torch.sqrt(s[f"{norm}.running_var"] + 1e-5)
        h = torch.relu(h * s[f"{norm}.weight"] + s[f"{norm}.bias"])
    return h @ s["net.6.weight"].T + s["net.6.bias"]


def accuracies(state: Mapping[str, torch.Tensor], splits: Mapping[str, Any]) -> dict[str, float]:
    right, total = {}, {}
    for task in ("old", "new"):
        x, y = splits[f"{task}_test"].tensors
        right[task] = int((mlp_logits_float64(state, x).argmax(1) == y).sum())
        total[task] = len(y)
    return {
        "old_acc": right["old"] / total["old"],
        "new_acc": right["new"] / total["new"],
        "all_acc": (right["old"] + right["new"]) / (total["old"] + total["new"]),
    }


# ----------------------------------------------------------------------------------------------------- digits demo
@pytest.mark.slow
def test_digits_table_structure(digits_run: dict[str, Any]) -> None:
    table = digits_run["table"]
    assert table == json.loads(json.dumps(digits_run["returned"]))  # --json writes what main returns
    assert [row["method"] for row in table["rows"]] == ["base", "last", "best", "average", "soup", "blended"]
    for row in table["rows"]:
        for column in ("old_acc", "new_acc", "all_acc"):
            assert isinstance(row[column], float) and 0.0 <= row[column] <= 1.0, (row["method"], column)
        assert (digits_run["out"] / row["file"]).is_file()
    assert len(table["verdicts"]) == 4
    assert all(" vs " in line and "McNemar p=" in line for line in table["verdicts"])
    assert (digits_run["out"] / "blend.png").stat().st_size > 0


@pytest.mark.slow
def test_digits_numbers_are_recomputed_from_the_files(digits_run: dict[str, Any]) -> None:
    """Every row equals the accuracy of its own file on the test split, recomputed here in float64."""
    out, table, demo = digits_run["out"], digits_run["table"], digits_run["demo"]
    splits = demo.load_splits(table["seed"])
    assert table["n_test"] == {"old": len(splits["old_test"]), "new": len(splits["new_test"])}
    expected_files = {
        "base": "base.safetensors",
        "last": "final.safetensors",
        "best": "best.safetensors",
        "average": "average.safetensors",
        "soup": "soup.safetensors",
        "blended": "blended.safetensors",
    }
    for row in table["rows"]:
        assert row["file"] == expected_files[row["method"]]
        reference = accuracies(load_file(str(out / row["file"])), splits)
        for column, value in reference.items():
            assert row[column] == pytest.approx(value, abs=1e-9), (row["method"], column)


@pytest.mark.slow
def test_digits_story_holds(digits_run: dict[str, Any]) -> None:
    """What the demo claims: the fine-tune forgets the old digits, the blend is base + r·(soup − base)."""
    out, rows = digits_run["out"], {r["method"]: r for r in digits_run["table"]["rows"]}
    assert rows["base"]["old_acc"] >= 0.9 and rows["base"]["new_acc"] == 0.0  # learned 0–4, never saw 5–9
    assert rows["last"]["new_acc"] > 0.8 and rows["last"]["old_acc"] < 0.2  # forgetting
    base, soup, blended = (load_file(str(out / f"{name}.safetensors")) for name in ("base", "soup", "blended"))
    ratio = json.loads((out / "blend.json").read_text())["ratio"]
    assert f"base + {ratio:g}·(soup − base)" in rows["blended"]["detail"]
    for key, value in blended.items():
        if value.is_floating_point():
            expected = base[key].double() + ratio * (soup[key].double() - base[key].double())
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-6)
        else:  # integer buffers (BatchNorm's num_batches_tracked) come from the trained weights, not the anchor
            assert torch.equal(value, soup[key])
    constraint = digits_run["table"]["constraint"]
    threshold = float(constraint.split(">=")[1])
    assert constraint.startswith("val/old_acc>=") and 0.5 < threshold < 1.0  # derived from the base, not fixed


@pytest.mark.parametrize(
    ("gained", "lost"), [(0, 0), (1, 0), (2, 0), (5, 1), (3, 3), (10, 2), (40, 22), (0, 9), (220, 146)]
)
def test_mcnemar_p_matches_a_binomial_test(gained: int, lost: int) -> None:
    """The verdicts' exact McNemar p-value equals an exact two-sided binomial test on the discordant images."""
    demo = load_example("forgetting_digits")
    n = gained + lost
    if n == 0:
        assert demo.mcnemar_p(0, 0) == 1.0
        return
    k = min(gained, lost)
    # Two-sided exact binomial(n, 1/2): the probability of outcomes at most as likely as the observed one.
    probability = [math.comb(n, i) / 2**n for i in range(n + 1)]
    expected = min(1.0, math.fsum(p for p in probability if p <= probability[k] * (1 + 1e-12)))
    assert demo.mcnemar_p(gained, lost) == pytest.approx(expected, rel=1e-9)
    assert demo.mcnemar_p(lost, gained) == demo.mcnemar_p(gained, lost)


def test_digits_verdict_words() -> None:
    """A verdict says helps/hurts only for a significant difference, and reports the raw counts."""
    demo = load_example("forgetting_digits")
    ones = {"old": torch.ones(100, dtype=torch.bool), "new": torch.ones(100, dtype=torch.bool)}
    fewer = {"old": ones["old"], "new": torch.arange(100) >= 20}  # 20 new-digit images lost
    one_less = {"old": ones["old"], "new": torch.arange(100) >= 1}
    assert "helps on new digits (test images +20/−0, McNemar p=1.9e-06)" in demo.verdict("a", ones, "b", fewer, "new")
    assert "hurts on new digits (test images +0/−20" in demo.verdict("b", fewer, "a", ones, "new")
    assert "no significant difference" in demo.verdict("a", ones, "b", one_less, "new")


def test_digits_trade_off_line() -> None:
    demo = load_example("forgetting_digits")
    rows = {
        "base": {"old_acc": 0.98, "new_acc": 0.0},
        "soup": {"old_acc": 0.0, "new_acc": 0.96},
        "blended": {"old_acc": 0.735, "new_acc": 0.24},
    }
    assert demo.trade_off(rows) == (
        "recovers 75% of the soup's old-digit forgetting and keeps 25% of its new-digit gain"
    )
    rows["soup"]["old_acc"] = 0.99  # nothing forgotten: no ratio to report
    assert "n/a (nothing forgotten)" in demo.trade_off(rows)


@pytest.mark.slow
def test_digits_demo_is_deterministic(digits_run: dict[str, Any], tmp_path: Path) -> None:
    demo = digits_run["demo"]
    before = torch.get_num_threads()
    try:
        again = demo.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(before)
    def numbers(table: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return [(r["method"], r["old_acc"], r["new_acc"], r["all_acc"]) for r in table["rows"]]

    assert numbers(again) == numbers(digits_run["table"])


# ---------------------------------------------------------------------------------------------------- LM example
@pytest.mark.slow
def test_lm_example_quick(tmp_path: Path, one_thread: None) -> None:
    lm = load_example("forgetting_lm")
    argv = ["--quick", "--out", str(tmp_path), "--json", str(tmp_path / "t.json"), "--no-progress", "--threads", "1"]
    result = lm.main(argv)
    assert [row["method"] for row in result["rows"]] == ["base", "last", "best", "average", "soup", "blended"]
    for row in result["rows"]:
        for column in ("old_loss", "new_loss", "mean_loss"):
            assert math.isfinite(row[column]) and 0.0 < row[column] < math.log(256) + 1, (row["method"], column)
        assert (tmp_path / row["file"]).is_file()
    # The constraint is derived from the base's English validation loss (no worse than the base, rounded up).
    threshold = float(result["constraint"].removeprefix("val/old_loss<="))
    assert result["constraint"].startswith("val/old_loss<=")
    assert result["base_val_old_loss"] <= threshold <= result["base_val_old_loss"] + 1e-4
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert len(result["verdicts"]) == 4


def test_lm_verdict_words() -> None:
    """Paired per-window differences: a consistent drop in loss helps, identical losses are no difference."""
    lm = load_example("forgetting_lm")
    ramp = torch.linspace(1.0, 2.0, 64, dtype=torch.float64)
    ref = {"old": ramp + 0.5, "new": ramp}
    noise = 0.01 * torch.sin(torch.arange(64, dtype=torch.float64))
    better = {"old": ref["old"], "new": ref["new"] - 0.05 + noise}
    assert lm.verdict("a", better, "b", ref, "new").startswith("a vs b: helps on Python (Δloss -0.0500")
    assert lm.verdict("b", ref, "a", better, "new").startswith("b vs a: hurts on Python")
    assert "no significant difference" in lm.verdict("a", ref, "b", ref, "both")
    tiny = {"old": ref["old"], "new": ref["new"] + noise}  # zero-mean differences
    assert "no significant difference" in lm.verdict("a", tiny, "b", ref, "new")


def test_lm_data_splits_are_disjoint_and_cover_the_texts() -> None:
    """Every document is split 80/10/10, so no test character is in the train or val text of its document."""
    lm = load_example("forgetting_lm")
    docs = ["a" * 100, "b" * 50 + "c" * 50]
    splits = lm.split_documents(docs)
    assert bytes(splits["train"].tolist()) == b"a" * 80 + b"\n\n" + b"b" * 50 + b"c" * 30
    assert bytes(splits["val"].tolist()) == b"a" * 10 + b"\n\n" + b"c" * 10
    assert bytes(splits["test"].tolist()) == b"a" * 10 + b"\n\n" + b"c" * 10
    texts = lm.load_texts()
    assert set(texts) == {f"{t}_{s}" for t in ("old", "new") for s in ("train", "val", "test")}
    assert all(len(v) > 10_000 for v in texts.values())


# ---------------------------------------------------------------------------------------------- LightningCLI config
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jsonargparse deprecations inside LightningCLI
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # pytorch_lightning vs torch 2.13's pytree
def test_lightning_cli_config(tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lightning_cli.py fit --config examples/config.yaml` builds the three callbacks from YAML and runs them."""
    import lightning_soup

    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["lightning_cli.py"])  # the arguments come from `args`, not pytest's argv
    cli = load_example("lightning_cli").main(
        [
            "fit",
            "--config", str(EXAMPLES / "config.yaml"),
            "--pretrain_epochs=2",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )  # fmt: skip
    kinds = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert isinstance(kinds["CheckpointAveraging"], lightning_soup.CheckpointAveraging)
    assert isinstance(kinds["GreedySoup"], lightning_soup.GreedySoup)
    blend = kinds["TaskArithmeticBlend"]
    assert isinstance(blend, lightning_soup.TaskArithmeticBlend)
    assert blend.monitor == "val/new_acc" and len(blend.ratios) == 11 and [str(b) for b in blend.constraint] == [
        "val/old_acc>=0.85"
    ]
    soup = tmp_path / "soup"
    for name in ("average.safetensors", "soup.safetensors", "soup.json", "blended.safetensors", "blend.json"):
        assert (soup / name).is_file(), name
    # The model ends with the blend, and the blend's anchor is the pretrained model (it knows the old digits).
    blended = load_file(str(soup / "blended.safetensors"))
    for key, value in cli.model.state_dict().items():
        assert torch.equal(value.cpu(), blended[key]), key
    report = json.loads((soup / "blend.json").read_text())
    assert report["candidates"][0]["metrics"]["val/old_acc"] > 0.8


# ------------------------------------------------------------------------------------ compose_skills / sweep_soup
README = Path(__file__).resolve().parents[1] / "README.md"


def page_float64(x: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
    """8×8 digits → 16×16 pages (flattened, float64) with the digit's top-left corner at ``offset``, written by
    index assignment (the examples pad)."""
    pages = torch.zeros(len(x), 16, 16, dtype=torch.float64)
    row, col = offset
    pages[:, row : row + 8, col : col + 8] = x.double()
    return pages.reshape(len(x), 256)


def page_mlp_probs_float64(state: Mapping[str, torch.Tensor], pages: torch.Tensor) -> torch.Tensor:
    """The examples' 256 → h → h → 10 ReLU MLP written out in float64, softmax over the logits."""
    s = {k: v.double() for k, v in state.items()}
    h = torch.relu(pages @ s["net.0.weight"].T + s["net.0.bias"])
    h = torch.relu(h @ s["net.2.weight"].T + s["net.2.bias"])
    return (h @ s["net.4.weight"].T + s["net.4.bias"]).softmax(1)


def right_float64(states: list[Mapping[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor, offset: tuple[int, int]):
    """Per image, whether the model (several: the mean of their softmax) is right, in float64."""
    pages = page_float64(x, offset)
    return torch.stack([page_mlp_probs_float64(s, pages) for s in states]).mean(0).argmax(1) == y


OFFSETS = {"clean": (4, 4), "a": (2, 6), "b": (6, 2)}


def readme_table(heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after the README line that starts with ``heading``."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    assert len(table) > 2, f"no table after {heading!r} in README.md"
    return [row for row in table[2:]]  # without the header and the |---| line


@pytest.fixture(scope="module")
def compose_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full run of `make demo` (examples/compose_skills.py, default settings): its JSON, folder and module.

    The script runs in its own interpreter, as `make demo` runs it: in this test process, earlier tests leave BLAS
    and OpenMP thread pools behind that change the last bits of an SVD, which Iso-CTS amplifies into another choice.
    """
    out = tmp_path_factory.mktemp("compose_skills")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "compose_skills.py"), "--out", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    demo = load_example("compose_skills")
    rows = {r["approach"]: r for r in result["rows"]}
    return {"out": out, "result": result, "rows": rows, "demo": demo, "splits": demo.load_digits_split(0)}


@pytest.mark.slow
def test_compose_readme_table_is_what_make_demo_prints(compose_run: dict[str, Any]) -> None:
    """`make demo` on this checkout reproduces the README's table cell for cell (the run is deterministic)."""
    markdown = compose_run["result"]["markdown"]
    printed = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()]
    assert readme_table("## The demo") == printed[2:]


@pytest.mark.slow
def test_compose_numbers_are_recomputed_from_the_files(compose_run: dict[str, Any]) -> None:
    """Every accuracy in the table is the test accuracy of its own weights, recomputed here in float64."""
    out, rows, splits = compose_run["out"], compose_run["rows"], compose_run["splits"]
    names = ["base", "skill A", "skill B", "sequential A→B", "sequential, blended", "ensemble A+B", "multi-task",
             "task arithmetic", "TIES"]  # fmt: skip
    assert list(rows)[: len(names)] == names and list(rows)[-1].endswith(", blended toward base")
    x, y = splits["test"]
    for name, row in rows.items():
        paths = row["files"]
        states = [load_file(str(out / p)) for p in paths]
        for domain, offset in OFFSETS.items():
            expected = int(right_float64(states, x, y, offset).sum()) / len(y)
            assert row[f"{domain}_acc"] == pytest.approx(expected, abs=1e-12), (name, domain)
        assert row["cost"] == len(paths)


@pytest.mark.slow
def test_compose_story_base_learns_and_each_fine_tune_learns_its_own_skill(compose_run: dict[str, Any]) -> None:
    rows = compose_run["rows"]
    assert rows["base"]["clean_acc"] >= 0.9  # the base learned its task before anything was merged
    assert rows["base"]["a_acc"] < 0.3 and rows["base"]["b_acc"] < 0.3  # and is bad at both skills
    assert rows["skill A"]["a_acc"] >= 0.9 and rows["skill A"]["b_acc"] < 0.3
    assert rows["skill B"]["b_acc"] >= 0.9 and rows["skill B"]["a_acc"] < 0.3


@pytest.mark.slow
def test_compose_sequential_fine_tuning_forgets_skill_a(compose_run: dict[str, Any]) -> None:
    """A then B loses at least 10 points of skill A, and the loss is significant on the paired test images."""
    rows, out, splits = compose_run["rows"], compose_run["out"], compose_run["splits"]
    assert rows["sequential A→B"]["b_acc"] >= 0.9  # it learned B...
    assert rows["sequential A→B"]["a_acc"] <= rows["skill A"]["a_acc"] - 0.10  # ...and forgot A
    x, y = splits["test"]
    before = right_float64([load_file(str(out / "skill_a.safetensors"))], x, y, OFFSETS["a"])
    after = right_float64([load_file(str(out / "sequential/final.safetensors"))], x, y, OFFSETS["a"])
    lost, gained = int((before & ~after).sum()), int((~before & after).sum())
    assert scipy_binom_p(gained, lost) < 1e-3 and lost > gained


def scipy_binom_p(gained: int, lost: int) -> float:
    from scipy.stats import binomtest

    return binomtest(gained, gained + lost, 0.5).pvalue


@pytest.mark.slow
def test_compose_chosen_merge_satisfies_its_constraint_on_validation(compose_run: dict[str, Any]) -> None:
    """Each compose picked the best mean among the candidates meeting the constraint, and the chosen weights
    (recomputed here on the validation split) meet it; the best merge meets it and beats sequential on test."""
    out, result, splits = compose_run["out"], compose_run["result"], compose_run["splits"]
    floors = dict(part.strip().split(">=") for part in result["constraint"].split(","))
    x, y = splits["val"]
    met_any = False
    for method in result["methods"]:
        recipe = json.loads((out / f"compose_{method}" / "compose.json").read_text())
        assert recipe["constraint"] == [f"{k}>={v}" for k, v in floors.items()]
        meeting = [c for c in recipe["candidates"] if c["meets_constraint"]]
        if not meeting:
            assert recipe["constraint_met"] is False
            continue
        met_any = True
        chosen = recipe["candidates"][recipe["index"]]
        assert chosen["meets_constraint"] and chosen["score"] == max(c["score"] for c in meeting)
        merged = load_file(str(out / f"compose_{method}" / "merged.safetensors"))
        acc = {d: int(right_float64([merged], x, y, OFFSETS[d]).sum()) / len(y) for d in ("a", "b")}
        for domain in ("a", "b"):
            assert acc[domain] >= float(floors[f"val/{domain}_acc"]), (method, domain)
            assert acc[domain] == pytest.approx(chosen["metrics"][f"val/{domain}_acc"], abs=1e-6)
    assert met_any
    # The blend toward the base keeps the base task on validation, and is base + r·(merge − base).
    toward = result["toward_base"]
    blended = load_file(str(out / "merge_toward_base.safetensors"))
    assert toward["met"] and int(right_float64([blended], x, y, OFFSETS["clean"]).sum()) / len(y) >= toward["floor"]
    source = compose_run["rows"][toward["from"]]["files"][0]
    base, merged = load_file(str(out / "base.safetensors")), load_file(str(out / source))
    for key, value in blended.items():
        expected = base[key].double() + toward["ratio"] * (merged[key].double() - base[key].double())
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-6)
    rows = compose_run["rows"]
    best = max((r for r in rows.values() if r["kind"] == "merge"), key=lambda r: r["val_mean_acc"])
    assert "constraint NOT met" not in best["detail"]
    assert best["mean_acc"] > rows["sequential A→B"]["mean_acc"]
    assert best["vs_reference"]["verdict"] == "better"


@pytest.mark.slow
def test_compose_task_arithmetic_file_is_base_plus_scaled_task_vectors(compose_run: dict[str, Any]) -> None:
    out = compose_run["out"]
    recipe = json.loads((out / "compose_task_arithmetic" / "compose.json").read_text())
    scales = recipe["scales"]
    base, a, b = (load_file(str(out / f)) for f in ("base.safetensors", "skill_a.safetensors", "skill_b.safetensors"))
    merged = load_file(str(out / "compose_task_arithmetic" / "merged.safetensors"))
    for key, value in merged.items():
        expected = base[key].double() + scales[0] * (a[key].double() - base[key].double()) + scales[1] * (
            b[key].double() - base[key].double()
        )
        torch.testing.assert_close(value.double(), expected, atol=1e-5, rtol=1e-5)


def test_skills_pages_and_mcnemar() -> None:
    """The digit lands where its domain says; the McNemar p-value is the exact binomial test on discordant pairs."""
    skills = load_example("_skills")
    x = torch.rand(3, 8, 8)
    for domain, offset in OFFSETS.items():
        assert torch.equal(skills.place(x, domain).double(), page_float64(x, offset))
    for gained, lost in ((0, 0), (3, 0), (5, 1), (40, 22), (0, 9)):
        n = gained + lost
        probability = [math.comb(n, i) / 2**n for i in range(n + 1)]
        k = min(gained, lost)
        expected = min(1.0, math.fsum(p for p in probability if p <= probability[k] * (1 + 1e-12))) if n else 1.0
        assert skills.mcnemar_p(gained, lost) == pytest.approx(expected, rel=1e-9)


def test_compose_pareto_front() -> None:
    demo = load_example("compose_skills")
    points = [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.6, 0.6)]
    assert demo.pareto(points) == [1, 5, 0, 4]  # (0.4, 0.4) and (0.5, 0.5) are beaten by (0.6, 0.6); ties kept


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    out = tmp_path_factory.mktemp("sweep_soup")
    sweep = load_example("sweep_soup")
    try:
        result = sweep.main(["--out", str(out)])
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
    return {"out": out, "result": result, "rows": {r["approach"]: r for r in result["rows"]}, "sweep": sweep}


@pytest.mark.slow
def test_sweep_greedy_soup_is_never_worse_than_the_best_single_on_validation(sweep_run: dict[str, Any]) -> None:
    """The greedy soup's file is the mean of the runs it accepted, and its validation accuracy (recomputed here
    in float64) is at least the best single run's; the README's sweep table is what the example prints."""
    out, result = sweep_run["out"], sweep_run["result"]
    assert len(result["val_scores"]) >= 8
    splits = load_example("_skills").load_digits_split(0)
    x, y = splits["val"]
    recipe = json.loads((out / "greedy" / "soup.json").read_text())
    accepted = [load_file(c["path"]) for c in recipe["checkpoints"] if c["accepted"]]
    soup = load_file(str(out / "greedy" / "soup.safetensors"))
    for key, value in soup.items():
        expected = torch.stack([s[key].double() for s in accepted]).mean(0)
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-6)
    best = load_file(str(out / "sweep" / f"{result['best']}.safetensors"))
    soup_acc = int(right_float64([soup], x, y, OFFSETS["a"]).sum()) / len(y)
    best_acc = int(right_float64([best], x, y, OFFSETS["a"]).sum()) / len(y)
    assert soup_acc >= best_acc
    assert max(result["val_scores"].values()) == pytest.approx(best_acc, abs=1e-6)  # the reference is the best
    printed = [[c.strip() for c in line.strip("|").split("|")] for line in result["markdown"].splitlines()]
    assert readme_table("### A hyperparameter sweep") == printed[2:]


def test_compose_demo_stops_when_the_base_did_not_learn(tmp_path: Path) -> None:
    """An untrained base (0 epochs) stops the demo before any fine-tune or merge, with a message saying why."""
    demo = load_example("compose_skills")
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with pytest.raises(SystemExit, match=r"STOP: the base's accuracy on its own test split .* below the 0\.90"):
            demo.main(["--out", str(tmp_path), "--base-epochs", "0"])
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]  # nothing fine-tuned or merged


@pytest.mark.parametrize(("value", "stops"), [(0.95, False), (0.9, False), (0.89, True), (float("nan"), True)])
def test_examples_require_a_learned_base(value: float, stops: bool) -> None:
    common = load_example("_common")
    if stops:
        with pytest.raises(SystemExit, match="STOP: the base's accuracy is"):
            common.require_learned("the base's accuracy", value, 0.9, "Train longer.")
        with pytest.raises(SystemExit, match="STOP: the base's loss is"):
            common.require_learned("the base's loss", 2 - value if value == value else value, 1.1, "Train longer.",
                                   higher_is_better=False)  # fmt: skip
    else:
        common.require_learned("the base's accuracy", value, 0.9, "Train longer.")
        common.require_learned("the base's loss", 2 - value, 1.1, "Train longer.", higher_is_better=False)
