"""Forgetting English while learning Python: a character-level transformer, averaged, souped and blended.

A small causal transformer over bytes is pretrained on English prose that ships with Python (the help texts in
``pydoc_data.topics``), then fine-tuned on Python source from the standard library. Fine-tuning makes the model
worse at English (the "old" task, ``val/old_loss``) while it learns code (the "new" task, ``val/new_loss``). One
``Trainer`` runs the fine-tune with the three ``lightning_soup`` callbacks:

* ``CheckpointAveraging(every_n_train_steps=...)``: the mean of the last N snapshots (LAWA, Kaddour 2022);
* ``GreedySoup(monitor="val/new_loss", mode="min")``: Wortsman et al.'s (2022) greedy soup over the snapshots taken
  at every validation;
* ``TaskArithmeticBlend(anchor="initial")``: ``base + r·(soup − base)`` (WiSE-FT), ``r`` the lowest code loss among
  the ratios whose English loss stays within ``--max-old-increase`` of the base's (a constraint computed from the
  base's validation loss, not written in).

Every text is split per document into train/val/test (80/10/10). The callbacks and every choice see the validation
split; the table reports test losses (nats per character) computed here from the files the callbacks wrote. Each
verdict compares two rows window by window on the test split (a paired z-test), so small differences are called
noise. Nothing is downloaded. CPU by default (a few minutes); ``--device cuda`` with larger ``--d-model``,
``--layers``, ``--context`` and ``--steps`` on a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_common.py, however this file is started
from _common import (  # noqa: E402
    blend_trade_off,
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

TASKS = ("old", "new")  # English, Python
TASK_NAMES = {"old": "English", "new": "Python"}
ROWS = ("base", "last", "best", "average", "soup", "blended")
BLEND_RATIOS = [i / 10 for i in range(11)]
SIGNIFICANCE = 0.05
# Standard-library modules whose source is the fine-tuning text (those missing from this Python are skipped).
CODE_MODULES = (
    "argparse", "dataclasses", "functools", "inspect", "textwrap", "string",
    "difflib", "shutil", "enum", "fractions", "heapq", "calendar",
)  # fmt: skip

SIZES: dict[str, dict[str, Any]] = {
    "default": dict(d_model=96, layers=2, heads=4, context=64, batch_size=32, base_steps=600, steps=400, evals=8,
                    val_windows=128, test_windows=256),
    "quick": dict(d_model=32, layers=1, heads=2, context=32, batch_size=16, base_steps=40, steps=24, evals=4,
                  val_windows=16, test_windows=32),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------- data
def english_documents() -> list[str]:
    """The long English help texts that ship with Python (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def python_documents() -> list[str]:
    """The source of a few standard-library modules of the running Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in CODE_MODULES:
        for path in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
            if path.is_file():
                docs.append(path.read_text(encoding="utf-8"))
                break
    if not docs:
        raise SystemExit(f"No standard-library sources found under {stdlib}; this example needs a full Python install.")
    return docs


def split_documents(docs: Sequence[str]) -> dict[str, Tensor]:
    """Split every document 80/10/10 into train/val/test and join each part: ``{split: uint8 bytes (n,)}``."""
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for doc in docs:
        data = doc.encode("utf-8")
        a, b = int(0.8 * len(data)), int(0.9 * len(data))
        for split, chunk in (("train", data[:a]), ("val", data[a:b]), ("test", data[b:])):
            parts[split].append(chunk)
    return {split: torch.frombuffer(bytearray(b"\n\n".join(part)), dtype=torch.uint8) for split, part in parts.items()}


def load_texts() -> dict[str, Tensor]:
    """``{"old_train", "old_val", ..., "new_test"}`` → byte tensors; old is English, new is Python."""
    texts = {}
    for task, docs in (("old", english_documents()), ("new", python_documents())):
        for split, data in split_documents(docs).items():
            texts[f"{task}_{split}"] = data
    return texts


class Windows(Dataset):
    """``(x, y)`` byte windows of ``context`` characters starting at a given offset; ``y`` is ``x`` shifted by one."""

    def __init__(self, data: Tensor, context: int) -> None:
        self.data, self.context = data, context

    def __len__(self) -> int:
        return len(self.data) - self.context

    def __getitem__(self, start: int) -> tuple[Tensor, Tensor]:
        chunk = self.data[start : start + self.context + 1].long()
        return chunk[:-1], chunk[1:]


class RandomStarts(Sampler[int]):
    """``num_samples`` uniformly random window starts, the same ones for a given seed."""

    def __init__(self, dataset: Windows, num_samples: int, seed: int) -> None:
        self.n, self.num_samples, self.seed = len(dataset), num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        return iter(torch.randint(self.n, (self.num_samples,), generator=generator).tolist())


def train_loader(data: Tensor, context: int, batch_size: int, steps: int, seed: int) -> DataLoader:
    windows = Windows(data, context)
    return DataLoader(windows, batch_size=batch_size, sampler=RandomStarts(windows, steps * batch_size, seed))


def eval_loader(data: Tensor, context: int, n_windows: int, batch_size: int) -> DataLoader:
    """``n_windows`` evenly spaced windows over the whole split, in order."""
    windows = Windows(data, context)
    starts = torch.linspace(0, len(windows) - 1, min(n_windows, len(windows))).long().tolist()
    return DataLoader(windows, batch_size=batch_size, sampler=starts)


# ------------------------------------------------------------------------------------------------------------ model
class CharTransformer(pl.LightningModule):
    """A causal pre-norm transformer over bytes (vocabulary 256) with learned positions.

    Validation logs ``val/<task>_loss`` (mean cross-entropy per character, nats) for every validation dataloader,
    named by ``val_tasks`` in order.

    Args:
        d_model: width; ``heads`` must divide it.
        layers: transformer blocks.
        heads: attention heads.
        context: longest sequence (characters).
        lr: AdamW peak learning rate.
        warmup: linear warm-up steps.
        decay_steps: cosine decay to 10% of ``lr`` over this many steps; 0 keeps ``lr`` constant after warm-up.
        val_tasks: the task name of each validation dataloader.
    """

    def __init__(
        self,
        d_model: int = 128,
        layers: int = 2,
        heads: int = 4,
        context: int = 64,
        lr: float = 3e-3,
        warmup: int = 50,
        decay_steps: int = 0,
        val_tasks: Sequence[str] = ("old",),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.val_tasks = tuple(val_tasks)
        self.embed = nn.Embedding(256, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.position[:t]  # (b, t, d)
        h = self.blocks(h, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h))  # (b, t, 256) logits

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.val_tasks[dataloader_idx]
        self.log(f"val/{task}_loss", self.loss(batch), add_dataloader_idx=False, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=(0.9, 0.99), weight_decay=0.01)

        def factor(step: int) -> float:
            if step < hp.warmup:
                return (step + 1) / hp.warmup
            if not hp.decay_steps:
                return 1.0
            progress = min(1.0, (step - hp.warmup) / max(1, hp.decay_steps - hp.warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class BestValidation(pl.Callback):
    """Keeps the weights of the best validation run by ``monitor`` (lower is better; the first on ties), in memory."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.score = math.inf
        self.step = -1
        self.weights: dict[str, Tensor] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if score < self.score:
            self.score, self.step = score, trainer.global_step
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}


