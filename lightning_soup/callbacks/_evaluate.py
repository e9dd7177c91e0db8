"""Score weights with the user's own validation, exactly as ``trainer.validate`` would report them.

A soup candidate (or a blend ratio) is "good" when the user's validation says so, with the user's reduction rules:
``self.log`` values reduced as a float32 mean weighted by batch size, ``sync_dist``, torchmetrics objects, several
validation dataloaders (``/dataloader_idx_N`` suffixes), ``limit_val_batches``. Rather than re-implementing those
rules, :func:`evaluate` runs Lightning's own evaluation loop: a fresh copy of the fit loop's ``_EvaluationLoop`` that
shares the fit's validation dataloaders, swapped in for the duration of one pass with the callbacks and loggers
detached. Every piece of trainer state that pass could touch (stage flags, callback/logged/progress-bar metrics, the
fit loop's progress counters saved in checkpoints, the module's train/eval modes, torchmetrics states, RNG streams)
is restored afterwards, so the extra pass is invisible to ``ModelCheckpoint``, ``EarlyStopping``, loggers, the
progress bar and to training itself.

The loop is reached duck-typed through ``trainer.fit_loop.epoch_loop.val_loop`` (the same attribute path in
``pytorch_lightning`` and ``lightning.pytorch`` 2.x), so this module imports neither package.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_soup.callbacks import _base, _dist, _tensors
from lightning_soup.errors import SoupError

__all__ = ["evaluate", "preserved_weights", "resolve_monitor", "swapped_weights"]


def evaluate(trainer: Any, pl_module: Any) -> dict[str, float]:
    """Run the user's validation on the module's current weights and return what ``trainer.validate`` would report.

    Call it on every rank (it is a collective under DDP, like validation itself) from ``on_train_end``,
    ``on_train_epoch_end`` or ``on_validation_end`` during ``trainer.fit``. The metrics of all validation
    dataloaders are merged into one dict, keyed like ``trainer.callback_metrics`` (``"val/acc"``,
    ``"val/acc/dataloader_idx_1"``); values are each rank's own (synchronised only where the user logged with
    ``sync_dist=True``, as in ``trainer.validate``).

    Args:
        trainer: the ``Trainer`` running ``fit``.
        pl_module: its ``LightningModule``, holding the weights to score.

    Returns:
        Every metric the validation logged, as Python floats.

    Raises:
        SoupError: not inside ``trainer.fit``, validation disabled (``limit_val_batches=0``), no
            ``validation_step``/validation data, or no batch ran.
    """
    if not _base.is_fitting(trainer):
        raise SoupError("`evaluate` scores weights with the validation loop of `trainer.fit`; call it during fit.")
    if trainer.limit_val_batches == 0:
        raise SoupError(
            "Validation is disabled (`Trainer(limit_val_batches=0)`), but GreedySoup and TaskArithmeticBlend score "
            "weights with your validation loop. Set `limit_val_batches` > 0 and provide validation data."
        )
    epoch_loop = trainer.fit_loop.epoch_loop
    outer = epoch_loop.val_loop
    inner = _fresh_loop_like(outer)
    connector = trainer._logger_connector
    saved_connector = {
        name: getattr(connector, name)
        for name in ("_callback_metrics", "_logged_metrics", "_progress_bar_metrics", "_first_loop_iter", "_current_fx")
    }
    saved_stage = trainer.state.stage
    saved_callbacks, saved_loggers = trainer.callbacks, trainer.loggers
    saved_last_val_time = getattr(trainer, "_last_val_time", None)
    model = trainer.model if trainer.model is not None else pl_module
    saved_modes = [(m, m.training) for m in model.modules()]
    try:
        with _isolated_rng(), _fresh_torchmetrics_states(pl_module):
            connector._callback_metrics, connector._logged_metrics, connector._progress_bar_metrics = {}, {}, {}
            connector._first_loop_iter = None
            connector._current_fx = None
            trainer.callbacks = []  # ModelCheckpoint, EarlyStopping, progress bars, ourselves: none of them see it
            trainer.loggers = []
            epoch_loop.val_loop = inner  # trainer._results and trainer._evaluation_loop now resolve to `inner`
            trainer.validating = True
            inner.run()
            if not inner._has_run:
                raise SoupError(
                    "The validation loop ran no batch: check `validation_step`, `val_dataloader` and "
                    "`limit_val_batches`; GreedySoup and TaskArithmeticBlend need validation to score weights."
                )
            metrics = {k: _to_float(v) for k, v in connector._callback_metrics.items()}
    finally:
        epoch_loop.val_loop = outer
        inner._data_fetcher = None  # the shared dataloaders stay with the fit loop; drop only our iterator
        trainer.state.stage = saved_stage
        trainer.callbacks, trainer.loggers = saved_callbacks, saved_loggers
        for name, value in saved_connector.items():
            setattr(connector, name, value)
        if saved_last_val_time is not None:
            trainer._last_val_time = saved_last_val_time
        for module, training in saved_modes:
            module.training = training
        _dist.reshard_(pl_module)  # FSDP2: later writes into the shards must be seen by the next forward
    return metrics


def resolve_monitor(metrics: Mapping[str, Any], monitor: str) -> float:
    """The value of ``monitor`` in ``metrics`` as a float.

    Raises:
        SoupError: ``monitor`` is missing; the message lists the available names and how to log it.

    Example:
        >>> resolve_monitor({"val/acc": 0.75, "val/loss": 0.5}, "val/acc")
        0.75
    """
    if monitor not in metrics:
        available = ", ".join(repr(k) for k in sorted(metrics)) or "none"
        raise SoupError(
            f"The monitored metric {monitor!r} was not found among the validation metrics: [{available}]. "
            f"HINT: Did you call `self.log({monitor!r}, ...)` in `validation_step` (or `on_validation_epoch_end`)?"
        )
    return _to_float(metrics[monitor])


@contextlib.contextmanager
def preserved_weights(pl_module: Any, keys: Iterable[str] = ()) -> Iterator[None]:
    """Keep a transient copy of the module's weights and put them back, bit for bit, on exit.

    What training changes is copied (:func:`~._tensors.kept_tensors`: a LoRA run's frozen base is not), plus the
    entries ``keys`` names. The copy lives next to each tensor (same device and dtype); it costs the trainable
    weights' memory while inside.
    """
    every = _tensors.module_tensors(pl_module)
    kept = _tensors.kept_tensors(pl_module)
    extra = {k: every[k] for k in map(_tensors.canonical_key, keys) if k in every and k not in kept}
    live = list(_tensors.unique_tensors({**kept, **extra}).values())
    with torch.no_grad():
        backup = [t.detach().clone() for t in live]
    try:
        yield
    finally:
        with torch.no_grad():
            for dst, src in zip(live, backup):
                dst.copy_(src)
        del backup
        # FSDP2 keeps the root's parameters gathered after an evaluation forward: drop that stale copy.
        _dist.reshard_(pl_module)


@contextlib.contextmanager
def swapped_weights(pl_module: Any, state: Mapping[str, Tensor]) -> Iterator[None]:
    """Load ``state`` into the module in place for the body of the ``with``; restore the previous weights after.

    Raises:
        SoupError: ``state`` does not fit the module (keys or shapes).
    """
    with preserved_weights(pl_module, keys=list(state)):
        _tensors.load_into_module_(pl_module, state)
        yield


def _fresh_loop_like(outer: Any) -> Any:
    """A new evaluation loop of the same class sharing ``outer``'s dataloaders but none of its progress state."""
    inner = type(outer)(
        outer.trainer, outer._trainer_fn, outer._stage, verbose=False, inference_mode=outer.inference_mode
    )
    inner._data_source = outer._data_source
    inner._combined_loader = outer._combined_loader
    inner._max_batches = list(outer._max_batches)
    inner._last_val_dl_reload_epoch = outer._last_val_dl_reload_epoch
    return inner


def _to_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Keep the extra validation from consuming the random streams training draws from (shuffling, dropout)."""
    py_state = random.getstate()
    np_random = None
    with contextlib.suppress(ImportError):
        import numpy.random as np_random
    np_state = np_random.get_state() if np_random is not None else None
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        if np_random is not None:
            np_random.set_state(np_state)


def _is_metric(module: Any) -> bool:
    defaults = getattr(module, "_defaults", None)
    return isinstance(defaults, dict) and callable(getattr(module, "reset", None)) and hasattr(module, "_update_count")


_METRIC_COUNTERS = ("_update_count", "_computed", "_forward_cache", "_cache", "_is_synced")


@contextlib.contextmanager
def _fresh_torchmetrics_states(pl_module: Any) -> Iterator[None]:
    """Start the module's torchmetrics objects from empty states and give them their previous states back after.

    Lightning resets a logged ``Metric`` only at the end of an evaluation, so from ``on_validation_end`` it still
    holds that run's accumulated state, which would otherwise leak into our score (and ours into the user's own
    ``on_validation_end``).
    """
    metrics = [m for m in pl_module.modules() if _is_metric(m)]
    saved = []
    for m in metrics:
        # reset() replaces tensor states with new tensors but clears list states in place: copy the lists.
        states = {a: (list(v) if isinstance(v, list) else v) for a in m._defaults for v in [getattr(m, a)]}
        saved.append((m, states, {a: getattr(m, a, None) for a in _METRIC_COUNTERS}))
    for m in metrics:
        m.reset()
    try:
        yield
    finally:
        for m, states, counters in saved:
            for attr, value in states.items():
                setattr(m, attr, value)
            for attr, value in counters.items():
                setattr(m, attr, value)
