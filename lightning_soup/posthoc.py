"""Merging finished models with your own validation: :func:`soup` over a sweep and :func:`compose` of capabilities.

* :func:`soup` — model soups over *separate fine-tunes* of one pretrained model, the founding experiment of
  Wortsman et al., *Model soups: averaging weights of multiple fine-tuned models improves accuracy without
  increasing inference time* (ICML 2022): the greedy soup (Recipe 1) or the uniform soup, every ingredient and
  candidate scored by ``trainer.validate``.
* :func:`compose` — several capabilities fine-tuned from one base, combined into one model: task arithmetic
  (Ilharco et al., ICLR 2023), TIES (Yadav et al., NeurIPS 2023), DARE (Yu et al., ICML 2024) and the methods
  of :mod:`lightning_soup.merge` added after them, with the coefficient chosen on validation under
  per-capability constraints.

How it works. Scores are what ``trainer.validate(model, ...)`` returns for the weights (the package's one
evaluation path outside ``fit``), with the trainer's loggers detached unless ``log=True`` and the metrics of every
validation dataloader merged into one dict. Under DDP every rank validates every candidate and rank zero's metrics
are broadcast right after each pass, so every decision is rank zero's; rank zero alone writes files. All maths is
:mod:`lightning_soup.merge`; files are read through :mod:`lightning_soup.storage` (``.ckpt``, ``.safetensors``,
sharded folders, mixed), lazily, onto the strategy's device, where the candidates are built. Every argument and
every input file is checked before the first validation (keys, shapes, and that the inputs share a base); an
exception or KeyboardInterrupt during the candidates puts the module's original weights back.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_soup import merge, storage
from lightning_soup.callbacks import _base, _dist, _tensors
from lightning_soup.callbacks._constraint import Bound, choose, parse_constraint, satisfies, total_violation
from lightning_soup.errors import SoupError
from lightning_soup.merge import _inplace
from lightning_soup.merge._checks import check_compatible, check_density, check_mode, check_seed
from lightning_soup.merge._core import acc_dtype

__all__ = ["MergeResult", "compose", "soup"]

SOUP_FILE, SOUP_REPORT = "soup.safetensors", "soup.json"
MERGED_FILE, COMPOSE_REPORT, COMPOSE_PLOT = "merged.safetensors", "compose.json", "compose.png"
DEFAULT_SCALES = (0.3, 0.5, 0.7, 1.0)

#: compose's ``method`` → the function of :mod:`lightning_soup.merge` it runs (looked up when called).
COMPOSE_METHODS = {
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare": "dare",
    "tsv": "tsv_merge",
    "iso_c": "iso_c",
    "iso_cts": "iso_cts",
    "model_stock": "model_stock",
}
_SOUP_METHODS = ("greedy", "uniform")


@dataclass(frozen=True)
class MergeResult:
    """What :func:`soup` and :func:`compose` made.

    Attributes:
        path: the written weights (``soup.safetensors`` or ``merged.safetensors``), keyed like
            ``model.state_dict()``.
        recipe: the report also written as JSON next to it (every checkpoint or candidate and its metrics).
        metrics: the chosen weights' validation metrics, as ``trainer.validate`` reported them.
        report: the JSON report's path (``soup.json`` or ``compose.json``).
        plot: ``compose.png`` when it was written (compose with matplotlib installed), else None.
    """

    path: Path
    recipe: dict[str, Any] = field(repr=False)
    metrics: dict[str, float]
    report: Path
    plot: Path | None = None


# --------------------------------------------------------------------------------------------------------- soup


def soup(
    trainer: Any,
    model: Any,
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    monitor: str,
    mode: Literal["max", "min"] = "max",
    method: Literal["greedy", "uniform"] = "greedy",
    datamodule: Any = None,
    val_dataloaders: Any = None,
    dirpath: str | os.PathLike | None = None,
    log: bool = False,
    allow_unrelated: bool = False,
) -> MergeResult:
    """Soup a sweep's fine-tunes of one base, scored by your validation loop.

    Every checkpoint is scored alone, as ``trainer.validate(model, ...)`` reports ``monitor`` for its weights.
    ``"greedy"``: Wortsman's greedy soup (:func:`lightning_soup.merge.greedy_soup`): sorted by score, starting from
    the best, each next checkpoint joins the running uniform mean when the candidate's validated score is not
    worse. ``"uniform"``: the mean of all checkpoints, validated too. Memory: one float32 running sum and one
    candidate (plus a host copy of the module's original weights), whatever the number of checkpoints; each
    checkpoint is read at most twice.

    Args:
        trainer: the ``Trainer`` whose strategy and devices validate (one device or DDP).
        model: the ``LightningModule`` whose ``validation_step`` scores the weights; it ends holding the soup.
        checkpoints: paths or glob patterns of ``.ckpt`` files, ``.safetensors`` files or sharded folders keyed like
            ``model.state_dict()`` (formats may be mixed).
        monitor: the validation metric to rank by, as logged (e.g. ``"val/acc"``).
        mode: ``"max"`` when higher ``monitor`` is better, ``"min"`` for losses.
        method: ``"greedy"`` or ``"uniform"``.
        datamodule: passed to ``trainer.validate``.
        val_dataloaders: passed to ``trainer.validate`` as ``dataloaders`` (instead of a datamodule).
        dirpath: where ``soup.safetensors`` and ``soup.json`` go; default ``<trainer.default_root_dir>/soup``.
        log: also send every validation and the soup's metrics (``soup/<monitor>``) to the trainer's loggers.
        allow_unrelated: skip the check that every checkpoint shares a base with the first one (which reads each
            checkpoint once more, before the first validation: three reads instead of two).

    Returns:
        A :class:`MergeResult`; ``recipe["checkpoints"]`` lists every checkpoint (path, score, accepted, soup
        score after it) in the order tried.

    Raises:
        SoupError: before any validation, for bad arguments, paths or globs that match nothing, a duplicate or
            unreadable checkpoint, keys/shapes that do not fit the model, or (unless `allow_unrelated`) a
            checkpoint whose weights do not share a base with the first one; after the first validation when it
            does not log ``monitor`` (listing what it logs).
    """
    problems = _common_problems(monitor, datamodule, val_dataloaders, log, allow_unrelated)
    mode = _collect(problems, check_mode, mode)
    if method not in _SOUP_METHODS:
        problems.append(f"`method` must be one of {', '.join(map(repr, _SOUP_METHODS))}, got {method!r}.")
    paths = _expand(checkpoints, "checkpoints", problems)
    _raise(problems)
    out = _output_dir(trainer, dirpath)
    with _opened(paths) as lazies:
        names = [str(p) for p in paths]
        _check_fits(model, lazies, names)
        validator = _Validator(trainer, model, datamodule, val_dataloaders, log, [monitor])
        start, device = _device(model), _work_device(trainer, model)
        if not allow_unrelated:
            _check_related([_OnDevice(lz, device) for lz in lazies], names)
        with _restored_on_error(model):
            own = []
            for lazy in lazies:  # first read of each checkpoint
                own.append(_load_and_validate(model, _read_all(lazy, device), validator))
            scores = [_score(m, monitor) for m in own]
            if method == "greedy":
                soup_metrics, rows = _greedy(model, validator, lazies, device, scores, own, monitor, mode)
            else:
                soup_metrics, rows = _uniform(model, validator, lazies, device, scores, own)
        _dist.broadcast_module_(trainer, model)
        model.to(start)  # where trainer.validate leaves it, and where it was given
    soup_score = _score(soup_metrics, monitor)
    for row, name in ((r, names[r["index"]]) for r in rows):
        row["path"] = name
    recipe = storage.json_safe({
        "method": f"{method}_soup",
        "monitor": monitor,
        "mode": mode,
        "soup_score": soup_score,
        "metrics": soup_metrics,
        "ingredients_used": sum(1 for r in rows if r["accepted"]),
        "checkpoints": rows,
    })
    path = _tensors.write_module_weights(trainer, model, out / SOUP_FILE, recipe)
    if trainer.is_global_zero:
        storage.write_json(recipe, out / SOUP_REPORT)
    from lightning_soup import _posthoc_report

    _dist.print_on_rank_zero(trainer, _posthoc_report.soup_table(recipe))
    if log:
        _log(trainer, {f"soup/{monitor}": soup_score, "soup/ingredients": float(recipe["ingredients_used"])})
    trainer.strategy.barrier("lightning_soup.soup.end")
    return MergeResult(path=path, recipe=recipe, metrics=soup_metrics, report=out / SOUP_REPORT)


def _greedy(
    model: Any,
    validator: _Validator,
    lazies: list[storage.LazyStateDict],
    device: torch.device,
    scores: list[float],
    own: list[dict[str, float]],
    monitor: str,
    mode: str,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    tried: list[dict[str, float]] = []

    def evaluate(candidate: dict[str, Tensor]) -> float:
        tried.append(_load_and_validate(model, candidate, validator))
        del candidate
        return _score(tried[-1], monitor)

    # Candidates are built in the module's own tensors when every floating entry has one there (else in fresh ones).
    model.to(device)
    live = _tensors.module_tensors(model)
    floats = {k: v for k, v in lazies[0].meta().items() if v.is_floating_point()}
    into = {k: live.get(_tensors.canonical_key(k)) for k in floats}
    fits = all(t is not None and t.is_floating_point() and t.shape == floats[k].shape for k, t in into.items())
    # second read of each checkpoint (NaN-scored ones are never read again)
    result, steps = merge.greedy_soup(
        [_OnDevice(lz, device) for lz in lazies], evaluate, mode=mode, scores=scores, into=into if fits else None
    )
    _load_(model, result)
    del result
    last = max(j for j, s in enumerate(steps) if s["accepted"])
    metrics = own[steps[0]["index"]] if last == 0 else tried[last - 1]
    rows = [
        {"index": s["index"], "score": s["score"], "metrics": own[s["index"]], "accepted": s["accepted"],
         "soup_score": s["soup_score"], "skipped": s["skipped"]}
        for s in steps
    ]
    return dict(metrics), rows


def _uniform(
    model: Any,
    validator: _Validator,
    lazies: list[storage.LazyStateDict],
    device: torch.device,
    scores: list[float],
    own: list[dict[str, float]],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    if merge.lora_pairs(lazies[0].keys()):
        # LoRA factors are averaged on ΔW = B·A (every checkpoint in memory at once: adapters are small)
        result, _ = merge.lora_uniform_soup([_OnDevice(lz, device) for lz in lazies], allow_unrelated=True)
        _load_(model, result)
        del result
    else:
        model.to(device)  # the mean is written straight into the module's tensors
        live = _tensors.unique_tensors(_tensors.module_tensors(model))  # tied weights written once
        keys = [k for k, v in live.items() if v.is_floating_point()]
        fixed = [k for k in live if k not in keys]
        sums: list[Tensor] = []
        with torch.no_grad():
            for i, lazy in enumerate(lazies):  # second read of each checkpoint: one ingredient at a time
                sd = _tensors.canonical(_OnDevice(lazy, device))
                tensors = [sd[k] for k in keys]
                if i == 0:
                    sums = [t.to(acc_dtype(t.dtype), copy=True) for t in tensors]
                else:
                    _inplace.accumulate_(sums, tensors)
                del tensors
            _inplace.assign_mean_([live[k] for k in keys], sums, len(lazies))
            del sums
            # non-floating entries (integer buffers) are taken from the first checkpoint, never averaged
            first = _tensors.canonical(_OnDevice(lazies[0], device))
            _inplace.assign_([live[k] for k in fixed], [first[k] for k in fixed])
    metrics = validator()
    rows = [
        {"index": i, "score": scores[i], "metrics": own[i], "accepted": True, "soup_score": None, "skipped": False}
        for i in range(len(lazies))
    ]
    return metrics, rows


# ------------------------------------------------------------------------------------------------------ compose


def compose(
    trainer: Any,
    model: Any,
    base: str | os.PathLike,
    finetuned: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    method: Literal["task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "model_stock"] = "task_arithmetic",
    scales: Sequence[float] | Sequence[Sequence[float]] | float | None = DEFAULT_SCALES,
    monitor: str,
    mode: Literal["max", "min"] = "max",
    constraint: str | Sequence[str] | None = None,
    density: float = 0.2,
    seed: int = 0,
    datamodule: Any = None,
    val_dataloaders: Any = None,
    dirpath: str | os.PathLike | None = None,
    log: bool = False,
    allow_unrelated: bool = False,
) -> MergeResult:
    """Combine fine-tunes of one base into one model, the merge chosen on your validation under constraints.

    Each candidate is ``method`` over the fine-tunes with one entry of ``scales``; every candidate is validated
    and the chosen one is the best ``monitor`` among those meeting ``constraint`` (when none does, the one
    closest to meeting it, with a warning, as ``TaskArithmeticBlend`` does). The base and each fine-tune alone are
    validated too, for comparison (never chosen).

    Args:
        trainer: the ``Trainer`` whose strategy and devices validate (one device or DDP).
        model: the ``LightningModule`` whose ``validation_step`` scores the weights; it ends holding the result.
        base: the checkpoint the fine-tunes started from (``.ckpt``, ``.safetensors`` or sharded folder).
        finetuned: the fine-tunes (paths or glob patterns), keyed like ``model.state_dict()``.
        method: ``task_arithmetic``, ``ties``, ``dare``, ``tsv``, ``iso_c``, ``iso_cts`` or ``model_stock`` (the
            functions of :mod:`lightning_soup.merge` of that name; ``tsv`` is ``tsv_merge``).
        scales: floats (one coefficient λ/α shared by every task vector per candidate) or tuples (one λ per
            fine-tune per candidate: each τᵢ is multiplied by its λᵢ first and the method runs with scale 1).
            ``model_stock`` has no scale (one candidate): leave the default or pass None.
        monitor: the validation metric to rank candidates by.
        mode: ``"max"`` or ``"min"`` for ``monitor``.
        constraint: ``"val/a_acc>=0.9, val/b_acc>=0.8"`` (or a list); every name must be logged by validation.
        density: the fraction of each task vector kept by ``ties`` and ``dare``.
        seed: ``dare``'s random seed.
        datamodule: passed to ``trainer.validate``.
        val_dataloaders: passed to ``trainer.validate`` as ``dataloaders``.
        dirpath: where ``merged.safetensors``, ``compose.json`` and ``compose.png`` go; default
            ``<trainer.default_root_dir>/soup``.
        log: also send every validation and the chosen candidate's metrics (``compose/<metric>``) to the loggers.
        allow_unrelated: skip the check that every fine-tune was fine-tuned from `base`.

    Returns:
        A :class:`MergeResult`; ``recipe["candidates"]`` holds every candidate (method, scales, metrics,
        constraint met) and ``recipe["references"]`` the base and each fine-tune alone.

    Raises:
        SoupError: before any validation, for a bad argument, a path or glob that matches nothing, inputs whose
            keys/shapes do not fit the model, a method that is not available, or (unless `allow_unrelated`) a
            fine-tune that does not look derived from `base`; after the first validation when
            it does not log ``monitor`` or a constrained metric (listing what it logs).
    """
    problems = _common_problems(monitor, datamodule, val_dataloaders, log, allow_unrelated)
    mode = _collect(problems, check_mode, mode)
    bounds: tuple[Bound, ...] = _collect(problems, parse_constraint, constraint) or ()
    base_paths = _expand(base, "base", problems)
    if len(base_paths) > 1:
        problems.append(f"`base` must be one checkpoint, but {str(base)!r} matches {len(base_paths)}.")
    ft_paths = _expand(finetuned, "finetuned", problems)
    if base_paths:
        same = [str(p) for p in ft_paths if p.resolve() == base_paths[0].resolve()]
        if same:
            problems.append(f"`finetuned` lists the base itself ({same[0]!r}); give only the fine-tunes of `base`.")
    function = None
    if method not in COMPOSE_METHODS:
        problems.append(f"`method` must be one of {', '.join(map(repr, COMPOSE_METHODS))}, got {method!r}.")
    else:
        function = getattr(merge, COMPOSE_METHODS[method], None)
        if function is None:
            problems.append(
                f"`method={method!r}` needs `lightning_soup.merge.{COMPOSE_METHODS[method]}`, which this version "
                "does not have. Upgrade lightning_soup, or use 'task_arithmetic', 'ties' or 'dare'."
            )
    grid = _scale_grid(method, scales, len(ft_paths), problems) if ft_paths else []
    if method in ("ties", "dare"):
        density = _collect(problems, check_density, density)
    if method == "dare":
        seed = _collect(problems, check_seed, seed)
    if method == "model_stock" and 0 < len(ft_paths) < 2:
        problems.append("`method='model_stock'` needs at least 2 fine-tunes in `finetuned`.")
    _raise(problems)
    out = _output_dir(trainer, dirpath)
    names = [str(p) for p in base_paths + ft_paths]
    metric_names = list(dict.fromkeys([monitor, *(b.metric for b in bounds)]))
    with _opened(base_paths + ft_paths) as lazies:
        _check_fits(model, lazies, names)
        lora = bool(merge.lora_pairs(lazies[0].keys()))
        if lora and method != "task_arithmetic":
            raise SoupError(
                "These checkpoints hold LoRA factors, which compose merges on ΔW = B·A with "
                f"`method='task_arithmetic'` only; got `method={method!r}`. Use task_arithmetic, or merge the "
                "adapters into dense weights first (`lightning-soup ... --merge-into BASE`)."
            )
        if lora:
            function = merge.lora_task_arithmetic
        start, device = _device(model), _work_device(trainer, model)
        validator = _Validator(trainer, model, datamodule, val_dataloaders, log, metric_names)
        with _restored_on_error(model):
            # each input read once, kept on the module's device for every candidate
            base_sd = _read_all(lazies[0], device)
            fts = [_read_all(lazy, device) for lazy in lazies[1:]]
            if not allow_unrelated:  # on what was read (no second read), before any validation
                _check_related(fts, names[1:], base=base_sd, base_name=names[0])
            references = [{"name": "base", "path": names[0], "metrics": _load_and_validate(model, base_sd, validator)}]
            for i, ft in enumerate(fts):
                metrics = _load_and_validate(model, ft, validator)
                references.append({"name": f"finetuned[{i}]", "path": names[i + 1], "metrics": metrics})
            # checked above (or allowed): the merge functions need not measure it again for every candidate
            tvs = [merge.task_vector(ft, base_sd, allow_unrelated=True) for ft in fts] \
                if method == "task_arithmetic" and not lora else []
            rows = []
            for scale in grid:
                candidate = _candidate(function, method, base_sd, fts, tvs, scale, density, seed)
                rows.append(_load_and_validate(model, candidate, validator))
                del candidate
            scores = [_score(r, monitor) for r in rows]
            values = [{b.metric: _score(r, b.metric) for b in bounds} for r in rows]
            index, met = choose(scores, values, mode, bounds)
            chosen = _candidate(function, method, base_sd, fts, tvs, grid[index], density, seed)  # built again
            _load_(model, chosen)
            del chosen
            del base_sd, fts, tvs
        _dist.broadcast_module_(trainer, model)
        model.to(start)
    candidates = [
        {"method": method, "scales": _scale_json(s), "metrics": r, "score": scores[i],
         "meets_constraint": satisfies(bounds, values[i]) if bounds else None,
         "violation": total_violation(bounds, values[i]) if bounds else None}
        for i, (s, r) in enumerate(zip(grid, rows))
    ]
    recipe = storage.json_safe({
        "method": method,
        "base": names[0],
        "finetuned": names[1:],
        "density": density if method in ("ties", "dare") else None,
        "seed": seed if method == "dare" else None,
        "monitor": monitor,
        "mode": mode,
        "constraint": [str(b) for b in bounds],
        "index": index,
        "scales": _scale_json(grid[index]),
        "constraint_met": met,
        "fallback": met is False,
        "metrics": rows[index],
        "candidates": candidates,
        "references": references,
    })
    if met is False:
        _dist.warn_on_rank_zero(
            trainer,
            f"compose: no candidate satisfies `constraint` {', '.join(map(str, bounds))}; falling back to scales "
            f"{recipe['scales']}, the closest to satisfying it (smallest total normalised violation "
            f"{candidates[index]['violation']:.4g}). See {out / COMPOSE_REPORT}.",
        )
    path = _tensors.write_module_weights(trainer, model, out / MERGED_FILE, recipe)
    from lightning_soup import _posthoc_report

    plot = None
    if trainer.is_global_zero:
        storage.write_json(recipe, out / COMPOSE_REPORT)
        plot = _write_plot(trainer, recipe, out / COMPOSE_PLOT)
    _dist.print_on_rank_zero(trainer, _posthoc_report.compose_table(recipe))
    if log:
        _log(trainer, {f"compose/{k}": float(rows[index][k]) for k in metric_names})
    trainer.strategy.barrier("lightning_soup.compose.end")
    return MergeResult(path=path, recipe=recipe, metrics=dict(rows[index]), report=out / COMPOSE_REPORT, plot=plot)


def _scale_grid(method: str, scales: Any, count: int, problems: list[str]) -> list[float | tuple[float, ...] | None]:
    """The candidates' coefficients: floats (shared) or tuples of `count` floats (one per fine-tune)."""
    if method == "model_stock":
        if scales is None or _same_scales(scales, DEFAULT_SCALES):
            return [None]
        problems.append(
            f"`method='model_stock'` has no scale (it computes its own interpolation), so it is one candidate; got "
            f"`scales={scales!r}`. Leave `scales` at its default or pass None."
        )
        return [None]
    if scales is None:
        problems.append(f"`method={method!r}` needs `scales`: a list of floats or of tuples of {count} floats.")
        return []
    items = [scales] if _is_number(scales) else list(scales) if isinstance(scales, Sequence) else None
    if isinstance(scales, str) or items is None:
        problems.append(f"`scales` must be a list of floats or of tuples, got {scales!r}.")
        return []
    if not items:
        problems.append("`scales` is empty: give at least one coefficient, e.g. [0.3, 0.5, 0.7, 1.0].")
        return []
    numbers = [_is_number(s) for s in items]
    if all(numbers):
        bad = [repr(s) for s in items if not math.isfinite(float(s))]
        if bad:
            problems.append(f"`scales` must be finite numbers; got {', '.join(bad)}.")
        return [float(s) for s in items]
    tuples = [isinstance(s, Sequence) and not isinstance(s, str) for s in items]
    if not all(tuples):
        problems.append(
            f"`scales` must be all floats (one shared coefficient per candidate) or all tuples (one coefficient per "
            f"fine-tune), not a mix: got {scales!r}."
        )
        return []
    grid: list[float | tuple[float, ...] | None] = []
    for s in items:
        if len(s) != count or not all(_is_number(x) and math.isfinite(float(x)) for x in s):
            problems.append(
                f"`scales` entry {tuple(s)!r} must hold {count} finite numbers, one per fine-tune in `finetuned` "
                "(in that order)."
            )
        else:
            grid.append(tuple(float(x) for x in s))
    return grid


def _candidate(
    function: Any,
    method: str,
    base: dict[str, Tensor],
    finetuned: list[dict[str, Tensor]],
    task_vectors: list[dict[str, Tensor]],
    scale: float | tuple[float, ...] | None,
    density: float,
    seed: int,
) -> dict[str, Tensor]:
    """One candidate: `method` of lightning_soup.merge at one entry of the scale grid (inputs already checked)."""
    if method == "task_arithmetic":
        coefficients = list(scale) if isinstance(scale, tuple) else scale
        if not task_vectors:  # LoRA: lora_task_arithmetic takes the fine-tunes and returns (state, report)
            return function(base, finetuned, coefficients, allow_unrelated=True)[0]
        return function(base, task_vectors, coefficients, allow_unrelated=True)
    if method == "model_stock":
        return function(base, finetuned, allow_unrelated=True)
    coefficient = scale
    if isinstance(scale, tuple):
        # τᵢ scaled by its own λᵢ first (base + λᵢτᵢ), then the method at scale 1
        finetuned = [merge.interpolate(base, ft, s, allow_unrelated=True) for ft, s in zip(finetuned, scale)]
        coefficient = 1.0
    if method == "ties":
        return function(base, finetuned, density, scale=coefficient, allow_unrelated=True)
    if method == "dare":
        return function(base, finetuned, density, scale=coefficient, seed=seed, allow_unrelated=True)
    return function(base, finetuned, alpha=coefficient, allow_unrelated=True)


def _write_plot(trainer: Any, recipe: Mapping[str, Any], path: Path) -> Path | None:
    from lightning_soup import _posthoc_report

    try:
        figure = _posthoc_report.compose_figure(recipe)
    except ImportError:
        _dist.warn_on_rank_zero(
            trainer,
            f"compose: matplotlib is not installed, so {path.name} was not written (the table is in "
            f"{COMPOSE_REPORT}). For the plot: pip install lightning-soup[plot]",
        )
        return None
    with storage.atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


# ------------------------------------------------------------------------------------------------------ plumbing


class _Validator:
    """``trainer.validate`` on the module's current weights: rank zero's metrics, merged over dataloaders.

    The first call checks that every name in `required` was logged, and raises a SoupError listing what was.
    """

    def __init__(
        self, trainer: Any, model: Any, datamodule: Any, dataloaders: Any, log: bool, required: Sequence[str]
    ) -> None:
        self.trainer, self.model, self.datamodule, self.dataloaders = trainer, model, datamodule, dataloaders
        self.log, self.required, self.calls = log, list(required), 0

    def __call__(self) -> dict[str, float]:
        trainer = self.trainer
        loggers = trainer.loggers
        if not self.log:
            trainer.loggers = []
        try:
            results = trainer.validate(
                self.model, dataloaders=self.dataloaders, datamodule=self.datamodule, verbose=False
            )
        finally:
            trainer.loggers = loggers
        metrics: dict[str, float] = {}
        for per_loader in results or []:
            metrics.update({k: _to_float(v) for k, v in per_loader.items()})
        metrics = trainer.strategy.broadcast(metrics)
        self.calls += 1
        if self.calls == 1:
            missing = [name for name in self.required if name not in metrics]
            if missing:
                logged = ", ".join(repr(k) for k in sorted(metrics)) or "nothing"
                raise SoupError(
                    f"Validation does not log {', '.join(map(repr, missing))} (needed by `monitor`/`constraint`); "
                    f"it logs: [{logged}]. HINT: Did you call `self.log({missing[0]!r}, ...)` in "
                    "`validation_step`? With several validation dataloaders names carry a `/dataloader_idx_N` "
                    "suffix unless logged with `add_dataloader_idx=False`."
                )
        return metrics


class _OnDevice(Mapping[str, Tensor]):
    """A lazy checkpoint whose tensors arrive on `device` (the module's), read when accessed."""

    def __init__(self, lazy: storage.LazyStateDict, device: torch.device) -> None:
        self._lazy, self._device = lazy, device

    def __getitem__(self, key: str) -> Tensor:
        return self._lazy[key].to(self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._lazy)

    def __len__(self) -> int:
        return len(self._lazy)

    def meta(self) -> dict[str, Tensor]:
        return self._lazy.meta()


class _opened:
    """Open every checkpoint lazily (headers only), reporting every unreadable one at once; close them on exit."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths
        self.lazies: list[storage.LazyStateDict] = []

    def __enter__(self) -> list[storage.LazyStateDict]:
        problems = []
        for path in self.paths:
            try:
                self.lazies.append(storage.open_state_dict(path))
            except SoupError as e:
                problems.append(str(e))
        if problems:
            self.__exit__()
            _raise(problems)
        return self.lazies

    def __exit__(self, *exc: Any) -> None:
        for lazy in self.lazies:
            lazy.close()


class _restored_on_error:
    """Put the module's original weights back (bit for bit) when the body raises, KeyboardInterrupt included.

    The copy lives in host memory, so the module's device holds only the candidates.
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.device = _device(self.model)
        with torch.no_grad():
            self.backup = {k: v.detach().to("cpu", copy=True) for k, v in _tensors.module_tensors(self.model).items()}

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.model.to(self.device)
            _tensors.load_into_module_(self.model, {k: v.to(self.device) for k, v in self.backup.items()})
        del self.backup


def _common_problems(monitor: Any, datamodule: Any, val_dataloaders: Any, log: Any, allow_unrelated: Any) -> list[str]:
    problems = []
    if not isinstance(monitor, str) or not monitor.strip():
        problems.append(f"`monitor` must be the name of a logged validation metric, e.g. 'val/acc'; got {monitor!r}.")
    if datamodule is not None and val_dataloaders is not None:
        problems.append("Pass `datamodule` or `val_dataloaders`, not both.")
    if not isinstance(log, bool):
        problems.append(f"`log` must be True or False, got {log!r}.")
    if not isinstance(allow_unrelated, bool):
        problems.append(f"`allow_unrelated` must be True or False, got {allow_unrelated!r}.")
    return problems


def _collect(problems: list[str], check: Any, value: Any) -> Any:
    try:
        return check(value)
    except SoupError as e:
        problems.append(str(e))
        return value


def _raise(problems: Sequence[str]) -> None:
    if len(problems) == 1:
        raise SoupError(problems[0])
    if problems:
        raise SoupError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def _expand(spec: Any, argument: str, problems: list[str]) -> list[Path]:
    """Paths and glob patterns → existing paths, in order (each pattern's matches sorted); duplicates refused."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else spec
    if not isinstance(items, Sequence) or isinstance(items, (bytes, Mapping)):
        problems.append(f"`{argument}` must be a path, a glob pattern or a list of them; got {spec!r}.")
        return []
    if not items:
        problems.append(f"`{argument}` is empty: give at least one checkpoint path or glob pattern.")
        return []
    paths: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            problems.append(f"`{argument}` entries must be paths or glob patterns; got {item!r}.")
            continue
        text = os.path.expanduser(os.fspath(item))
        if glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                problems.append(f"`{argument}`: the pattern {text!r} matches nothing.")
            paths += [Path(m) for m in matches]
        elif not os.path.exists(text):
            problems.append(f"`{argument}`: {text!r} does not exist.")
        else:
            paths.append(Path(text))
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            problems.append(
                f"`{argument}` names {str(p)!r} twice (as {str(seen[key])!r} too); list each checkpoint once."
            )
        seen.setdefault(key, p)
    return paths


def _check_fits(model: Any, lazies: Sequence[storage.LazyStateDict], names: Sequence[str]) -> None:
    """Every checkpoint has the module's keys and shapes (checked on headers only)."""
    layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _tensors.module_tensors(model).items()}
    try:
        check_compatible([layout, *(_tensors.canonical(lz.meta()) for lz in lazies)], ["model.state_dict()", *names])
    except SoupError as e:
        hint = "The checkpoints must be keyed like `model.state_dict()` (fine-tunes of this model)."
        raise SoupError(f"{e}\n{hint}") from None


