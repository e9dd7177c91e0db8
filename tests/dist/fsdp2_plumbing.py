"""FSDP2 on CPU (gloo), 2 ranks: the shard-local plumbing in ``lightning_soup.callbacks._dist`` and ``._tensors``.

At ``on_train_end`` (right after a validation run, when FSDP2 may have left the root's parameters unsharded) the
probe writes new weights into the local shards and checks that a forward pass uses them; it also exercises the
gather-one-tensor-at-a-time writer, the scatter-from-rank-zero reader and the buffer broadcast.
Usage: fsdp2_plumbing.py <flavour>
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from _common import (
    finish,
    flavour,
    full_state,
    model_parallel_strategy,
    out_dir,
    sharded_classifier_class,
    trainer_kwargs,
    write_result,
)
from lightning_soup.callbacks import _base, _dist, _tensors

pl, soup = flavour(sys.argv[1])
OUT = out_dir()
result: dict = {}


class Probe(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        _dist.check_strategy(trainer)
        result["setup"] = {
            "sharded": _dist.is_sharded(pl_module),
            "owns_state": _dist.owns_state(trainer, pl_module),
            "rank_dir": str(_dist.rank_dir(trainer, pl_module, OUT / "soup", ".state").relative_to(OUT)),
        }

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        state = pl_module.state_dict()
        live = _tensors.module_tensors(pl_module)
        result["end"] = {"sharded": _dist.is_sharded(pl_module), "owns_state": _dist.owns_state(trainer, pl_module)}
        result["global_shapes"] = {k: list(v.shape) for k, v in state.items()}
        result["local_shapes"] = {k: list(v.shape) for k, v in live.items()}
        result["local_is_live"] = all(
            v.data_ptr() == (state[k].to_local() if hasattr(state[k], "to_local") else state[k]).data_ptr()
            for k, v in live.items()
        )

        before = full_state(pl_module)
        save_file(before, str(OUT / f"before_rank{rank}.safetensors"))
        result["local_shard_matches"] = all(
            torch.equal(_dist.local_shard(before[k], state[k]), live[k].cpu())
            for k in state
            if _dist._is_dtensor(state[k])
        )

        # The gather-one-tensor-at-a-time writer (rank zero writes) and the rank-zero reader that scatters shards.
        path = _tensors.write_module_weights(trainer, pl_module, OUT / "written.safetensors", {"method": "probe"})
        shards = _dist.read_local_shards(trainer, pl_module, path)
        # Shards are this rank's own; the other entries (buffers, which FSDP2 does not synchronise) are rank zero's.
        zero = trainer.strategy.broadcast({k: v for k, v in before.items() if not _dist._is_dtensor(state[k])})
        result["read_back_equal"] = all(
            torch.equal(shards[k].cpu(), live[k].cpu() if _dist._is_dtensor(state[k]) else zero[k]) for k in live
        )

        # New weights, the same on every rank, written shard-locally; buffers stay each rank's own until broadcast.
        new = {k: v * 0.5 + 0.1 if v.is_floating_point() else v for k, v in before.items()}
        local_new = {
            k: _dist.local_shard(new[k], state[k]).clone() if _dist._is_dtensor(state[k]) else live[k].clone()
            for k in state
        }
        _tensors.load_into_module_(pl_module, local_new)
        buffers = [k for k in state if not _dist._is_dtensor(state[k])]
        result["buffers_differ_before_broadcast"] = any(not torch.equal(zero[k], before[k]) for k in buffers)
        _dist.broadcast_module_(trainer, pl_module)

        pl_module.eval()
        x = torch.linspace(-2, 2, 5 * 8).reshape(5, 8)
        y = pl_module(x)
        after = full_state(pl_module)
        save_file(after, str(OUT / f"after_rank{rank}.safetensors"))
        save_file({"x": x, "y": y.detach().cpu().contiguous()}, str(OUT / f"forward_rank{rank}.safetensors"))

        # FSDP2 keeps the root's gathered parameters after an evaluation forward: writes into shard tensors taken
        # before that forward are only seen by the next forward once the module is resharded.
        live = _tensors.module_tensors(pl_module)
        pl_module(x)  # root parameters (BatchNorm's weight and bias) stay gathered
        for cached_write_then_reshard in (False, True):
            if cached_write_then_reshard:
                _dist.reshard_(pl_module)
            with torch.no_grad():
                for k, v in live.items():
                    if v.is_floating_point() and _dist._is_dtensor(state[k]):
                        v.add_(1.0)
            save_file(
                {"y": pl_module(x).detach().contiguous(), **{f"w/{k}": v for k, v in full_state(pl_module).items()}},
                str(OUT / f"cached_{int(cached_write_then_reshard)}_rank{rank}.safetensors"),
            )

        # A problem found on rank 1 alone is raised on both ranks, with rank 1's message.
        try:
            _dist.raise_on_every_rank(trainer, "rank 1 misses its shard file" if rank == 1 else None)
            result["raised_everywhere"] = None
        except soup.SoupError as e:
            result["raised_everywhere"] = str(e)
        _dist.raise_on_every_rank(trainer, None)  # no problem: returns on every rank

        try:  # a per-rank file from another sharding is refused with a hint
            _tensors.load_into_module_(pl_module, {k: before[k] for k in state})
            result["full_shapes_refused"] = None
        except soup.SoupError as e:
            result["full_shapes_refused"] = str(e)


def main() -> None:
    torch.manual_seed(0)
    model = sharded_classifier_class(pl)()
    trainer = pl.Trainer(
        **trainer_kwargs(OUT, devices=2, max_epochs=2, strategy=model_parallel_strategy(pl), callbacks=[Probe()])
    )
    trainer.fit(model)
    write_result(trainer.global_rank, result)


if __name__ == "__main__":
    main()
    finish()
