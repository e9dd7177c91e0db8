"""benchmarks/bench_merge.py runs end to end on a tiny model and reports every operation against the floor."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_merge.py"


def test_bench_merge_smoke(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_merge", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--size-gb", "0.002", "--hidden", "64", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = [r["name"] for r in result["results"]]
    assert names[0].startswith("floor") and any("uniform_soup" in n for n in names)
    assert any("interpolate" in n for n in names) and any("task_arithmetic" in n for n in names)
    for row in result["results"]:
        assert row["seconds"] > 0 and row["gb_per_s"] > 0 and row["ratio_to_floor"] > 0
    assert "x floor" in capsys.readouterr().out
