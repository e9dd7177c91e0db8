"""Run every benchmark in this folder and write one results table.

Each ``bench_*.py`` script accepts ``--json OUT`` and writes its figures there; this script runs them one after
another (never in parallel: they time each other's memory bandwidth), then writes ``benchmarks/RESULTS.md`` with the
machine, the versions and every figure, and prints it.

    python benchmarks/run_all.py                      # everything, default sizes
    python benchmarks/run_all.py --quick              # reduced sizes (a smoke run, numbers not for quoting)
    python benchmarks/run_all.py --only merge averaging --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Extra arguments per benchmark for --quick runs (smaller sizes, fewer repeats).
QUICK_ARGS: dict[str, list[str]] = {
    "merge": ["--size-gb", "0.1", "--hidden", "512", "--repeats", "2"],
    "averaging": ["--quick"],
    "greedy_soup": ["--quick"],
    "posthoc": ["--quick"],
    "lora": ["--quick"],
    "cli_memory": ["--size-mb", "32"],
    "mergekit": ["--hidden", "256", "--layers", "2", "--vocab", "2000", "--repeat", "1"],
    "multitask": ["--quick"],
    "merge_svd": ["--quick"],
    "related": ["--steps", "30"],
}
# Second runs of a script with other arguments: name -> (script name, extra arguments).
VARIANTS: dict[str, tuple[str, list[str]]] = {"cli_memory_tsv": ("cli_memory", ["--command", "tsv"])}
# Benchmarks whose ``--json`` is a flag that prints the figures on stdout instead of writing a file.
JSON_ON_STDOUT = frozenset({"cli_memory", "mergekit"})
# Extra arguments per benchmark for full runs: one intra-op thread where timings are steadier that way on shared
# machines. (Not the averaging benchmark: it trains with torch's default threads, every core, so that its background
# writer competes with training for the cores as it would for a user.)
# The SVD timings at 0.25 GB (width 1024): the ratio to the SVDs a method needs does not depend on the size, and at
# 1 GB (width 2048) the SVDs alone take over half an hour on two cores (`bench_merge_svd.py --size-gb 1` for that).
DEFAULT_ARGS: dict[str, list[str]] = {
    "posthoc": ["--threads", "1"],
    "merge_svd": ["--size-gb", "0.25", "--hidden", "1024"],
}


def _last_json(text: str) -> Any:
    """The last top-level JSON object printed in ``text``."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 :] if start >= 0 else text[text.index("{") :])


def _machine() -> dict[str, str]:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
    }
    try:
        import pytorch_lightning

        info["pytorch_lightning"] = pytorch_lightning.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            label = v.get("name") or v.get("op") or v.get("case") or str(i)
            _flatten(f"{prefix}[{label}]", {k: x for k, x in v.items() if k not in ("name", "op", "case")}, out)
    elif isinstance(value, list) and len(value) > 6:
        return  # raw per-repeat samples: the summary figures beside them are what the table is for
    else:
        out[prefix] = value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(machine: dict[str, str], results: dict[str, Any]) -> str:
    """The markdown results table: one section per benchmark, one row per figure."""
    lines = ["# Benchmark results", "", "Written by `python benchmarks/run_all.py`.", ""]
    lines += ["| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in machine.items()] + [""]
    for name, data in results.items():
        lines += [f"## {name}", ""]
        if isinstance(data, dict) and "error" in data:
            lines += [f"failed: `{data['error']}`", ""]
            continue
        flat: dict[str, Any] = {}
        _flatten("", data, flat)
        lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in flat.items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes; a smoke run")
    parser.add_argument("--only", nargs="*", help="benchmark names (bench_NAME.py) to run")
    parser.add_argument("--device", default=None, help="passed to benchmarks that take --device")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown results file")
    args = parser.parse_args(argv)

    runs = [(s.stem.removeprefix("bench_"), s, []) for s in sorted(HERE.glob("bench_*.py"))]
    runs += [(name, HERE / f"bench_{script}.py", extra) for name, (script, extra) in VARIANTS.items()]
    names = [name for name, _, _ in runs]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
        runs = [r for r in runs if r[0] in args.only]

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, extra in runs:
            base_name = script.stem.removeprefix("bench_")
            out = Path(tmp) / f"{name}.json"
            stdout_json = base_name in JSON_ON_STDOUT
            cmd = [sys.executable, str(script), "--json"] + ([] if stdout_json else [str(out)])
            cmd += DEFAULT_ARGS.get(base_name, []) + extra
            if args.quick:
                cmd += QUICK_ARGS.get(base_name, [])
            if args.device and "--device" in script.read_text():
                cmd += ["--device", args.device]
            print(f"$ {' '.join(cmd)}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=HERE.parent, stdout=subprocess.PIPE if stdout_json else None, text=True)
            try:
                if proc.returncode != 0:
                    raise RuntimeError(f"exit code {proc.returncode}")
                results[name] = _last_json(proc.stdout) if stdout_json else json.loads(out.read_text())
            except (RuntimeError, ValueError, OSError) as e:
                results[name] = {"error": str(e)}
            print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)

    text = render(_machine(), results)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if all(not (isinstance(r, dict) and "error" in r) for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
