"""``lightning-soup inspect``: compare checkpoints and, against a base, their task vectors (streamed).

File names and tensor keys are user data: they are escaped before rich sees them (``[/]`` in a key is text, not
markup), and the report is rendered whole before the first byte is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_soup.cli.io import Progress, device_of, open_inputs, prefetch, wants_progress
from lightning_soup.merge import diagnostics
from lightning_soup.merge._related import MIN_COSINE, Relatedness, Relation
from lightning_soup.merge.diagnostics import Compatibility, TaskVectorReport

if TYPE_CHECKING:
    from rich.console import RenderableType


def run_inspect(args: Namespace) -> int:
    """Print the report (rich tables, or JSON with ``--json``) on stdout.

    Returns 1 when the inputs cannot be merged: they differ in keys, shapes or kinds, or (with ``--base``) a model
    does not look fine-tuned from the base (:mod:`lightning_soup.merge._related`); 0 otherwise.
    """
    device = device_of(args.device)
    roles = ([("base", args.base)] if args.base else []) + [("model", p) for p in args.models]
    report = None
    relations: list[Relation] | None = None
    with contextlib.ExitStack() as stack:
        inputs = open_inputs(stack, roles, args.prefix, merging=False)
        metas = [i.meta() for i in inputs]
        compat = diagnostics.compare(metas, [i.name for i in inputs])
        if args.base:
            base_meta = metas[0]
            keys = [k for k in compat.common if base_meta[k].dtype.is_floating_point]
            total = sum(m[k].numel() * m[k].element_size() for k in keys for m in metas)
            stats = diagnostics.TaskVectorStats([i.name for i in inputs[1:]])
            related = Relatedness([i.name for i in inputs[1:]], inputs[0].name)

            def load(key: str) -> list[Tensor]:
                return [i[key] for i in inputs]

            with Progress(wants_progress(args.quiet or args.json)) as progress:
                task = progress.add("reading", total)
                for key, tensors in prefetch(keys, load):
                    nbytes = sum(t.numel() * t.element_size() for t in tensors)
                    tensors = [t.to(device) for t in tensors]
                    stats.update(key, tensors[0], tensors[1:])
                    related.update(key, tensors[0], tensors[1:])
                    del tensors
                    progress.advance(task, nbytes)
            report = stats.result(args.top)
            relations = related.relations()
    base_name = args.base
    unrelated = [r.name for r in relations or [] if not r.related]
    if args.json:
        doc = diagnostics.report_json(compat, report, base_name)
        if relations is not None:
            doc["related"] = [_relation_json(r) for r in relations]
            doc["unrelated"] = unrelated
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        from rich.console import Console

        # piped output keeps whole rows instead of wrapping at 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=160)
        with console.capture() as captured:  # all or nothing: a rendering error prints no half report
            console.print(render_report(compat, report, base_name or "base"))
            if relations is not None:
                console.print(render_relations(relations, base_name))
        sys.stdout.write(captured.get())
        sys.stdout.flush()
    return 0 if compat.compatible and not unrelated else 1


def _relation_json(r: Relation) -> dict[str, Any]:
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "model": r.name,
        "cosine": finite(r.cosine),
        "distance": finite(r.distance),
        "judged": r.judged,
        "related": r.related,
        "worst_tensor": None if r.worst is None else {"key": r.worst[0], "cosine": finite(r.worst[1])},
    }


def render_relations(relations: list[Relation], base_name: str) -> RenderableType:
    """Whether each model looks fine-tuned from the base: whole-model cosine and distance, and a verdict."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Fine-tuned from {_e(base_name)}? (tensor means removed)", title_justify="left")
    columns = (("model", "left"), ("cosine to base", "right"), ("‖θ − base‖ / ‖base‖", "right"), ("", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in relations:
        verdict = (
            Text("✓ shares the base", style="green")
            if r.related and r.judged
            else Text("? too small to tell")
            if r.related
            else Text("✗ does not share the base", style="bold red")
        )
        table.add_row(_e(r.name), _num(r.cosine, ".4f"), _num(r.distance, ".3f"), verdict)
    parts: list[Any] = [table]
    bad = [r for r in relations if not r.related]
    if bad:
        worst = ", ".join(
            f"{_plain(r.name)}: {_plain(repr(r.worst[0]))} cosine {r.worst[1]:.4f}" for r in bad if r.worst
        )
        parts.append(
            Text(
                f"✗ {len(bad)} model(s) do not look fine-tuned from {_plain(base_name)}: fine-tunes measure a cosine "
                f"of 0.35 to 1, independent initialisations about 0 (limit {MIN_COSINE}); largest unrelated tensors: "
                f"{worst}. Merging them would produce garbage (the merge commands refuse; --allow-unrelated "
                "overrides).",
                style="red",
            )
        )
    return Group(*parts)


def _plain(text: object) -> str:
    """User text for a rich ``Text`` (no markup): control characters shown as escapes."""
    from lightning_soup.cli import printable

    return printable(text)


def _e(text: object) -> str:
    """User text (a path, a key) made safe for rich: markup escaped, control characters (a terminal escape
    sequence in a tensor name) shown as escapes."""
    from rich.markup import escape

    from lightning_soup.cli import printable

    return escape(printable(text))


# ---------------------------------------------------------------------------------------------------- rendering


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


def _count(n: int) -> str:
    return f"{n:,}"


def _num(x: float, fmt: str = ".4g") -> str:
    return "—" if math.isnan(x) else format(x, fmt)


def _percent(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.2f}%"


def _matrix_table(title: str, names: list[str], values: list[list[float]], fmt: Any) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("")
    for name in names:
        table.add_column(_e(name), justify="right")
    for i, (name, row) in enumerate(zip(names, values)):
        table.add_row(_e(name), *("·" if i == j else fmt(v) for j, v in enumerate(row)))
    return table


def render_compatibility(compat: Compatibility, *, limit: int = 20) -> RenderableType:
    """The models table and what differs between them (``limit`` rows per kind of difference)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    models = Table(title="Models", title_justify="left")
    for col, justify in (
        ("model", "left"),
        ("tensors", "right"),
        ("parameters", "right"),
        ("floating", "right"),
        ("size", "right"),
        ("dtypes", "left"),
    ):
        models.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in compat.models:
        dtypes = ", ".join(f"{d} {100 * n / m.num_params:.0f}%" if m.num_params else d for d, n in m.dtypes.items())
        models.add_row(
            _e(m.name), _count(m.num_tensors), _count(m.num_params), _count(m.num_floating), _bytes(m.nbytes), dtypes
        )
    parts: list[Any] = [models]
    if len(compat.models) < 2:
        return Group(*parts)
    if compat.compatible:
        parts.append(Text(f"✓ compatible: same keys, shapes and kinds ({len(compat.common)} tensors)", style="green"))
    else:
        parts.append(Text("✗ not compatible:", style="bold red"))
        problems = compat.problems()
        for line in problems[:limit]:
            parts.append(Text(f"  {_plain(line)}", style="red"))
        if len(problems) > limit:
            parts.append(Text(f"  … and {len(problems) - limit} more"))
        parts.append(Text(f"  {len(compat.common)} tensors are common to all with the same shape and kind"))
    if compat.dtypes:
        table = Table(
            title="Floating dtypes that differ (mergeable: computed in float32 or better)", title_justify="left"
        )
        for col in ("key", "model", "dtype", "reference"):
            table.add_column(col)
        for m in compat.dtypes[:limit]:
            table.add_row(_e(m.key), _e(m.name), _e(m.value), _e(f"{m.expected} ({m.ref})"))
        if len(compat.dtypes) > limit:
            table.add_row(f"… and {len(compat.dtypes) - limit} more", "", "", "")
        parts.append(table)
    return Group(*parts)


def render_task_vectors(report: TaskVectorReport, base_name: str) -> RenderableType:
    """Norms, cosine similarity and sign conflicts of the task vectors against ``base_name``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    norms = Table(title=f"Task vectors τ = model − {_e(base_name)}", title_justify="left")
    for col in ("model", "‖τ‖", "‖τ‖ / ‖base‖"):
        norms.add_column(col, justify="left" if col == "model" else "right")
    for name, norm, rel in zip(report.names, report.norms, report.relative_norms):
        norms.add_row(_e(name), _num(norm), _num(rel))
    parts: list[Any] = [
        Text(
            f"{_count(report.num_params)} floating parameters in {report.num_tensors} tensors compared; "
            f"‖base‖ = {_num(report.base_norm)}"
        ),
        norms,
    ]
    if len(report.names) > 1:
        parts.append(
            _matrix_table("Cosine similarity of task vectors", report.names, report.cosine, lambda v: _num(v, "+.4f"))
        )
        parts.append(
            Text(
                f"Sign conflicts: {_percent(report.conflict_fraction)} of the parameters have task vectors of "
                "opposite signs",
                style="bold",
            )
        )
        if len(report.names) > 2:
            parts.append(_matrix_table("Pairwise sign conflicts", report.names, report.pairwise_conflicts, _percent))
        if report.top_conflicts:
            top = Table(title=f"Most-conflicting tensors (top {len(report.top_conflicts)})", title_justify="left")
            for col, justify in (("tensor", "left"), ("parameters", "right"), ("conflicts", "right")):
                top.add_column(col, justify=justify)  # type: ignore[arg-type]
            for key, numel, fraction in report.top_conflicts:
                top.add_row(_e(key), _count(numel), _percent(fraction))
            parts.append(top)
    return Group(*parts)


def render_report(
    compat: Compatibility, task_vectors: TaskVectorReport | None = None, base_name: str = "base"
) -> RenderableType:
    """The whole ``inspect`` report as one rich renderable."""
    from rich.console import Group

    parts = [render_compatibility(compat)]
    if task_vectors is not None:
        parts.append(render_task_vectors(task_vectors, base_name))
    return Group(*parts)
