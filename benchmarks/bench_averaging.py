"""What ``CheckpointAveraging`` costs, and what its decay-shaped windows buy.

Four measurements, in one run (all ratios are taken inside this run, so machine speed cancels out):

* ``training``: the same MLP (Linear/BatchNorm blocks, ``--width``² × ``--depth`` parameters: 100 MB of float32 at
  the defaults) trained ``--epochs`` epochs of a few seconds, plain and with ``CheckpointAveraging(window=4)``
  every epoch (``snapshots="disk"`` and ``"cpu"``), Lightning's ``WeightAveraging`` and ``EMAWeightAveraging``
  updated on the same schedule (once per epoch). Each repeat runs every kind once, in alternating order (forward,
  then backward), and each kind's median epoch time (after the first epoch; the snapshot is taken inside the
  epoch's end, so it is counted) is divided by the plain run's of the same repeat: ``x_plain`` is the median of
  these paired ratios (goal ≤ 1.02). Noise-robust companions: the process CPU-time ratio, the time inside the
  callback's hooks and the snapshot writer thread's CPU time per epoch, and the end of fit.
* ``update``: one steady-state snapshot (window full) on the training thread against a single ``torch.add`` pass
  over the same weights (``s.add_(w)`` per tensor; goal ≤ 1.3×), for ``"cpu"`` and ``"disk"`` (whose file write
  runs in the background: its thread CPU time is reported apart), with the training thread's minor page faults
  per snapshot and the number of snapshots read back while taking them (0: nothing is read back, evicted or not).
* ``memory``: peak ``RssAnon`` (anonymous memory, sampled every millisecond) of a child process that trains with
  ``window=2`` and ``window=16``, above the same child without the callback. Disk snapshots keep it flat; ``"cpu"``
  holds the window in host RAM by design (meant for GPU training).
* ``wsm``: decay-shaped windows (WSM) on a constant-learning-rate run: a small MLP on scikit-learn's digits, SGD at
  a constant, fairly high learning rate, ``CheckpointAveraging(window=5)`` with ``weights`` ``"uniform"``,
  ``"linear"``, ``"cosine"`` and ``"1-sqrt"`` side by side in one fit; test accuracy and loss of each average and
  of the run's last weights, over ``--wsm-seeds`` seeds. (``"linear"`` is the uniform mean by construction: WSM's
  linear decay over the window.)

Usage::

    python benchmarks/bench_averaging.py --json bench_averaging.json
    python benchmarks/bench_averaging.py --device cuda --json bench_averaging.json
    python benchmarks/bench_averaging.py --quick            # smoke run, numbers not for quoting
"""

from __future__ import annotations

import argparse
import json
import resource
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

WINDOW = 4
KINDS = ("plain", "CheckpointAveraging[disk]", "CheckpointAveraging[cpu]", "WeightAveraging", "EMAWeightAveraging")

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
            return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)

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
        accelerator="gpu" if device.startswith("cuda") else "cpu",
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
        return [CheckpointAveraging(window=WINDOW, every_n_epochs=1, snapshots=mode, dirpath=root, verbose=False)]
    from pytorch_lightning.callbacks import EMAWeightAveraging, WeightAveraging

    base = EMAWeightAveraging if kind == "EMAWeightAveraging" else WeightAveraging

    class EveryEpoch(base):  # type: ignore[misc,valid-type]
        def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
            return epoch_idx is not None

    return [EveryEpoch(decay=0.5) if kind == "EMAWeightAveraging" else EveryEpoch()]


# ---------------------------------------------------------------------------------------------------- training


