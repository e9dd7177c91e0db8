"""``soup`` and ``compose`` as LightningCLI subcommands: ``SoupCLI`` over the digits classifier of ``lightning_cli.py``.

A sweep is several fine-tunes of one starting point; here three runs with different learning rates, all starting
from the same seeded weights (``seed_everything: 0``), each keeping its last checkpoint::

    for lr in 0.01 0.02 0.05; do
        python examples/soup_cli.py fit --config examples/soup_cli.yaml --model.lr $lr \\
            --trainer.default_root_dir out/sweep/lr$lr
    done

Wortsman's greedy soup of the sweep, every candidate scored by the model's own validation (``val/new_acc``)::

    python examples/soup_cli.py soup --config examples/soup_cli.yaml \\
        --checkpoints 'out/sweep/*/checkpoints/*.ckpt' --monitor val/new_acc

Two fine-tunes of one base combined, the coefficient chosen under a constraint on the other capability::

    python examples/soup_cli.py compose --config examples/soup_cli.yaml --base BASE.ckpt \\
        --finetuned '[A.ckpt, B.ckpt]' --method ties --scales '[0.3, 0.5, 0.7, 1.0]' \\
        --monitor val/new_acc --constraint 'val/old_acc>=0.8'

Results go to ``<trainer.default_root_dir>/soup`` (``soup.safetensors`` + ``soup.json``, or ``merged.safetensors``
+ ``compose.json`` + ``compose.png``). ``fit``, ``validate``, ``test`` and ``predict`` work as in any LightningCLI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lightning_cli.py and _common.py, however this is started
from lightning_cli import DigitsClassifier, DigitsDataModule  # noqa: E402

from lightning_soup import SoupCLI  # noqa: E402

__all__ = ["DigitsClassifier", "DigitsDataModule", "main"]


def main(args: Any = None) -> Any:
    """``args``: command-line arguments (default ``sys.argv[1:]``), as for ``LightningCLI``."""
    return SoupCLI(DigitsClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
