"""Catastrophic forgetting on handwritten digits, and what averaging, soups and blending do about it.

A small MLP learns digits 0–4 (the "base" capability) and is then fine-tuned on digits 5–9 only, through the same
10-way head; the fine-tune forgets the old digits. One ``Trainer`` runs the fine-tune with the three
``lightning_soup`` callbacks:

* ``CheckpointAveraging``: the mean of the last N epoch-end weights (LAWA, Kaddour 2022);
* ``GreedySoup``: Wortsman et al.'s (2022) greedy soup over the epoch-end weights, scored on new-digit validation;
* ``TaskArithmeticBlend(anchor="initial")``: ``base + r·(soup − base)`` (WiSE-FT, Wortsman et al. 2022), with ``r``
  the best new-digit validation accuracy among the ratios that keep ``--keep-old`` of the base's old-digit accuracy.

Data: scikit-learn's bundled 8×8 digits (no download), each task split 50/25/25 into train/val/test (stratified,
seeded). The callbacks and every choice (best epoch, soup recipe, blend ratio) see only the validation split. The
table reports the test split, computed here from the files the callbacks wrote; each verdict compares two rows with
an exact McNemar test on the same test images, so a difference of a digit or two is called what it is: noise.

Run ``python examples/forgetting_digits.py`` (``make demo``); ``--help`` lists the flags.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, however this file is started
from _common import (  # noqa: E402
    DigitsSteps,
    blend_trade_off,
    digits_mlp,
    json_result,
    merged_files,
    print_results,
    quiet_lightning,
    render_table,
    require_learned,
    score_files,
    soup_callbacks,
    standard_verdicts,
)

OLD_DIGITS = (0, 1, 2, 3, 4)
NEW_DIGITS = (5, 6, 7, 8, 9)
TASKS = ("old", "new")
ROWS = ("base", "last", "best", "average", "soup", "blended")
BLEND_RATIOS = [i / 20 for i in range(21)]  # 0, 0.05, ..., 1
BASE_FLOOR = 0.9  # the base must classify the old digits' test images at least this well before anything else
SIGNIFICANCE = 0.05  # McNemar p-value below which a verdict says "helps"/"hurts"

# --quick is for tests: a few seconds, not a good model.
SIZES = {
    "default": {"base_epochs": 10, "epochs": 10, "hidden": 128},
    "quick": {"base_epochs": 4, "epochs": 4, "hidden": 64},
}


# ------------------------------------------------------------------------------------------------------------- data
def load_splits(seed: int = 0) -> dict[str, TensorDataset]:
    """Digits 0–4 ("old") and 5–9 ("new"), each split 50/25/25 into train/val/test, stratified by digit.

    Returns:
        ``{"old_train", "old_val", "old_test", "new_train", "new_val", "new_test"}`` → ``TensorDataset(x, y)``,
        ``x`` float32 ``(n, 64)`` pixel intensities in [0, 1], ``y`` int64 digit labels 0–9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    splits: dict[str, TensorDataset] = {}
    for task, digits in (("old", OLD_DIGITS), ("new", NEW_DIGITS)):
        index = torch.isin(y, torch.tensor(digits)).nonzero().squeeze(1).numpy()
        train, rest = train_test_split(index, train_size=0.5, stratify=labels[index], random_state=seed)
        val, test = train_test_split(rest, train_size=0.5, stratify=labels[rest], random_state=seed)
        for name, part in (("train", train), ("val", val), ("test", test)):
            rows = torch.as_tensor(sorted(part))
            splits[f"{task}_{name}"] = TensorDataset(x[rows], y[rows])
    return splits