def make_trainer(args: argparse.Namespace, steps: int, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    extra: list[pl.Callback] = []
    if args.progress:
        from pytorch_lightning.callbacks import RichProgressBar

        extra.append(RichProgressBar())
    return pl.Trainer(
        default_root_dir=str(args.out),
        accelerator="gpu" if args.device == "cuda" else args.device,
        devices=1,
        precision=args.precision,
        max_steps=steps,
        max_epochs=1,  # one pass over `steps` random batches
        val_check_interval=steps // args.evals,
        # Some CUDA kernels (attention and embedding backward) have no deterministic version: warn, don't fail.
        deterministic=True if args.device == "cpu" else "warn",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=[*callbacks, *extra],
    )


# ------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def window_losses(
    weights: Mapping[str, Tensor], texts: Mapping[str, Tensor], args: argparse.Namespace
) -> dict[str, Tensor]:
    """Per test window, the mean cross-entropy per character (float64, CPU) of ``weights``, for each task."""
    model = CharTransformer(d_model=args.d_model, layers=args.layers, heads=args.heads, context=args.context)
    model.load_state_dict(weights)
    model.to(args.device).eval()
    losses = {}
    for task in TASKS:
        per_window = []
        for x, y in eval_loader(texts[f"{task}_test"], args.context, args.test_windows, 64):
            x, y = x.to(args.device), y.to(args.device)
            ce = nn.functional.cross_entropy(model(x).transpose(1, 2).float(), y, reduction="none")  # (b, t)
            per_window.append(ce.mean(1).double().cpu())
        losses[task] = torch.cat(per_window)
    return losses


