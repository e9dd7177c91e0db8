"""benchmarks/bench_multitask.py and bench_merge_svd.py run end to end at tiny sizes and report every method."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # bench_merge_svd imports bench_merge from its folder
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_bench_merge_svd_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("bench_merge_svd")
    out = tmp_path / "svd.json"
    result = bench.main(["--size-gb", "0.001", "--hidden", "64", "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == {"tsv_merge", "iso_c", "iso_cts", "model_stock"}
    for row in rows.values():
        assert row["seconds"] > 0 and row["floor_seconds"] > 0 and row["ratio_to_floor"] > 0
    assert rows["model_stock"]["floor"].startswith("bandwidth") and rows["tsv_merge"]["floor"].startswith("torch")
    assert "x floor" in capsys.readouterr().out


@pytest.mark.slow  # imports scikit-learn and trains 3 tiny models: ~10 s
def test_bench_multitask_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("bench_multitask")
    out = tmp_path / "multitask.json"
    argv = ["--tasks", "2", "--seeds", "1", "--width", "16", "--pretrain-steps", "20", "--probe-steps", "10"]
    result = bench.main([*argv, "--finetune-steps", "20", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = [r["name"] for r in result["results"]]
    assert names[:2] == ["pre-trained base", "fine-tuned (each its own task)"]
    assert set(names[2:]) == set(bench.METHODS)
    for row in result["results"]:
        assert 0 <= row["absolute"] <= 1 and len(row["per_task"]) == 2
        if row["name"] in ("task arithmetic", "TSV", "Iso-C", "Iso-CTS (f = 0.8)"):
            assert row["coefficients"][0] in bench.GRID
    fine_tuned = result["results"][1]
    assert fine_tuned["normalised"] == pytest.approx(1.0)
    assert "| method | avg. absolute acc. (%)" in capsys.readouterr().out