_HOOKS = ("on_train_start", "on_train_batch_end", "on_train_epoch_end", "on_validation_epoch_start",
          "on_validation_epoch_end", "on_save_checkpoint")


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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_training(args: argparse.Namespace) -> dict[str, Any]:
    """Paired, alternating runs: every repeat trains each kind once; ratios are against that repeat's plain run."""
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
            _sync(args.device)
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.on_train_epoch_start(trainer, pl_module)  # the last epoch ends (and its snapshot is taken) here

    kinds = list(KINDS)
    per: dict[str, dict[str, list[float]]] = {
        k: {"epoch": [], "cpu": [], "x_plain": [], "x_plain_cpu": [], "hook": [], "writer": [], "end": [], "fit": []}
        for k in kinds
    }
    for repeat in range(args.repeats):
        order = kinds if repeat % 2 == 0 else kinds[::-1]
        this: dict[str, tuple[float, float]] = {}
        for kind in order:
            with tempfile.TemporaryDirectory() as root:
                clock, spent = Clock(), [0.0]
                callbacks = make_callback(kind, root)
                for callback in callbacks:
                    _time_hooks(callback, spent)
                background[0] = 0.0
                module = make_module(args.width, args.depth, args.n_train, args.batch_size)
                # The clock goes first, so it times the epoch end including every other callback's work.
                trainer = trainer_for([clock, *callbacks], root, args.epochs, args.device)
                start = time.perf_counter()
                trainer.fit(module)
                _sync(args.device)
                done = time.perf_counter()
                epoch = statistics.median(b - a for a, b in zip(clock.wall[1:-1], clock.wall[2:]))
                cpu = statistics.median(b - a for a, b in zip(clock.cpu[1:-1], clock.cpu[2:]))
                this[kind] = (epoch, cpu)
                row = per[kind]
                row["epoch"].append(epoch)
                row["cpu"].append(cpu)
                row["hook"].append(spent[0] / args.epochs)
                row["writer"].append(background[0] / args.epochs)
                row["end"].append(done - clock.wall[-1])
                row["fit"].append(done - start)
        for kind in kinds:
            per[kind]["x_plain"].append(this[kind][0] / this["plain"][0])
            per[kind]["x_plain_cpu"].append(this[kind][1] / this["plain"][1])
    averaging._SnapshotStore._write = write  # type: ignore[method-assign]
    plain_epoch = statistics.median(per["plain"]["epoch"])
    rows = []
    for kind in kinds:
        row = per[kind]
        hook, writer = statistics.median(row["hook"]), statistics.median(row["writer"])
        rows.append({
            "name": kind,
            "epoch_s": statistics.median(row["epoch"]),
            "x_plain": statistics.median(row["x_plain"]),
            "x_plain_cpu": statistics.median(row["x_plain_cpu"]),
            "hook_ms_per_epoch": 1e3 * hook,
            "writer_cpu_ms_per_epoch": 1e3 * writer,
            "own_cost_pct": 100.0 * (hook + writer) / plain_epoch,
            "end_of_fit_s": statistics.median(row["end"]),
            "fit_s": statistics.median(row["fit"]),
            "x_plain_all": row["x_plain"],
        })
    model = make_module(args.width, args.depth, 8, 8)
    mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    return {"model_mb": mb, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "window": WINDOW,
            "epochs": args.epochs, "repeats": args.repeats, "goal_x_plain": 1.02, "runs": rows}


# ------------------------------------------------------------------------------------------------------ update


