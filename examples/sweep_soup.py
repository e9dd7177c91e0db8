"""A hyperparameter sweep of fine-tunes, souped: greedy soup vs uniform soup vs the best single run vs an ensemble.

The founding experiment of model soups (Wortsman et al., ICML 2022) at toy scale: one base (centred digits on a
16×16 page, see ``_skills.py``) is fine-tuned on skill A (digits written up-right of the centre) 8 times, varying
the axes of the paper's sweep: learning rate, weight decay, data augmentation (pixel noise, one-pixel shifts) and
label smoothing. Then, with ``lightning_soup.soup`` scoring every checkpoint and candidate with the module's own
validation loop:

* greedy soup: sorted by validation accuracy, each run joins the running mean only when validation does not drop;
* uniform soup: the mean of all runs;
* the best single run (by validation), and the output ensemble of all runs (8× the inference cost).

The table reports the held-out test split and a shifted test split (the same test pages with Gaussian pixel noise,
σ = ``--noise``) that no run trained or was chosen on; each row is compared with the best single run by an exact
McNemar test. ``soup_progression.png`` plots the greedy soup's accuracy after each ingredient tried.

Run ``python examples/sweep_soup.py`` (about a minute on one CPU core); outputs go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/_skills.py, however this file is started
from _skills import (  # noqa: E402
    PageClassifier,
    accuracy,
    domain_data,
    load_digits_split,
    loader,
    make_trainer,
    paired,
    place,
    probabilities,
    require,
    setup,
    state,
    train_base,
    val_loaders,
)

import lightning_soup  # noqa: E402
from lightning_soup.merge import uniform_soup  # noqa: E402

# The sweep: (name, learning rate, weight decay, augmentation, label smoothing).
SWEEP = [
    ("lr0.02", 0.02, 0.0, "none", 0.0),
    ("lr0.05", 0.05, 0.0, "none", 0.0),
    ("lr0.01", 0.01, 0.0, "none", 0.0),
    ("wd1e-3", 0.02, 1e-3, "none", 0.0),
    ("noise", 0.02, 0.0, "noise", 0.0),
    ("shift", 0.02, 0.0, "shift", 0.0),
    ("ls0.1", 0.02, 0.0, "none", 0.1),
    ("lr0.05-wd-noise-ls", 0.05, 1e-3, "noise", 0.1),
]
SKILL_FLOOR = 0.9  # the best run must learn skill A to at least this (validation) before anything is souped
SIGNIFICANCE = 0.05


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/sweep_soup"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-epochs", type=int, default=20, help="base training epochs (centred digits)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every fine-tune")
    parser.add_argument("--hidden", type=int, default=256, help="MLP width")
    parser.add_argument("--noise", type=float, default=0.3, help="σ of the pixel noise of the shifted test split")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def shifted(pages: Tensor, sigma: float, seed: int) -> Tensor:
    """The pages with Gaussian pixel noise (clamped to [0, 1]), reproducibly."""
    noise = torch.randn(pages.shape, generator=torch.Generator().manual_seed(seed + 1000))
    return (pages + sigma * noise).clamp(0.0, 1.0)


@torch.no_grad()
def predict_hits(models: Sequence[Mapping[str, Tensor]], pages: Tensor, y: Tensor, hidden: int) -> Tensor:
    """Per page, whether the model (several: the mean of their softmax) is right."""
    return torch.stack([probabilities(m, pages, hidden) for m in models]).mean(0).argmax(1) == y


def soup_of(paths: Sequence[Path]) -> dict[str, Tensor]:
    return uniform_soup([load_file(str(p)) for p in paths])


def render(rows: Sequence[Mapping[str, Any]], n_test: int, sigma: float) -> Table:
    table = Table(title=f"A sweep of {len(SWEEP)} fine-tunes on skill A, souped ({n_test} test images; shifted: "
                  f"+ pixel noise σ={sigma:g})", title_justify="left")  # fmt: skip
    for header in ("approach", "weights", "val acc", "test acc", "shifted\ntest acc", "inference\ncost",
                   "vs best single:\ntest", "vs best single:\nshifted"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("approach", "weights") else "right")
    for r in rows:
        table.add_row(r["approach"], r["detail"], f"{r['val_acc']:.3f}", f"{r['test_acc']:.3f}",
                      f"{r['shifted_acc']:.3f}", f"×{r['cost']:g}", r["versus_test"], r["versus_shifted"])  # fmt: skip
    return table


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| approach | weights | val acc | test acc | shifted test acc | inference cost | vs best single: test | "
             "vs best single: shifted |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['approach']} | {r['detail']} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
                     f"{r['shifted_acc']:.3f} | ×{r['cost']:g} | {r['versus_test']} | {r['versus_shifted']} |")
    return "\n".join(lines) + "\n"


def cell(mine: Tensor, ref: Tensor, is_ref: bool) -> str:
    if is_ref:
        return "(reference)"
    gained, lost, p = paired(mine, ref)
    word = "n.s." if p >= SIGNIFICANCE else ("better" if gained > lost else "worse")
    return f"+{gained}/−{lost}, p={p:.2g} ({word})"


def plot(progression: Sequence[Mapping[str, Any]], lines: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """The greedy soup after each ingredient tried (validation, test, shifted test), with the other rows as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharex=True)
    steps = list(range(1, len(progression) + 1))
    for ax, key, title in zip(axes, ("val", "test", "shifted"), ("validation (chooses)", "test", "shifted test")):
        ax.plot(steps, [p[f"soup_{key}"] for p in progression], "-", color="tab:green", label="greedy soup so far")
        ax.scatter(steps, [p[f"own_{key}"] for p in progression], marker="o", color="0.5", label="the run alone")
        for s, p in zip(steps, progression):  # each candidate soup: kept (diamond) or rejected (x)
            ax.scatter([s], [p[f"tried_{key}"]], marker="D" if p["accepted"] else "x", s=50,
                       color="tab:green" if p["accepted"] else "tab:red", zorder=3)  # fmt: skip
        for (name, values), color in zip(lines.items(), ("tab:blue", "tab:orange", "tab:purple")):
            ax.axhline(values[key], linestyle="--", color=color, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(steps, [p["name"] for p in progression], rotation=60, fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on skill A")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Greedy soup: runs tried in order of validation accuracy; each candidate soup kept (diamond) or "
                 "rejected (red x) on validation",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start_time = time.perf_counter()
    setup(threads=1)
    console = Console()
    out: Path = args.out
    (out / "sweep").mkdir(parents=True, exist_ok=True)
    splits = load_digits_split(args.seed)
    console.rule(f"1/3  base: centred digits, {args.base_epochs} epochs")
    base = train_base(out, splits, hidden=args.hidden, epochs=args.base_epochs, seed=args.seed, val_domains=("a",))

    console.rule(f"2/3  the sweep: {len(SWEEP)} fine-tunes of the base on skill A, {args.epochs} epochs each")
    paths = []
    for i, (name, lr, wd, augment, smoothing) in enumerate(SWEEP):
        pl.seed_everything(args.seed + 1 + i, verbose=False)
        model = PageClassifier(hidden=args.hidden, lr=lr, weight_decay=wd, label_smoothing=smoothing,
                               augment=augment, val_domains=("a",))  # fmt: skip
        model.load_state_dict(base)
        train = loader(domain_data(splits["train"], ["a"]), shuffle=True, seed=args.seed + 1 + i)
        make_trainer(out, args.epochs).fit(model, train, val_loaders(splits["val"], ["a"]))
        paths.append(out / "sweep" / f"{name}.safetensors")
        save_file(state(model), str(paths[-1]))
    names = [name for name, *_ in SWEEP]

    console.rule("3/3  lightning_soup.soup: greedy and uniform, scored on validation (val/a_acc)")
    results = {}
    for method in ("greedy", "uniform"):
        model = PageClassifier(hidden=args.hidden, val_domains=("a",))
        results[method] = lightning_soup.soup(
            make_trainer(out), model, [str(p) for p in paths], monitor="val/a_acc", method=method,
            val_dataloaders=val_loaders(splits["val"], ["a"]), dirpath=str(out / method),
        )  # fmt: skip
    greedy = results["greedy"].recipe
    val_scores = {Path(c["path"]).stem: c["score"] for c in greedy["checkpoints"]}
    best = max(names, key=lambda n: (val_scores[n], -names.index(n)))  # first listed on ties
    require(f"the best run's ({best}) validation accuracy on skill A", val_scores[best], SKILL_FLOOR,
            "Fine-tune longer (--epochs) or change SWEEP.")  # fmt: skip

    # Test and shifted test, computed here from the files.
    x, y = splits["test"]
    pages = {"test": place(x, "a"), "shifted": shifted(place(x, "a"), args.noise, args.seed)}
    val_pages = place(splits["val"][0], "a")
    weights = {n: load_file(str(p)) for n, p in zip(names, paths)}
    candidates: dict[str, tuple[list[dict[str, Tensor]], str]] = {
        "best single": ([weights[best]], f"run {best} (best val)"),
        "uniform soup": ([load_file(str(results["uniform"].path))], f"mean of all {len(names)} runs"),
        "greedy soup": ([load_file(str(results["greedy"].path))],
                        f"mean of {greedy['ingredients_used']}: "
                        + "+".join(Path(c["path"]).stem for c in greedy["checkpoints"] if c["accepted"])),
        "ensemble": (list(weights.values()), f"all {len(names)} runs, mean of softmax"),
    }  # fmt: skip
    right = {name: {k: predict_hits(m, v, y, args.hidden) for k, v in pages.items()}
             for name, (m, _) in candidates.items()}  # fmt: skip
    rows = []
    for name, (models, detail) in candidates.items():
        val_acc = accuracy(predict_hits(models, val_pages, splits["val"][1], args.hidden))
        rows.append({
            "approach": name, "detail": detail, "val_acc": val_acc,
            "test_acc": accuracy(right[name]["test"]), "shifted_acc": accuracy(right[name]["shifted"]),
            "cost": len(models),
            "versus_test": cell(right[name]["test"], right["best single"]["test"], name == "best single"),
            "versus_shifted": cell(right[name]["shifted"], right["best single"]["shifted"], name == "best single"),
        })  # fmt: skip

    # The greedy soup's progression: the soup after each ingredient tried, on every split.
    progression, members = [], []
    for c in greedy["checkpoints"]:
        name = Path(c["path"]).stem
        trial = soup_of([out / "sweep" / f"{m}.safetensors" for m in [*members, name]])
        if c["accepted"]:
            members.append(name)
        current = soup_of([out / "sweep" / f"{m}.safetensors" for m in members])
        own = weights[name]
        progression.append({
            "name": name, "accepted": c["accepted"], "own_val": c["score"],
            "tried_val": accuracy(predict_hits([trial], val_pages, splits["val"][1], args.hidden)),
            "soup_val": accuracy(predict_hits([current], val_pages, splits["val"][1], args.hidden)),
            **{f"own_{k}": accuracy(predict_hits([own], v, y, args.hidden)) for k, v in pages.items()},
            **{f"tried_{k}": accuracy(predict_hits([trial], v, y, args.hidden)) for k, v in pages.items()},
            **{f"soup_{k}": accuracy(predict_hits([current], v, y, args.hidden)) for k, v in pages.items()},
        })  # fmt: skip
    by_name = {r["approach"]: r for r in rows}
    lines = {n: {"val": by_name[n]["val_acc"], "test": by_name[n]["test_acc"], "shifted": by_name[n]["shifted_acc"]}
             for n in ("best single", "uniform soup", "ensemble")}  # fmt: skip
    figure = plot(progression, lines, out / "soup_progression.png")
    wall = time.perf_counter() - start_time

    console.print()
    console.print(render(rows, len(y), args.noise))
    console.print(f"Plot: {figure}; soups and their recipes in {out}/greedy and {out}/uniform ({wall:.0f} s)")
    result = {
        "command": " ".join(["python", "examples/sweep_soup.py", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed, "noise": args.noise, "n_test": len(y), "best": best, "val_scores": val_scores,
        "rows": rows, "progression": progression, "wall_s": round(wall, 1), "markdown": markdown(rows),
    }  # fmt: skip
    (out / "table.md").write_text(result["markdown"])
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
