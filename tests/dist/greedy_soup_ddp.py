"""DDP on CPU (gloo), 2 ranks: GreedySoup's end-of-fit soup against a greedy soup recomputed with trainer.validate.

Every rank records its own weights and ``val/loss`` at each validation; file opens, tensor reads and file commits
are counted per rank. After fit, every rank recomputes the greedy soup from rank zero's recorded ingredients in
float64, scoring each candidate with ``trainer.validate`` (rank zero's value, as GreedySoup decides). Rank zero
writes the reference soup; every rank writes its module's final weights and what it counted.
With ``online`` the soup is built during training (``GreedySoup(online=True)``) and the reference follows the
online rule in training order.
Usage: greedy_soup_ddp.py <flavour> [online]
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from _common import finish, flavour, out_dir, trainer_kwargs, write_result
from _models import tiny_classifier_class
from lightning_soup import storage
from lightning_soup._storage import _read

pl, soup = flavour(sys.argv[1])
ONLINE = sys.argv[2:] == ["online"]
OUT = out_dir()
SOUP_DIR = OUT / "soup"
counting = {"on": True}
opened: list[str] = []
reads: Counter = Counter()
commits: list[str] = []

_open, _getitem, _replace = storage.open_state_dict, _read.LazyStateDict.__getitem__, os.replace


def counted_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    if counting["on"]:
        opened.append(str(Path(path).relative_to(SOUP_DIR)))
    return _open(path, *args, **kwargs)


def counted_getitem(self, key):  # type: ignore[no-untyped-def]
    if counting["on"]:
        reads[f"{Path(self.path).name}:{key}"] += 1
    return _getitem(self, key)


def counted_replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
    if counting["on"] and str(dst).startswith(str(SOUP_DIR)):
        commits.append(str(Path(dst).relative_to(SOUP_DIR)))
    return _replace(src, dst, *args, **kwargs)


storage.open_state_dict = counted_open
_read.LazyStateDict.__getitem__ = counted_getitem
os.replace = counted_replace


class Capture(pl.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.scores: list[float] = []

    def on_validation_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.states.append({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()})
            self.scores.append(float(trainer.callback_metrics["val/loss"]))


def mean64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in states[0].items()
    }


def main() -> None:
    torch.manual_seed(0)
    model = tiny_classifier_class(pl)(lr=0.3)
    capture = Capture()
    greedy = soup.GreedySoup(monitor="val/loss", mode="min", dirpath=str(SOUP_DIR), online=ONLINE)
    trainer = pl.Trainer(
        **trainer_kwargs(OUT, devices=2, strategy="ddp", max_epochs=4, num_sanity_val_steps=1),
        callbacks=[capture, greedy],
    )
    trainer.fit(model)
    counting["on"] = False
    rank = trainer.global_rank
    module = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_file(module, str(OUT / f"module_rank{rank}.safetensors"))

    # The reference: rank zero's ingredients and scores, candidates scored by trainer.validate (rank zero's value).
    ingredients = trainer.strategy.broadcast(capture.states)
    scores = trainer.strategy.broadcast(capture.scores)

    def validate(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state)
        return float(trainer.strategy.broadcast(trainer.validate(model, verbose=False)[0]["val/loss"]))

    if ONLINE:  # training order; join if not worse than soup and newcomer, restart if the newcomer alone is better
        members, soup_score, trace = [0], scores[0], [scores[0]]
        for i in range(1, len(scores)):
            candidate = validate(mean64([ingredients[j] for j in [*members, i]]))
            if candidate <= soup_score and candidate <= scores[i]:
                members, soup_score = [*members, i], candidate
            elif scores[i] < soup_score:
                members, soup_score = [i], scores[i]
            trace.append(soup_score)
    else:
        order = sorted(range(len(scores)), key=lambda i: scores[i])
        members, soup_score, trace = [order[0]], scores[order[0]], [scores[order[0]]]
        for i in order[1:]:
            candidate = validate(mean64([ingredients[j] for j in [*members, i]]))
            if candidate <= soup_score:
                members, soup_score = [*members, i], candidate
            trace.append(soup_score)
    if rank == 0:
        save_file(mean64([ingredients[j] for j in members]), str(OUT / "reference.safetensors"))
    write_result(
        rank,
        {
            "own_scores": capture.scores,
            "scores": scores,
            "members": members,
            "trace": trace,
            "recipe": greedy.recipe,
            "opened": opened,
            "reads": dict(reads),
            "commits": commits,
        },
    )


if __name__ == "__main__":
    main()
    finish()
