"""Peak memory of ``lightning-soup average`` (or ``tsv``) over large inputs: a few tensors, not a model.

Writes ``--inputs`` safetensors files of ``--size-mb`` each (float32 tensors of ``--tensor-mb``), runs the real CLI
(``python -m lightning_soup average ...``) in a subprocess, and measures that process from outside:

* peak ``RssAnon`` (anonymous memory: heap, tensors; not the page cache of the files), sampled every millisecond
  from ``/proc/<pid>/status``;
* peak RSS from ``getrusage`` (``wait4``'s ``ru_maxrss``), which also counts file-backed pages the process maps.
  Linux carries ``ru_maxrss`` across ``exec``, so this script never imports torch itself (the inputs are written by
  a child process): the parent stays far below what it measures.

Both are reported as absolute values and above a baseline: a process that imports everything the CLI imports for
a merge (torch, lightning_soup.merge, storage, rich) and does nothing else. Linux only.

glibc keeps freed blocks below its (dynamic, at most 32 MiB) mmap threshold for reuse, so part of the peak is
allocator retention rather than live tensors; ``--mmap-threshold 1048576`` runs the CLI with
``MALLOC_MMAP_THRESHOLD_`` fixed, which returns every tensor's memory at once and shows the live working set.

Usage:
    python benchmarks/bench_cli_memory.py                      # 3 inputs of 256 MB, 4 MB tensors
    python benchmarks/bench_cli_memory.py --size-mb 64 --json  # reduced (the slow test runs this)
    python benchmarks/bench_cli_memory.py --command tsv        # TSV-Merge: a base and 2 fine-tunes of 256 MB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PeakRssAnon  # this folder: sys.path[0] when run as a script (and in make_inputs' child)

BASELINE = (
    "import torch, rich.progress, lightning_soup.cli, lightning_soup.cli.merge, lightning_soup.merge, "
    "lightning_soup.storage; import time; time.sleep(0.2)"
)


def measure(argv: list[str], interval: float = 0.001, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``argv``; return its wall time, peak RssAnon (sampled) and peak RSS (getrusage), in MB."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    with PeakRssAnon(proc.pid, interval) as sampler:
        stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{stderr.decode()}")
    return {
        "seconds": wall,
        "peak_rss_anon_mb": sampler.peak_kb / 1024,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "stdout": stdout.decode().strip(),  # type: ignore[dict-item]
    }


def make_inputs(folder: Path, count: int, size_mb: float, tensor_mb: float) -> list[Path]:
    """Write the inputs from a child process, so that this one never holds them (or torch)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_cli_memory as b; " + (
        f"b._write_inputs({str(folder)!r}, {count}, {size_mb}, {tensor_mb})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return [folder / f"model{i}.safetensors" for i in range(count)]


def _write_inputs(folder: str, count: int, size_mb: float, tensor_mb: float) -> None:
    import torch
    from safetensors.torch import save_file

    cols = 1024
    rows = max(1, int(tensor_mb * 2**20 / 4 / cols))
    n = max(1, round(size_mb / tensor_mb))
    # model0 and, for i >= 1, fine-tunes of it (model0 + 1% noise): what `tsv --base model0 ...` expects to see
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        sd = {}
        for j in range(n):
            t = torch.randn(rows, cols, generator=torch.Generator().manual_seed(10_000 + j))
            if i:
                t.add_(torch.randn(rows, cols, generator=g), alpha=0.01)
            sd[f"layers.{j}.weight"] = t
        save_file(sd, Path(folder) / f"model{i}.safetensors")
        del sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--size-mb", type=float, default=256, help="size of each input (default: 256)")
    parser.add_argument("--tensor-mb", type=float, default=4, help="size of each tensor (default: 4)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the inputs (default: a temp dir)")
    parser.add_argument(
        "--command",
        choices=["average", "tsv"],
        default="average",
        help="average the inputs, or `tsv` with the first input as the base and the others as fine-tunes (SVDs of "
        "each tensor's task vectors: more working memory per tensor)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="run the CLI with MALLOC_MMAP_THRESHOLD_ set to this many bytes",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        paths = make_inputs(folder, args.inputs, args.size_mb, args.tensor_mb)
        input_mb = paths[0].stat().st_size / 2**20
        baseline = measure([sys.executable, "-c", BASELINE])
        out = folder / "soup.safetensors"
        inputs = [str(p) for p in paths] if args.command == "average" else ["--base", *map(str, paths)]
        cli = [sys.executable, "-m", "lightning_soup", args.command, *inputs, "-o", str(out), "--quiet"]
        env = None
        if args.mmap_threshold is not None:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
        run = measure(cli, env=env)
        output_ok = out.stat().st_size > 0 and run["stdout"].endswith(str(out))

    result = {
        "command": args.command,
        "inputs": args.inputs,
        "input_mb": input_mb,
        "tensor_mb": args.tensor_mb,
        "seconds": run["seconds"],
        "peak_rss_anon_mb": run["peak_rss_anon_mb"],
        "baseline_rss_anon_mb": baseline["peak_rss_anon_mb"],
        "extra_rss_anon_mb": run["peak_rss_anon_mb"] - baseline["peak_rss_anon_mb"],
        "peak_rss_mb": run["peak_rss_mb"],
        "baseline_rss_mb": baseline["peak_rss_mb"],
        "extra_rss_mb": run["peak_rss_mb"] - baseline["peak_rss_mb"],
        "output_ok": output_ok,
        "mmap_threshold": args.mmap_threshold,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    r = result
    malloc = "" if r["mmap_threshold"] is None else f", MALLOC_MMAP_THRESHOLD_={r['mmap_threshold']}"
    print(
        f"lightning-soup {r['command']}: {r['inputs']} inputs × {r['input_mb']:.0f} MB ({r['tensor_mb']:g} MB float32 "
        f"tensors{malloc})"
    )
    print(f"  wall time                       {r['seconds']:.2f} s")
    print(
        f"  peak RssAnon (sampled)          {r['peak_rss_anon_mb']:.0f} MB  = "
        f"baseline {r['baseline_rss_anon_mb']:.0f} MB "
        f"+ {r['extra_rss_anon_mb']:.0f} MB ({r['extra_rss_anon_mb'] / r['input_mb']:.2f} × one input)"
    )
    print(
        f"  peak RSS (getrusage ru_maxrss)  {r['peak_rss_mb']:.0f} MB  = baseline {r['baseline_rss_mb']:.0f} MB "
        f"+ {r['extra_rss_mb']:.0f} MB ({r['extra_rss_mb'] / r['input_mb']:.2f} × one input)"
    )


if __name__ == "__main__":
    main()
