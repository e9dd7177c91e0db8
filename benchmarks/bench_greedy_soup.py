"""What ``GreedySoup``'s end-of-fit soup costs, against its floor: the candidate validations and one read per ingredient.

An MLP (Linear/BatchNorm blocks, about ``--width``² × ``--depth`` parameters) is trained ``--epochs`` epochs with
``GreedySoup(monitor="val/loss", mode="min")``, one ingredient per epoch. The greedy soup over ``n`` ingredients
must validate ``n − 1`` candidates (the single ingredients' scores come from training) and read every ingredient
from disk; anything above that is overhead (arithmetic, copies into the module, the evaluation loop's setup).

Reported:

* ``soup_s``: wall time (median of ``--repeats`` builds, alternating with the floor's measurement, so machine load
  hits both alike; ``*_cpu_s``: process CPU time, steadier on a shared machine) of building the soup at the end of
  fit (reading, averaging, validating every candidate, loading the soup into the module); ``end_of_fit_s``: the
  whole ``on_train_end`` (plus writing ``final``, ``soup`` and ``soup.json``).
* ``plain_validations_s``: ``n − 1`` plain runs of the trainer's own validation loop, timed right after each soup
  (same machine load), and ``read_s``: reading every ingredient once with ``storage.load_state_dict`` (page cache
  warm, like the soup's reads right after training wrote the files), timed right after those; medians.
  ``validation_during_training_s`` is the median validation pass during training, for reference.
* ``floor_s = plain_validations_s + read_s`` and ``ratio = soup_s / floor_s`` (goal: ≤ 1.10);
  ``ratio_paired_median``: the median over repeats of each soup build against the floor (validations and reads)
  measured right after it. The soup reads each next ingredient in the background while a candidate validates, so
  ``read_s`` can overlap.
* ``bytes_read`` (tensor bytes the soup read from ingredient files, counted at the storage layer) against
  ``ingredient_bytes`` (all ingredients' tensor bytes): ``reads_per_ingredient`` must be 1.0; ``rchar`` is the
  process's ``/proc/self/io`` read-byte counter over the end of fit, for comparison (includes file headers).

Usage::

    python benchmarks/bench_greedy_soup.py --json bench_greedy_soup.json
    python benchmarks/bench_greedy_soup.py --device cuda --width 4096
    python benchmarks/bench_greedy_soup.py --quick            # smoke run, numbers not for quoting
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import mlp_base  # noqa: E402  (this folder: sys.path[0] when run as a script)


def make_module(width: int, depth: int, n_train: int, n_val: int, batch_size: int, seed: int = 0) -> Any:
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class MLP(mlp_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(width, depth)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            self.log("val/loss", nn.functional.cross_entropy(logits, y))
            self.log("val/acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def _data(self, n: int, seed: int) -> DataLoader:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, width, generator=g)
            y = (x[:, :10] + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
            return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=seed == 0)

        def train_dataloader(self) -> DataLoader:
            return self._data(n_train, 0)

        def val_dataloader(self) -> DataLoader:
            return self._data(n_val, 1)

    torch.manual_seed(seed)
    return MLP()


def _rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl

    from lightning_soup import GreedySoup, storage
    from lightning_soup._storage import _read
    from lightning_soup.callbacks import _evaluate

    device = args.device
    counters = {"bytes_read": 0, "reading": False, "evaluations": 0}
    original_getitem = _read.LazyStateDict.__getitem__

    def counted_getitem(self: Any, key: str) -> torch.Tensor:
        tensor = original_getitem(self, key)
        if counters["reading"]:
            counters["bytes_read"] += tensor.numel() * tensor.element_size()
        return tensor

    original_evaluate = _evaluate.evaluate

    def counted_evaluate(trainer: Any, pl_module: Any) -> dict[str, float]:
        counters["evaluations"] += 1
        return original_evaluate(trainer, pl_module)

    _read.LazyStateDict.__getitem__ = counted_getitem  # type: ignore[method-assign]
    _evaluate.evaluate = counted_evaluate  # type: ignore[assignment]

    class TimedSoup(GreedySoup):
        """Times the soup (wall and process CPU time), then re-measures soup and floor alternately."""

        soup: list[tuple[float, float]] = []
        plain: list[tuple[float, float]] = []
        reads: list[tuple[float, float]] = []

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            _sync(device)
            self.rchar0, start = _rchar(), time.perf_counter()
            super().on_train_end(trainer, pl_module)
            _sync(device)
            self.end_of_fit_s = time.perf_counter() - start
            self.rchar = _rchar() - self.rchar0
            candidates = counters["evaluations"]
            files = sorted((Path(self.dirpath_for(trainer)) / "ingredients").glob("*.safetensors"))
            for repeat in range(args.repeats):
                self.plain.append(self._plain_validations(trainer, candidates))
                self.reads.append(self._read_floor(files))
                if repeat + 1 < args.repeats:
                    self._offline_finish(trainer, pl_module)

        def _read_floor(self, files: list[Path]) -> tuple[float, float]:
            """The other part of the floor: read every ingredient once (page cache warm, like the soup's reads)."""
            start, cpu = time.perf_counter(), time.process_time()
            for path in files:
                state = storage.load_state_dict(path)
                del state
            return time.perf_counter() - start, time.process_time() - cpu

        def _plain_validations(self, trainer: Any, count: int) -> tuple[float, float]:
            """The floor: ``count`` plain runs of the trainer's own validation loop, no callback attached."""
            stage, loop, callbacks = trainer.state.stage, trainer.fit_loop.epoch_loop.val_loop, trainer.callbacks
            trainer.validating, trainer.callbacks = True, []
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                loop.run()
            _sync(device)
            elapsed = (time.perf_counter() - start, time.process_time() - cpu)
            trainer.state.stage, trainer.callbacks = stage, callbacks
            return elapsed

        def _offline_finish(self, trainer: Any, pl_module: Any) -> Any:
            _sync(device)
            counters["reading"] = not self.soup  # bytes are counted for the first soup only
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return super()._offline_finish(trainer, pl_module)
            finally:
                _sync(device)
                self.soup.append((time.perf_counter() - start, time.process_time() - cpu))
                counters["reading"] = False

    class ValidationTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            _sync(device)
            self._start = time.perf_counter()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            _sync(device)
            if not trainer.sanity_checking:
                self.times.append(time.perf_counter() - self._start)

    with tempfile.TemporaryDirectory() as tmp:
        model = make_module(args.width, args.depth, args.n_train, args.n_val, args.batch_size)
        n_params = sum(p.numel() for p in model.parameters())
        soup = TimedSoup(monitor="val/loss", mode="min", dirpath=str(Path(tmp) / "soup"), verbose=False)
        timer = ValidationTimer()
        trainer = pl.Trainer(
            default_root_dir=tmp,
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1,
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[timer, soup],
        )
        trainer.fit(model)

        files = sorted((Path(tmp) / "soup" / "ingredients").glob("*.safetensors"))
        ingredient_bytes = 0
        for path in files:
            state = storage.load_state_dict(path)
            ingredient_bytes += sum(t.numel() * t.element_size() for t in state.values())
            del state

    n = len(files)
    validation_s = statistics.median(timer.times[:n])  # the passes during training
    soup_s = statistics.median(w for w, _ in soup.soup)
    plain_s = statistics.median(w for w, _ in soup.plain)
    soup_cpu = statistics.median(c for _, c in soup.soup)
    plain_cpu = statistics.median(c for _, c in soup.plain)
    read_s = statistics.median(w for w, _ in soup.reads)
    read_cpu = statistics.median(c for _, c in soup.reads)
    floor_s = plain_s + read_s
    accepted = sum(1 for i in soup.recipe["ingredients"] if i["accepted"])
    return {
        "device": device,
        "parameters": n_params,
        "ingredients": n,
        "accepted": accepted,
        "candidate_validations": counters["evaluations"] // args.repeats,
        "repeats": args.repeats,
        "soup_s": round(soup_s, 4),
        "end_of_fit_s": round(soup.end_of_fit_s, 4),
        "plain_validations_s": round(plain_s, 4),
        "validation_during_training_s": round(validation_s, 4),
        "read_s": round(read_s, 4),
        "floor_s": round(floor_s, 4),
        "ratio": round(soup_s / floor_s, 3),
        # soup i against the floor measured right after it (paired, alternating), then the median of the ratios
        "ratio_paired_median": round(
            statistics.median(w / (p + r) for (w, _), (p, _), (r, _) in zip(soup.soup, soup.plain, soup.reads)), 3
        ),
        "soup_cpu_s": round(soup_cpu, 4),
        "plain_validations_cpu_s": round(plain_cpu, 4),
        "cpu_ratio": round(soup_cpu / (plain_cpu + read_cpu), 3),
        "goal_ratio": 1.10,
        "bytes_read": counters["bytes_read"],
        "ingredient_bytes": ingredient_bytes,
        "reads_per_ingredient": round(counters["bytes_read"] / ingredient_bytes, 3),
        "rchar": soup.rchar,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6, help="one ingredient per epoch")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=9, help="soup and floor measured alternately, medians")
    parser.add_argument("--quick", action="store_true", help="small sizes; a smoke run, numbers not for quoting")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.epochs, args.n_val = 128, 2, 3, 512
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