def bench_update(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_soup.callbacks.averaging import _SnapshotStore

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module = make_module(args.width, args.depth, 8, 8).to(device)
    live = {k: v.detach() for k, v in module.state_dict().items()}
    floats = [v for v in live.values() if v.is_floating_point()]
    mb = sum(t.numel() * t.element_size() for t in live.values()) / 1e6
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in floats]

    def plain_add() -> None:
        for s, w in zip(sums, floats):
            s.add_(w)

    root = tempfile.TemporaryDirectory()
    stores: dict[str, tuple[_SnapshotStore, list[str]]] = {}
    for mode in ("cpu", "disk"):
        (Path(root.name) / mode).mkdir()
        store = _SnapshotStore(Path(root.name) / mode, mode, live)
        names = [f"s{i}.safetensors" for i in range(WINDOW)]
        for name in names:
            store.push(name, live)
        stores[mode] = (store, names)
    counter = [WINDOW]
    writer_cpu: list[float] = []
    write = _SnapshotStore._write

    def timed_write(self: Any, *a: Any, **k: Any) -> Any:
        start = time.thread_time()
        try:
            return write(self, *a, **k)
        finally:
            writer_cpu.append(time.thread_time() - start)

    _SnapshotStore._write = timed_write  # type: ignore[method-assign]

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
        "snapshot [cpu] (training thread)": lambda: push("cpu"),
        "snapshot [disk] (training thread)": lambda: push("disk"),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    faults: dict[str, list[int]] = {k: [] for k in ops}
    reads_before = {mode: len(store.reads) for mode, (store, _) in stores.items()}
    # Round-robin, so that machine noise hits every op alike. The background file write of the previous push is
    # finished before timing (in training an epoch separates two pushes): only the training thread's work is timed.
    for _ in range(args.update_repeats):
        for name, fn in ops.items():
            for store, _names in stores.values():
                store.flush()
            sync()
            minflt = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - minflt)
    for store, _names in stores.values():
        store.flush()
    _SnapshotStore._write = write  # type: ignore[method-assign]
    reads = {mode: len(store.reads) - reads_before[mode] for mode, (store, _) in stores.items()}
    files = len(list((Path(root.name) / "disk").glob("*.safetensors")))
    for store, _names in stores.values():
        store.close()
    root.cleanup()
    base = statistics.median(times["torch.add pass"])
    rows = [
        {"op": name, "median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
         "x_torch_add": statistics.median(v) / base, "page_faults": statistics.median(faults[name])}
        for name, v in times.items()
    ]
    return {
        "device": str(device), "weights_mb": mb, "goal_x_torch_add": 1.3, "ops": rows,
        "writer_cpu_ms_per_snapshot": 1e3 * statistics.median(writer_cpu) if writer_cpu else 0.0,
        "snapshots_read_back": reads, "files_on_disk_window": files,
    }


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
        trainer = trainer_for(callbacks, root, args.memory_epochs, "cpu", limit_train_batches=1, limit_val_batches=0)
        trainer.fit(module)


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    script = str(Path(__file__).resolve())
    # One small batch per epoch: the memory of the snapshots is what is measured, not the training's activations.
    common = ["--width", str(args.width), "--depth", str(args.depth), "--batch-size", "16"]
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


# --------------------------------------------------------------------------------------------------------- wsm


def bench_wsm(args: argparse.Namespace) -> dict[str, Any]:
    """Constant-LR digits runs: the last weights against uniform and decay-shaped windows of the same run."""
    import pytorch_lightning as pl
    from safetensors.torch import load_file
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_soup import CheckpointAveraging

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1200], perm[1200:]

    class Digits(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, labels = batch
            return nn.functional.cross_entropy(self(inputs), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=args.wsm_lr)  # constant: no decay, no scheduler

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(x[train], y[train]), batch_size=16, shuffle=True)

    def score(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        model = Digits()
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model(x[test])
        return float((logits.argmax(1) == y[test]).float().mean()), float(nn.functional.cross_entropy(logits, y[test]))

    shapes = ["uniform", "linear", "cosine", "1-sqrt"]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in ["last", *shapes]}
    for seed in range(args.wsm_seeds):
        with tempfile.TemporaryDirectory() as root:
            torch.manual_seed(seed)
            callbacks = [
                CheckpointAveraging(window=5, weights=w, dirpath=f"{root}/{w}", verbose=False) for w in shapes
            ]
            trainer = trainer_for(callbacks, root, args.wsm_epochs, "cpu", limit_val_batches=0)
            trainer.fit(Digits())
            results["last"].append(score(load_file(f"{root}/uniform/final.safetensors")))
            for w in shapes:
                results[w].append(score(load_file(f"{root}/{w}/average.safetensors")))
    rows = [
        {"name": k, "test_acc": statistics.mean(a for a, _ in v), "test_loss": statistics.mean(l for _, l in v)}
        for k, v in results.items()
    ]
    return {"task": "sklearn digits, MLP 64-256-10", "lr": args.wsm_lr, "epochs": args.wsm_epochs, "window": 5,
            "seeds": args.wsm_seeds, "runs": rows}


