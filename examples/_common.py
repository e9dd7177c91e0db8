"""Pieces the examples share: the digits MLP's steps, quiet Lightning logging, the results table and report.

Not an example itself: ``forgetting_digits.py``, ``forgetting_lm.py`` and ``lightning_cli.py`` import it (they put
their own folder on ``sys.path`` first, so it is found however they are started).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_soup import CheckpointAveraging, GreedySoup, TaskArithmeticBlend


# ------------------------------------------------------------------------------------------------------------ model
def digits_mlp(hidden: int) -> nn.Sequential:
    """64 → hidden → hidden → 10 MLP with BatchNorm: the digits examples' network."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip


class DigitsSteps:
    """LightningModule steps for a classifier ``self.net`` over 8×8 digits, trained with SGD (momentum 0.9).

    Mix in before ``LightningModule``. Needs ``self.net``, ``self.hparams.lr`` and ``self.val_tasks`` (the task name of
    each validation dataloader). Validation logs ``val/<task>_acc`` and ``val/<task>_loss`` with
    ``add_dataloader_idx=False``, so the names carry no ``/dataloader_idx_N``.
    """

    net: nn.Module
    val_tasks: Sequence[str]
    hparams: Any
    log: Any
    parameters: Any

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (n, 64) → (n, 10) logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)  # type: ignore[operator]
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self(x)  # type: ignore[operator]
        task = self.val_tasks[dataloader_idx]
        # Epoch values are batch-size-weighted means: exactly the accuracy over the whole split.
        self.log(f"val/{task}_acc", (logits.argmax(1) == y).float().mean(), add_dataloader_idx=False, prog_bar=True)
        self.log(f"val/{task}_loss", nn.functional.cross_entropy(logits, y), add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


# ------------------------------------------------------------------------------------------------------- experiment
def soup_callbacks(
    out: Path, *, window: int, monitor: str, mode: str, constraint: str, ratios: Sequence[float], **averaging: Any
) -> list[Any]:
    """The three callbacks of the forgetting experiments, writing to ``out``; ``averaging``: more CheckpointAveraging
    arguments."""
    return [
        CheckpointAveraging(window=window, **averaging, dirpath=str(out)),
        GreedySoup(monitor=monitor, mode=mode, dirpath=str(out)),
        TaskArithmeticBlend(
            anchor="initial", ratio=ratios, monitor=monitor, mode=mode, constraint=constraint, dirpath=str(out)
        ),
    ]


def merged_files(out: Path, unit: str) -> dict[str, tuple[str, str]]:
    """The soup's and the blend's files in ``out``, each with a description read from its JSON report."""
    return {
        "soup": ("soup.safetensors", soup_detail(json.loads((out / "soup.json").read_text()), unit)),
        "blended": ("blended.safetensors", blend_detail(json.loads((out / "blend.json").read_text()))),
    }


def score_files(
    out: Path,
    files: Mapping[str, tuple[str, str]],
    score: Callable[[dict[str, Tensor]], Any],
    summary: Callable[[Any], dict[str, float]],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``score`` the weights of each of ``files`` (name → (file in ``out``, description)).

    Returns the scores and the table rows (file, description and ``summary`` of the score), by name.
    """
    scores, rows = {}, {}
    for name, (file, detail) in files.items():
        scores[name] = score(load_file(str(out / file)))
        rows[name] = {"file": file, "detail": detail, **summary(scores[name])}
    return scores, rows


def standard_verdicts(compare: Callable[..., str], scores: Mapping[str, Any], both: str, trade: str) -> list[str]:
    """Best vs last, average vs last, soup vs best on the new task; blended vs soup on ``both``, plus ``trade``."""
    return [
        compare("best checkpoint", scores["best"], "last", scores["last"], "new"),
        compare("average", scores["average"], "last", scores["last"], "new"),
        compare("greedy soup", scores["soup"], "best checkpoint", scores["best"], "new"),
        compare("blended", scores["blended"], "greedy soup", scores["soup"], both) + "; " + trade,
    ]


def require_learned(what: str, value: float, bound: float, hint: str, *, higher_is_better: bool = True) -> None:
    """Stop the example with a clear message when the base did not learn its task (``value`` worse than ``bound``):
    averaging, souping or blending toward a base that never learned anything shows nothing."""
    ok = value >= bound if higher_is_better else value <= bound
    if not ok:  # NaN fails too
        relation = "below" if higher_is_better else "above"
        raise SystemExit(
            f"STOP: {what} is {value:.4g}, {relation} the {bound:.4g} this example needs before anything is merged. "
            f"{hint}"
        )


# ----------------------------------------------------------------------------------------------------------- output
def quiet_lightning() -> None:
    """Keep the demo's output to the progress bar, the callbacks' summaries and the results."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message)


def render_table(
    rows: Mapping[str, Mapping[str, Any]],
    title: str,
    columns: Sequence[tuple[str, str]],
    *,
    higher_is_better: bool,
    decimals: int,
) -> Table:
    """The results as a rich table (``columns``: ``(row key, header)``); the best value of each column in bold."""
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    table.add_column("weights")
    for _, header in columns:
        table.add_column(header, justify="right")
    pick = max if higher_is_better else min
    best = {key: pick(r[key] for r in rows.values()) for key, _ in columns}
    for name, row in rows.items():
        cells = [f"{row[k]:.{decimals}f}" for k, _ in columns]
        cells = [f"[bold]{cell}[/]" if row[k] == best[k] else cell for cell, (k, _) in zip(cells, columns)]
        table.add_row(name, row["detail"], *cells)
    return table


def blend_trade_off(
    rows: Mapping[str, Mapping[str, float]], old: str, new: str, *, higher_is_better: bool, old_name: str, new_name: str
) -> str:
    """How much of the soup's forgetting the blend undid, and how much of its gain it kept (``old``/``new`` keys)."""
    sign = 1 if higher_is_better else -1  # negation is exact: the same numbers as writing each case out
    base, soup, blended = rows["base"], rows["soup"], rows["blended"]
    forgot, gained = sign * (base[old] - soup[old]), sign * (soup[new] - base[new])
    recovered = f"{sign * (blended[old] - soup[old]) / forgot:.0%}" if forgot > 0 else "n/a (nothing forgotten)"
    kept = f"{sign * (blended[new] - base[new]) / gained:.0%}" if gained > 0 else "n/a (nothing gained)"
    return f"recovers {recovered} of the soup's {old_name} forgetting and keeps {kept} of its {new_name} gain"


def soup_detail(recipe: Mapping[str, Any], unit: str) -> str:
    """``"mean of epochs 6+9 (greedy, of 10)"`` from ``soup.json`` (``unit``: the ingredients' "epoch" or "step")."""
    members = sorted(i[unit] for i in recipe["ingredients"] if i["accepted"])
    return f"mean of {unit}s {'+'.join(map(str, members))} (greedy, of {len(recipe['ingredients'])})"


def blend_detail(report: Mapping[str, Any]) -> str:
    """``"base + 0.4·(soup − base)"`` from ``blend.json``, flagged when no ratio met the constraint."""
    text = f"base + {report['ratio']:g}·(soup − base)"
    return text if report["constraint_met"] is not False else f"{text}, constraint NOT met"


def print_results(console: Console, table: Table, verdicts: Sequence[str], out: Path, wall: float) -> None:
    """The table, one bullet per verdict, and where the files are."""
    console.print()
    console.print(table)
    for line in verdicts:
        console.print(f"  • {line}")
    console.print(f"Weights, soup.json, blend.json and the ratio plot blend.png are in {out}/ ({wall:.1f} s)")


def json_result(
    script: str,
    argv: Sequence[str] | None,
    fields: Mapping[str, Any],
    rows: Mapping[str, Mapping[str, Any]],
    verdicts: Sequence[str],
    wall: float,
    path: Path | None,
) -> dict[str, Any]:
    """What ``--json`` writes (the command line, ``fields``, the table, the verdicts, the time); written at ``path``
    unless it is None."""
    result = {
        "command": " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)]),
        **fields,
        "rows": [{"method": name, **row} for name, row in rows.items()],
        "verdicts": list(verdicts),
        "wall_s": round(wall, 1),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
