"""Two skills fine-tuned separately from one base, and every way to get one model that has both.

The story model merging exists for, at toy scale: a team fine-tunes one base into a "support" model and,
separately, a "code" model. Here the base classifies handwritten digits in the centre of a 16×16 page; skill A
(standing in for "support") is digits written up-right of the centre, skill B (standing in for "code") digits
written down-left (see ``_skills.py``: an MLP has no translation invariance, so each position is a new input
distribution the base is bad at). Then, one row per approach:

* the base, and each fine-tune alone (each learns its own skill and is bad at the other);
* sequential fine-tuning, A then B: learns B and forgets A (catastrophic forgetting);
* the same run ended by ``TaskArithmeticBlend(anchor="initial")``: blended back toward its start (the A model)
  under "keep 90% of skill A", WiSE-FT style;
* the output ensemble of both fine-tunes: both skills, at twice the inference cost (measured);
* multi-task training on A and B together: the upper bound, which needs all the data in one run;
* ``lightning_soup.compose`` with task arithmetic, TIES and the newest method available (Iso-CTS): one
  model, the coefficients (λ_A, λ_B) chosen on validation as the best mean skill accuracy among the candidates that
  keep each skill at ≥ 90% of its own fine-tune's validation accuracy;
* the best of those merges blended back toward the base (``merge.interpolate``), the ratio chosen on validation
  to keep ≥ 80% of the base's own task: what the base knew, bought back at a price in both skills.

Every choice (coefficients, blend ratio, the reference model) uses the validation split; the table reports the
held-out test split, computed here from the written weights, and compares every row with the strongest single
fine-tuned model (chosen on validation) by an exact McNemar test over the same test images. Deterministic (fixed
seeds, one thread, deterministic kernels): the numbers are the same on every machine with the pinned versions.

Run ``python examples/compose_skills.py`` (``make demo``; about a minute on one CPU core). Outputs, including the
plot ``skills.png`` (skill A against skill B, every approach a point, the Pareto front), go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
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
    DOMAIN_NAMES,
    PageClassifier,
    accuracy,
    domain_data,
    hits,
    load_digits_split,
    loader,
    make_trainer,
    paired,
    place,
    require,
    setup,
    state,
    time_ratio,
    train_base,
    val_loaders,
    weight_bytes,
)

import lightning_soup  # noqa: E402
from lightning_soup import TaskArithmeticBlend  # noqa: E402

DOMAINS = ("clean", "a", "b")
BLEND_RATIOS = [i / 10 for i in range(11)]
# Merge coefficients tried on validation: one λ per fine-tune (λ_A, λ_B), 16 candidates per method.
SCALES = [(la, lb) for la in (0.5, 0.7, 1.0, 1.3) for lb in (0.5, 0.7, 1.0, 1.3)]
KEEP = 0.9  # each skill must keep this fraction of its own fine-tune's validation accuracy
SKILL_FLOOR = 0.9  # each fine-tune must reach this on its own skill's test split
SIGNIFICANCE = 0.05
# The newest method, where this version of lightning_soup has it (Iso-CTS: best of its paper's comparison).
NEW_METHODS = ("iso_cts",)
KEEP_BASE = 0.8  # the blend toward the base keeps this fraction of the base's centred validation accuracy
METHOD_NAMES = {"task_arithmetic": "task arithmetic", "ties": "TIES", "tsv": "TSV", "iso_cts": "Iso-CTS",
                "iso_c": "Iso-C", "dare": "DARE", "model_stock": "Model Stock"}  # fmt: skip
# Single models trained without this library: the candidates for the significance reference.
PLAIN = ("base", "skill A", "skill B", "sequential A→B")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/compose_skills"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-epochs", type=int, default=20, help="base training epochs (centred digits)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every fine-tune (and of multi-task)")
    parser.add_argument("--lr", type=float, default=0.02, help="fine-tune learning rate (SGD, momentum 0.9)")
    parser.add_argument("--hidden", type=int, default=256, help="MLP width")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def merge_methods() -> list[str]:
    """Task arithmetic, TIES, and the newest method this lightning_soup has (Iso-CTS)."""
    from lightning_soup import merge

    return ["task_arithmetic", "ties", *(m for m in NEW_METHODS if hasattr(merge, {"tsv": "tsv_merge"}.get(m, m)))]


def scales_text(scales: float | Sequence[float]) -> str:
    """``0.7`` or ``(1, 0.7)``."""
    if isinstance(scales, (int, float)):
        return f"{scales:g}"
    return "(" + ", ".join(f"{v:g}" for v in scales) + ")"


def floor3(value: float) -> float:
    """Round down to 3 decimals, so a threshold written in a constraint never excludes the value it came from."""
    return math.floor(value * 1000 + 1e-9) / 1000


# ------------------------------------------------------------------------------------------------------------ steps
def fine_tune(
    out: Path, start: Mapping[str, Tensor], domains: Sequence[str], splits: Mapping[str, Any], args: argparse.Namespace,
    seed: int, callbacks: Sequence[pl.Callback] = (),
) -> PageClassifier:  # fmt: skip
    """Train a copy of ``start`` on ``domains`` (validation: every domain); returns the module."""
    pl.seed_everything(seed, verbose=False)
    model = PageClassifier(hidden=args.hidden, lr=args.lr, val_domains=DOMAINS)
    model.load_state_dict(start)
    train = loader(domain_data(splits["train"], domains), shuffle=True, seed=seed)
    make_trainer(out, args.epochs, callbacks).fit(model, train, val_loaders(splits["val"], DOMAINS))
    return model


def run_compose(
    out: Path, method: str, constraint: str, splits: Mapping[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """``lightning_soup.compose`` of the two fine-tunes with ``method``; returns its recipe."""
    model = PageClassifier(hidden=args.hidden, val_domains=DOMAINS)
    result = lightning_soup.compose(
        make_trainer(out), model, base=str(out / "base.safetensors"),
        finetuned=[str(out / "skill_a.safetensors"), str(out / "skill_b.safetensors")],
        method=method, scales=SCALES, monitor="val/mean_acc", constraint=constraint, density=0.2,
        val_dataloaders=val_loaders(splits["val"], DOMAINS), dirpath=str(out / f"compose_{method}"),
    )  # fmt: skip
    return dict(result.recipe)


def blend_toward_base(
    base: Mapping[str, Tensor], merged: Mapping[str, Tensor], floor: float, splits: Mapping[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """``base + r·(merged − base)`` (``merge.interpolate``) with the ratio ``r`` of the best validation mean skill
    accuracy among those that keep the base task (centred digits) at ``floor`` or above (when none does, the one
    with the best centred accuracy)."""
    from lightning_soup.merge import interpolate

    tried = []
    for ratio in BLEND_RATIOS:
        weights = interpolate(base, merged, ratio)
        right = hits([weights], splits["val"], DOMAINS, args.hidden)
        mean = (accuracy(right["a"]) + accuracy(right["b"])) / 2
        tried.append({"ratio": ratio, "weights": weights, "clean": accuracy(right["clean"]), "mean": mean})
    meeting = [t for t in tried if t["clean"] >= floor]
    chosen = max(meeting, key=lambda t: t["mean"]) if meeting else max(tried, key=lambda t: t["clean"])
    return {**chosen, "met": bool(meeting)}


# ------------------------------------------------------------------------------------------------------------ table
def render(rows: Sequence[Mapping[str, Any]], reference: str, n_test: int) -> Table:
    """The results as a rich table; the best of each accuracy column in bold."""
    table = Table(title=f"One base, two skills (test split: {n_test} images per domain)", title_justify="left")
    for header in ("approach", "weights", "centred\n(base task)", "skill A", "skill B", "mean\nA, B",
                   "inference\ncost", f"vs {reference}\n(A+B test images)"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("approach", "weights") else "right")
    columns = ("clean_acc", "a_acc", "b_acc", "mean_acc")
    best = {c: max(r[c] for r in rows) for c in columns}
    for r in rows:
        cells = [f"[bold]{r[c]:.3f}[/]" if r[c] == best[c] else f"{r[c]:.3f}" for c in columns]
        table.add_row(r["approach"], r["detail"], *cells, f"×{r['cost']:g}", r["versus"])
    return table


def markdown(rows: Sequence[Mapping[str, Any]], reference: str) -> str:
    """The table as Markdown, for the README (the test compares the README with these numbers)."""
    lines = [
        "| approach | weights | centred (base task) | skill A | skill B | mean A, B | inference cost | "
        f"vs {reference} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['approach']} | {r['detail']} | {r['clean_acc']:.3f} | {r['a_acc']:.3f} | {r['b_acc']:.3f} | "
            f"{r['mean_acc']:.3f} | ×{r['cost']:g} | {r['versus']} |"
        )
    return "\n".join(lines) + "\n"


def versus(mine: Mapping[str, Tensor], ref: Mapping[str, Tensor], is_ref: bool) -> tuple[str, dict[str, Any]]:
    """The McNemar cell against the reference, on the skill A and skill B test images together."""
    if is_ref:
        return "(reference)", {}
    gained, lost, p = paired(torch.cat([mine["a"], mine["b"]]), torch.cat([ref["a"], ref["b"]]))
    word = "n.s." if p >= SIGNIFICANCE else ("better" if gained > lost else "worse")
    return f"+{gained}/−{lost}, p={p:.2g} ({word})", {"gained": gained, "lost": lost, "p": p, "verdict": word}


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (maximising both), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]  # fmt: skip
    return sorted(front, key=lambda i: points[i])


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Skill A against skill B test accuracy, one point per approach, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["a_acc"], r["b_acc"]) for r in rows]
    front = pareto(points)
    styles = {"single": ("o", "tab:blue"), "merge": ("D", "tab:green"), "blend": ("s", "tab:olive"),
              "ensemble": ("^", "tab:red"), "multitask": ("*", "tab:purple")}  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    low = math.floor(min(min(p) for p in points if min(p) >= 0.5) * 20) / 20 - 0.05  # the zoom's corner
    for ax, zoom in zip(axes, (False, True)):
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="0.6", zorder=1,
                label="Pareto front")  # fmt: skip
        for n, (r, (x, y)) in enumerate(zip(rows, points)):
            marker, color = styles[r["kind"]]
            label = r["approach"] + (f" (×{r['cost']:g} inference)" if r["cost"] != 1 else "")
            ax.scatter([x], [y], marker=marker, color=color, s=200 if r["kind"] == "multitask" else 70, zorder=2)
            if not zoom or (x >= low and y >= low):
                ax.annotate(label, (x, y), textcoords="offset points", fontsize=8,
                            xytext=(7, 5 if n % 2 else -11))  # fmt: skip
        lo = low if zoom else 0.0
        ax.set_xlim(lo, 1.0 + (1 - lo) * 0.05)
        ax.set_ylim(lo, 1.0 + (1 - lo) * 0.05)
        ax.set_xlabel("skill A test accuracy (digits up-right)")
        ax.set_ylabel("skill B test accuracy (digits down-left)")
        ax.grid(alpha=0.3)
        ax.set_title("zoom on the top right: one model with both skills" if zoom else "every approach", fontsize=10)
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Skill A vs skill B on the test split (blue: single models, green: merges, olive: blend, "
                 "red: ensemble, purple: multi-task, which needs all data in one run)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the story, print the table; returns what ``--json`` writes."""
    args = parse_args(argv)
    start_time = time.perf_counter()
    setup(threads=1)
    console = Console()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    splits = load_digits_split(args.seed)
    n_train, n_test = len(splits["train"][1]), len(splits["test"][1])

    # 1. The base: centred digits only. It must learn them before anything else means anything.
    console.rule(f"1/5  base: centred digits, {n_train} training images, {args.base_epochs} epochs")
    base = train_base(out, splits, hidden=args.hidden, epochs=args.base_epochs, seed=args.seed, val_domains=DOMAINS)

    # 2. Two capabilities, fine-tuned separately from the base.
    console.rule(f"2/5  fine-tunes from the base, {args.epochs} epochs each: skill A, skill B")
    models: dict[str, list[dict[str, Tensor]]] = {"base": [base]}
    for skill, seed in (("a", args.seed + 1), ("b", args.seed + 2)):
        weights = state(fine_tune(out, base, [skill], splits, args, seed))
        save_file(weights, str(out / f"skill_{skill}.safetensors"))
        own = accuracy(hits([weights], splits["test"], [skill], args.hidden)[skill])
        require(f"the skill {skill.upper()} fine-tune's accuracy on its own test split", own, SKILL_FLOOR,
                "Fine-tune it longer (--epochs) or with another --lr.")  # fmt: skip
        models[f"skill {skill.upper()}"] = [weights]
    val_hits = {name: hits(m, splits["val"], DOMAINS, args.hidden) for name, m in models.items()}
    floors = {s: floor3(KEEP * accuracy(val_hits[f"skill {s.upper()}"][s])) for s in ("a", "b")}
    constraint = f"val/a_acc>={floors['a']:g}, val/b_acc>={floors['b']:g}"

    # 3. Sequential fine-tuning: the A model fine-tuned on B; its end blended back toward its start (the A model).
    console.rule(f"3/5  sequential: the skill A model fine-tuned on skill B, then blended toward A "
                 f"(val/a_acc>={floors['a']:g})")  # fmt: skip
    blend = TaskArithmeticBlend(anchor="initial", ratio=BLEND_RATIOS, monitor="val/mean_acc",
                                constraint=f"val/a_acc>={floors['a']:g}", dirpath=str(out / "sequential"))  # fmt: skip
    fine_tune(out, models["skill A"][0], ["b"], splits, args, args.seed + 3, [blend])
    models["sequential A→B"] = [load_file(str(out / "sequential" / "final.safetensors"))]
    models["sequential, blended"] = [load_file(str(out / "sequential" / "blended.safetensors"))]
    assert blend.result is not None
    blend_ratio, blend_met = blend.result["ratio"], blend.result.get("constraint_met")

    # 4. The alternatives that need more: both models at inference, or all data in one run.
    console.rule("4/5  output ensemble of the two fine-tunes; multi-task training on A and B together")
    models["ensemble A+B"] = [*models["skill A"], *models["skill B"]]
    multitask = state(fine_tune(out, base, ["a", "b"], splits, args, args.seed + 4))
    save_file(multitask, str(out / "multitask.safetensors"))
    models["multi-task"] = [multitask]

    # 5. Merges of the two fine-tunes, each chosen on validation under the constraint.
    methods = merge_methods()
    console.rule(f"5/5  lightning_soup.compose: {', '.join(METHOD_NAMES[m] for m in methods)}; "
                 f"λ_A, λ_B in (0.5, 0.7, 1, 1.3); {constraint}")  # fmt: skip
    recipes = {}
    for method in methods:
        recipes[method] = run_compose(out, method, constraint, splits, args)
        models[METHOD_NAMES[method]] = [load_file(str(out / f"compose_{method}" / "merged.safetensors"))]

    # 6. The alignment tax: blend the best merge (on validation) back toward the base until it keeps the base task.
    merged_val = {METHOD_NAMES[m]: hits(models[METHOD_NAMES[m]], splits["val"], DOMAINS, args.hidden) for m in methods}
    best_name = max(merged_val, key=lambda n: (accuracy(merged_val[n]["a"]) + accuracy(merged_val[n]["b"])) / 2)
    base_floor = floor3(KEEP_BASE * accuracy(val_hits["base"]["clean"]))
    toward_base = blend_toward_base(base, models[best_name][0], base_floor, splits, args)
    models[f"{best_name}, blended toward base"] = [toward_base["weights"]]
    save_file(toward_base["weights"], str(out / "merge_toward_base.safetensors"))

    # The table: test accuracy of every approach, computed here from the weights.
    test_hits = {name: hits(m, splits["test"], DOMAINS, args.hidden) for name, m in models.items()}
    val_hits.update({n: hits(m, splits["val"], DOMAINS, args.hidden) for n, m in models.items() if n not in val_hits})
    val_mean = {n: (accuracy(h["a"]) + accuracy(h["b"])) / 2 for n, h in val_hits.items()}
    reference = max(PLAIN, key=lambda n: val_mean[n])  # the strongest plain single model, chosen on validation
    details = {
        "base": "trained on centred digits",
        "skill A": "base fine-tuned on skill A",
        "skill B": "base fine-tuned on skill B",
        "sequential A→B": "skill A model fine-tuned on skill B",
        "sequential, blended": f"A + {blend_ratio:g}·(sequential − A), TaskArithmeticBlend"
                               + ("" if blend_met is not False else ", constraint NOT met"),
        "ensemble A+B": "both fine-tunes, mean of softmax",
        "multi-task": "base fine-tuned on A and B together",
    }  # fmt: skip
    for method, recipe in recipes.items():
        extra = ", density 0.2" if method == "ties" else ""
        met = "" if recipe["constraint_met"] is not False else ", constraint NOT met"
        details[METHOD_NAMES[method]] = f"compose, λ={scales_text(recipe['scales'])}{extra}{met}"
    details[f"{best_name}, blended toward base"] = (
        f"base + {toward_base['ratio']:g}·({best_name} − base), merge.interpolate, val/clean_acc>={base_floor:g}"
        + ("" if toward_base["met"] else ", constraint NOT met")
    )
    kinds = {"ensemble A+B": "ensemble", "multi-task": "multitask", "sequential, blended": "blend",
             f"{best_name}, blended toward base": "blend",
             **{METHOD_NAMES[m]: "merge" for m in methods}}  # fmt: skip
    files = {
        "base": ["base.safetensors"], "skill A": ["skill_a.safetensors"], "skill B": ["skill_b.safetensors"],
        "sequential A→B": ["sequential/final.safetensors"], "sequential, blended": ["sequential/blended.safetensors"],
        "ensemble A+B": ["skill_a.safetensors", "skill_b.safetensors"], "multi-task": ["multitask.safetensors"],
        **{METHOD_NAMES[m]: [f"compose_{m}/merged.safetensors"] for m in methods},
        f"{best_name}, blended toward base": ["merge_toward_base.safetensors"],
    }  # fmt: skip
    rows = []
    for name, h in test_hits.items():
        cell, stats = versus(h, test_hits[reference], name == reference)
        rows.append({
            "approach": name, "detail": details[name], "kind": kinds.get(name, "single"),
            "clean_acc": accuracy(h["clean"]), "a_acc": accuracy(h["a"]), "b_acc": accuracy(h["b"]),
            "mean_acc": (accuracy(h["a"]) + accuracy(h["b"])) / 2, "val_mean_acc": val_mean[name],
            "cost": len(models[name]), "versus": cell, "files": files[name],
            **({"vs_reference": stats} if stats else {}),
        })  # fmt: skip

    # Inference cost of the ensemble, measured: weights held and forward time, against one model.
    pages = torch.cat([place(splits["test"][0], d) for d in DOMAINS])
    cost = {
        "memory_ratio": weight_bytes(models["ensemble A+B"]) / weight_bytes(models["skill A"]),
        "time_ratio": time_ratio(models["ensemble A+B"], models["skill A"][0], pages, args.hidden),
    }
    figure = plot(rows, out / "skills.png")
    wall = time.perf_counter() - start_time

    console.print()
    console.print(render(rows, reference, n_test))
    best_merge = max((r for r in rows if r["kind"] == "merge"), key=lambda r: r["val_mean_acc"])
    by_name = {r["approach"]: r for r in rows}
    seq, ref_row, a_model = by_name["sequential A→B"], by_name[reference], by_name["skill A"]
    toward = by_name[f"{best_name}, blended toward base"]
    lines = [
        f"sequential fine-tuning forgets skill A: {a_model['a_acc']:.3f} → {seq['a_acc']:.3f} on its test images",
        f"the ensemble holds {cost['memory_ratio']:.2f}× the weights and takes {cost['time_ratio']:.2f}× the "
        "forward time of one model (measured now; the time varies with the machine)",
        f"best merge on validation: {best_merge['approach']} ({best_merge['detail']}): "
        f"mean {best_merge['mean_acc']:.3f} "
        f"on test vs {ref_row['mean_acc']:.3f} for {reference}, one model at ×1 cost",
        f"blending it toward the base buys back the base task (centred {toward['clean_acc']:.3f} vs "
        f"{best_merge['clean_acc']:.3f}) at a cost in both skills (mean {toward['mean_acc']:.3f})",
    ]  # fmt: skip
    for line in lines:
        console.print(f"  • {line}")
    console.print(f"Plot: {figure}; weights, compose_*/compose.json and sequential/blend.json in {out}/ ({wall:.0f} s)")

    result = {
        "command": " ".join(["python", "examples/compose_skills.py", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed, "n_test": n_test, "constraint": constraint, "reference": reference,
        "methods": methods, "rows": rows,
        "toward_base": {"from": best_name, "ratio": toward_base["ratio"], "floor": base_floor,
                        "met": toward_base["met"]},
        "inference_cost": cost, "notes": lines, "wall_s": round(wall, 1),
        "markdown": markdown(rows, reference),
    }  # fmt: skip
    (out / "table.md").write_text(result["markdown"])
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
