"""Blend the trained weights back toward an anchor after fit: task arithmetic / WiSE-FT.

``anchor + ratio·(θ − anchor)`` (Ilharco et al. 2023, "Editing Models with Task Arithmetic"; Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models") moves a fine-tune back toward its base or a safety-tuned checkpoint,
recovering what fine-tuning cost while keeping most of the new skill. This callback decides *when* (after fit,
after every averaging/soup callback) and *which* ratio (a validated sweep under a metric constraint); the
arithmetic is :func:`lightning_soup.merge._inplace.assign_lerp_`, the in-place form of
:func:`lightning_soup.merge.interpolate`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lightning_soup import storage
from lightning_soup.callbacks import _base, _dist, _report, _tensors
from lightning_soup.callbacks._constraint import Bound, choose, parse_constraint, satisfies, total_violation
from lightning_soup.errors import SoupError

if TYPE_CHECKING:
    import pytorch_lightning as pl

ANCHOR_FILE = "anchor.safetensors"
BLENDED_FILE = "blended.safetensors"
REPORT_FILE = "blend.json"
PLOT_FILE = "blend.png"
# The initial weights are written here at fit start and renamed to ANCHOR_FILE once the run is known not to be a
# resume (strategies such as FSDP restore callback state only after ``on_fit_start``).
_PENDING_ANCHOR_FILE = "anchor.pending.safetensors"
# An anchor file this fit may replace (an earlier fit's final.safetensors or last.ckpt) is held here from fit start.
_HELD_ANCHOR_STEM = "anchor.held"
_NAME = "TaskArithmeticBlend"


class _TaskArithmeticBlend(_base.SoupCallback):
    """After fit, set the module to ``anchor + ratio·(θ − anchor)``; with several ratios, pick one on validation.

    ``θ`` is the module's weights when training ends, after every ``CheckpointAveraging``/``GreedySoup`` in the
    trainer has loaded its result, whatever order the callbacks are listed in. Floating-point entries of the
    module's ``state_dict()`` are blended (parameters and floating buffers such as BatchNorm statistics); integer
    entries keep the module's values. Ratio 0 gives the anchor, 1 the trained weights; values outside [0, 1]
    extrapolate.

    With a list of ratios and a ``monitor``, every ratio is scored with the module's own validation loop (the
    metrics ``trainer.validate`` would report), and the chosen ratio is the best one by ``mode`` on ``monitor``
    among those whose metrics satisfy ``constraint`` (ties go to the larger ratio, the one closer to the trained
    weights, with a warning). When no ratio satisfies the
    constraint, a warning is raised and the ratio closest to satisfying it is chosen: the one with the smallest
    total normalised violation ``Σ max(0, gap) / |threshold|`` (the gap itself when the threshold is 0), ties
    broken by ``monitor``. Every rank evaluates every candidate; rank zero's choice is broadcast.

    Files written to ``dirpath`` (global rank zero only):

    * ``anchor.safetensors`` — with ``anchor="initial"``, the weights when fit first started. A resumed run
      keeps blending toward this file (it is never overwritten; resuming without it is an error). A checkpoint
      without this callback's state (another ``dirpath`` or ``anchor``) anchors at the resumed weights, with a
      warning.
    * ``final.safetensors`` — the trained weights before blending.
    * ``blended.safetensors`` — the result, with its recipe (anchor, ratio, layer ratios, scores) in the metadata.
    * ``blend.json`` — every ratio's metrics, which met the constraint, and the choice (also without a sweep).
    * ``blend.png`` — each monitored and constrained metric against the ratio, the chosen ratio and the constraint
      thresholds marked (when metrics were evaluated; needs ``pip install lightning-soup[plot]``).

    ``blend/ratio`` and ``blend/<metric>`` for the monitored and constrained metrics go to the trainer's loggers,
    and a table of every ratio's metrics is printed. In ``trainer.validate``/``test``/``predict`` the callback
    does nothing.

    Memory: during training the anchor stays on disk. At the end of fit it is loaded to the module's device, and
    a sweep keeps a float32 copy of ``θ`` there while it evaluates the candidates.

    Args:
        anchor: ``"initial"`` (the module's weights when fit first starts) or the path to a ``.safetensors`` file,
            a sharded safetensors folder or a Lightning ``.ckpt`` whose floating entries match the module's keys
            and shapes. A path is checked (exists, keys, shapes, finite values) when fit starts, not here, so a
            config can name a file that is written later.
        ratio: the blend ratio, or a list of ratios to choose from (a list of several needs ``monitor``).
        monitor: the validation metric that ranks the ratios, as logged with ``self.log`` (e.g. ``"val/acc"``).
            With a single ratio it is evaluated and reported.
        mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is.
        constraint: conditions the chosen ratio's metrics must meet: ``"metric>=x"``, ``"metric<=x"``,
            ``"metric>x"``, ``"metric<x"``, several joined with ``,`` or `` and `` or given as a list of strings.
        layer_ratios: ratios for some entries, by ``fnmatch`` pattern over ``state_dict`` keys (the first matching
            pattern wins; ``ratio`` applies to the rest), e.g. ``{"classifier.*": 1.0}``.
        dirpath: output folder; ``<trainer.default_root_dir>/soup`` by default.

    Raises:
        SoupError: at construction, listing every invalid argument; at fit start, when the anchor is missing,
            unreadable, has NaN/inf values or does not match the module (naming the keys), when the monitored or
            constrained metrics are not logged by the first validation run, or when ``dirpath`` is not writable.

    Example:
        >>> from lightning_soup import TaskArithmeticBlend
        >>> blend = TaskArithmeticBlend(
        ...     anchor="initial", ratio=[0.0, 0.25, 0.5, 0.75, 1.0], monitor="val/acc", constraint="val/safety_acc>=0.9"
        ... )
        >>> # Trainer(callbacks=[blend]).fit(model) leaves the chosen blend in `model`
        >>> TaskArithmeticBlend(ratio=[0.5, 1.0], mode="best")
        Traceback (most recent call last):
        ...
        lightning_soup.errors.SoupError: Invalid TaskArithmeticBlend arguments:
          - `ratio` lists 2 values, so `monitor` must name the validation metric that chooses between them
          - `mode` can be 'min' or 'max', got 'best'
    """

    _outputs = (BLENDED_FILE, REPORT_FILE, PLOT_FILE, ANCHOR_FILE, _PENDING_ANCHOR_FILE,
                _HELD_ANCHOR_STEM + ".safetensors", _HELD_ANCHOR_STEM + ".ckpt")

    def __init__(
        self,
        anchor: str = "initial",
        ratio: float | list[float] = 0.5,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "max",
        constraint: str | list[str] | None = None,
        layer_ratios: dict[str, float] | None = None,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        problems: list[str] = []
        if isinstance(anchor, os.PathLike):
            anchor = os.fspath(anchor)
        if not isinstance(anchor, str) or not anchor:
            problems.append(f'`anchor` must be "initial" or a path to a weights file, got {anchor!r}')
        ratios = _ratio_list(ratio, problems)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            problems.append(f"`monitor` must be a metric name or None, got {monitor!r}")
        if len(ratios) > 1 and monitor is None:
            problems.append(
                f"`ratio` lists {len(ratios)} values, so `monitor` must name the validation metric that chooses "
                "between them"
            )
        if mode not in ("min", "max"):
            problems.append(f"`mode` can be 'min' or 'max', got {mode!r}")
        bounds: tuple[Bound, ...] = ()
        try:
            bounds = parse_constraint(constraint)
        except SoupError as e:
            problems.append(str(e))
        layer_map = _layer_ratio_map(layer_ratios, problems)
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            problems.append(f"`dirpath` must be a folder path or None, got {dirpath!r}")
        if problems:
            raise SoupError(f"Invalid {_NAME} arguments:\n" + "\n".join(f"  - {p}" for p in problems))

        self.anchor: str = anchor
        self.ratios: list[float] = ratios
        self.monitor = monitor
        self.mode = mode
        self.constraint: tuple[Bound, ...] = bounds
        self.layer_ratios: dict[str, float] = layer_map
        self._dirpath_arg = None if dirpath is None else os.fspath(dirpath)
        # Resumable state (plain types).
        self._anchor_saved = False  # "initial" only: anchor.safetensors was committed by an earlier fit start
        self.result: dict[str, Any] | None = None  # the last blend: choice and every candidate's metrics
        # Per-fit scratch.
        self._dirpath: Path | None = None
        self._pending_anchor = False
        self._metrics_checked = False
        self._held_anchor: Path | None = None

    # ----------------------------------------------------------------------------------------------------- state

    @property
    def state_key(self) -> str:
        return f"{_NAME}{ {'anchor': self.anchor, 'dirpath': self._dirpath_arg}!r}"

    @property
    def _evaluates(self) -> bool:
        return self.monitor is not None or bool(self.constraint)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "anchor_saved": self._anchor_saved, "result": self.result}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoint state is untrusted: checked here, once (it names no file; the anchor comes from `anchor`).
        self._anchor_saved = _base.state_value(self, state_dict, "anchor_saved", bool, False)
        self.result = _base.state_value(self, state_dict, "result", (dict, type(None)), None)

    # ----------------------------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or _base.skip_fast_dev_run(trainer, self):
            return
        # A new fit starts fresh (a reused instance anchors on the new fit's start); a resume loads its state later.
        self._anchor_saved = False
        self.result = None
        _dist.check_strategy(trainer, self)
        if self._evaluates and trainer.limit_val_batches == 0:
            raise SoupError(
                f"{_NAME}(monitor={self.monitor!r}, constraint={self._constraint_text()!r}) scores the blend ratios "
                "with your validation loop, but validation is disabled (`Trainer(limit_val_batches=0)`). Enable "
                "validation, or give a single `ratio` without `monitor`/`constraint`."
            )
        self._dirpath = self.prepare_dirpath(trainer)
        self._pending_anchor = False
        self._metrics_checked = False
        _base.move_after_producers(trainer, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_layer_patterns(trainer, pl_module)
        if self.anchor != "initial":
            self._raise_anchor_problem(trainer, pl_module, Path(self.anchor).expanduser(), check_values=True)
            self._hold_anchor(trainer)
        elif self._anchor_saved:
            self._raise_anchor_problem(trainer, pl_module, self._anchor_path(), check_values=False)
        else:
            # Callback state is restored before this hook by most strategies but after it by some
            # (ModelParallelStrategy), so the initial weights are committed in on_train_start, once it is known
            # whether this fit resumes.
            recipe = {"method": "anchor", "anchor": "initial", "global_step": trainer.global_step}
            # What training changes only (a LoRA run's anchor is its fresh adapter, not the frozen base).
            _tensors.write_module_weights(trainer, pl_module, self._path(_PENDING_ANCHOR_FILE), recipe, kept_only=True)
            self._pending_anchor = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pending_anchor:
            return
        self._pending_anchor = False
        pending = self._path(_PENDING_ANCHOR_FILE)
        if self._anchor_saved:  # a resume whose state arrived after on_fit_start: the pending file is not initial
            if trainer.is_global_zero:
                pending.unlink(missing_ok=True)
            trainer.strategy.barrier("lightning_soup.blend.anchor")
            self._raise_anchor_problem(trainer, pl_module, self._anchor_path(), check_values=False)
            return
        if trainer.ckpt_path is not None:
            # Resuming from a checkpoint without this callback's state (another `dirpath` or `anchor`, or a
            # weights-only checkpoint): the first fit's weights are unknown, so the resumed weights stand in for them
            # (with late-restoring strategies, the pending file holds the weights from before the restore).
            _dist.warn_on_rank_zero(
                trainer,
                f"{_NAME}(anchor='initial'): resuming from {str(trainer.ckpt_path)!r}, which holds no state of this "
                f"callback (state key {self.state_key}), so the anchor is the weights this fit resumed from, not "
                "those the original run started with. Resume with the same `dirpath` to keep that anchor.",
            )
            recipe = {"method": "anchor", "anchor": "resumed", "global_step": trainer.global_step}
            _tensors.write_module_weights(trainer, pl_module, self._anchor_path(), recipe, kept_only=True)
            if trainer.is_global_zero:
                pending.unlink(missing_ok=True)
        elif trainer.is_global_zero:
            os.replace(pending, self._anchor_path())
        trainer.strategy.barrier("lightning_soup.blend.anchor")
        self._anchor_saved = True

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail at the first validation (the sanity check when enabled), not after training, on a metric name typo.
        if self._metrics_checked or not self._evaluates or not _base.is_fitting(trainer):
            return
        from lightning_soup.callbacks._evaluate import resolve_monitor

        logged = dict.fromkeys(trainer.callback_metrics, 0.0)  # names only: no device sync
        if not logged and trainer.sanity_checking:
            # With several validation dataloaders Lightning exposes no metrics during the sanity check:
            # check at the first real validation instead.
            return
        self._metrics_checked = True
        for name in self._metric_names():
            resolve_monitor(logged, name)

    @override
    @_base.restores_raw_weights
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_soup.merge._inplace import assign_lerp_, float32_copy, layer_weights
        from lightning_soup.merge.lora import combine_into_, lora_pairs

        dirpath = self._output_dir()
        _base.save_final_weights(trainer, pl_module, dirpath)
        # What training changes, each storage once: tied weights move once, a frozen base not at all.
        keys, live = _tensors.floating_items(_tensors.kept_tensors(pl_module))
        keys, live = self._in_anchor(trainer, keys, live)
        # Rank zero reads the file and sends each rank its part; the anchor keeps its own dtypes.
        anchor_state = _dist.read_local_shards(trainer, pl_module, self._anchor_path(), keys)
        anchor = [anchor_state.pop(k) for k in keys]
        weights = {r: layer_weights(keys, r, self.layer_ratios) for r in self.ratios}
        # LoRA pairs blend on ΔW = B·A (merge.lora), after the plain lerp of everything else.
        pairs = lora_pairs(keys)
        lora_errors: dict[float, float] = {}

        def blend_(r: float, theta: list[Tensor]) -> None:
            assign_lerp_(live, anchor, theta, weights[r])
            if pairs:
                ratio_of = dict(zip(keys, weights[r]))
                report = combine_into_(
                    dict(zip(keys, live)),
                    [dict(zip(keys, anchor)), dict(zip(keys, theta))],
                    {p.a_key: [1.0 - ratio_of[p.a_key], ratio_of[p.a_key]] for p in pairs},
                )
                lora_errors[r] = report.relative_error

        with torch.no_grad():
            # transient float32 copy of θ: the candidates are written into the live tensors
            theta = float32_copy(live) if self._evaluates or pairs else live
            if self._evaluates:
                from lightning_soup.callbacks._evaluate import evaluate

                rows = []
                for r in self.ratios:
                    blend_(r, theta)
                    rows.append(evaluate(trainer, pl_module))
                # Every rank evaluated; rank zero's choice (and its numbers, for the files) is the one kept.
                rows, (index, met) = trainer.strategy.broadcast((rows, self._choose(rows)))
                blend_(self.ratios[index], theta)
            else:
                rows, index, met = [], 0, None
                blend_(self.ratios[0], theta)
            del theta
        del anchor
        if self._held_anchor is not None and trainer.is_global_zero:
            self._held_anchor.unlink(missing_ok=True)
        self._held_anchor = None
        _dist.broadcast_module_(trainer, pl_module, kept_only=True)

        self.result = self._summary(rows, index, met)
        if pairs:
            for c in self.result["candidates"]:
                c["lora_relative_error"] = lora_errors.get(c["ratio"])
            self.result["lora_relative_error"] = lora_errors[self.ratios[index]]
        self._warn_on_tie(trainer)
        if met is False:
            _dist.warn_on_rank_zero(
                trainer,
                f"{_NAME}: no ratio in {self.ratios} satisfies `constraint` {self._constraint_text()}; falling back "
                f"to ratio {self.ratios[index]:g}, the closest to satisfying it (smallest total normalised "
                f"violation {self.result['candidates'][index]['violation']:.4g}). See {dirpath / REPORT_FILE}.",
            )
        recipe = {
            "method": "task_arithmetic_blend",
            "anchor": self._anchor_description(),
            "ratio": self.result["ratio"],
            "layer_ratios": self.layer_ratios,
            "monitor": self.monitor,
            "mode": self.mode,
            "constraint": [str(b) for b in self.constraint],
            "scores": [{"ratio": c["ratio"], "score": c["score"], "meets_constraint": c["meets_constraint"]}
                       for c in self.result["candidates"]],
        }
        if pairs:
            # LoRA pairs are the best rank-r pairs for the blended ΔW; 0.0 when exact (e.g. toward a fresh adapter)
            recipe["lora_relative_error"] = self.result["lora_relative_error"]
        _tensors.write_module_weights(trainer, pl_module, dirpath / BLENDED_FILE, storage.json_safe(recipe))
        if trainer.is_global_zero:
            storage.write_json(storage.json_safe(self.result), dirpath / REPORT_FILE)
            if rows:
                self._write_plot(trainer, dirpath / PLOT_FILE)
        self._log_metrics(trainer)
        _dist.print_on_rank_zero(
            trainer,
            _report.blend_table(
                self.result["candidates"],
                chosen=index,
                monitor=self.monitor,
                constraint=[str(b) for b in self.constraint],
                anchor=self._anchor_description(),
            ),
        )
        trainer.strategy.barrier("lightning_soup.blend.end")

    # ------------------------------------------------------------------------------------------------- helpers

    def _in_anchor(self, trainer: Any, keys: list[str], live: list[Tensor]) -> tuple[list[str], list[Tensor]]:
        """The entries the anchor has. A parameter frozen when the ``"initial"`` anchor was written (e.g. a backbone
        that ``BackboneFinetuning`` unfreezes later) is not in it: it keeps its trained value, with a warning."""
        names = None
        if trainer.is_global_zero:
            with storage.open_state_dict(self._anchor_path()) as state:
                names = {_tensors.canonical_key(k) for k in state}
        names = trainer.strategy.broadcast(names)
        absent = [k for k in keys if k not in names]
        if not absent:
            return keys, live
        _dist.warn_on_rank_zero(
            trainer,
            f"{_NAME}: {len(absent)} trainable entries are not in the anchor {str(self._anchor_path())!r} (they were "
            f"frozen when it was written, e.g. a backbone unfrozen during fit), so they keep their trained values: "
            f"{absent[:5]}{' ...' if len(absent) > 5 else ''}. Pass a full weights file as `anchor` to blend them.",
        )
        kept = [(k, t) for k, t in zip(keys, live) if k in names]
        return [k for k, _ in kept], [t for _, t in kept]

    def _output_dir(self) -> Path:
        assert self._dirpath is not None, "setup() runs before every other hook of fit"
        return self._dirpath

    def _path(self, name: str) -> Path:
        return self._output_dir() / name

    def _anchor_path(self) -> Path:
        if self.anchor == "initial":
            return self._path(ANCHOR_FILE)
        return self._held_anchor if self._held_anchor is not None else Path(self.anchor).expanduser()

    def _hold_anchor(self, trainer: Any) -> None:
        """Keep the anchor as it is now when this fit may replace or delete it before the blend reads it.

        That is an anchor among this fit's soup outputs (``<dirpath>/final.safetensors`` of an earlier fit) or in a
        ``ModelCheckpoint`` folder (``last.ckpt``, a top-k file). It is hard-linked (copied where links do not
        work) to ``dirpath/anchor.held.<suffix>`` and the blend reads that: every writer replaces files by rename,
        so the link keeps the earlier weights, and the blend never anchors on this fit's own.
        """
        import shutil

        held = None
        source = Path(self.anchor).expanduser()
        if trainer.is_global_zero and source.is_file():  # rank zero alone reads the anchor (no shared filesystem)
            real = os.path.realpath(source)
            outputs = {
                os.path.realpath(c.dirpath_for(trainer) / name)
                for c in trainer.callbacks
                if isinstance(c, _base.SoupCallback)
                for name in (*c._outputs, "final.safetensors")
            }
            folders = {os.path.realpath(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
            if real in outputs or os.path.dirname(real) in folders:
                held = self._path(_HELD_ANCHOR_STEM + source.suffix)
                with storage.atomic_write(held) as tmp:
                    try:
                        os.link(real, tmp)
                    except OSError:
                        shutil.copyfile(real, tmp)
        self._held_anchor = trainer.strategy.broadcast(held)

    def _anchor_description(self) -> str:
        return f"initial ({self._anchor_path()})" if self.anchor == "initial" else self.anchor

    def _constraint_text(self) -> str:
        return ", ".join(str(b) for b in self.constraint)

    def _metric_names(self) -> list[str]:
        names = [] if self.monitor is None else [self.monitor]
        return list(dict.fromkeys(names + [b.metric for b in self.constraint]))

    def _raise_anchor_problem(self, trainer: Any, pl_module: Any, path: Path, *, check_values: bool) -> None:
        """Check the anchor on rank zero and raise the same SoupError on every rank."""
        problem = None
        if trainer.is_global_zero:
            if self.anchor == "initial" and not path.exists():
                problem = (
                    f"{_NAME}(anchor='initial'): the initial weights {str(path)!r}, saved when this fit first "
                    "started and recorded in the checkpoint being resumed, are missing. Restore that file (or resume "
                    "with the `dirpath` it was written to) so the blend targets the true initial weights."
                )
            else:
                module_keys = set(_tensors.canonical(pl_module.state_dict()))
                problem = _anchor_problem(path, _floating_meta(pl_module), module_keys, check_values=check_values)
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise SoupError(problem)

    def _check_layer_patterns(self, trainer: Any, pl_module: Any) -> None:
        import fnmatch

        keys = [k for k, v in _tensors.canonical(pl_module.state_dict()).items() if v.is_floating_point()]
        unused = [p for p in self.layer_ratios if not any(fnmatch.fnmatchcase(k, p) for k in keys)]
        if unused:
            _dist.warn_on_rank_zero(
                trainer,
                f"{_NAME}: `layer_ratios` patterns {unused} match no floating-point key of the module, so they have "
                f"no effect. Keys look like {keys[:3]}.",
            )

    def _choose(self, rows: Sequence[Mapping[str, float]]) -> tuple[int, bool | None]:
        """The chosen candidate's index, and whether it meets the constraint (None without a constraint)."""
        from lightning_soup.callbacks._evaluate import resolve_monitor

        scores = None if self.monitor is None else [resolve_monitor(row, self.monitor) for row in rows]
        values = [{b.metric: resolve_monitor(row, b.metric) for b in self.constraint} for row in rows]
        # Ties go to the larger ratio, the one closer to the trained weights (a short or nearly untrained fit
        # scores every ratio the same, and the blend must not silently undo training).
        return choose(scores, values, self.mode, self.constraint, prefer=self.ratios)

    def _warn_on_tie(self, trainer: Any) -> None:
        assert self.result is not None
        candidates, index = self.result["candidates"], self.result["index"]
        chosen = candidates[index]
        if self.monitor is None or chosen["score"] is None:
            return
        same = ("score", "meets_constraint", "violation")
        tied = [c["ratio"] for i, c in enumerate(candidates) if i != index and all(c[k] == chosen[k] for k in same)]
        if tied:
            _dist.warn_on_rank_zero(
                trainer,
                f"{_NAME}: ratios {sorted([*tied, chosen['ratio']])} score the same {self.monitor} "
                f"({chosen['score']:.6g}), so the largest, {chosen['ratio']:g} (closest to the trained weights), is "
                "chosen. Validation cannot tell them apart: train longer or validate on more data.",
            )

    def _summary(self, rows: Sequence[Mapping[str, float]], index: int, met: bool | None) -> dict[str, Any]:
        from lightning_soup.callbacks._evaluate import resolve_monitor

        candidates = []
        for i, r in enumerate(self.ratios):
            row = rows[i] if rows else None
            entry: dict[str, Any] = {"ratio": r, "metrics": dict(row) if row is not None else {}, "score": None,
                                     "meets_constraint": None, "violation": None}
            if row is not None:
                if self.monitor is not None:
                    entry["score"] = resolve_monitor(row, self.monitor)
                if self.constraint:
                    values = {b.metric: resolve_monitor(row, b.metric) for b in self.constraint}
                    entry["constrained"] = values
                    entry["meets_constraint"] = satisfies(self.constraint, values)
                    entry["violation"] = total_violation(self.constraint, values)
            candidates.append(entry)
        return {
            "anchor": self._anchor_description(),
            "monitor": self.monitor,
            "mode": self.mode,
            "constraint": [str(b) for b in self.constraint],
            "layer_ratios": dict(self.layer_ratios),
            "ratio": self.ratios[index],
            "index": index,
            "constraint_met": met,
            "fallback": met is False,
            "candidates": candidates,
        }

    def _write_plot(self, trainer: Any, path: Path) -> None:
        assert self.result is not None
        try:
            figure = _report.blend_figure(
                self.result["candidates"],
                chosen=self.result["index"],
                metrics=self._metric_names(),
                bounds=[(b.metric, b.op, b.threshold) for b in self.constraint],
            )
        except ImportError:
            _dist.warn_on_rank_zero(
                trainer,
                f"{_NAME}: matplotlib is not installed, so {path.name} was not written (the table is in "
                f"{REPORT_FILE}). For the plot: pip install lightning-soup[plot]",
            )
            return
        with storage.atomic_write(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120)

    def _log_metrics(self, trainer: Any) -> None:
        assert self.result is not None
        chosen = self.result["candidates"][self.result["index"]]
        metrics = {"blend/ratio": float(self.result["ratio"])}
        for name in self._metric_names():
            value = chosen.get("constrained", {}).get(name, chosen["score"] if name == self.monitor else None)
            if value is not None:
                metrics[f"blend/{name}"] = float(value)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _ratio_list(ratio: Any, problems: list[str]) -> list[float]:
    values = ratio if isinstance(ratio, (list, tuple)) else [ratio]
    good = [
        isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in values
    ]
    if not values or not all(good):
        problems.append(f"`ratio` must be a finite number or a non-empty list of finite numbers, got {ratio!r}")
        return []
    ratios = [float(r) for r in values]
    if len(set(ratios)) != len(ratios):
        problems.append(f"`ratio` lists a value more than once: {ratios}")
    return ratios


def _layer_ratio_map(layer_ratios: Any, problems: list[str]) -> dict[str, float]:
    if layer_ratios is None:
        return {}
    if not isinstance(layer_ratios, Mapping):
        problems.append(f"`layer_ratios` must map fnmatch patterns to ratios, got {layer_ratios!r}")
        return {}
    bad = {
        p: r
        for p, r in layer_ratios.items()
        if not isinstance(p, str) or not p
        or isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
    }
    if bad:
        problems.append(f"`layer_ratios` must map non-empty fnmatch patterns to finite numbers; bad entries: {bad!r}")
        return {}
    return {p: float(r) for p, r in layer_ratios.items()}


def _floating_meta(pl_module: Any) -> dict[str, Tensor]:
    """The floating entries the blend moves (what training changes, each storage once) as meta tensors with their
    full (unsharded) shapes and canonical keys."""
    keep = _tensors.kept_keys(pl_module)
    state = _tensors.canonical(pl_module.state_dict())
    kept = _tensors.unique_tensors({k: v for k, v in state.items() if k in keep})
    return {
        k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in kept.items() if v.is_floating_point()
    }


def _anchor_problem(
    path: Path, module_meta: Mapping[str, Tensor], module_keys: set[str], *, check_values: bool
) -> str | None:
    """Why the weights at ``path`` cannot be the module's anchor, or None. Reads one tensor at a time.

    The anchor must hold every entry of ``module_meta`` with its shape; other entries (a full model's frozen
    weights, tied duplicates) are not used. Keys with or without ``_orig_mod.`` are accepted.
    """
    from lightning_soup.merge._checks import check_compatible
    from lightning_soup.merge._inplace import all_finite

    where = f"{_NAME}(anchor={str(path)!r})"
    try:
        with storage.open_state_dict(path) as state:
            names = {_tensors.canonical_key(k): k for k in state}
            meta = state.meta()
            # what the blend moves, plus floating entries the module does not have (reported as unexpected);
            # the module's other entries (frozen weights, tied duplicates) may be there and are not used
            anchor_meta = {
                k: meta[n]
                for k, n in names.items()
                if k in module_meta or (k not in module_keys and meta[n].is_floating_point())
            }
            check_compatible([module_meta, anchor_meta], names=["the module", "the anchor"])
            if check_values:
                bad = [k for k in module_meta if not all_finite([state[names[k]]])]  # one tensor at a time
                if bad:
                    return f"{where}: the anchor has NaN or infinite values in {bad}. Use a healthy checkpoint."
    except SoupError as e:
        return f"{where}: {e}"
    return None
