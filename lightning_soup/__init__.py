"""Checkpoint averaging, greedy model soups and task-arithmetic blending for PyTorch Lightning.

The callbacks exported here subclass ``pytorch_lightning.Callback``; the same classes bound to
``lightning.pytorch`` live in :mod:`lightning_soup.lightning`. :func:`soup` and :func:`compose` merge finished
models with your validation (:mod:`lightning_soup.posthoc`), and :class:`SoupCLI` adds them to a ``LightningCLI``.
The pure functional core is :mod:`lightning_soup.merge`.

Everything but ``SoupError`` is imported lazily, so ``lightning_soup.merge``, the storage layer and the CLI never
import Lightning.
"""

from typing import TYPE_CHECKING, Any

from lightning_soup.errors import SoupError

if TYPE_CHECKING:
    from lightning_soup._pl import CheckpointAveraging, GreedySoup, SoupCLI, TaskArithmeticBlend
    from lightning_soup.posthoc import MergeResult, compose, soup

__all__ = [
    "CheckpointAveraging",
    "GreedySoup",
    "MergeResult",
    "SoupCLI",
    "SoupError",
    "TaskArithmeticBlend",
    "compose",
    "soup",
]
__version__ = "0.1.0"

_CALLBACKS = frozenset({"CheckpointAveraging", "GreedySoup", "SoupCLI", "TaskArithmeticBlend"})
_POSTHOC = frozenset({"MergeResult", "compose", "soup"})


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        import sys

        if "lightning.pytorch" in sys.modules and "pytorch_lightning" not in sys.modules:
            # Most likely a `lightning.pytorch` project (LightningCLI's `class_path: lightning_soup.X` then fails with
            # "does not correspond to a subclass of Callback"): say which import fits before that error.
            import warnings

            warnings.warn(
                f"`lightning_soup.{name}` subclasses `pytorch_lightning.Callback`, but this program uses "
                f"`lightning.pytorch`: use `lightning_soup.lightning.{name}` (in a LightningCLI config, "
                f"`class_path: lightning_soup.lightning.{name}`).",
                UserWarning,
                stacklevel=2,
            )
        from lightning_soup import _pl

        return getattr(_pl, name)
    if name in _POSTHOC:
        from lightning_soup import posthoc

        return getattr(posthoc, name)
    raise AttributeError(f"module 'lightning_soup' has no attribute {name!r}")
