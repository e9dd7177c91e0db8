"""Greedy model soups over the checkpoints of one training run.

Wortsman et al., *Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time* (ICML 2022): sort the ingredients by held-out score, start from the best, and add each next one to
the running uniform average only if held-out validation does not get worse.

How it works. After every ``every_n_epochs``-th epoch's validation (never the sanity check) the module's weights
become an ingredient, scored by ``trainer.callback_metrics[monitor]`` and written as
``dirpath/ingredients/epoch=E-step=S.safetensors`` (atomically, by global rank zero). A non-finite score or
non-finite weights skip the ingredient with a warning; with ``max_ingredients`` only the best-scored ones are kept on
disk. At the end of fit (``on_train_end``, while the trainer's devices are still set up) the soup is
:func:`lightning_soup.merge.greedy_soup` over the ingredients, each read from disk exactly once, in score order;
the known scores are passed in, so no single ingredient is validated again, and every candidate is scored by the
user's own validation loop (:func:`~._evaluate.evaluate`), so a candidate's score is what ``trainer.validate``
would report for it. Reading overlaps validating: when the soup reads an ingredient, a background thread starts
reading the next one (in score order), so its read runs while the current candidate is validated (one more
ingredient in memory). The running sum and the candidates are built on the module's CUDA device when it has room
for them (five copies of the weights; else in host memory, as on a CPU device), so copying a candidate into the
module is a device-to-device copy; under DDP, where ingredients arrive by broadcast, nothing is prefetched.

With ``online=True`` the soup is built during training instead: each new ingredient is tried against the current
soup right after its own validation (one extra validation pass per epoch, the raw training weights restored
bit for bit afterwards), and only the soup's float32 running sum is kept on disk. Ingredients arrive in training
order, not score order, so the online soup is an approximation of the offline one: a new ingredient joins the soup
when the candidate is at least as good as both the soup and the ingredient alone; an ingredient better on its own
than both restarts the soup from itself.

Outputs: ``dirpath/soup.safetensors`` (the soup, with the recipe in its metadata), ``dirpath/soup.json`` (every
ingredient: epoch, step, file, its own score, whether it was accepted and the soup score after it),
``dirpath/final.safetensors`` (the raw trained weights); the soup is loaded into the module, its score is logged to
the trainer's loggers and set in ``trainer.callback_metrics`` as ``greedy_soup/<monitor>``, and a table of the
recipe is printed on rank zero.

Resuming. The checkpoint state is plain types (ingredient files, scores, epochs, steps), so ``fit(ckpt_path=...)``
continues with the ingredients already on disk and ends with the same soup as an uninterrupted run. Files an
ingredient drops out of (``max_ingredients``, online sums) are deleted only once neither of the two latest
checkpoints nor any checkpoint a ``ModelCheckpoint`` keeps names them; a checkpoint whose files are missing fails at
resume with the list of them, and state with malformed values or file names outside ``dirpath`` fails when loaded.

Distributed training. Every rank takes part in every candidate validation; scores are global rank zero's
(broadcast), so every rank makes the same decisions. No shared filesystem is assumed. Under replicated strategies
(DDP) only rank zero writes and reads ingredient files (``dirpath/ingredients/``), and sends each ingredient to the
other ranks one tensor at a time (``torch.distributed.broadcast``) as the soup reads it, so all ranks compute the
same candidates. Under sharded strategies (``ModelParallelStrategy`` with FSDP2) every rank keeps its own shards
(``dirpath/ingredients/rank{R}/``, likewise the online sums): taking an ingredient and building the soup need no
communication, since averaging is elementwise; the soup file is gathered one tensor at a time at the end, and the
buffers FSDP2 does not synchronise are rank zero's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lightning_soup import storage
from lightning_soup.callbacks import _base, _dist, _evaluate, _tensors
from lightning_soup.errors import SoupError
from lightning_soup.merge import _inplace
from lightning_soup.merge.lora import combine_into_, lora_keys

if TYPE_CHECKING:
    import pytorch_lightning as pl

Mode = Literal["min", "max"]
_MODES = ("min", "max")
_INGREDIENT_DIR = "ingredients"
_ONLINE_DIR = "online"
_SOUP_FILE = "soup.safetensors"
_RECIPE_FILE = "soup.json"
_STATE_VERSION = 1
#: Online soup files keep each member's LoRA factors as ``lora_member.<j>.<key>`` (ΔW is not a sum of factors).
_MEMBER = "lora_member."
_STATUSES = ("kept", "pruned", "skipped", "accepted", "rejected", "restarted")


class _GreedySoup(_base.SoupCallback):
    """Build Wortsman's greedy soup from this run's validated checkpoints and load it into the module at the end.

    After every ``every_n_epochs``-th epoch's validation run the module's weights become an ingredient scored by
    ``trainer.callback_metrics[monitor]``. At the end of fit the ingredients are added best-first to a uniform
    average whenever the user's own validation (``validation_step`` over the trainer's validation dataloaders,
    scored exactly as ``trainer.validate`` reports it) does not get worse. Writes ``dirpath/soup.safetensors``,
    ``dirpath/soup.json`` and ``dirpath/final.safetensors`` (the raw trained weights), and leaves the soup in the
    module.

    Args:
        monitor: the validation metric that scores ingredients and candidates, as logged (``"val/acc"``).
        mode: ``"max"`` when higher ``monitor`` is better, ``"min"`` when lower is.
        every_n_epochs: take an ingredient at the validation of every n-th epoch.
        max_ingredients: keep only the best n ingredients on disk (None: all of them).
        dirpath: output folder; default ``<trainer.default_root_dir>/soup``.
        online: build the soup during training (one extra validation per ingredient) and keep only the soup on
            disk, instead of keeping every ingredient and building the soup at the end.
        verbose: print the recipe table at the end of fit (global rank zero).

    Raises:
        SoupError: an argument is invalid (all problems are reported at once); at the first validation, when
            ``monitor`` is not logged; before training, when validation is disabled.

    Example:
        >>> from lightning_soup.callbacks.greedy_soup import _GreedySoup
        >>> _GreedySoup(monitor="val/acc", max_ingredients=5).state_key
        "GreedySoup{'monitor': 'val/acc', 'mode': 'max', 'dirpath': None}"
    """

    _produces_weights = True
    _outputs = (_SOUP_FILE, _RECIPE_FILE, _INGREDIENT_DIR, _ONLINE_DIR)

    def __init__(
        self,
        monitor: str,
        mode: Mode = "max",
        every_n_epochs: int = 1,
        max_ingredients: int | None = None,
        dirpath: str | None = None,
        online: bool = False,
        verbose: bool = True,
    ) -> None:
        problems = []
        if not isinstance(monitor, str) or not monitor:
            problems.append(f"`monitor` must be the name of a logged metric such as 'val/acc', got {monitor!r}")
        if mode not in _MODES:
            problems.append(f"`mode` can be 'min' or 'max', got {mode!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            problems.append(f"`every_n_epochs` must be an int >= 1, got {every_n_epochs!r}")
        if max_ingredients is not None and (
            isinstance(max_ingredients, bool) or not isinstance(max_ingredients, int) or max_ingredients < 1
        ):
            problems.append(f"`max_ingredients` must be an int >= 1 or None, got {max_ingredients!r}")
        if dirpath is not None and (not isinstance(dirpath, (str, Path)) or not str(dirpath)):
            problems.append(f"`dirpath` must be a path string or None, got {dirpath!r}")
        for flag, value in (("online", online), ("verbose", verbose)):
            if not isinstance(value, bool):
                problems.append(f"`{flag}` must be True or False, got {value!r}")
        if online is True and max_ingredients is not None:
            problems.append("`max_ingredients` has no effect with `online=True` (only the soup is kept); leave it None")
        if problems:
            raise SoupError("Invalid GreedySoup arguments: " + "; ".join(problems) + ".")

        self.monitor = monitor
        self.mode = mode
        self.every_n_epochs = every_n_epochs
        self.max_ingredients = max_ingredients
        self._dirpath_arg = None if dirpath is None else str(dirpath)
        self.online = online
        self.verbose = verbose
        self._reset()

    # ------------------------------------------------------------------------------------------------------ state
    def _reset(self) -> None:
        # Replicated on every rank (plain types). One entry per ingredient seen, in training order:
        # {"epoch", "step", "score", "file" (relative to dirpath, or None), "status", "reason"}; status is
        # "kept" (on disk, offline), "pruned" (dropped by max_ingredients), "skipped" (non-finite), or, online,
        # "accepted"/"rejected"/"restarted".
        self._entries: list[dict[str, Any]] = []
        # Online: the current soup {"file", "count", "score", "first"} (first: the entry whose integer buffers it uses).
        self._online: dict[str, Any] | None = None
        self._retained: list[str] = []  # dropped files a recent checkpoint may still name
        self._checkpointed: list[list[str]] = []  # the files named at the two latest checkpoints
        self._dir: Path | None = None
        self.soup_path: Path | None = None
        self.soup_score: float | None = None
        self.recipe: dict[str, Any] | None = None
        self._lora_error: float | None = None  # LoRA pairs: the soup's rank-r relative error on ΔW

    @property
    def state_key(self) -> str:
        # The class name, not the flavour's qualname, so checkpoints resume across pytorch_lightning/lightning.
        args = {"monitor": self.monitor, "mode": self.mode, "dirpath": self._dirpath_arg}
        return f"GreedySoup{args!r}"

    @override
    def state_dict(self) -> dict[str, Any]:
        # A checkpoint now names these files: keep them on disk until two newer checkpoints exist.
        self._checkpointed = [*self._checkpointed[-1:], self._live_files()]
        return {
            "version": _STATE_VERSION,
            "entries": [dict(e) for e in self._entries],
            "online": None if self._online is None else dict(self._online),
            "retained": list(self._retained),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoint state is untrusted: every value is checked here, once, before any file it names is touched.
        self._entries, self._online, self._retained = self._parse_state(state_dict)
        self._checkpointed = [self._live_files()]

    def _parse_state(self, state: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[str]]:
        """``(entries, online, retained)`` from checkpoint state, checked: types, statuses, and every file name a
        plain name in ``dirpath/ingredients`` or ``dirpath/online``.

        Raises:
            SoupError: the state is malformed or names a file outside those folders.
        """
        value, folders = _base.state_value, (_INGREDIENT_DIR, _ONLINE_DIR)
        number = (int, float)
        entries = []
        for e in value(self, state, "entries", list, []):
            if not isinstance(e, dict):
                raise _base.corrupt_state(self, f"an ingredient entry is a {type(e).__name__}, not a dict")
            entry = dict(e)
            for key, types in (("epoch", int), ("step", int), ("score", number), ("status", str)):
                value(self, entry, key, types)
            if entry["status"] not in _STATUSES:
                raise _base.corrupt_state(self, f"unknown ingredient status {entry['status']!r}")
            file = value(self, entry, "file", (str, type(None)), None)
            if entry["status"] == "kept" or file is not None:
                entry["file"] = _base.state_file_name(self, file, folders)
            value(self, entry, "reason", (str, type(None)), None)
            for key in ("candidate_score", "soup_score"):
                value(self, entry, key, (*number, type(None)), None)
            entries.append(entry)
        kept = [e["file"] for e in entries if e["status"] == "kept"]
        if len(set(kept)) != len(kept):  # one ingredient in the soup twice would skew it
            raise _base.corrupt_state(self, f"an ingredient file is listed more than once: {kept}")
        online = value(self, state, "online", (dict, type(None)), None)
        if online is not None:
            online = dict(online)
            online["file"] = _base.state_file_name(self, value(self, online, "file", str), folders)
            for key, types in (("count", int), ("score", number), ("first", int)):
                value(self, online, key, types)
            if online["count"] < 1:
                raise _base.corrupt_state(self, f"the online soup's count is {online['count']}")
        retained = [_base.state_file_name(self, f, folders) for f in value(self, state, "retained", list, [])]
        return entries, online, retained

    def _files_in_state(self, state: Any) -> list[str]:
        """The files a checkpoint with this callback state needs for resuming."""
        entries, online, _ = self._parse_state(state)
        return [e["file"] for e in entries if e["status"] == "kept"] + ([online["file"]] if online else [])

    def _live_files(self) -> list[str]:
        files = [e["file"] for e in self._entries if e["status"] == "kept"]
        if self._online is not None:
            files.append(self._online["file"])
        return files

    # ------------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or _base.skip_fast_dev_run(trainer, self):
            return
        self._reset()  # a new fit starts a new soup; a resumed fit loads its state right after setup
        _dist.check_strategy(trainer, self)
        if trainer.limit_val_batches == 0:
            raise SoupError(
                "GreedySoup scores its ingredients and candidates with your validation loop, but validation is "
                "disabled (`Trainer(limit_val_batches=0)`). Set `limit_val_batches` > 0 and provide validation data."
            )
        self._dir = self.prepare_dirpath(trainer)  # refuses another soup callback writing the same files there

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not getattr(trainer, "enable_validation", True):
            raise SoupError(
                "GreedySoup needs a validation loop to score ingredients, but this fit has none: define "
                "`validation_step` and a validation dataloader (or datamodule), and keep `limit_val_batches` > 0."
            )
        # After a resume: the files the checkpoint names must still be there.
        self._check_files(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _base.is_fitting(trainer) or trainer.sanity_checking:
            return
        epoch, step = int(trainer.current_epoch), int(trainer.global_step)
        if (epoch + 1) % self.every_n_epochs:
            return
        if any(e["epoch"] == epoch and e["step"] == step for e in self._entries):
            return  # this validation's ingredient was taken before a resume
        score = _evaluate.resolve_monitor(trainer.callback_metrics, self.monitor)
        score = float(trainer.strategy.broadcast(score, src=0))
        entry: dict[str, Any] = {"epoch": epoch, "step": step, "score": score, "file": None, "status": "skipped"}
        entry["reason"] = None
        self._entries.append(entry)
        if not math.isfinite(score):
            entry["reason"] = f"non-finite {self.monitor} ({score})"
            _dist.warn_on_rank_zero(
                trainer, f"GreedySoup skips the weights of epoch {epoch} (step {step}): {self.monitor} is {score}."
            )
            return
        if not self._weights_finite(trainer, pl_module):
            entry["reason"] = "non-finite weights"
            _dist.warn_on_rank_zero(
                trainer, f"GreedySoup skips the weights of epoch {epoch} (step {step}): they contain NaN or inf."
            )
            return
        if self.online:
            self._online_add(trainer, pl_module, entry)
        else:
            self._keep(trainer, pl_module, entry)
        self._delete_unneeded(trainer)

    @override
    @_base.restores_raw_weights
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _base.is_fitting(trainer):
            return
        dirpath = self._dir if self._dir is not None else self.dirpath_for(trainer)
        _base.save_final_weights(trainer, pl_module, dirpath)
        if self.online:
            tried = self._online_finish(trainer, pl_module)
        else:
            tried = self._offline_finish(trainer, pl_module)
        if tried is None:
            reasons = "; ".join(f"epoch {e['epoch']}: {e['reason']}" for e in self._entries) or "no validation ran"
            _dist.warn_on_rank_zero(
                trainer,
                f"GreedySoup has no ingredient to make a soup from ({reasons}), so the module keeps its trained "
                "weights and no soup is written.",
            )
            self.recipe = self._recipe([], None)
            if trainer.is_global_zero:
                storage.write_json(self.recipe, dirpath / _RECIPE_FILE)
            trainer.strategy.barrier("lightning_soup.greedy_soup.recipe")
            return
        self.recipe = self._recipe(tried, self.soup_score)
        self.soup_path = _tensors.write_module_weights(trainer, pl_module, dirpath / _SOUP_FILE, self.recipe)
        if trainer.is_global_zero:
            storage.write_json(self.recipe, dirpath / _RECIPE_FILE)
        self._delete_unneeded(trainer)
        trainer.strategy.barrier("lightning_soup.greedy_soup.done")
        self._log_score(trainer)
        if self.verbose:
            from lightning_soup.callbacks._report import greedy_soup_table

            _dist.print_on_rank_zero(trainer, greedy_soup_table(self.recipe))

    # ------------------------------------------------------------------------------------------------ ingredients
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def _weights_finite(self, trainer: Any, pl_module: Any) -> bool:
        finite = _inplace.all_finite(list(_tensors.kept_tensors(pl_module).values()))
        # Every rank must agree (shards differ; replicas' buffers may too): one non-finite part skips it everywhere.
        return bool(trainer.strategy.reduce_boolean_decision(finite, all=True))

    def _keep(self, trainer: Any, pl_module: Any, entry: dict[str, Any]) -> None:
        """Write the module's weights as a new ingredient, dropping the worst one beyond ``max_ingredients``."""
        kept = [e for e in self._entries if e["status"] == "kept"]
        if self.max_ingredients is not None and len(kept) >= self.max_ingredients:
            # Ties keep the older ingredient: a newcomer must be strictly better than the worst kept one.
            worst = kept[0]
            for e in kept[1:]:
                if self._better(worst["score"], e["score"]):
                    worst = e
            if not self._better(entry["score"], worst["score"]):
                entry.update(status="pruned", reason=f"not among the best {self.max_ingredients}")
                return
            self._retained.append(worst["file"])  # deleted once no recent checkpoint names it
            worst.update(status="pruned", file=None, reason=f"not among the best {self.max_ingredients}")
        name = f"{_INGREDIENT_DIR}/epoch={entry['epoch']}-step={entry['step']}.safetensors"
        recipe = {"method": "greedy_soup_ingredient", "monitor": self.monitor, "score": entry["score"]}
        recipe.update(epoch=entry["epoch"], step=entry["step"])
        if _dist.owns_state(trainer, pl_module):
            # This rank's tensors (its own shards when sharded): nothing is gathered during training. Only what
            # training changes: a LoRA run's ingredient is its adapter, not the frozen base.
            live = {k: v.detach() for k, v in _tensors.kept_tensors(pl_module).items()}
            storage.save_state_dict(live, self._state_path(trainer, pl_module, name), recipe=recipe)
        trainer.strategy.barrier("lightning_soup.greedy_soup.ingredient")
        entry.update(status="kept", file=name)

    def _delete_unneeded(self, trainer: Any) -> None:
        """Delete files no entry uses any more, unless one of the two latest checkpoints or a checkpoint that a
        ``ModelCheckpoint`` keeps names them (for resuming)."""
        needed = set(self._live_files()).union(*self._checkpointed)
        if any(f not in needed for f in self._retained):  # a kept Lightning checkpoint may still name them
            needed |= _base.files_named_by_kept_checkpoints(trainer, self, self._files_in_state)
        drop = [f for f in self._retained if f not in needed]
        self._retained = [f for f in self._retained if f in needed]
        for name in drop:
            for path in self._owned_paths(trainer, name):
                path.unlink(missing_ok=True)

    def _check_files(self, trainer: Any, pl_module: Any) -> None:
        """Raise on every rank if a file the state names is missing or does not fit the module.

        Each rank checks the files it owns (rank zero's under DDP, its own shards' when sharded); the ranks then
        agree, so all of them raise together instead of some waiting in a collective.
        """
        names = [e["file"] for e in self._entries if e["status"] == "kept"]
        if self._online is not None:
            names.append(self._online["file"])
        problem = None
        if _dist.owns_state(trainer, pl_module):
            paths = [self._state_path(trainer, pl_module, n) for n in names]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                problem = (
                    f"Cannot resume GreedySoup: the checkpoint names files that are missing: {missing}. Restore "
                    "them, pass the `dirpath` the run used, or start a new soup by removing this callback's state "
                    "from the checkpoint."
                )
            else:
                kept, every = _tensors.kept_tensors(pl_module), _tensors.module_tensors(pl_module)
                # An online soup file holds float32 (float64) running sums: for bf16 weights its dtypes differ.
                sums = {k: v.to("meta", torch.promote_types(v.dtype, torch.float32)) if v.is_floating_point() else v
                        for k, v in kept.items()}
                for path, name in zip(paths, names):
                    if problem is None:
                        problem = _mismatch([path], sums if name.startswith(f"{_ONLINE_DIR}/") else kept, every)
        if _dist.world_size(trainer) > 1:
            ok = trainer.strategy.reduce_boolean_decision(problem is None, all=True)
            if not ok and problem is None:
                problem = "GreedySoup: another rank found missing or mismatched files (see its error message)."
        if problem is not None:
            raise SoupError(problem)

    # ---------------------------------------------------------------------------------------------- offline soup
    def _offline_finish(self, trainer: Any, pl_module: Any) -> list[dict[str, Any]] | None:
        from lightning_soup import merge

        kept = [e for e in self._entries if e["status"] == "kept"]
        if not kept:
            return None
        self._check_files(trainer, pl_module)
        owner = _dist.owns_state(trainer, pl_module)
        paths = [self._state_path(trainer, pl_module, e["file"]) if owner else None for e in kept]
        sources = [_Ingredient(path, trainer, pl_module) for path in paths]
        # greedy_soup reads the ingredients best first (a stable sort of the finite scores). A background thread
        # reads them ahead: the first two at once, then each next one while a candidate validates (not while the
        # soup adds the previous one, which would compete for the same memory bandwidth and cores).
        scores = [e["score"] for e in kept]
        order = sorted((i for i in range(len(kept)) if math.isfinite(scores[i])),
                       key=lambda i: -scores[i] if self.mode == "max" else scores[i])
        device = _candidate_device(pl_module, len(kept))
        for source in sources:
            source.device = device
        ahead = [sources[i] for i in order]
        for source in ahead[:2]:
            source.prefetch()
        upcoming = iter(ahead[2:])

        def score(candidate: Mapping[str, Tensor]) -> float:
            _tensors.load_into_module_(pl_module, candidate, partial=True)  # only what is not built in place
            following = next(upcoming, None)
            if following is not None:
                following.prefetch()
            local = _evaluate.resolve_monitor(_evaluate.evaluate(trainer, pl_module), self.monitor)
            return float(trainer.strategy.broadcast(local, src=0))

        try:
            # Candidates are built in the module's own tensors: nothing to allocate or copy per candidate.
            into = {k: v for k, v in _tensors.kept_tensors(pl_module).items() if v.is_floating_point()}
            soup, recipe = merge.greedy_soup(sources, score, mode=self.mode, scores=scores, into=into)
        finally:
            for source in sources:
                source.close()
        _tensors.load_into_module_(pl_module, soup, partial=True)
        del soup
        # Every rank computed the same soup; rank zero's copy settles any last-bit difference between hosts, and
        # under FSDP2 gives every rank rank zero's buffers (FSDP2 does not synchronise them).
        _dist.broadcast_module_(trainer, pl_module, kept_only=True)
        tried = []
        for step in recipe:
            entry = kept[step["index"]]
            accepted = bool(step["accepted"])
            tried.append({**entry, "status": "accepted" if accepted else "rejected", "accepted": accepted,
                          "soup_score": step["soup_score"]})
            if "lora_relative_error" in step:  # LoRA pairs averaged on ΔW: the soup's rank-r error after this turn
                self._lora_error = step["lora_relative_error"]
        accepted_scores = [t["soup_score"] for t in tried if t["accepted"]]
        self.soup_score = accepted_scores[-1] if accepted_scores else None
        return tried

    # ----------------------------------------------------------------------------------------------- online soup
    def _online_add(self, trainer: Any, pl_module: Any, entry: dict[str, Any]) -> None:
        """Try the module's weights (a new ingredient) against the current soup; keep the better of the options."""
        score = entry["score"]
        soup = self._online
        if soup is None:
            self._online_restart(trainer, pl_module, entry, "accepted")
            return
        owner = _dist.owns_state(trainer, pl_module)
        live = _tensors.kept_tensors(pl_module)
        float_keys, floats = _tensors.floating_items(live)
        factor_keys = sorted(lora_keys(live))
        sums: list[Tensor] = []
        stored: dict[str, Tensor] = {}
        members: list[dict[str, Tensor]] = []
        with _evaluate.preserved_weights(pl_module):
            if owner:
                # candidate = (soup sum + new) / (count + 1), written straight into the module
                stored = self._read_state(trainer, pl_module, soup["file"], live)
                sums = [stored[k].to(t.device) for k, t in zip(float_keys, floats)]
                with torch.no_grad():
                    # LoRA pairs: the soup keeps its members' factors (tiny); the candidate's pairs are the best
                    # rank-r pairs for the mean ΔW of the members and the new ingredient
                    members = [*_members(stored, soup["count"], factor_keys),
                               {k: live[k].detach().to("cpu", copy=True) for k in factor_keys}]
                    _inplace.accumulate_(sums, floats)
                    _inplace.assign_mean_(floats, sums, soup["count"] + 1)
                    ints = [k for k in live if k not in set(float_keys)]
                    _inplace.assign_([live[k] for k in ints], [stored[k] for k in ints])
                    if factor_keys:
                        n = len(members)
                        entry["lora_relative_error"] = combine_into_(live, members, [1.0 / n] * n).relative_error
            if not _dist.keeps_state_per_rank(trainer, pl_module):
                # DDP: rank zero alone holds the soup
                _dist.broadcast_module_(trainer, pl_module, kept_only=True)
            local = _evaluate.resolve_monitor(_evaluate.evaluate(trainer, pl_module), self.monitor)
            candidate = float(trainer.strategy.broadcast(local, src=0))
        # The raw training weights are back in the module.
        entry["candidate_score"] = candidate
        if math.isfinite(candidate) and not self._better(soup["score"], candidate) and not self._better(score, candidate):
            name = self._online_name(entry)
            if owner:
                state = {**{k: v for k, v in stored.items() if k not in set(float_keys)}, **dict(zip(float_keys, sums))}
                state.update(_member_entries(members))
                storage.save_state_dict(state, self._state_path(trainer, pl_module, name), recipe=self._sum_recipe())
            trainer.strategy.barrier("lightning_soup.greedy_soup.online")
            self._retained.append(soup["file"])
            self._online = {**soup, "file": name, "count": soup["count"] + 1, "score": candidate}
            entry.update(status="accepted", soup_score=candidate)
        elif self._better(score, soup["score"]):
            self._online_restart(trainer, pl_module, entry, "restarted")
        else:
            entry.update(status="rejected", soup_score=soup["score"])

    def _online_restart(self, trainer: Any, pl_module: Any, entry: dict[str, Any], status: str) -> None:
        """Make the module's current weights (alone) the soup."""
        name = self._online_name(entry)
        if _dist.owns_state(trainer, pl_module):
            live = _tensors.kept_tensors(pl_module)
            float_keys, floats = _tensors.floating_items(live)
            state = {k: v.detach() for k, v in live.items()}
            state.update(zip(float_keys, _inplace.float32_copy([t.detach() for t in floats])))
            state.update(_member_entries([{k: live[k].detach() for k in lora_keys(live)}]))
            storage.save_state_dict(state, self._state_path(trainer, pl_module, name), recipe=self._sum_recipe())
        trainer.strategy.barrier("lightning_soup.greedy_soup.online")
        if self._online is not None:
            self._retained.append(self._online["file"])
        self._online = {"file": name, "count": 1, "score": entry["score"], "first": len(self._entries) - 1}
        entry.update(status=status, soup_score=entry["score"])

    def _online_finish(self, trainer: Any, pl_module: Any) -> list[dict[str, Any]] | None:
        soup = self._online
        if soup is None:
            return None
        self._check_files(trainer, pl_module)
        if _dist.owns_state(trainer, pl_module):
            live = _tensors.kept_tensors(pl_module)
            float_keys, floats = _tensors.floating_items(live)
            stored = self._read_state(trainer, pl_module, soup["file"], live)
            with torch.no_grad():
                _inplace.assign_mean_(floats, [stored[k].to(t.device) for k, t in zip(float_keys, floats)], soup["count"])
                ints = [k for k in live if k not in set(float_keys)]
                _inplace.assign_([live[k] for k in ints], [stored[k] for k in ints])
                factor_keys = sorted(lora_keys(live))
                if factor_keys:
                    n = soup["count"]
                    members = _members(stored, n, factor_keys)
                    self._lora_error = combine_into_(live, members, [1.0 / n] * n).relative_error
            del stored
        _dist.broadcast_module_(trainer, pl_module, kept_only=True)
        self.soup_score = soup["score"]
        tried = [dict(e) for e in self._entries if e["status"] in ("accepted", "rejected", "restarted")]
        start = max(i for i, e in enumerate(tried) if e["status"] == "restarted") if any(
            e["status"] == "restarted" for e in tried
        ) else 0
        for i, e in enumerate(tried):
            # Members of the final soup: the last (re)start and the ingredients accepted after it.
            e["accepted"] = i >= start and e["status"] in ("accepted", "restarted")
        return tried

    def _read_state(self, trainer: Any, pl_module: Any, name: str, kept: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The kept entries of state file ``name`` (files of older versions may hold more, or `_orig_mod.` keys)."""
        with storage.open_state_dict(self._state_path(trainer, pl_module, name)) as lazy:
            names = {_tensors.canonical_key(k): k for k in lazy}
            state = {k: lazy[names[k]] for k in kept}
            state.update({k: lazy[k] for k in lazy if k.startswith(_MEMBER)})
            return state

    def _online_name(self, entry: dict[str, Any]) -> str:
        return f"{_ONLINE_DIR}/soup-sum-epoch={entry['epoch']}-step={entry['step']}.safetensors"

    def _sum_recipe(self) -> dict[str, Any]:
        return {"method": "greedy_soup_online_sum", "monitor": self.monitor, "mode": self.mode}

    # ---------------------------------------------------------------------------------------------------- outputs
    def _recipe(self, tried: list[dict[str, Any]], soup_score: float | None) -> dict[str, Any]:
        listed = {(t["epoch"], t["step"]) for t in tried}
        rest = []
        for e in self._entries:
            if (e["epoch"], e["step"]) not in listed:
                rest.append({**e, "accepted": False, "soup_score": None})
        columns = ("epoch", "step", "file", "score", "status", "accepted", "soup_score", "reason")
        ingredients = [{c: row.get(c) for c in columns} for row in [*tried, *rest]]
        return {
            "method": "greedy_soup",
            "monitor": self.monitor,
            "mode": self.mode,
            "online": self.online,
            "soup_score": soup_score,
            **({} if self._lora_error is None else {"lora_relative_error": self._lora_error}),
            "accepted": sum(1 for i in ingredients if i["accepted"]),
            "ingredients": ingredients,
        }

    def _log_score(self, trainer: Any) -> None:
        if self.soup_score is None:
            return
        key = f"greedy_soup/{self.monitor}"
        trainer.callback_metrics[key] = torch.tensor(self.soup_score)
        for logger in trainer.loggers:
            logger.log_metrics({key: self.soup_score}, step=trainer.global_step)
            logger.save()

    # ------------------------------------------------------------------------------------------------------ paths
    def _root(self, trainer: Any) -> Path:
        return self._dir if self._dir is not None else self.dirpath_for(trainer)

    def _state_path(self, trainer: Any, pl_module: Any, name: str) -> Path:
        """Where ``name`` (``"ingredients/<file>"`` or ``"online/<file>"``) lives for this rank: in
        ``dirpath/<folder>/`` (rank zero's) under DDP, in ``dirpath/<folder>/rank{R}/`` when sharded."""
        folder, _, file = name.partition("/")
        # Names come from checkpoint state (checked at load) or are made here; confined on every read and delete.
        return storage.confined(_dist.rank_dir(trainer, pl_module, self._root(trainer), folder), file)

    def _owned_paths(self, trainer: Any, name: str) -> list[Path]:
        """The files of ``name`` this rank is responsible for (for deletion)."""
        pl_module = trainer.lightning_module
        return [self._state_path(trainer, pl_module, name)] if _dist.owns_state(trainer, pl_module) else []


def _mismatch(paths: list[Path], kept: Mapping[str, Tensor], every: Mapping[str, Tensor]) -> str | None:
    """Why one of the files at ``paths`` does not fit tensors like ``kept``, or None (reads headers only).

    A file must hold every kept entry with its shape and dtype; it may hold other entries of the module too (files
    written before the callbacks kept only what training changes hold the whole module).
    """
    expected = {k: (tuple(v.shape), v.dtype) for k, v in kept.items()}
    for path in paths:
        with storage.open_state_dict(path) as lazy:
            found = {
                _tensors.canonical_key(k): (tuple(v.shape), v.dtype)
                for k, v in lazy.meta().items()
                if not k.startswith(_MEMBER)
            }
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - every.keys())
        differ = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        if missing or unexpected or differ:
            return (
                f"GreedySoup file {str(path)!r} does not fit the module (missing keys {missing or 'none'}, "
                f"unexpected keys {unexpected or 'none'}, other shapes/dtypes {differ or 'none'}). Was the model, "
                "the strategy or the set of trainable parameters changed since the checkpoint? Use a new `dirpath` "
                "for a new model."
            )
    return None


def _member_entries(members: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{_MEMBER}{j}.{k}": v for j, member in enumerate(members) for k, v in member.items()}


def _members(stored: Mapping[str, Tensor], count: int, factor_keys: list[str]) -> list[dict[str, Tensor]]:
    """The online soup's members' LoRA factors, as saved by :func:`_member_entries`."""
    if not factor_keys:
        return []
    missing = [k for k in factor_keys if f"{_MEMBER}0.{k}" not in stored]
    if missing:
        raise SoupError(
            "GreedySoup(online=True): the online soup file has no per-member LoRA factors (it was written by an "
            "older version, which averaged LoRA factors). Start a new soup with a new `dirpath`."
        )
    return [{k: stored[f"{_MEMBER}{j}.{k}"] for k in factor_keys} for j in range(count)]


# One background reader for every GreedySoup: reading the next ingredient overlaps validating the current candidate.
# Created on first use and forgotten in a forked child (ddp_fork, ddp_notebook, a test runner's fork): the child
# inherits the executor object but not its thread, so work submitted to it there would never run.
_prefetch_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _prefetcher() -> concurrent.futures.ThreadPoolExecutor:
    global _prefetch_pool
    if _prefetch_pool is None:
        _prefetch_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="lightning_soup-ingredients", initializer=_base.background_priority
        )
    return _prefetch_pool


def _forget_prefetcher() -> None:
    global _prefetch_pool
    _prefetch_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_prefetcher)