def loss_row(losses: Mapping[str, Tensor]) -> dict[str, float]:
    row = {f"{task}_loss": losses[task].mean().item() for task in TASKS}
    row["mean_loss"] = (row["old_loss"] + row["new_loss"]) / 2
    return row


def verdict(name: str, losses: Mapping[str, Tensor], ref_name: str, ref: Mapping[str, Tensor], on: str) -> str:
    """One line comparing two rows' test losses, window by window, on ``on`` ("new" or "both")."""
    tasks = TASKS if on == "both" else (on,)
    diff = torch.cat([losses[t] - ref[t] for t in tasks])  # (n_windows,) float64, < 0 means better
    mean, sem = diff.mean().item(), (diff.std() / math.sqrt(len(diff))).item()
    z = mean / sem if sem > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    p = math.erfc(abs(z) / math.sqrt(2))  # two-sided, normal approximation
    word = "no significant difference" if p >= SIGNIFICANCE else ("helps" if mean < 0 else "hurts")
    target = "Python" if on == "new" else "English + Python"
    delta = {t: (losses[t].mean() - ref[t].mean()).item() for t in TASKS}
    return (
        f"{name} vs {ref_name}: {word} on {target} (Δloss {mean:+.4f} ± {sem:.4f} per window, p={p:.2g}); "
        f"English {delta['old']:+.3f}, Python {delta['new']:+.3f} nats/char"
    )


