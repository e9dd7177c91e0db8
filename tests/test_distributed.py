"""Distributed and sharded training: DDP, ddp_spawn, several nodes, FSDP2 on CPU, refused strategies, resume.

Multi-process runs are worker scripts in ``tests/dist`` started by ``tests/_launch.py`` (fresh processes, a free
port, a timeout); the workers write what they saw, and the references are computed here in float64.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _launch import launch
from lightning_soup import SoupError
from lightning_soup.callbacks import _base


def _sequential_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``TinyClassifier.net`` in eval mode, in float64, from a full state dict (keys ``net.*``)."""
    hidden = state["net.0.weight"].shape[0]
    net = nn.Sequential(nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3)).double().eval()
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    with torch.no_grad():
        return net(x.double())


# ------------------------------------------------------------------------------------------ strategy checks


def _fake_trainer(strategy: object, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, is_global_zero=rank == 0, global_rank=rank, world_size=2)


def test_check_strategy_accepts_supported(flavour: SimpleNamespace) -> None:
    s = flavour.pl.strategies
    for strategy in (s.SingleDeviceStrategy("cpu"), s.DDPStrategy(), s.DDPStrategy(start_method="spawn"), s.ModelParallelStrategy()):
        _base.check_strategy(_fake_trainer(strategy))


def test_check_strategy_refuses_fsdp1_deepspeed_and_unknown(flavour: SimpleNamespace) -> None:
    s = flavour.pl.strategies

    class DeepSpeedStrategy(s.DDPStrategy):  # the real one needs `deepspeed` installed; the family is the name
        pass

    class XLAStrategy(s.DDPStrategy):
        pass

    class HomeGrownStrategy:  # a third-party strategy the callbacks know nothing about
        pass

    cases = {
        s.FSDPStrategy(): ["`FSDPStrategy`", "FSDP1", "ModelParallelStrategy", "fully_shard"],
        DeepSpeedStrategy(): ["`DeepSpeedStrategy`", "ZeRO", "ModelParallelStrategy"],
        XLAStrategy(): ["`XLAStrategy`", "torch_xla"],
        HomeGrownStrategy(): ["`HomeGrownStrategy`"],
    }
    callback = flavour.soup.GreedySoup(monitor="val/acc")
    for strategy, expected in cases.items():
        with pytest.raises(SoupError) as e:
            _base.check_strategy(_fake_trainer(strategy), callback)
        message = str(e.value)
        for fragment in [*expected, "`GreedySoup`", "SingleDeviceStrategy", "ddp_spawn", "ModelParallelStrategy"]:
            assert fragment in message, (fragment, message)


@pytest.mark.parametrize("rank", [0, 1])
def test_state_ownership_and_rank_dirs(flavour: SimpleNamespace, tmp_path: Path, rank: int) -> None:
    s = flavour.pl.strategies
    module = nn.Linear(2, 2)  # plain parameters: before configure_model a sharded module looks like this too
    ddp = _fake_trainer(s.DDPStrategy(), rank)
    assert _base.owns_state(ddp, module) is (rank == 0)
    assert _base.rank_dir(ddp, module, tmp_path, ".snapshots") == tmp_path / ".snapshots"
    sharded = _fake_trainer(s.ModelParallelStrategy(), rank)
    assert _base.owns_state(sharded, module) is True
    folder = _base.rank_dir(sharded, module, tmp_path, ".snapshots")
    assert folder == tmp_path / ".snapshots" / f"rank{rank}" and folder.is_dir()


# ----------------------------------------------------------------------------------------------- FSDP2 on CPU


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp2_shard_local_plumbing(tmp_path: Path) -> None:
    """ModelParallelStrategy + fully_shard on 2 CPU processes: live local shards, gather-per-tensor writes, buffers."""
    ranks = launch("fsdp2_plumbing.py", tmp_path, "pytorch_lightning", timeout=240)
    for rank, r in enumerate(ranks):
        # Before configure_model the module is not sharded yet, but every rank already owns its state.
        assert r["setup"] == {"sharded": False, "owns_state": True, "rank_dir": f"soup/.state/rank{rank}"}
        assert r["end"] == {"sharded": True, "owns_state": True}
        # module_tensors gives this rank's shard (uneven: 3 rows over 2 ranks), as a view of the live parameter.
        assert r["local_shapes"]["net.0.weight"] == [8, 8]
        assert r["local_shapes"]["net.3.weight"] == [[2, 16], [1, 16]][rank]
        assert r["local_shapes"]["net.1.running_mean"] == [16]  # buffers are not sharded
        assert r["local_is_live"] and r["local_shard_matches"] and r["read_back_equal"]
        assert "same number of processes" in r["full_shapes_refused"]
    # Each rank saw other data, so its BatchNorm statistics differ from rank zero's until they are broadcast.
    assert ranks[1]["buffers_differ_before_broadcast"]

    before = [load_file(tmp_path / f"before_rank{r}.safetensors") for r in range(2)]
    written = load_file(tmp_path / "written.safetensors")
    assert written.keys() == before[0].keys()
    for k in written:  # the full file is rank zero's module: gathered shards plus rank zero's buffers
        torch.testing.assert_close(written[k], before[0][k], rtol=0, atol=0)

    # New weights written into the local shards (right after validation) are what the next forward uses, on
    # both ranks, with rank zero's buffers everywhere.
    expected = {k: v.double() * 0.5 + 0.1 if v.is_floating_point() else v for k, v in before[0].items()}
    for rank in range(2):
        after = load_file(tmp_path / f"after_rank{rank}.safetensors")
        for k, v in after.items():
            if k.startswith("net.1.running") or k.endswith("num_batches_tracked"):
                torch.testing.assert_close(v, before[0][k], rtol=0, atol=0)  # buffers: rank zero's, untouched
            else:
                torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6)
        fwd = load_file(tmp_path / f"forward_rank{rank}.safetensors")
        reference = _sequential_forward({k: v.double() if v.is_floating_point() else v for k, v in after.items()}, fwd["x"])
        torch.testing.assert_close(fwd["y"].double(), reference, rtol=1e-5, atol=1e-5)
