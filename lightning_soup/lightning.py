"""The callbacks bound to ``lightning.pytorch``.

Use these with ``import lightning.pytorch``; with ``pytorch_lightning`` import from ``lightning_soup``.
Both flavours share one implementation in lightning_soup.callbacks, and their checkpoints resume in either
package (the state keys are the class names).
"""

import lightning.pytorch as pl

from lightning_soup.callbacks.averaging import _CheckpointAveraging
from lightning_soup.callbacks.blend import _TaskArithmeticBlend
from lightning_soup.callbacks.greedy_soup import _GreedySoup
from lightning_soup.errors import SoupError

__all__ = ["CheckpointAveraging", "GreedySoup", "SoupCLI", "SoupError", "TaskArithmeticBlend"]


class CheckpointAveraging(_CheckpointAveraging, pl.Callback):
    __doc__ = _CheckpointAveraging.__doc__


class GreedySoup(_GreedySoup, pl.Callback):
    __doc__ = _GreedySoup.__doc__


class TaskArithmeticBlend(_TaskArithmeticBlend, pl.Callback):
    __doc__ = _TaskArithmeticBlend.__doc__


def __getattr__(name: str) -> object:
    # SoupCLI needs jsonargparse (Lightning's CLI extra): built on first use, so the callbacks never import it.
    if name == "SoupCLI":
        from lightning_soup._soupcli import soup_cli_class

        return soup_cli_class(pl.__name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
