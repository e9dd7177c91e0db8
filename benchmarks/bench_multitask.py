"""Multi-task merging on CPU in minutes: every merge method of `lightning_soup.merge` on one small benchmark.

The protocol of the task-arithmetic / TIES / TSV / Iso-C papers (Ilharco et al. 2023, §"Adding task vectors"),
shrunk to scikit-learn's digits (1,797 8×8 images, shipped with scikit-learn, no download):

* tasks: ``--tasks`` views of the same digits, each one of the 8 symmetries of the square applied to the image
  (identity, rotations, flips, transpositions), each a 10-way classification task;
* base: an MLP encoder pretrained on a small labelled subset of the *identity* view only (the "pre-trained
  model"), so it has generic digit features but does not solve the other views;
* heads: per task, a linear classifier fitted on the base's frozen features of a few (``--probe-samples``)
  images, then kept frozen: the stand-in for CLIP's zero-shot head, weak until the encoder adapts to it;
* fine-tunes: per task, the encoder fine-tuned on that task's training split, its head frozen;
* merging: the encoders are merged with each method; the merged encoder is evaluated with every task's own head.
  A method's coefficient (λ / α / scale) is chosen from ``GRID`` on the validation split by average accuracy over
  tasks, one value for all tasks. TIES keeps density 0.2 as in its paper, DARE density 0.3, Iso-CTS common
  fraction 0.8; the uniform average and Model Stock have no coefficient. Every method is ``base + c·Δ``, so each
  is merged once at ``c = 1`` and interpolated to the grid;
* reported on the test split: average absolute accuracy and average normalised accuracy (merged accuracy on a
  task divided by that task's fine-tune's accuracy), mean ± std over ``--seeds`` runs.

Example::

    python benchmarks/bench_multitask.py                      # 8 tasks, 3 seeds (~2.5 min on one idle core)
    python benchmarks/bench_multitask.py --quick              # 4 tasks, 1 seed, shorter training (a smoke run)
    python benchmarks/bench_multitask.py --json multitask.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_soup import merge

#: name -> image transformation of an (N, 8, 8) batch; the first `--tasks` are used
VIEWS: dict[str, Callable[[Tensor], Tensor]] = {  # the 8 symmetries of the square (the dihedral group D4)
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, (1, 2)),
    "rot180": lambda x: torch.rot90(x, 2, (1, 2)),
    "rot270": lambda x: torch.rot90(x, 3, (1, 2)),
    "flip-lr": lambda x: torch.flip(x, (2,)),
    "flip-ud": lambda x: torch.flip(x, (1,)),
    "transpose": lambda x: x.transpose(1, 2),
    "anti-transpose": lambda x: torch.rot90(x, 2, (1, 2)).transpose(1, 2),
}

#: every coefficient (λ, scale, α) is chosen from this grid on validation
GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 4.0, 5.0]
METHODS: dict[str, tuple[Callable[..., dict[str, Tensor]], list[float] | None]] = {
    # name -> (merge(base, finetuned, coefficient) on encoder state dicts, the coefficient grid or None)
    "uniform average": (lambda b, fts, c: merge.uniform_soup(fts), None),
    "task arithmetic": (
        lambda b, fts, c: merge.task_arithmetic(b, [merge.task_vector(f, b) for f in fts], c),
        GRID,
    ),
    "TIES (density 0.2)": (lambda b, fts, c: merge.ties(b, fts, density=0.2, scale=c), GRID),
    "DARE (density 0.3)": (lambda b, fts, c: merge.dare(b, fts, density=0.3, scale=c, seed=0), GRID),
    "TSV": (lambda b, fts, c: merge.tsv_merge(b, fts, alpha=c), GRID),
    "Iso-C": (lambda b, fts, c: merge.iso_c(b, fts, alpha=c), GRID),
    "Iso-CTS (f = 0.8)": (lambda b, fts, c: merge.iso_cts(b, fts, alpha=c, common_fraction=0.8), GRID),
    "Model Stock": (lambda b, fts, c: merge.model_stock(b, fts), None),
}


def encoder(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU()
    )


def load_digits(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Digits scaled to [0, 1] as (N, 8, 8), split 60/20/20 into train/val/test, stratified by label."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8) / 16.0
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    as_t = lambda a, b: (torch.tensor(a, dtype=torch.float32), torch.tensor(b))  # noqa: E731
    return {"train": as_t(x_train, y_train), "val": as_t(x_val, y_val), "test": as_t(x_test, y_test)}


def view(task: str, x: Tensor) -> Tensor:
    return VIEWS[task](x).reshape(-1, 64)


def train(
    params: list[Tensor], forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, steps: int, lr: float, seed: int
) -> None:
    """Adam on cross-entropy, mini-batches of 64 drawn with a fixed generator."""
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(forward(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(enc: nn.Module, head: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((head(enc(x)).argmax(1) == y).float().mean())


def run_seed(seed: int, tasks: list[str], args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    data = load_digits(seed)
    x_train, y_train = data["train"]

    # pre-training: the identity view, a small labelled subset, a throwaway head
    base = encoder(args.width)
    pre_head = nn.Linear(args.width, 10)
    subset = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[: args.pretrain_samples]
    train(
        [*base.parameters(), *pre_head.parameters()],
        lambda x: pre_head(base(x)),
        view("identity", x_train[subset]),
        y_train[subset],
        args.pretrain_steps,
        3e-3,
        seed,
    )
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}

    heads, fts = [], []
    for i, task in enumerate(tasks):
        xt = view(task, x_train)
        head = nn.Linear(args.width, 10)
        few = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed + 300 + i))[: args.probe_samples]
        with torch.no_grad():
            features = base(xt[few])
        train(list(head.parameters()), head, features, y_train[few], args.probe_steps, 1e-2, seed + 100 + i)
        head.requires_grad_(False)
        enc = encoder(args.width)
        enc.load_state_dict(base_sd)
        train(
            list(enc.parameters()), lambda x: head(enc(x)), xt, y_train, args.finetune_steps, args.finetune_lr,
            seed + 200 + i,
        )
        heads.append(head)
        fts.append({k: v.detach().clone() for k, v in enc.state_dict().items()})

    probe = encoder(args.width)

    def scores(sd: dict[str, Tensor], split: str) -> list[float]:
        probe.load_state_dict(sd)
        x, y = data[split]
        return [accuracy(probe, heads[i], view(task, x), y) for i, task in enumerate(tasks)]

    finetuned_test = [scores(ft, "test")[i] for i, ft in enumerate(fts)]
    base_test = scores(base_sd, "test")
    rows: dict[str, dict] = {
        "pre-trained base": {"test": base_test, "coefficient": None},
        "fine-tuned (each its own task)": {"test": finetuned_test, "coefficient": None},
    }
    for name, (fn, grid) in METHODS.items():
        best: tuple[float, float | None, dict[str, Tensor]] | None = None
        # every coefficient scales the merged update linearly (base + c·Δ), so merge once and interpolate
        unit = fn(base_sd, fts, 1.0)
        for c in grid if grid is not None else [None]:
            merged = unit if c is None else merge.interpolate(base_sd, unit, c)
            val = statistics.fmean(scores(merged, "val"))
            if best is None or val > best[0]:
                best = (val, c, merged)
        assert best is not None
        rows[name] = {"test": scores(best[2], "test"), "coefficient": best[1], "val": best[0]}
    for row in rows.values():
        row["absolute"] = statistics.fmean(row["test"])
        row["normalised"] = statistics.fmean(a / f for a, f in zip(row["test"], finetuned_test))
    return {"rows": rows}


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    for name in runs[0]["rows"]:
        per = [r["rows"][name] for r in runs]
        abs_ = [p["absolute"] for p in per]
        norm = [p["normalised"] for p in per]
        out.append(
            {
                "name": name,
                "absolute": statistics.fmean(abs_),
                "absolute_std": statistics.pstdev(abs_),
                "normalised": statistics.fmean(norm),
                "normalised_std": statistics.pstdev(norm),
                "coefficients": [p["coefficient"] for p in per],
                "per_task": [statistics.fmean(p["test"][i] for p in per) for i in range(len(per[0]["test"]))],
            }
        )
    return out


def render(summary: list[dict], tasks: list[str], seeds: int) -> str:
    lines = [
        f"| method | avg. absolute acc. (%) | avg. normalised acc. (%) | chosen coefficient ({seeds} seeds) |",
        "|---|---|---|---|",
    ]
    for r in summary:
        coef = ", ".join("—" if c is None else f"{c:g}" for c in r["coefficients"])
        lines.append(
            f"| {r['name']} | {100 * r['absolute']:.1f} ± {100 * r['absolute_std']:.1f} | "
            f"{100 * r['normalised']:.1f} ± {100 * r['normalised_std']:.1f} | {coef} |"
        )
    lines.append("")
    lines.append(f"tasks: {', '.join(tasks)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help=f"number of tasks, at most {len(VIEWS)} (default 8)")
    parser.add_argument("--seeds", type=int, default=3, help="independent runs (default 3)")
    parser.add_argument("--width", type=int, default=512, help="encoder width (default 512)")
    parser.add_argument("--pretrain-samples", type=int, default=200, help="labelled identity-view images (200)")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--probe-samples", type=int, default=30, help="images per task for its frozen head (30)")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="4 tasks, 1 seed, width 128, short training: a smoke run")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.width = min(args.tasks, 4), 1, 128
        args.pretrain_steps, args.probe_steps, args.finetune_steps = 150, 100, 200
    if not 2 <= args.tasks <= len(VIEWS):
        parser.error(f"--tasks must be between 2 and {len(VIEWS)}")
    torch.set_num_threads(args.threads)
    tasks = list(VIEWS)[: args.tasks]

    start = time.perf_counter()
    runs = [run_seed(seed, tasks, args) for seed in range(args.seeds)]
    summary = summarise(runs)
    print(render(summary, tasks, args.seeds))
    result = {
        "benchmark": "multitask",
        "tasks": tasks,
        "seeds": args.seeds,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.processor() or platform.machine(),
        "seconds": time.perf_counter() - start,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "results": [{k: v for k, v in r.items() if k != "per_task"} | {"per_task": r["per_task"]} for r in summary],
    }
    print(f"\n{result['seconds']:.0f} s on {args.threads} thread(s), torch {torch.__version__}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
