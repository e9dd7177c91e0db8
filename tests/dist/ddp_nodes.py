"""DDP over 2 single-process "nodes" that share no filesystem: each node has its own ``default_root_dir``.

Only global rank zero may write; everything rank 1 needs (ingredients, candidates, the anchor, the results) must
reach it by broadcast, since it cannot read node 0's folder. After fit each rank saves its module's weights.
Usage: ddp_nodes.py <flavour>
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

from _common import finish, flavour, out_dir, trainer_kwargs, write_result
from _models import make_model

pl, soup = flavour(sys.argv[1])


def main() -> None:
    out = out_dir()
    node = int(os.environ["NODE_RANK"])
    root = out / f"node{node}"  # this node's private disk
    model = make_model(pl, seed=0)
    greedy = soup.GreedySoup(monitor="val/acc")
    blend = soup.TaskArithmeticBlend(anchor="initial", ratio=[0.25, 0.75], monitor="val/acc")
    callbacks = [soup.CheckpointAveraging(window=2), greedy, blend]
    trainer = pl.Trainer(**trainer_kwargs(root, devices=1, num_nodes=2, strategy="ddp", callbacks=callbacks))
    trainer.fit(model)
    rank = trainer.global_rank
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"module_rank{rank}.safetensors"))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    write_result(rank, {"files": files, "recipe": greedy.recipe, "blend": blend.result})


if __name__ == "__main__":
    main()
    finish()
