"""Checkpoint averaging, greedy model soups and task-arithmetic blending for PyTorch Lightning.

The callbacks exported here subclass ``pytorch_lightning.Callback``; the same classes bound to
``lightning.pytorch`` live in :mod:`lightning_soup.lightning`. The pure functional core is
:mod:`lightning_soup.merge`.

The callbacks are imported lazily, so ``lightning_soup.merge``, the storage layer and the CLI never import
Lightning.
"""

from typing import TYPE_CHECKING, Any

from lightning_soup.errors import SoupError

if TYPE_CHECKING:
    from lightning_soup._pl import CheckpointAveraging, GreedySoup, TaskArithmeticBlend

__all__ = ["CheckpointAveraging", "GreedySoup", "SoupError", "TaskArithmeticBlend"]
__version__ = "0.1.0"

_CALLBACKS = frozenset({"CheckpointAveraging", "GreedySoup", "TaskArithmeticBlend"})


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        from lightning_soup import _pl

        return getattr(_pl, name)
    raise AttributeError(f"module 'lightning_soup' has no attribute {name!r}")
