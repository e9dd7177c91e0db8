"""``strategy="ddp_spawn"`` on 2 CPU processes: when ``fit`` returns in the launching process, the results are on
disk and the launcher's module holds the final weights (Lightning copies rank zero's back).
Usage: ddp_spawn.py <flavour>
"""

from __future__ import annotations

import sys

from safetensors.torch import save_file

from _common import flavour, out_dir, trainer_kwargs, write_result
from _models import tiny_classifier_class

pl, soup = flavour(sys.argv[1])


class Model(tiny_classifier_class(pl)):  # type: ignore[misc]
    """Module-level, so the spawned processes can unpickle it."""


def main() -> None:
    import torch

    out = out_dir()
    torch.manual_seed(0)
    model = Model()
    callbacks = [
        soup.CheckpointAveraging(window=2),
        soup.GreedySoup(monitor="val/acc"),
        soup.TaskArithmeticBlend(anchor="initial", ratio=0.5),
    ]
    trainer = pl.Trainer(**trainer_kwargs(out, devices=2, strategy="ddp_spawn", callbacks=callbacks))
    trainer.fit(model)
    # Back in the launching process, right after fit returned.
    files = sorted(str(p.relative_to(out / "soup")) for p in (out / "soup").rglob("*") if p.is_file())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "launcher_module.safetensors"))
    write_result(0, {"files": files, "trainer_rank": trainer.global_rank})


if __name__ == "__main__":
    main()
