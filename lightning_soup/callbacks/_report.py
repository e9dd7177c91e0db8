"""Rendering for the callbacks' end-of-fit summaries: pure functions that return rich tables and matplotlib figures.

The callbacks print or save what these return (on rank zero), so rendering is testable without a ``Trainer``.
Every user string (metric names, paths, reasons) is escaped before rich sees it: a ``[/]`` in a metric name is
text, not markup that fails after the files were written.
matplotlib is an optional extra (``pip install lightning-soup[plot]``): the figure functions import it lazily and
raise ImportError without it. Figures are built on the Agg canvas, never through ``pyplot``'s global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return escape(str(value))


def lora_note(recipe: Mapping[str, Any]) -> str | None:
    """A caption line for LoRA pairs merged on ΔW (``lora_relative_error`` in the recipe), or None without them.

    Example:
        >>> lora_note({"lora_relative_error": 0.0123})
        'LoRA pairs merged on ΔW = B·A: best rank-r pairs, relative error 0.0123'
        >>> lora_note({"lora_relative_error": 0.0})
        'LoRA pairs merged on ΔW = B·A: exact'
    """
    error = recipe.get("lora_relative_error")
    if error is None:
        return None
    how = "exact" if error == 0 else f"best rank-r pairs, relative error {_fmt(error)}"
    return f"LoRA pairs merged on ΔW = B·A: {how}"


# ------------------------------------------------------------------------------------------ TaskArithmeticBlend


def blend_table(
    candidates: Sequence[Mapping[str, Any]],
    *,
    chosen: int,
    monitor: str | None = None,
    constraint: Sequence[str] = (),
    anchor: str = "",
) -> Table:
    """One row per blend ratio with every metric it was evaluated on; the chosen row marked.

    Args:
        candidates: ``{"ratio": float, "metrics": {name: value}, "meets_constraint": bool | None}`` per ratio.
        chosen: index of the chosen candidate.
        monitor: the metric that ranked the candidates (shown first).
        constraint: the constraint's bounds as text, for the caption.
        anchor: what the blend moved toward, for the title.

    Example:
        >>> table = blend_table([{"ratio": 0.5, "metrics": {"val/acc": 0.9}, "meets_constraint": None}], chosen=0)
        >>> table.row_count
        1
    """
    names: list[str] = [] if monitor is None else [monitor]
    for candidate in candidates:
        names += [n for n in candidate.get("metrics", {}) if n not in names]
    title = "TaskArithmeticBlend" + (f" toward {escape(str(anchor))}" if anchor else "")
    caption = []
    if monitor is not None:
        caption.append(f"ranked by {escape(monitor)}")
    if constraint:
        caption.append("subject to " + ", ".join(escape(str(c)) for c in constraint))
    lora = any(c.get("lora_relative_error") is not None for c in candidates)
    if lora:
        caption.append("LoRA pairs blended on ΔW = B·A (column: relative error of the rank-r pairs)")
    table = Table(title=title, caption="; ".join(caption) or None)
    table.add_column("ratio", justify="right")
    for name in names:
        table.add_column(escape(str(name)), justify="right", style="bold" if name == monitor else None)
    if constraint:
        table.add_column("constraint", justify="center")
    if lora:
        table.add_column("LoRA error", justify="right")
    table.add_column("chosen", justify="center")
    for i, candidate in enumerate(candidates):
        metrics = candidate.get("metrics", {})
        row = [_fmt(float(candidate["ratio"]))] + [_fmt(metrics.get(name)) for name in names]
        if constraint:
            met = candidate.get("meets_constraint")
            row.append("—" if met is None else ("[green]✓[/]" if met else "[red]✗[/]"))
        if lora:
            row.append(_fmt(candidate.get("lora_relative_error")))
        row.append("[bold green]◀[/]" if i == chosen else "")
        table.add_row(*row, style="on grey15" if i == chosen else None)
    return table


def blend_figure(
    candidates: Sequence[Mapping[str, Any]],
    *,
    chosen: int,
    metrics: Sequence[str],
    bounds: Sequence[tuple[str, str, float]] = (),
) -> Figure:
    """Each metric against the blend ratio, one panel per metric; the chosen ratio and the thresholds drawn.

    Args:
        candidates: ``{"ratio": float, "metrics": {name: value}}`` per ratio.
        chosen: index of the chosen candidate.
        metrics: the metrics to draw (the monitored one, then the constrained ones).
        bounds: ``(metric, op, threshold)`` constraint bounds; each threshold is drawn on its metric's panel with
            the infeasible side shaded.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> rows = [{"ratio": r, "metrics": {"val/acc": r}} for r in (0.0, 0.5, 1.0)]
        >>> figure = blend_figure(rows, chosen=1, metrics=["val/acc"], bounds=[("val/acc", ">=", 0.25)])
        >>> len(figure.axes)
        1
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(metrics)) or ["(none)"]
    order = sorted(range(len(candidates)), key=lambda i: float(candidates[i]["ratio"]))
    ratios = [float(candidates[i]["ratio"]) for i in order]
    figure = Figure(figsize=(6.0, 1.0 + 2.2 * len(metrics)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    chosen_ratio = float(candidates[chosen]["ratio"])
    for ax, name in zip(axes, metrics):
        values = [_as_float(candidates[i].get("metrics", {}).get(name)) for i in order]
        ax.plot(ratios, values, marker="o", color="C0", label=name)
        violating = [(r, v) for r, v, i in zip(ratios, values, order) if candidates[i].get("meets_constraint") is False]
        if violating:
            ax.plot(*zip(*violating), linestyle="none", marker="o", markerfacecolor="white", color="C3",
                    label="violates constraint")
        ax.axvline(chosen_ratio, color="C2", linestyle="--", label=f"chosen ratio {chosen_ratio:g}")
        chosen_value = _as_float(candidates[chosen].get("metrics", {}).get(name))
        if math.isfinite(chosen_value):
            ax.plot([chosen_ratio], [chosen_value], marker="*", markersize=14, color="C2", zorder=3)
        for metric, op, threshold in bounds:
            if metric != name:
                continue
            ax.axhline(threshold, color="C3", linestyle=":", label=f"{metric}{op}{threshold:g}")
            lo, hi = ax.get_ylim()
            lo, hi = min(lo, threshold), max(hi, threshold)
            # Shade the side of the threshold the constraint rules out.
            if op in (">=", ">"):
                ax.axhspan(lo, threshold, color="C3", alpha=0.08)
            else:
                ax.axhspan(threshold, hi, color="C3", alpha=0.08)
            ax.set_ylim(lo, hi)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("blend ratio (0 = anchor, 1 = trained weights)")
    figure.suptitle("TaskArithmeticBlend: metrics against the blend ratio")
    return figure


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------------------------------ CheckpointAveraging


def averaging_table(recipe: Mapping[str, Any], path: Any = None) -> Table:
    """What ``CheckpointAveraging`` averaged: one row per snapshot in the window, oldest first, with its weight.

    Args:
        recipe: the averaging recipe (``window``, the schedule, ``weights``, ``averaged``: ``{"epoch",
            "global_step", "weight"}`` rows, ``snapshots_taken``).
        path: where the average was written, for the caption.

    Example:
        >>> recipe = {"window": 2, "every_n_epochs": 1, "every_n_train_steps": None, "snapshots_taken": 3,
        ...           "weights": "uniform", "averaged": [{"epoch": 1, "global_step": 12, "weight": 0.5},
        ...                                              {"epoch": 2, "global_step": 18, "weight": 0.5}]}
        >>> averaging_table(recipe, "soup/average.safetensors").row_count
        2
    """
    rows = list(recipe.get("averaged", []))
    steps = recipe.get("every_n_train_steps")
    schedule = f"every {steps} optimizer steps" if steps else f"every {recipe.get('every_n_epochs', 1)} epoch(s)"
    taken = recipe.get("snapshots_taken", len(rows))
    weights = recipe.get("weights", "uniform")
    kind = "mean" if weights == "uniform" else escape(f"weighted mean (weights={weights!r})")
    title = f"CheckpointAveraging: {kind} of the last {len(rows)} of {taken} snapshots ({schedule})"
    caption = f"window={escape(str(recipe.get('window')))}"
    if path is not None:
        caption += f"; written to {escape(str(path))}"
    caption += "".join(f"; {note}" for note in [lora_note(recipe)] if note)
    table = Table(title=title, caption=caption)
    table.add_column("#", justify="right")
    table.add_column("epoch", justify="right")
    table.add_column("global step", justify="right")
    table.add_column("weight", justify="right")
    for i, row in enumerate(rows):
        weight = row.get("weight")
        table.add_row(
            str(i + 1), _fmt(row.get("epoch")), _fmt(row.get("global_step")),
            "" if weight is None else f"{weight:.4f}",
        )
    return table


# ------------------------------------------------------------------------------------------------- GreedySoup

_GREEDY_STATUS = {
    "accepted": "[green]accepted[/]",
    "restarted": "[green]restarted soup[/]",
    "rejected": "[yellow]rejected[/]",
    "pruned": "[dim]pruned[/]",
    "skipped": "[red]skipped[/]",
}


def greedy_soup_table(recipe: Mapping[str, Any]) -> Table:
    """One row per ingredient in the order the soup tried them (then the unused ones), with its own score, whether
    it joined the soup and the soup's score after it.

    Args:
        recipe: GreedySoup's recipe (the content of ``soup.json``): ``monitor``, ``mode``, ``soup_score`` and
            ``ingredients``, each ``{"epoch", "step", "score", "status", "accepted", "soup_score", "reason"}``.

    Example:
        >>> recipe = {"monitor": "val/acc", "mode": "max", "soup_score": 0.9, "ingredients": [
        ...     {"epoch": 2, "step": 30, "score": 0.88, "status": "accepted", "accepted": True, "soup_score": 0.88},
        ...     {"epoch": 1, "step": 20, "score": 0.85, "status": "accepted", "accepted": True, "soup_score": 0.9},
        ...     {"epoch": 0, "step": 10, "score": 0.5, "status": "rejected", "accepted": False, "soup_score": 0.9}]}
        >>> table = greedy_soup_table(recipe)
        >>> table.row_count, str(table.title)
        (3, 'GreedySoup: 2 of 3 ingredients, val/acc 0.9 (max)')
    """
    rows = list(recipe.get("ingredients", []))
    monitor = escape(str(recipe.get("monitor", "score")))
    accepted = sum(1 for r in rows if r.get("accepted"))
    title = f"GreedySoup: {accepted} of {len(rows)} ingredients, {monitor} {_fmt(recipe.get('soup_score'))}"
    if recipe.get("mode"):
        title += f" ({escape(str(recipe['mode']))})"
    table = Table(title=title, caption=lora_note(recipe))
    table.add_column("#", justify="right")
    table.add_column("epoch", justify="right")
    table.add_column("step", justify="right")
    table.add_column(monitor, justify="right")
    table.add_column("result")
    table.add_column(f"soup {monitor} after", justify="right")
    for i, row in enumerate(rows):
        status = str(row.get("status", ""))
        if status in ("accepted", "restarted") and not row.get("accepted"):
            status = f"{status}, later dropped"
        result = _GREEDY_STATUS.get(status, escape(status))
        if row.get("reason"):
            result += f" [dim]({escape(str(row['reason']))})[/]"
        table.add_row(
            str(i + 1), _fmt(row.get("epoch")), _fmt(row.get("step")), _fmt(row.get("score")), result,
            _fmt(row.get("soup_score")), style="bold" if row.get("accepted") else None,
        )
    return table
