"""DDP on CPU (gloo), 2 ranks: soup() and compose() over finished checkpoints, every rank validating.

Every rank runs ``soup`` (greedy, ``val/loss/dataloader_idx_0``, min) over the sweep written by the test, then
``compose`` (ties, a constraint on the second dataloader's loss). Each rank records its module after the soup, the
recipes, and how many files it committed into the output folder. Then every rank recomputes the greedy soup in
float64 with ``trainer.validate``, rank zero's value broadcast (the rule soup() must follow), and rank zero writes it.
Usage: posthoc_ddp.py <sweep folder>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file

from _common import finish, out_dir, trainer_kwargs, write_result
from _models import tiny_classifier_class
from lightning_soup import compose, soup, storage

LOSS0, LOSS1 = "val/loss/dataloader_idx_0", "val/loss/dataloader_idx_1"
OUT = out_dir()
SOUP_DIR = OUT / "soup"
commits = {"n": 0}
_replace = os.replace


def counted_replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
    if str(dst).startswith(str(SOUP_DIR)):
        commits["n"] += 1
    return _replace(src, dst, *args, **kwargs)


os.replace = counted_replace


def mean64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in states[0].items()
    }


def main() -> None:
    sweep = Path(sys.argv[1])
    paths = [sweep / name for name in ("ft0.ckpt", "ft1.safetensors", "ft2", "ft3.ckpt", "ft4.safetensors")]
    torch.manual_seed(3)
    model = tiny_classifier_class(pl)(two_val_loaders=True)
    trainer = pl.Trainer(**trainer_kwargs(OUT, devices=2, strategy="ddp"))
    rank = trainer.global_rank
    result = soup(trainer, model, [str(p) for p in paths], monitor=LOSS0, mode="min", dirpath=str(SOUP_DIR))
    module = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(module, str(OUT / f"module_rank{rank}.safetensors"))
    caps = [str(sweep / "cap_a.safetensors"), str(sweep / "cap_b")]
    composed = compose(trainer, model, str(sweep / "base.ckpt"), caps,
                       method="ties", scales=[0.3, 0.7, 1.0], density=0.3, monitor=LOSS0, mode="min",
                       constraint=f"{LOSS1}<=10", dirpath=str(SOUP_DIR))
    soup_commits = commits["n"]

    states = [storage.load_state_dict(p) for p in paths]

    def validate(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state)
        metrics = {}
        for d in trainer.validate(model, verbose=False):
            metrics.update(d)
        return float(trainer.strategy.broadcast(metrics[LOSS0]))

    scores = [validate(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: scores[i])
    members, soup_score = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = validate(mean64([states[j] for j in [*members, i]]))
        if candidate <= soup_score:
            members, soup_score = [*members, i], candidate
    if rank == 0:
        save_file(mean64([states[j] for j in members]), str(OUT / "reference.safetensors"))
    write_result(rank, {
        "soup_recipe": result.recipe,
        "compose_recipe": composed.recipe,
        "soup_members": sorted(paths.index(Path(r["path"])) for r in result.recipe["checkpoints"] if r["accepted"]),
        "members": sorted(members),
        "reference_score": soup_score,
        "commits": soup_commits,
    })


if __name__ == "__main__":
    main()
    finish()
