"""What ``lightning_soup.soup`` (greedy) costs over K finished checkpoints, against its floor: 2K − 1 validations.

A greedy soup over K checkpoints must validate each checkpoint alone (K passes) and K − 1 candidates; it also reads
every checkpoint twice, averages and writes the soup. The floor is 2K − 1 plain ``trainer.validate`` passes of the
same model, in the same process, on the same trainer; anything above it is overhead (reading, arithmetic, copies
into the module, writing). Each K runs in a fresh child process so that memory figures are not hidden by an
allocator that kept what an earlier K freed.

Reported per K (``runs[K]``):

* ``soup_s``: wall time of ``soup(trainer, model, checkpoints, monitor="val/loss", mode="min")`` (median of
  ``--repeats``, alternating with the floor's measurement so machine load hits both alike);
  ``validate_s``: 2K − 1 plain ``trainer.validate`` passes; ``ratio = soup_s / validate_s`` (goal: ≤ 1.10).
* ``peak_extra_mb``: the peak of the process's anonymous memory (``RssAnon``, sampled every millisecond) during the
  first soup, untimed (the sampler costs CPU), above what it held right before (model, trainer, data);
  ``checkpoint_mb``: one checkpoint's size. Flat in K is the goal: one float32 running mean or sum (candidates are
  built in the module's own tensors), one checkpoint being read, a host copy of the module's original weights,
  whatever K. On CUDA also ``cuda_peak_extra_mb``
  (``max_memory_allocated`` above the start).

``peak_extra_mb_growth``: the largest K's ``peak_extra_mb`` over the smallest K's (1.0 = flat).

Usage::

    python benchmarks/bench_posthoc.py --json bench_posthoc.json
    python benchmarks/bench_posthoc.py --device cuda --width 4096
    python benchmarks/bench_posthoc.py --quick            # smoke run, numbers not for quoting
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _common import PeakRssAnon, status_kb  # noqa: E402  (this folder: sys.path[0] when run as a script)


def child(args: argparse.Namespace, k: int) -> dict[str, Any]:
    """One K, in this (fresh) process: write K checkpoints, then time and measure soup() against the floor."""
    import pytorch_lightning as pl
    import torch
    from bench_greedy_soup import make_module

    import lightning_soup as ls
    from lightning_soup import storage

    if args.threads:
        torch.set_num_threads(args.threads)
    pid = os.getpid()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_module(args.width, args.depth, 64, args.n_val, args.batch_size)
        base = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(0)
        paths = []
        for i in range(k):
            sd = {
                key: v + 0.01 * (1 + i % 3) * torch.randn(v.shape, generator=g)
                if v.is_floating_point() and "running" not in key else v.clone()
                for key, v in base.items()
            }
            paths.append(str(storage.save_state_dict(sd, folder / f"ft{i}.safetensors")))
        checkpoint_mb = os.path.getsize(paths[0]) / 2**20
        del base, sd
        trainer = pl.Trainer(
            accelerator=args.device, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp,
        )
        trainer.validate(model, verbose=False)  # warm-up: dataloaders, kernels
        cuda = args.device.startswith("cuda")
        soup_s, validate_s, peaks, cuda_peaks = [], [], [], []
        def run_soup() -> Any:
            result = ls.soup(trainer, model, paths, monitor="val/loss", mode="min", dirpath=str(folder / "out"))
            if cuda:
                torch.cuda.synchronize()
            return result

        # Memory in a soup of its own, the first (what it allocates is not yet held by the allocator from an earlier
        # soup), untimed: the sampler, a thread reading /proc every millisecond, would slow a timed soup, which the
        # floor's validations would not pay.
        before = status_kb(pid, "RssAnon") or 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            cuda_before = torch.cuda.memory_allocated()
        with PeakRssAnon(pid) as peak:
            result = run_soup()
        peaks.append(max(0, peak.peak_kb - before) / 1024)
        if cuda:
            cuda_peaks.append((torch.cuda.max_memory_allocated() - cuda_before) / 2**20)
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(2 * k - 1):
                trainer.validate(model, verbose=False)
            validate_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = run_soup()
            soup_s.append(time.perf_counter() - start)
    out = {
        "k": k,
        "validations": 2 * k - 1,
        "soup_s": statistics.median(soup_s),
        "validate_s": statistics.median(validate_s),
        "ratio": statistics.median(soup_s) / statistics.median(validate_s),
        "soup_samples_s": soup_s,
        "validate_samples_s": validate_s,
        "peak_extra_mb": max(peaks),
        "checkpoint_mb": checkpoint_mb,
        "accepted": result.recipe["ingredients_used"],
    }
    if cuda_peaks:
        out["cuda_peak_extra_mb"] = max(cuda_peaks)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--n-val", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--ks", default="4,8,16", help="numbers of checkpoints, comma-separated")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="soup and floor measured alternately, medians")
    parser.add_argument("--quick", action="store_true", help="small sizes; a smoke run, numbers not for quoting")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.n_val, args.ks, args.repeats = 128, 2, 512, "3,6", 1
    if args.child is not None:
        Path(args.json).write_text(json.dumps(child(args, args.child)))
        return 0

    runs = {}
    for k in sorted({int(x) for x in args.ks.split(",")}):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            argv_child = list(argv if argv is not None else sys.argv[1:])
            argv_child = _without(argv_child, "--json") + ["--child", str(k), "--json", str(out)]
            proc = subprocess.run([sys.executable, __file__, *argv_child], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            runs[str(k)] = json.loads(out.read_text())
        r = runs[str(k)]
        print(f"K={k}: soup {r['soup_s']:.2f} s, {2 * k - 1} validations {r['validate_s']:.2f} s, "
              f"ratio {r['ratio']:.3f}, peak extra {r['peak_extra_mb']:.1f} MB", flush=True)
    ks = sorted(runs, key=int)
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
        "runs": runs,
        "ratio_at_largest_k": runs[ks[-1]]["ratio"],
        "peak_extra_mb_growth": runs[ks[-1]]["peak_extra_mb"] / max(runs[ks[0]]["peak_extra_mb"], 1e-9),
        "goal": "ratio <= 1.10; peak_extra_mb flat in K",
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _without(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag` and its value (either ``--flag v`` or ``--flag=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
