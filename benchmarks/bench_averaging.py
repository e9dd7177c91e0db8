"""What ``CheckpointAveraging`` costs: training overhead, one update against a plain add, and memory vs ``window``.

Three measurements, in one run:

* ``training``: the same MLP (Linear/BatchNorm blocks, about ``--width``² × ``--depth`` parameters) trained
  ``--epochs`` epochs on synthetic data, plain and with ``CheckpointAveraging(window=5, every_n_epochs=1)``
  (``snapshots="disk"`` and ``"cpu"``), and with Lightning's own ``WeightAveraging`` updated once per epoch (the
  same schedule, but a running mean of every snapshot rather than a window), interleaved ``--repeats`` times so
  that machine noise hits them alike. Reported: the median epoch time after the first epoch (the snapshot is taken
  inside the epoch's end, so it is counted), its overhead against plain training, and the end-of-fit time (the
  exact average, ``average.safetensors`` and ``final.safetensors`` written).
* ``update``: one steady-state window update (window full) against a plain ``torch.add`` pass over the same
  weights (``s.add_(w)`` per tensor) and a ``torch._foreach_add_`` pass: the arithmetic alone
  (``sum += new − evicted``), and the whole main-thread cost of a snapshot for ``"cpu"`` (host copy) and
  ``"disk"`` (reading the evicted snapshot, the staging copy; the file write runs in a background thread).
* ``memory``: peak ``RssAnon`` (anonymous memory, sampled every millisecond from ``/proc/<pid>/status``) of a
  child process that trains with ``window=2`` and ``window=16`` (``window + 2`` snapshots), for both storages,
  above the same child without the callback. Disk snapshots keep it flat; ``"cpu"`` holds the window in host RAM
  by design (meant for GPU training).

Usage::

    python benchmarks/bench_averaging.py --json bench_averaging.json
    python benchmarks/bench_averaging.py --threads 1 --json bench_averaging.json   # a shared, busy machine
    python benchmarks/bench_averaging.py --quick            # smoke run, numbers not for quoting
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import PeakRssAnon, mlp_base  # noqa: E402  (this folder: sys.path[0] when run as a script)

# ------------------------------------------------------------------------------------------------------- model


def make_module(width: int, depth: int, n_train: int, batch_size: int, seed: int = 0) -> Any:
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class MLP(mlp_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(width, depth)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val/loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(n_train, width, generator=g), torch.randint(0, 10, (n_train,), generator=g)
            data = TensorDataset(x, y)
            return DataLoader(data, batch_size=batch_size, shuffle=True)

        def val_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(2)
            n = 2 * batch_size
            data = TensorDataset(torch.randn(n, width, generator=g), torch.randint(0, 10, (n,), generator=g))
            return DataLoader(data, batch_size=batch_size)

    torch.manual_seed(seed)
    return MLP()


def trainer_for(callbacks: list, root: str, epochs: int, device: str, **kw: Any) -> Any:
    import pytorch_lightning as pl

    return pl.Trainer(
        default_root_dir=root,
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def make_callback(kind: str, root: str) -> list:
    if kind == "plain":
        return []
    if kind.startswith("CheckpointAveraging"):
        from lightning_soup import CheckpointAveraging

        mode = "cpu" if kind.endswith("[cpu]") else "disk"
        return [CheckpointAveraging(window=5, every_n_epochs=1, snapshots=mode, dirpath=root, verbose=False)]
    if kind == "WeightAveraging":
        from pytorch_lightning.callbacks import WeightAveraging

        class EveryEpoch(WeightAveraging):
            def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
                return epoch_idx is not None

        return [EveryEpoch()]
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------- training


_HOOKS = (
    "on_train_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_save_checkpoint",
)


def _time_hooks(callback: Any, spent: list[float]) -> None:
    """Accumulate the wall time spent inside ``callback``'s training-time hooks (not ``on_train_end``) in spent[0]."""
    for name in _HOOKS:
        hook = getattr(callback, name, None)
        if hook is None:
            continue

        def timed(*a: Any, _hook: Any = hook, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return _hook(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(callback, name, timed)


def bench_training(args: argparse.Namespace) -> dict[str, Any]:
    """Epoch times with and without the callbacks, and the callbacks' own cost measured from inside.

    On a busy shared machine the wall-clock comparison drifts with the neighbours' load (interleaving only averages
    it out over many repeats), so two noise-robust figures are reported too: the time spent inside the callback's
    hooks during training, and the CPU time of the background snapshot writer, both per epoch and as a share of
    the plain epoch time.
    """
    import pytorch_lightning as pl

    from lightning_soup.callbacks import averaging

    background = [0.0]
    write = averaging._SnapshotStore._write

    def timed_write(self: Any, *a: Any, **k: Any) -> Any:
        start = time.thread_time()
        try:
            return write(self, *a, **k)
        finally:
            background[0] += time.thread_time() - start

    averaging._SnapshotStore._write = timed_write  # type: ignore[method-assign]

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.on_train_epoch_start(trainer, pl_module)  # the last epoch ends (and its snapshot is taken) here

    kinds = ["plain", "CheckpointAveraging[disk]", "CheckpointAveraging[cpu]"]
    try:
        from pytorch_lightning.callbacks import WeightAveraging  # noqa: F401

        kinds.append("WeightAveraging")
    except ImportError:
        pass
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    hooks: dict[str, list[float]] = {k: [] for k in kinds}
    writer: dict[str, list[float]] = {k: [] for k in kinds}
    fit_end: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            with tempfile.TemporaryDirectory() as root:
                clock, spent = Clock(), [0.0]
                callbacks = make_callback(kind, root)
                for callback in callbacks:
                    _time_hooks(callback, spent)
                background[0] = 0.0
                module = make_module(args.width, args.depth, args.n_train, args.batch_size)
                # The clock goes first, so it times the epoch end including every other callback's work.
                trainer = trainer_for([clock, *callbacks], root, args.epochs, args.device)
                trainer.fit(module)
                done = time.perf_counter()
                # Skip the first (warm-up) epoch.
                wall[kind] += [b - a for a, b in zip(clock.wall[1:-1], clock.wall[2:])]
                cpu[kind] += [b - a for a, b in zip(clock.cpu[1:-1], clock.cpu[2:])]
                hooks[kind].append(spent[0] / args.epochs)
                writer[kind].append(background[0] / args.epochs)
                fit_end[kind].append(done - clock.wall[-1])
    averaging._SnapshotStore._write = write  # type: ignore[method-assign]
    plain_wall, plain_cpu = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    rows = []
    for kind in kinds:
        hook, bg = statistics.median(hooks[kind]), statistics.median(writer[kind])
        rows.append(
            {
                "name": kind,
                "epoch_s": statistics.median(wall[kind]),
                "overhead_pct": 100.0 * (statistics.median(wall[kind]) / plain_wall - 1.0),
                "epoch_cpu_s": statistics.median(cpu[kind]),
                "cpu_overhead_pct": 100.0 * (statistics.median(cpu[kind]) / plain_cpu - 1.0),
                "hook_ms_per_epoch": 1e3 * hook,
                "writer_cpu_ms_per_epoch": 1e3 * bg,
                "own_cost_pct": 100.0 * (hook + bg) / plain_wall,
                "end_of_fit_s": statistics.median(fit_end[kind]),
                "epoch_s_all": wall[kind],
            }
        )
    n_params = sum(p.numel() for p in make_module(args.width, args.depth, 8, 8).parameters())
    return {"params_m": n_params / 1e6, "epochs": args.epochs, "repeats": args.repeats, "runs": rows}


# ------------------------------------------------------------------------------------------------------ update


def bench_update(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_soup.callbacks.averaging import _SnapshotStore
    from lightning_soup.merge import _inplace

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module = make_module(args.update_width, args.depth, 8, 8).to(device)
    live = {k: v.detach() for k, v in module.state_dict().items()}
    floats = [v for v in live.values() if v.is_floating_point()]
    mb = sum(t.numel() * t.element_size() for t in floats) / 1e6
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in floats]
    old = [t.clone() for t in floats]

    def plain_add() -> None:
        for s, w in zip(sums, floats):
            s.add_(w)

    root = tempfile.TemporaryDirectory()
    stores: dict[str, tuple[_SnapshotStore, list[str]]] = {}
    window = 5
    for mode in ("cpu", "disk"):
        (Path(root.name) / mode).mkdir()
        store = _SnapshotStore(Path(root.name) / mode, mode, live)
        names = [f"s{i}.safetensors" for i in range(window)]
        for name in names:
            store.push(name, live)
        stores[mode] = (store, names)
    counter = [window]

    def push(mode: str) -> None:
        store, names = stores[mode]
        name = f"s{counter[0]}.safetensors"
        counter[0] += 1
        evicted = names.pop(0)
        names.append(name)
        store.push(name, live, evicted)
        store.delete_files([evicted])

    ops = {
        "torch.add pass": plain_add,
        "torch._foreach_add_ pass": lambda: torch._foreach_add_(sums, floats),
        "accumulate_ (sum += new - evicted)": lambda: _inplace.accumulate_(sums, floats, old),
        "snapshot push [cpu] (main thread)": lambda: push("cpu"),
        "snapshot push [disk] (main thread)": lambda: push("disk"),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    # Round-robin, so that machine noise hits every op alike. The background file write of the previous push is
    # finished before timing (in training an epoch separates two pushes): only the main thread's work is timed.
    for _ in range(args.update_repeats):
        for name, fn in ops.items():
            for store, _names in stores.values():
                store.flush()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    for store, _names in stores.values():
        store.close()
    root.cleanup()
    base_min, base_median = min(times["torch.add pass"]), statistics.median(times["torch.add pass"])
    rows = []
    for name, values in times.items():
        rows.append(
            {
                "op": name,
                "min_ms": 1e3 * min(values),
                "median_ms": 1e3 * statistics.median(values),
                "x_torch_add_min": min(values) / base_min,
                "x_torch_add_median": statistics.median(values) / base_median,
            }
        )
    return {"weights_mb": mb, "ops": rows}


# ------------------------------------------------------------------------------------------------------ memory


def _peak_rss_anon_mb(argv: list[str]) -> float:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=HERE.parent)
    with PeakRssAnon(proc.pid) as sampler:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {err.decode()[-2000:]}")
    return sampler.peak_kb / 1024


def memory_child(args: argparse.Namespace) -> None:
    window, mode = args.memory_child
    window = int(window)
    with tempfile.TemporaryDirectory() as root:
        callbacks = []
        if mode != "none":
            from lightning_soup import CheckpointAveraging

            callbacks = [CheckpointAveraging(window=window, snapshots=mode, dirpath=root, verbose=False)]
        module = make_module(args.width, args.depth, 4 * args.batch_size, args.batch_size)
        trainer = trainer_for(callbacks, root, args.memory_epochs, "cpu", limit_train_batches=2, limit_val_batches=0)
        trainer.fit(module)


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    script = str(Path(__file__).resolve())
    common = ["--width", str(args.width), "--depth", str(args.depth), "--batch-size", str(args.batch_size)]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    epochs = 18  # window + 2 for the largest window
    model_mb = sum(p.numel() * 4 for p in make_module(args.width, args.depth, 8, 8).state_dict().values()) / 1e6
    child = [sys.executable, script, *common, "--memory-epochs", str(epochs), "--memory-child"]
    base = _peak_rss_anon_mb([*child, "0", "none"])
    rows = []
    for mode in ("disk", "cpu"):
        for window in (2, 16):
            peak = _peak_rss_anon_mb([*child, str(window), mode])
            rows.append({"case": f"{mode} window={window}", "peak_rss_anon_mb": peak, "extra_mb": peak - base})
    return {"model_mb": model_mb, "plain_peak_rss_anon_mb": base, "runs": rows}


# -------------------------------------------------------------------------------------------------------- main


def summary(part: str, data: dict[str, Any]) -> str:
    """A few plain lines per measurement (the JSON has everything)."""
    if part == "update":
        lines = [f"update over {data['weights_mb']:.0f} MB of weights (min / median ms, x torch.add):"]
        for r in data["ops"]:
            lines.append(
                f"  {r['op']:40s} {r['min_ms']:8.2f} / {r['median_ms']:8.2f}   "
                f"{r['x_torch_add_min']:.2f}x / {r['x_torch_add_median']:.2f}x"
            )
    elif part == "memory":
        lines = [f"peak RssAnon above plain training ({data['model_mb']:.0f} MB model, plain "
                 f"{data['plain_peak_rss_anon_mb']:.0f} MB):"]
        lines += [f"  {r['case']:20s} +{r['extra_mb']:.0f} MB" for r in data["runs"]]
    else:
        lines = [
            f"training, {data['params_m']:.1f} M parameters; median epoch wall / CPU time (after the first); the "
            "callback's own cost per epoch (inside its hooks + background writer CPU) as a share of a plain epoch:"
        ]
        lines += [
            f"  {r['name']:26s} wall {r['epoch_s']:.3f} s ({r['overhead_pct']:+.1f} %)  "
            f"cpu {r['epoch_cpu_s']:.3f} s ({r['cpu_overhead_pct']:+.1f} %)  "
            f"own {r['hook_ms_per_epoch']:.1f} + {r['writer_cpu_ms_per_epoch']:.1f} ms = {r['own_cost_pct']:.2f} %  "
            f"end of fit {r['end_of_fit_s']:.2f} s"
            for r in data["runs"]
        ]
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--update-width", type=int, default=2048, help="MLP width for the update timing")
    parser.add_argument("--update-repeats", type=int, default=10)
    parser.add_argument("--memory-epochs", type=int, default=18)
    parser.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=["training", "update", "memory"], default=None)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's); 1 gives stable timings on a shared, oversubscribed machine",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args)
        return 0
    if args.quick:
        args.width, args.n_train, args.epochs, args.repeats = 256, 1024, 3, 1
        args.update_width, args.update_repeats = 512, 3

    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    only = set(args.only or ["training", "update", "memory"])
    results: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads()}
    if "update" in only:
        results["update"] = bench_update(args)
        print(summary("update", results["update"]), flush=True)
    if "memory" in only:
        results["memory"] = bench_memory(args)
        print(summary("memory", results["memory"]), flush=True)
    if "training" in only:
        results["training"] = bench_training(args)
        print(summary("training", results["training"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