# -------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/forgetting_lm"), help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default=None, help="Lightning precision (default 32-true; bf16-mixed on cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny model for tests (seconds)")
    sizes = parser.add_argument_group("sizes (defaults: a CPU-sized model; --quick: a toy)")
    for name, kind, help_text in (
        ("d-model", int, "model width"),
        ("layers", int, "transformer blocks"),
        ("heads", int, "attention heads"),
        ("context", int, "characters per window"),
        ("batch-size", int, "windows per step"),
        ("base-steps", int, "pretraining steps on English"),
        ("steps", int, "fine-tuning steps on Python"),
        ("evals", int, "validations (soup ingredients, averaging snapshots) during the fine-tune"),
        ("val-windows", int, "validation windows per task"),
        ("test-windows", int, "test windows per task"),
    ):
        sizes.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate (AdamW, constant)")
    parser.add_argument("--window", type=int, default=4, help="CheckpointAveraging window (last N snapshots)")
    parser.add_argument(
        "--max-old-increase", type=float, default=0.0,
        help="blend constraint: English validation loss at most (1 + this) × the base's (default 0: no forgetting)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default 1 on CPU: a model this small gains little from more, and on a busy "
        "machine waiting threads make it several times slower)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    for key, value in SIZES["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    if args.steps < args.evals or args.base_steps < args.evals:
        parser.error(f"--steps and --base-steps must be at least --evals ({args.evals})")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the experiment, print the table and verdicts; returns what ``--json`` writes."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    console = Console()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    texts = load_texts()
    sizes = {k: f"{len(v) / 1000:.0f}K" for k, v in texts.items() if k.endswith("_train")}
    arch = dict(d_model=args.d_model, layers=args.layers, heads=args.heads, context=args.context)

    def val_loader(task: str) -> DataLoader:
        return eval_loader(texts[f"{task}_val"], args.context, args.val_windows, 64)

    # 1. The base capability: English.
    console.rule(f"1/2  pretraining on English ({sizes['old_train']} chars), {args.base_steps} steps")
    pl.seed_everything(args.seed, verbose=False)
    base = CharTransformer(**arch, lr=3e-3, warmup=min(50, args.base_steps // 4), decay_steps=args.base_steps)
    console.print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, {arch}")
    pretrain = make_trainer(args, args.base_steps)
    english = train_loader(texts["old_train"], args.context, args.batch_size, args.base_steps, args.seed)
    pretrain.fit(base, english, val_loader("old"))
    base_val_old = pretrain.validate(base, val_loader("old"), verbose=False)[0]["val/old_loss"]
    # The base must model English better than its byte frequencies do (a --quick toy: better than chance).
    counts = torch.bincount(texts["old_train"].long(), minlength=256).double()
    frequencies = counts[counts > 0] / counts.sum()
    floor = math.log(256) if args.quick else float(-(frequencies * frequencies.log()).sum())
    require_learned(
        "the base's English validation loss (nats per character)", base_val_old, floor,
        f"The bound is {'chance, ln 256' if args.quick else 'the unigram entropy of the English bytes'}. "
        "Pretrain longer (--base-steps) or a larger model.", higher_is_better=False,
    )  # fmt: skip
    base_weights = {k: v.detach().cpu() for k, v in base.state_dict().items()}
    save_file(base_weights, str(out / "base.safetensors"))

    # 2. Fine-tune on Python with the three callbacks; validation sees both tasks.
    threshold = math.ceil(base_val_old * (1 + args.max_old_increase) * 1e4) / 1e4
    constraint = f"val/old_loss<={threshold:g}"
    console.rule(
        f"2/2  fine-tuning on Python ({sizes['new_train']} chars), {args.steps} steps; blend constraint {constraint} "
        f"({1 + args.max_old_increase:g} × the base's {base_val_old:.4f})"
    )
    pl.seed_everything(args.seed + 1, verbose=False)
    model = CharTransformer(**arch, lr=args.lr, warmup=min(20, args.steps // 4), val_tasks=("new", "old"))
    model.load_state_dict(base_weights)
    best = BestValidation(monitor="val/new_loss")
    every = args.steps // args.evals
    callbacks = [
        best,
        *soup_callbacks(
            out, window=args.window, monitor="val/new_loss", mode="min", constraint=constraint, ratios=BLEND_RATIOS,
            every_n_train_steps=every,
        ),
    ]  # fmt: skip
    finetune = make_trainer(args, args.steps, callbacks)
    train = train_loader(texts["new_train"], args.context, args.batch_size, args.steps, args.seed + 1)
    finetune.fit(model, train, [val_loader("new"), val_loader("old")])
    save_file(best.weights, str(out / "best.safetensors"))

    # 3. Test losses of every file, computed here; the callbacks never saw the test split.
    files = {
        "base": ("base.safetensors", "pretrained on English (the blend's anchor)"),
        "last": ("final.safetensors", f"fine-tune, step {finetune.global_step} (last)"),
        "best": ("best.safetensors", f"fine-tune, step {best.step} (best val Python loss)"),
        "average": ("average.safetensors", f"mean of the last {min(args.window, args.evals)} snapshots"),
        **merged_files(out, "step"),
    }
    losses, rows = score_files(out, files, lambda weights: window_losses(weights, texts, args), loss_row)
    trade = blend_trade_off(rows, "old_loss", "new_loss", higher_is_better=False, old_name="English", new_name="Python")
    verdicts = standard_verdicts(verdict, losses, "both", trade)
    wall = time.perf_counter() - start

    title = f"Learning Python after English (test: {args.test_windows} windows of {args.context} chars per task)"
    headers = {"old_loss": "English", "new_loss": "Python", "mean_loss": "mean"}
    columns = [(key, f"{header}\ntest loss") for key, header in headers.items()]
    print_results(console, render_table(rows, title, columns, higher_is_better=False, decimals=4), verdicts, out, wall)

    fields = {
        "seed": args.seed,
        "device": args.device,
        "sizes": {k: getattr(args, k) for k in SIZES["default"]},
        "out": str(out),
        "constraint": constraint,
        "base_val_old_loss": base_val_old,
    }
    return json_result("examples/forgetting_lm.py", argv, fields, rows, verdicts, wall, args.json)


if __name__ == "__main__":
    main()