def _check_related(
    inputs: Sequence[Mapping[str, Tensor]], names: Sequence[str], base: Any = None, base_name: str = "base"
) -> None:
    """Refuse inputs that do not share a base, before any validation (lightning_soup.merge's whole-model check).

    compose: every fine-tune against `base` (already in memory). soup: every checkpoint against the first, streamed
    key by key from the lazy mappings (one tensor per checkpoint in memory; one more read of each checkpoint).
    """
    from lightning_soup.merge._related import check_related

    if base is not None:
        check_related(base, inputs, names, base_name, derived=True)
    elif len(inputs) > 1:
        check_related(inputs[0], inputs[1:], names[1:], names[0], derived=False)


def _output_dir(trainer: Any, dirpath: str | os.PathLike | None) -> Path:
    out = Path(dirpath).expanduser() if dirpath is not None else Path(trainer.default_root_dir) / "soup"
    # every rank checks (nothing is initialised to share a verdict before the first validation), so all stop together
    problem = _base._check_writable_dir(out)
    if problem:
        raise SoupError(problem.replace("before training", "before merging"))
    return out


def _device(model: Any) -> torch.device:
    tensors = _tensors.module_tensors(model)
    return next(iter(tensors.values())).device if tensors else torch.device("cpu")


def _read_all(lazy: storage.LazyStateDict, device: torch.device) -> dict[str, Tensor]:
    return {k: lazy[k].to(device) for k in lazy}


