"""Rendering for :func:`lightning_soup.soup` and :func:`lightning_soup.compose`: pure functions over their recipes.

They return rich tables and matplotlib figures; the callers print or save them on rank zero, so rendering is
testable without a ``Trainer``. Paths and metric names are user text: escaped before rich sees them, so a ``[/]``
in a checkpoint path is shown, not parsed as markup. matplotlib is optional: :func:`compose_figure` imports it lazily (ImportError
without it) and draws on the Agg canvas, never through ``pyplot``'s global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["compose_figure", "compose_table", "pareto_front", "soup_table"]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(float(v)) for v in value) + ")"
    return escape(str(value))


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def soup_table(recipe: Mapping[str, Any]) -> Table:
    """One row per checkpoint in the order the soup tried them: its own score, accepted, the soup's score after it.

    Args:
        recipe: the content of ``soup.json``.

    Example:
        >>> recipe = {"method": "greedy_soup", "monitor": "val/acc", "mode": "max", "soup_score": 0.9,
        ...           "ingredients_used": 2, "checkpoints": [
        ...     {"path": "a.ckpt", "score": 0.88, "accepted": True, "soup_score": 0.88},
        ...     {"path": "b.ckpt", "score": 0.85, "accepted": True, "soup_score": 0.9},
        ...     {"path": "c.ckpt", "score": 0.5, "accepted": False, "soup_score": 0.9}]}
        >>> table = soup_table(recipe)
        >>> table.row_count, str(table.title)
        (3, 'greedy_soup: 2 of 3 checkpoints, val/acc 0.9 (max)')
    """
    rows = list(recipe.get("checkpoints", []))
    monitor = escape(str(recipe.get("monitor", "score")))
    used = recipe.get("ingredients_used", sum(1 for r in rows if r.get("accepted")))
    score = _fmt(recipe.get("soup_score"))
    title = f"{_fmt(recipe.get('method', 'soup'))}: {used} of {len(rows)} checkpoints, {monitor} {score}"
    if recipe.get("mode"):
        title += f" ({_fmt(recipe['mode'])})"
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("checkpoint", overflow="fold")
    table.add_column(monitor, justify="right")
    table.add_column("result")
    table.add_column(f"soup {monitor} after", justify="right")
    for i, row in enumerate(rows):
        if row.get("skipped"):
            result = "[dim]skipped (non-finite score)[/]"
        else:
            result = "[green]accepted[/]" if row.get("accepted") else "[red]rejected[/]"
        table.add_row(str(i + 1), _fmt(row.get("path", "")), _fmt(row.get("score")), result,
                      _fmt(row.get("soup_score")), style="bold" if row.get("accepted") else None)
    return table


def _metric_names(recipe: Mapping[str, Any]) -> list[str]:
    constrained = [_split(b)[0] for b in recipe.get("constraint", [])]
    return list(dict.fromkeys([recipe.get("monitor", ""), *constrained]))


def _split(bound: str) -> tuple[str, str, float]:
    """``"val/a>=0.9"`` → ``("val/a", ">=", 0.9)`` (bounds as the recipe stores them)."""
    for op in (">=", "<=", ">", "<"):
        if op in bound:
            metric, _, value = bound.partition(op)
            return metric, op, float(value)
    raise ValueError(f"not a bound: {bound!r}")


def compose_table(recipe: Mapping[str, Any]) -> Table:
    """The base and each fine-tune alone, then one row per candidate with its metrics; the chosen one marked.

    Args:
        recipe: the content of ``compose.json``.

    Example:
        >>> recipe = {"method": "ties", "monitor": "val/acc", "constraint": ["val/a>=0.5"], "index": 1,
        ...           "references": [{"name": "base", "metrics": {"val/acc": 0.4, "val/a": 0.2}}],
        ...           "candidates": [
        ...               {"scales": 0.5, "metrics": {"val/acc": 0.8, "val/a": 0.4}, "meets_constraint": False},
        ...               {"scales": 1.0, "metrics": {"val/acc": 0.7, "val/a": 0.6}, "meets_constraint": True}]}
        >>> compose_table(recipe).row_count
        3
    """
    names = _metric_names(recipe)
    for row in [*recipe.get("references", []), *recipe.get("candidates", [])]:
        names += [n for n in row.get("metrics", {}) if n not in names]
    constraint = list(recipe.get("constraint", []))
    caption = [f"ranked by {_fmt(recipe.get('monitor'))} ({_fmt(recipe.get('mode', 'max'))})"]
    if constraint:
        caption.append("subject to " + ", ".join(_fmt(c) for c in constraint))
    if recipe.get("fallback"):
        caption.append("no candidate met the constraint: the closest was chosen")
    table = Table(title=f"compose: {_fmt(recipe.get('method'))}", caption="; ".join(caption))
    table.add_column("model")
    table.add_column("scales", justify="right")
    for name in names:
        table.add_column(_fmt(name), justify="right", style="bold" if name == recipe.get("monitor") else None)
    if constraint:
        table.add_column("constraint", justify="center")
    table.add_column("chosen", justify="center")
    for ref in recipe.get("references", []):
        metrics = ref.get("metrics", {})
        table.add_row(f"[dim]{_fmt(ref.get('name'))}[/]", "—", *(_fmt(metrics.get(n)) for n in names),
                      *(["—"] if constraint else []), "")
    for i, cand in enumerate(recipe.get("candidates", [])):
        metrics = cand.get("metrics", {})
        row = [_fmt(cand.get("method", recipe.get("method"))), _fmt(cand.get("scales"))]
        row += [_fmt(metrics.get(n)) for n in names]
        if constraint:
            met = cand.get("meets_constraint")
            row.append("—" if met is None else ("[green]✓[/]" if met else "[red]✗[/]"))
        chosen = i == recipe.get("index")
        row.append("[bold green]◀[/]" if chosen else "")
        table.add_row(*row, style="on grey15" if chosen else None)
    return table


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: tuple[bool, bool]) -> list[int]:
    """Indices of the points no other point dominates (at least as good on both axes, better on one).

    Points with a NaN coordinate are never on the front. Returned in increasing order of the first coordinate.

    Example:
        >>> pareto_front([(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1)], (True, True))
        [0, 1, 3]
    """
    sign = [1.0 if h else -1.0 for h in higher_is_better]
    good = [i for i, p in enumerate(points) if not any(math.isnan(v) for v in p)]
    front = []
    for i in good:
        a = (points[i][0] * sign[0], points[i][1] * sign[1])
        dominated = False
        for j in good:
            b = (points[j][0] * sign[0], points[j][1] * sign[1])
            if j != i and b[0] >= a[0] and b[1] >= a[1] and (b[0] > a[0] or b[1] > a[1]):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def compose_figure(recipe: Mapping[str, Any]) -> Figure:
    """Each candidate's metrics (one panel per monitored/constrained metric, references as lines); with two or more
    constrained metrics, also the trade-off of the first two: every candidate, the Pareto front, the constraint
    region, the chosen point, and the base and each fine-tune as reference points.

    Args:
        recipe: the content of ``compose.json``.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> recipe = {"method": "ties", "monitor": "val/acc", "constraint": ["val/a>=0.5", "val/b>=0.5"], "index": 1,
        ...           "references": [{"name": "base", "metrics": {"val/acc": 0.4, "val/a": 0.2, "val/b": 0.3}}],
        ...           "candidates": [{"scales": s, "metrics": {"val/acc": s, "val/a": s, "val/b": 1 - s}}
        ...                          for s in (0.3, 0.5, 0.7)]}
        >>> len(compose_figure(recipe).axes)
        4
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    candidates = list(recipe.get("candidates", []))
    references = list(recipe.get("references", []))
    chosen = recipe.get("index")
    bounds = [_split(b) for b in recipe.get("constraint", [])]
    constrained = list(dict.fromkeys(m for m, _, _ in bounds))
    names = [n for n in _metric_names(recipe) if n]
    trade_off = len(constrained) >= 2
    rows = len(names) + (1 if trade_off else 0)
    figure = Figure(figsize=(7.0, 1.2 + 2.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    labels = [_fmt(c.get("scales")) if c.get("scales") is not None else str(c.get("method")) for c in candidates]
    xs = list(range(len(candidates)))
    for ax, name in zip(axes, names):
        values = [_num(c.get("metrics", {}).get(name)) for c in candidates]
        ax.plot(xs, values, marker="o", color="C0", label="candidates")
        bad = [(x, v) for x, v, c in zip(xs, values, candidates) if c.get("meets_constraint") is False]
        if bad:
            ax.plot(*zip(*bad), linestyle="none", marker="o", markerfacecolor="white", color="C3",
                    label="violates constraint")
        if chosen is not None and 0 <= chosen < len(values) and math.isfinite(values[chosen]):
            ax.plot([chosen], [values[chosen]], marker="*", markersize=15, color="C2", zorder=3, label="chosen")
        for k, ref in enumerate(references):
            value = _num(ref.get("metrics", {}).get(name))
            if math.isfinite(value):
                ax.axhline(value, color=f"C{4 + k % 6}", linestyle="--", linewidth=1, label=str(ref.get("name")))
        for metric, op, threshold in bounds:
            if metric == name:
                ax.axhline(threshold, color="C3", linestyle=":", label=f"{metric}{op}{threshold:g}")
        ax.set_xticks(xs, labels, rotation=30 if len(xs) > 6 else 0, fontsize="small")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
    if names:
        axes[len(names) - 1].set_xlabel("candidate scales (λ shared, or one per fine-tune)")
    if trade_off:
        _trade_off(axes[-1], recipe, candidates, references, bounds, constrained[:2])
    figure.suptitle(f"compose ({recipe.get('method')}): every candidate's validation metrics")
    return figure


def _trade_off(
    ax: Any,
    recipe: Mapping[str, Any],
    candidates: list[Mapping[str, Any]],
    references: list[Mapping[str, Any]],
    bounds: list[tuple[str, str, float]],
    pair: list[str],
) -> None:
    x_name, y_name = pair
    points = [(_num(c.get("metrics", {}).get(x_name)), _num(c.get("metrics", {}).get(y_name))) for c in candidates]
    better = tuple(next(op in (">=", ">") for m, op, _ in bounds if m == name) for name in pair)
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="C0", label="candidates", zorder=2)
    front = pareto_front(points, better)  # type: ignore[arg-type]
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="C1", linewidth=1.5,
                marker="o", label="Pareto front", zorder=2)
    for k, ref in enumerate(references):
        metrics = ref.get("metrics", {})
        ax.scatter([_num(metrics.get(x_name))], [_num(metrics.get(y_name))], marker="s", s=50,
                   color=f"C{4 + k % 6}", label=str(ref.get("name")), zorder=3)
    chosen = recipe.get("index")
    if chosen is not None and 0 <= chosen < len(points):
        ax.plot([points[chosen][0]], [points[chosen][1]], marker="*", markersize=18, color="C2", linestyle="none",
                label="chosen", zorder=4)
    ax.relim()
    ax.autoscale_view()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    lo = {x_name: x0, y_name: y0}
    hi = {x_name: x1, y_name: y1}
    for metric, op, threshold in bounds:
        if metric in lo:
            if op in (">=", ">"):
                lo[metric] = max(lo[metric], threshold)
            else:
                hi[metric] = min(hi[metric], threshold)
            line = ax.axvline if metric == x_name else ax.axhline
            line(threshold, color="C3", linestyle=":", linewidth=1)
    if lo[x_name] < hi[x_name] and lo[y_name] < hi[y_name]:
        ax.fill_between([lo[x_name], hi[x_name]], lo[y_name], hi[y_name], color="C2", alpha=0.08,
                        label="constraint met")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title("trade-off between the constrained metrics", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="x-small")
