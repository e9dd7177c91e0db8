"""Throughput of `lightning_soup.merge` against the memory-bandwidth floor.

Builds about ``--size-gb`` of float32 weights per model, as many tensors of realistic transformer sizes (a
Llama-style embedding, attention and MLP matrices, norms), and times, best of ``--repeats``:

* ``floor``: ``torch._foreach_add(A, B)`` into fresh outputs, a plain add pass over the same tensors;
* ``uniform_soup([A, B, C])``;
* ``interpolate(A, B, 0.3)``;
* ``task_arithmetic(A, [B, C], [0.5, -0.3])``;
* the relatedness check those functions run first by default (``merge._related``: B and C against A), timed apart:
  the inputs here are independent random draws, so the merges themselves run with ``allow_unrelated=True``;
* for reference, the floor's add written into preallocated outputs (no allocation, no page faults).

Every operation must read each input once and write one fresh output, so its floor time is its bytes touched
(inputs + output) divided by the floor's measured bandwidth; the table reports the ratio to that floor. All
operations are timed round-robin in the same run, so machine noise hits them alike.

Example::

    python benchmarks/bench_merge.py --size-gb 1 --device cpu --repeats 5 --json bench_merge.json
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

from lightning_soup.merge import interpolate, task_arithmetic, uniform_soup
from lightning_soup.merge._related import Relatedness


def layout(size_gb: float, hidden: int = 2048) -> dict[str, tuple[int, ...]]:
    """Key -> shape for about `size_gb` of float32 in a Llama-style model of width `hidden`.

    At the default width (a 1B-class model): a 32000 x 2048 embedding, then whole layers of attention q/k/v/o
    (2048 x 2048), MLP gate/up/down (5632 x 2048, 2048 x 5632) and two norm vectors, until the size is reached.
    """
    ffn, vocab = 11 * hidden // 4, 125 * hidden // 8
    layer_shapes = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_norm", "post_norm"]
    budget = size_gb * 1e9 / 4
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    used = vocab * hidden
    layer = 0
    while used < budget:
        for name, shape in zip(names, layer_shapes):
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
            used += torch.Size(shape).numel()
        layer += 1
    return shapes


def make_state_dict(shapes: dict[str, tuple[int, ...]], seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {k: torch.empty(s, device=device).uniform_(-1.0, 1.0, generator=g) for k, s in shapes.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="float32 gigabytes per model (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per operation; best is kept")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--hidden", type=int, default=2048, help="model width, sets the tensor sizes (default 2048)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    shapes = layout(args.size_gb, args.hidden)
    a, b, c = (make_state_dict(shapes, seed, device) for seed in (0, 1, 2))
    tv_b = {k: v * 0.01 for k, v in b.items()}
    tv_c = {k: v * 0.01 for k, v in c.items()}
    model_bytes = sum(t.numel() * t.element_size() for t in a.values())
    la, lb = list(a.values()), list(b.values())
    prealloc = [torch.empty_like(t) for t in la]

    def relatedness() -> None:
        rel = Relatedness(["B", "C"], "A")
        for k, t in a.items():
            rel.update(k, t, [b[k], c[k]])
        rel.relations()

    def add_into_existing() -> None:
        for x, y, o in zip(la, lb, prealloc):
            torch.add(x, y, out=o)

    # name -> (callable, bytes it must touch: every input read once + one output written)
    ops: dict[str, tuple[Callable[[], object], int]] = {
        "floor: _foreach_add(A, B)": (lambda: torch._foreach_add(la, lb), 3 * model_bytes),
        "uniform_soup(3 models)": (lambda: uniform_soup([a, b, c], allow_unrelated=True), 4 * model_bytes),
        "interpolate(A, B, 0.3)": (lambda: interpolate(a, b, 0.3, allow_unrelated=True), 3 * model_bytes),
        "task_arithmetic(2 vectors)": (
            lambda: task_arithmetic(a, [tv_b, tv_c], [0.5, -0.3], allow_unrelated=True),
            4 * model_bytes,
        ),
        # reads the three models once and writes nothing: its floor is 3 models' bytes
        "relatedness check (B, C vs A)": (relatedness, 3 * model_bytes),
        # for reference only: the same add without allocating outputs (on CPU, first-touch page faults of fresh
        # outputs cost more than the arithmetic; every merge function returns fresh tensors, so pays them too)
        "(add into existing outputs)": (add_into_existing, 3 * model_bytes),
    }
    best = {name: float("inf") for name in ops}
    for repeat in range(args.repeats + 1):  # the first round warms up allocator and caches, untimed
        for name, (fn, _) in ops.items():
            gc.collect()
            sync(device)
            start = time.perf_counter()
            out = fn()
            sync(device)
            elapsed = time.perf_counter() - start
            del out
            if repeat:
                best[name] = min(best[name], elapsed)

    floor_name = next(iter(ops))
    floor_bw = ops[floor_name][1] / best[floor_name]
    rows = []
    for name, (_, nbytes) in ops.items():
        floor_s = nbytes / floor_bw
        rows.append(
            {
                "name": name,
                "seconds": best[name],
                "bytes": nbytes,
                "gb_per_s": nbytes / best[name] / 1e9,
                "floor_seconds": floor_s,
                "ratio_to_floor": best[name] / floor_s,
            }
        )

    print(
        f"lightning_soup.merge on {device} ({torch.get_num_threads()} threads), {len(shapes)} float32 tensors, "
        f"{model_bytes / 1e9:.2f} GB per model, best of {args.repeats}, torch {torch.__version__}"
    )
    header = f"{'operation':<28} {'GB touched':>10} {'seconds':>9} {'GB/s':>7} {'floor s':>9} {'x floor':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<28} {r['bytes'] / 1e9:>10.2f} {r['seconds']:>9.4f} {r['gb_per_s']:>7.1f} "
            f"{r['floor_seconds']:>9.4f} {r['ratio_to_floor']:>8.2f}"
        )
    result = {
        "benchmark": "merge",
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        ),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "size_gb": model_bytes / 1e9,
        "tensors": len(shapes),
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