def loader(dataset: TensorDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


# ------------------------------------------------------------------------------------------------------------ model
class DigitsMLP(DigitsSteps, pl.LightningModule):
    """64 → hidden → hidden → 10 MLP with BatchNorm; one head shared by both tasks.

    Validation logs ``val/<task>_acc`` and ``val/<task>_loss`` for every validation dataloader, named by
    ``val_tasks`` in order (with ``add_dataloader_idx=False``, so the names carry no ``/dataloader_idx_N``).

    Args:
        hidden: width of the two hidden layers.
        lr: SGD learning rate (momentum 0.9, constant).
        val_tasks: the task name of each validation dataloader.
    """

    def __init__(self, hidden: int = 128, lr: float = 0.05, val_tasks: Sequence[str] = ("old",)) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.val_tasks = tuple(val_tasks)
        self.net = digits_mlp(hidden)


class BestEpoch(pl.Callback):
    """Keeps the weights of the best training epoch by ``monitor`` (the first on ties), in memory.

    It keeps what ``ModelCheckpoint(monitor=..., mode="max", save_top_k=1)`` would, without writing ``.ckpt`` files.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.score = -math.inf
        self.epoch = -1
        self.weights: dict[str, Tensor] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score = float(trainer.callback_metrics[self.monitor])  # this epoch's validation ran before this hook
        if score > self.score:
            self.score, self.epoch = score, trainer.current_epoch
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}


def make_trainer(out: Path, epochs: int, callbacks: Sequence[pl.Callback] = (), *, progress: bool) -> pl.Trainer:
    extra: list[pl.Callback] = []
    if progress:
        from pytorch_lightning.callbacks import RichProgressBar

        extra.append(RichProgressBar())
    return pl.Trainer(
        default_root_dir=str(out),
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        callbacks=[*callbacks, *extra],
    )


# ------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def test_predictions(
    weights: Mapping[str, Tensor], splits: Mapping[str, TensorDataset], hidden: int
) -> dict[str, Tensor]:
    """Per test image, whether ``weights`` classify it right (eval mode: BatchNorm running statistics)."""
    model = DigitsMLP(hidden=hidden)
    model.load_state_dict(weights)
    model.eval()
    hits = {}
    for task in TASKS:
        x, y = splits[f"{task}_test"].tensors
        hits[task] = model(x).argmax(1) == y  # (n_task,) bool
    return hits


def accuracy_row(hits: Mapping[str, Tensor]) -> dict[str, float]:
    row = {f"{task}_acc": int(hits[task].sum()) / len(hits[task]) for task in TASKS}
    every = torch.cat([hits[t] for t in TASKS])
    row["all_acc"] = int(every.sum()) / len(every)
    return row


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: images only one of two models gets right, tested against a fair coin."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def verdict(name: str, hits: Mapping[str, Tensor], ref_name: str, ref: Mapping[str, Tensor], on: str) -> str:
    """One line comparing two rows' test predictions on the ``on`` images (``"new"`` or ``"all"``)."""
    tasks = TASKS if on == "all" else (on,)
    mine = torch.cat([hits[t] for t in tasks])
    theirs = torch.cat([ref[t] for t in tasks])
    gained, lost = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
    p = mcnemar_p(gained, lost)
    word = "no significant difference" if p >= SIGNIFICANCE else ("helps" if gained > lost else "hurts")
    points = {t: 100 * (int(hits[t].sum()) - int(ref[t].sum())) / len(hits[t]) for t in TASKS}
    return (
        f"{name} vs {ref_name}: {word} on {'all' if on == 'all' else 'new'} digits "
        f"(test images +{gained}/−{lost}, McNemar p={p:.2g}); "
        f"old {points['old']:+.1f} pts, new {points['new']:+.1f} pts"
    )


def trade_off(rows: Mapping[str, Mapping[str, float]]) -> str:
    """How much of the soup's forgetting the blend undid, and how much of its gain it kept (test accuracy)."""
    names = {"old_name": "old-digit", "new_name": "new-digit"}
    return blend_trade_off(rows, "old_acc", "new_acc", higher_is_better=True, **names)


# -------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/forgetting_digits"), help="output folder")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (10; 4 with --quick)")
    parser.add_argument("--base-epochs", type=int, default=None, help="pretraining epochs (10; 4 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.02, help="fine-tune learning rate (SGD, momentum 0.9)")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tune batch size (small: noisy checkpoints)")
    parser.add_argument("--new-train", type=int, default=None, help="fine-tune on only this many new-digit images")
    parser.add_argument("--window", type=int, default=5, help="CheckpointAveraging window (last N epochs)")
    parser.add_argument(
        "--keep-old", type=float, default=0.9,
        help="blend constraint: keep this fraction of the base's old-digit validation accuracy (default 0.9)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "default"]
    args.epochs = args.epochs or sizes["epochs"]
    args.base_epochs = args.base_epochs or sizes["base_epochs"]
    args.hidden = sizes["hidden"]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment, print the table and verdicts; returns what ``--json`` writes."""
    args = parse_args(argv)
    start = time.perf_counter()
    # A tiny MLP gains nothing from intra-op threads, and on a busy machine OpenMP threads waiting for each other
    # make every small op 10-100x slower. One thread also makes the numbers independent of the core count.
    torch.set_num_threads(1)
    quiet_lightning()
    console = Console()
    progress = not args.no_progress
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(args.seed)
    if args.new_train:
        x, y = splits["new_train"].tensors
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[: args.new_train]
        splits["new_train"] = TensorDataset(x[keep], y[keep])

    # 1. The base capability: digits 0–4.
    console.rule(f"1/2  pretraining on digits 0–4: {len(splits['old_train'])} images, {args.base_epochs} epochs")
    pl.seed_everything(args.seed, verbose=False)
    base = DigitsMLP(hidden=args.hidden, lr=0.05, val_tasks=("old",))
    pretrain = make_trainer(out, args.base_epochs, progress=progress)
    pretrain.fit(base, loader(splits["old_train"], 32, shuffle=True, seed=args.seed), loader(splits["old_val"], 256))
    base_val_old = float(pretrain.callback_metrics["val/old_acc"])  # validation of the final weights
    save_file(base.state_dict(), str(out / "base.safetensors"))
    base_test_old = float(test_predictions(base.state_dict(), splits, args.hidden)["old"].float().mean())
    require_learned(
        "the base's accuracy on its own task (old digits 0–4, test split)", base_test_old, BASE_FLOOR,
        "Pretrain longer (--base-epochs) or with another --seed.",
    )  # fmt: skip

    # 2. Fine-tune on digits 5–9 with the three callbacks in one Trainer; validation sees both tasks.
    threshold = math.floor(args.keep_old * base_val_old * 1000) / 1000
    constraint = f"val/old_acc>={threshold:g}"
    console.rule(
        f"2/2  fine-tuning on digits 5–9: {len(splits['new_train'])} images, {args.epochs} epochs; blend constraint "
        f"{constraint} ({args.keep_old:g} × the base's {base_val_old:.3f})"
    )
    pl.seed_everything(args.seed + 1, verbose=False)
    model = DigitsMLP(hidden=args.hidden, lr=args.lr, val_tasks=("new", "old"))
    model.load_state_dict(base.state_dict())
    best = BestEpoch(monitor="val/new_acc")
    callbacks = [
        best,
        *soup_callbacks(
            out, window=args.window, monitor="val/new_acc", mode="max", constraint=constraint, ratios=BLEND_RATIOS
        ),
    ]
    finetune = make_trainer(out, args.epochs, callbacks, progress=progress)
    train = loader(splits["new_train"], args.batch_size, shuffle=True, seed=args.seed)
    finetune.fit(model, train, [loader(splits["new_val"], 256), loader(splits["old_val"], 256)])
    save_file(best.weights, str(out / "best.safetensors"))

    # 3. Test accuracy of every file, computed here; the callbacks never saw the test split.
    files = {
        "base": ("base.safetensors", "pretrained on 0–4 (the blend's anchor)"),
        "last": ("final.safetensors", f"fine-tune, epoch {args.epochs - 1} (last)"),
        "best": ("best.safetensors", f"fine-tune, epoch {best.epoch} (best val new acc)"),
        "average": ("average.safetensors", f"mean of the last {min(args.window, args.epochs)} epochs"),
        **merged_files(out, "epoch"),
    }
    hits, rows = score_files(out, files, lambda weights: test_predictions(weights, splits, args.hidden), accuracy_row)
    verdicts = standard_verdicts(verdict, hits, "all", trade_off(rows))
    wall = time.perf_counter() - start

    n_test = {task: len(splits[f"{task}_test"]) for task in TASKS}
    title = f"Learning digits 5–9 after 0–4 (test split: {n_test['old']} old + {n_test['new']} new images)"
    columns = [(f"{t}_acc", f"{h}\ntest acc") for t, h in (("old", "old digits 0–4"), ("new", "new digits 5–9"))]
    columns.append(("all_acc", "all digits\ntest acc"))
    table = render_table(rows, title, columns, higher_is_better=True, decimals=3)
    print_results(console, table, verdicts, out, wall)

    fields = {
        "seed": args.seed,
        "epochs": args.epochs,
        "base_epochs": args.base_epochs,
        "out": str(out),
        "n_test": n_test,
        "constraint": constraint,
    }
    return json_result("examples/forgetting_digits.py", argv, fields, rows, verdicts, wall, args.json)


if __name__ == "__main__":
    main()
