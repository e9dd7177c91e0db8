"""Cost of the SVD merges (TSV, Iso-C, Iso-CTS) against the SVDs they need, and of Model Stock against bandwidth.

Builds a base of about ``--size-gb`` of float32 weights (the Llama-style tensors of ``bench_merge.py``) and
``--finetuned`` fine-tunes of it (base + 0.01·noise: full-rank task vectors, the worst case for an SVD), then
times, best of ``--repeats``, in the same run and round-robin so that machine noise hits them alike:

* each merge function on the whole state dicts (``tsv_merge``, ``iso_c``, ``iso_cts``, ``model_stock``);
* for each SVD method, only the ``torch.linalg.svd`` calls its formula needs, on the same matrices (the
  operands are built untimed between the calls):

  - TSV: the T task vectors of a weight (one batched call), then its concatenated U (m × Tk) and Vh (Tk × n);
  - Iso-C: the summed task vector;
  - Iso-CTS: the summed task vector, the T task vectors without their common part (batched), the concatenated
    U (m × r) and Vh (r × n);

* for Model Stock (no SVD), the bandwidth floor of ``bench_merge.py``: ``_foreach_add`` over the same tensors,
  scaled to the bytes it must touch (every input read once, one output written).

The ratio method / floor says what the method costs beyond the linear algebra it cannot avoid.

Example::

    python benchmarks/bench_merge_svd.py --size-gb 1 --repeats 2 --json bench_merge_svd.json
    python benchmarks/bench_merge_svd.py --quick     # 20 MB, width 256: a smoke run, numbers not for quoting
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_merge import layout, make_state_dict, sync  # this folder: sys.path[0] when run as a script
from torch import Tensor

from lightning_soup.merge import _stacked, iso_c, iso_cts, model_stock, tsv_merge
from lightning_soup.merge.iso_cts import subspace_sizes


class SvdClock:
    """The merges' SVD (``torch.linalg.svd``, retried in float64 where float32 fails to converge, as the methods do)
    with the time spent inside it (synchronised on accelerators) added to ``seconds``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sync(self.device)
        start = time.perf_counter()
        out = _stacked.svd(x)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def _concat(u: Tensor, s: Tensor, vh: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    t, m, _ = u.shape
    return u[:, :, :k].permute(1, 0, 2).reshape(m, t * k), s[:, :k].reshape(-1), vh[:, :k].reshape(t * k, -1)


def svd_floor(method: str, taus: list[Tensor], device: torch.device, fraction: float = 0.8) -> float:
    """Seconds inside the SVD calls `method` needs, over every 2-D tensor's stacked task vectors in `taus`."""
    svd = SvdClock(device)
    for tau in taus:
        t, m, n = tau.shape
        if method == "tsv":
            k = max(1, min(m, n) // t)
            u, s, vh = _concat(*svd(tau), k)
            svd(u)
            svd(vh)
        elif method == "iso_c":
            svd(tau.sum(0))
        elif method == "iso_cts":
            kc, s_ = subspace_sizes(min(m, n), t, fraction)
            u, _, vh = svd(tau.sum(0))
            if s_ == 0:
                continue
            uc = u[:, :kc]
            ut, st, vht = _concat(*svd(tau - uc @ (uc.mT @ tau)), s_)
            svd(torch.cat((ut, uc), 1))
            svd(torch.cat((vht, vh[:kc]), 0))
    return svd.seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="float32 gigabytes per model (default 1)")
    parser.add_argument("--hidden", type=int, default=2048, help="model width, sets the tensor sizes (default 2048)")
    parser.add_argument("--finetuned", type=int, default=3, help="number of fine-tunes T (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per operation; best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="20 MB per model, width 256, 1 repeat: a smoke run")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb, args.hidden, args.repeats = 0.02, 256, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    shapes = layout(args.size_gb, args.hidden)
    base = make_state_dict(shapes, 0, device)
    fts = []
    for seed in range(1, args.finetuned + 1):
        ft = make_state_dict(shapes, seed, device)
        torch._foreach_mul_(list(ft.values()), 0.01)
        torch._foreach_add_(list(ft.values()), list(base.values()))
        fts.append(ft)
    model_bytes = sum(t.numel() * t.element_size() for t in base.values())
    matrices = [k for k, s in shapes.items() if len(s) == 2]

    def stacked(k: str) -> Tensor:
        return torch.stack([ft[k] for ft in fts]) - base[k]

    warm = torch.randn(3, 64, 32, device=device)  # LAPACK / cuSOLVER initialisation, untimed
    torch.linalg.svd(warm, full_matrices=False)
    la, lb = list(base.values()), list(fts[0].values())

    # name -> (what is timed, what it is compared with: ("svd", method) or ("bandwidth", bytes touched))
    ops: dict[str, tuple[Callable[[], object], tuple[str, object]]] = {
        "tsv_merge": (lambda: tsv_merge(base, fts), ("svd", "tsv")),
        "iso_c": (lambda: iso_c(base, fts), ("svd", "iso_c")),
        "iso_cts": (lambda: iso_cts(base, fts), ("svd", "iso_cts")),
        "model_stock": (lambda: model_stock(base, fts), ("bandwidth", (args.finetuned + 2) * model_bytes)),
    }
    best = {name: float("inf") for name in ops}
    floor_best = {name: float("inf") for name in ops}
    add_best = float("inf")
    for _ in range(args.repeats):
        for name, (fn, (kind, what)) in ops.items():
            gc.collect()
            sync(device)
            start = time.perf_counter()
            out = fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
            del out
            if kind == "svd":
                floor_best[name] = min(floor_best[name], svd_floor(str(what), [stacked(k) for k in matrices], device))
        gc.collect()
        sync(device)
        start = time.perf_counter()
        out = torch._foreach_add(la, lb)
        sync(device)
        add_best = min(add_best, time.perf_counter() - start)
        del out
    bandwidth = 3 * model_bytes / add_best

    rows = []
    for name, (_, (kind, what)) in ops.items():
        floor = floor_best[name] if kind == "svd" else float(what) / bandwidth  # type: ignore[arg-type]
        rows.append(
            {
                "name": name,
                "seconds": best[name],
                "floor": "torch.linalg.svd calls" if kind == "svd" else "bandwidth (_foreach_add)",
                "floor_seconds": floor,
                "ratio_to_floor": best[name] / floor,
            }
        )
    print(
        f"SVD merges on {device} ({torch.get_num_threads()} threads), {len(shapes)} float32 tensors "
        f"({len(matrices)} matrices), {model_bytes / 1e9:.2f} GB per model, T = {args.finetuned}, "
        f"best of {args.repeats}, torch {torch.__version__}"
    )
    header = f"{'method':<12} {'seconds':>9}  {'floor':<26} {'floor s':>9} {'x floor':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<12} {r['seconds']:>9.3f}  {r['floor']:<26} {r['floor_seconds']:>9.3f} "
            f"{r['ratio_to_floor']:>8.2f}"
        )
    result = {
        "benchmark": "merge_svd",
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        ),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "size_gb": model_bytes / 1e9,
        "tensors": len(shapes),
        "finetuned": args.finetuned,
        "repeats": args.repeats,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "results": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