def _candidate_device(pl_module: Any, count: int) -> torch.device:
    """Where to keep the soup's running sums: on the module's CUDA device when it has room for them (the float32
    sum, its next value, the ingredient being added and the one prefetched: four copies of the weights, with a
    margin), else in host memory. A CPU module keeps them in host memory either way. Candidates are written into
    the module's own tensors."""
    live = _tensors.kept_tensors(pl_module)
    device = next((t.device for t in live.values() if t.is_floating_point()), torch.device("cpu"))
    if device.type != "cuda" or count < 2:
        return torch.device("cpu")
    need = 5 * sum(t.numel() * 4 for t in live.values() if t.is_floating_point())
    free, _total = torch.cuda.mem_get_info(device)
    spare = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return device if free + spare >= need else torch.device("cpu")


class _Ingredient(Mapping[str, Tensor]):
    """One ingredient as this rank needs it, tensor by tensor, in host memory.

    Sharded modules (and one process): the rank's own file, read lazily, each tensor once, when the soup asks for
    it. DDP: global rank zero reads its file and broadcasts each tensor; the other ranks never touch a file. Keys
    iterate in the module's ``state_dict`` order, identical on every rank, so every rank's soup asks for the same
    tensors in the same order and the broadcasts pair up.
    """

    def __init__(self, path: Path | None, trainer: Any, pl_module: Any) -> None:
        self.path = path  # None on ranks that receive it
        self.device = torch.device("cpu")  # where the soup builds its candidates (see _candidate_device)
        self._fetched: concurrent.futures.Future[dict[str, Tensor]] | None = None
        self._data: dict[str, Tensor] | None = None
        # Shapes/dtypes/devices of what the callback keeps; local shards when sharded.
        self._template = _tensors.kept_tensors(pl_module)
        distributed = (
            _dist.world_size(trainer) > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        )
        self._broadcast = distributed and not _dist.keeps_state_per_rank(trainer, pl_module)
        self._reads = _dist.owns_state(trainer, pl_module)
        self._lazy: storage.LazyStateDict | None = None
        self._names: dict[str, str] = {}

    def prefetch(self) -> None:
        """Start reading every tensor (onto :attr:`device`) in a background thread. Not under DDP, where each
        tensor comes through a broadcast that must stay in step with the other ranks' collectives."""
        if self._broadcast or self._fetched is not None or self._data is not None:
            return
        self._fetched = _prefetcher().submit(self._read_all)

    def _read_all(self) -> dict[str, Tensor]:
        out = {}
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for key in self._template:
                value = self._read(key)
                out[key] = value.to(self.device, non_blocking=True) if value.is_floating_point() else value
        if stream is not None:
            # The soup uses these on the training stream: it waits for the uploads on the device, not the host.
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for value in out.values():
                if value.is_cuda:
                    value.record_stream(torch.cuda.current_stream(self.device))
        return out

    def _all(self) -> dict[str, Tensor] | None:
        if self._data is None and self._fetched is None:
            self.prefetch()
        if self._fetched is not None:
            fetched, self._fetched = self._fetched, None
            self._data = fetched.result()
        return self._data

    def __getitem__(self, key: str) -> Tensor:
        data = self._all()
        if data is not None:
            # Handed over, not kept: once the soup has read an ingredient, only the soup holds its tensors (a key
            # asked for again is read from the file).
            value = data.pop(key, None)
            return value if value is not None else self._read(key)
        like = self._template[key]
        value = self._read(key) if self._reads else None
        if not self._broadcast:
            assert value is not None
            return value
        # NCCL sends device tensors, gloo host ones: go through the device the module's tensor lives on.
        if value is None:
            buffer = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        else:
            buffer = value.to(like.device)
        torch.distributed.broadcast(buffer, src=0)
        return buffer.cpu()

    def _read(self, key: str) -> Tensor:
        if self._lazy is None:
            assert self.path is not None
            self._lazy = storage.open_state_dict(self.path)
            # files of compiled modules written by older versions carry `_orig_mod.` in their keys
            self._names = {_tensors.canonical_key(k): k for k in self._lazy}
        return self._lazy[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._template)

    def __len__(self) -> int:
        return len(self._template)

    def __contains__(self, key: object) -> bool:
        return key in self._template

    def meta(self) -> dict[str, Tensor]:
        """Shapes and dtypes (this rank's) without reading or communicating anything."""
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._template.items()}

    def close(self) -> None:
        fetched, self._fetched, self._data = self._fetched, None, None
        if fetched is not None:
            fetched.cancel()
            with contextlib.suppress(Exception):
                fetched.result()  # a read still running must finish before its file is closed
        if self._lazy is not None:
            self._lazy.close()
            self._lazy = None