# -------------------------------------------------------------------------------------------------------- main


def summary(part: str, data: dict[str, Any]) -> str:
    """A few plain lines per measurement (the JSON has everything)."""
    if part == "update":
        lines = [f"one snapshot of {data['weights_mb']:.0f} MB on the training thread (median / min ms, x torch.add; "
                 f"goal <= {data['goal_x_torch_add']}):"]
        lines += [f"  {r['op']:36s} {r['median_ms']:8.2f} / {r['min_ms']:8.2f}   {r['x_torch_add']:.2f}x   "
                  f"{r['page_faults']:.0f} page faults" for r in data["ops"]]
        lines.append(f"  writer thread CPU per snapshot {data['writer_cpu_ms_per_snapshot']:.1f} ms; snapshots read "
                     f"back {data['snapshots_read_back']}; files on disk {data['files_on_disk_window']}")
    elif part == "memory":
        lines = [f"peak RssAnon above plain training ({data['model_mb']:.0f} MB model, plain "
                 f"{data['plain_peak_rss_anon_mb']:.0f} MB):"]
        lines += [f"  {r['case']:20s} +{r['extra_mb']:.0f} MB" for r in data["runs"]]
    elif part == "wsm":
        lines = [f"constant-LR {data['task']}, window {data['window']}, mean of {data['seeds']} seeds:"]
        lines += [f"  {r['name']:10s} test acc {r['test_acc']:.4f}  test loss {r['test_loss']:.4f}"
                  for r in data["runs"]]
    else:
        lines = [
            f"training, {data['model_mb']:.0f} MB of weights, window {data['window']} every epoch; median paired ratio "
            f"to plain (goal <= {data['goal_x_plain']}), wall / CPU; the callback's own cost per epoch (hooks + "
            "writer thread CPU):"
        ]
        lines += [
            f"  {r['name']:26s} epoch {r['epoch_s']:.3f} s  x{r['x_plain']:.3f} / x{r['x_plain_cpu']:.3f} cpu  "
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
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=6, help="6 blocks of 2048: 25 M parameters, 100 MB")
    parser.add_argument("--n-train", type=int, default=None,
                        help="training samples per epoch (default 3072 on CPU, 98304 on CUDA: epochs of a few seconds)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 on CPU, 256 on CUDA")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--update-repeats", type=int, default=7)
    parser.add_argument("--memory-epochs", type=int, default=18)
    parser.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--wsm-seeds", type=int, default=3)
    parser.add_argument("--wsm-epochs", type=int, default=25)
    parser.add_argument("--wsm-lr", type=float, default=0.2)
    parser.add_argument("--only", nargs="*", choices=["training", "update", "memory", "wsm"], default=None)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's); 1 gives steadier timings on a shared, oversubscribed machine",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.n_train = args.n_train or (98304 if cuda else 3072)
    args.batch_size = args.batch_size or (256 if cuda else 128)
    if args.memory_child is not None:
        memory_child(args)
        return 0
    if args.quick:
        args.width, args.depth, args.n_train, args.epochs, args.repeats = 256, 2, 512, 3, 1
        args.update_repeats, args.wsm_seeds, args.wsm_epochs = 3, 1, 6

    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    only = set(args.only or ["training", "update", "memory", "wsm"])
    results: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads()}
    for part, fn in (("update", bench_update), ("memory", bench_memory), ("training", bench_training),
                     ("wsm", bench_wsm)):
        if part in only:
            start = time.perf_counter()
            results[part] = fn(args)
            results[part]["seconds"] = round(time.perf_counter() - start, 1)
            print(summary(part, results[part]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
