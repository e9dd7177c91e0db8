"""``SoupCLI``: a ``LightningCLI`` with two more subcommands, ``soup`` and ``compose``.

The subcommands are methods of a Trainer subclass made on the fly (``LightningCLI`` turns a trainer method's
signature into a subcommand's options and calls it with the instantiated model and datamodule), each a thin call
of :func:`lightning_soup.soup` / :func:`lightning_soup.compose`. ``fit``, ``validate``, ``test`` and ``predict`` are
unchanged. Both Lightning packages are served: the class is built for the one asked for.
"""

import functools
import importlib
from typing import Any, Literal, Optional, Union

from lightning_soup.errors import SoupError

__all__ = ["soup_cli_class"]

_SKIP = {"model", "datamodule"}


def _soup(
    self: Any,
    model: Any,
    checkpoints: Union[list[str], str],
    monitor: str,
    mode: Literal["max", "min"] = "max",
    method: Literal["greedy", "uniform"] = "greedy",
    datamodule: Any = None,
    dirpath: Optional[str] = None,
    log: bool = False,
    allow_unrelated: bool = False,
) -> Any:
    """Soup finished fine-tunes of one base (greedy or uniform), every candidate scored by validation.

    Args:
        checkpoints: paths or glob patterns of .ckpt / .safetensors files or sharded folders, e.g. 'sweep/*/last.ckpt'.
        monitor: the validation metric to rank by, e.g. val/acc.
        mode: max when higher is better, min for losses.
        method: greedy (Wortsman's greedy soup) or uniform (the mean of all).
        dirpath: where soup.safetensors and soup.json go (default: <default_root_dir>/soup).
        log: also send the validations and the soup's score to the trainer's loggers.
        allow_unrelated: skip the check that every checkpoint shares a base with the first one.
    """
    from lightning_soup.posthoc import soup

    return soup(self, model, checkpoints, monitor=monitor, mode=mode, method=method, datamodule=datamodule,
                dirpath=dirpath, log=log, allow_unrelated=allow_unrelated)


def _compose(
    self: Any,
    model: Any,
    base: str,
    finetuned: Union[list[str], str],
    monitor: str,
    method: Literal["task_arithmetic", "ties", "dare", "tsv", "iso_c", "iso_cts", "model_stock"] = "task_arithmetic",
    scales: Optional[Union[list[float], list[list[float]]]] = [0.3, 0.5, 0.7, 1.0],  # noqa: B006 (jsonargparse default)
    mode: Literal["max", "min"] = "max",
    constraint: Optional[Union[str, list[str]]] = None,
    density: float = 0.2,
    seed: int = 0,
    datamodule: Any = None,
    dirpath: Optional[str] = None,
    log: bool = False,
    allow_unrelated: bool = False,
) -> Any:
    """Merge fine-tunes of one base into one model, the coefficients chosen on validation under constraints.

    Args:
        base: the checkpoint the fine-tunes started from.
        finetuned: the fine-tunes (paths or glob patterns).
        monitor: the validation metric to rank candidates by.
        method: the merge method of lightning_soup.merge.
        scales: candidate coefficients: floats (shared by every fine-tune) or lists of one float per fine-tune.
        mode: max when higher is better, min for losses.
        constraint: conditions the chosen candidate must meet, e.g. "val/a_acc>=0.9, val/b_acc>=0.8".
        density: the fraction of each task vector kept (ties, dare).
        seed: dare's random seed.
        dirpath: where merged.safetensors, compose.json and compose.png go (default: <default_root_dir>/soup).
        log: also send the validations and the chosen metrics to the trainer's loggers.
        allow_unrelated: skip the check that every fine-tune was fine-tuned from base.
    """
    from lightning_soup.posthoc import compose

    return compose(self, model, base, finetuned, method=method, scales=scales, monitor=monitor, mode=mode,
                   constraint=constraint, density=density, seed=seed, datamodule=datamodule, dirpath=dirpath, log=log,
                   allow_unrelated=allow_unrelated)


@functools.cache
def _soup_trainer(trainer_class: type) -> type:
    """`trainer_class` with the ``soup`` and ``compose`` methods the subcommands run."""
    return type(trainer_class.__name__, (trainer_class,), {
        "soup": _soup, "compose": _compose, "__module__": trainer_class.__module__,
        "__doc__": trainer_class.__doc__, "__qualname__": trainer_class.__qualname__,
    })


@functools.cache
def soup_cli_class(package: str) -> type:
    """``SoupCLI`` for ``package`` (``"pytorch_lightning"`` or ``"lightning.pytorch"``)."""
    cli = importlib.import_module(f"{package}.cli")

    class SoupCLI(cli.LightningCLI):  # type: ignore[misc,name-defined]
        """``LightningCLI`` plus the subcommands ``soup`` and ``compose`` (:func:`lightning_soup.soup`,
        :func:`lightning_soup.compose`), whose options are those functions' arguments.

        Example (``main.py`` holding ``SoupCLI(MyModel, MyData)``)::

            python main.py soup --config config.yaml --checkpoints 'sweep/*/last.ckpt' --monitor val/acc
            python main.py compose --config config.yaml --base base.ckpt --finetuned '[a.ckpt, b.ckpt]' \\
                --method ties --monitor val/mean_acc --constraint 'val/a_acc>=0.9, val/b_acc>=0.8'
        """

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {**cli.LightningCLI.subcommands(), "soup": set(_SKIP), "compose": set(_SKIP)}

        def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
            if not isinstance(self.trainer_class, type):
                raise SoupError(
                    "SoupCLI adds its subcommands to the Trainer class, so `trainer_class` must be a Trainer "
                    f"subclass, not {self.trainer_class!r}."
                )
            self.trainer_class = _soup_trainer(self.trainer_class)
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    SoupCLI.__module__, SoupCLI.__qualname__ = "lightning_soup", "SoupCLI"
    return SoupCLI