def _work_device(trainer: Any, model: Any) -> torch.device:
    """Where candidates are built: the strategy's device (``trainer.validate`` moves the module there, and back to
    the CPU after every pass), else the module's."""
    root = getattr(trainer.strategy, "root_device", None)
    return torch.device(root) if root is not None else _device(model)


def _load_(model: Any, state: Mapping[str, Tensor]) -> None:
    """Copy `state` into the module, first moving the module to the device `state` lives on (no host round trip)."""
    first = next(iter(state.values()), None)
    if first is not None and _device(model) != first.device:
        model.to(first.device)
    _tensors.load_into_module_(model, state)


def _load_and_validate(model: Any, state: Mapping[str, Tensor], validator: _Validator) -> dict[str, float]:
    _load_(model, state)
    return validator()


def _score(metrics: Mapping[str, float], name: str) -> float:
    from lightning_soup.callbacks._evaluate import resolve_monitor

    return resolve_monitor(metrics, name)


def _to_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_scales(scales: Any, default: Sequence[float]) -> bool:
    try:
        return [float(s) for s in scales] == list(default)
    except (TypeError, ValueError):
        return False


def _scale_json(scale: float | tuple[float, ...] | None) -> float | list[float] | None:
    return list(scale) if isinstance(scale, tuple) else scale


def _log(trainer: Any, metrics: Mapping[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)
        logger.save()

