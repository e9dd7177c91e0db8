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


def _floats64(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def _assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for k in expected:
        if expected[k].is_floating_point():
            torch.testing.assert_close(actual[k].double(), expected[k].double(), rtol=1e-6, atol=1e-6, msg=f"{what}: {k}")
        else:
            assert torch.equal(actual[k], expected[k]), f"{what}: {k}"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fsdp2_callbacks_on_sharded_weights(tmp_path: Path) -> None:
    """Averaging, greedy soup and blend on FSDP2 shards equal the float64 maths on gathered full weights."""
    ranks = launch("fsdp2_callbacks.py", tmp_path, "pytorch_lightning", timeout=360)
    soup_dir = tmp_path / "soup"
    capture = {p.stem: load_file(p) for p in (tmp_path / "capture").glob("*.safetensors")}
    epochs = [capture[f"epoch{e}"] for e in range(3)]
    floats = [k for k, v in epochs[0].items() if v.is_floating_point()]

    # No rank gathered, scattered or broadcast weights between on_train_start and on_train_end.
    for rank, r in enumerate(ranks):
        assert r["gathers_during_training"] == {}, f"rank {rank} moved whole weights during training: {r['gathers_during_training']}"

    # State kept during training is shard-local: every per-rank file holds this rank's rows of the uneven layer.
    outputs = {"anchor", "average", "blended", "final", "soup"}
    state_files = {name: shapes for name, shapes in ranks[0]["files"].items() if Path(name).stem not in outputs}
    assert state_files, "no snapshot or ingredient files were kept"
    for name, shapes in state_files.items():
        assert shapes["net.3.weight"] in ([2, 16], [1, 16]), f"{name} holds {shapes['net.3.weight']}, not a shard"
    local_rows = sorted({tuple(s["net.3.weight"]) for s in state_files.values()})
    assert local_rows == [(1, 16), (2, 16)], "both ranks must keep their own shards"

    # Outputs are full files.
    for name in outputs:
        assert load_file(soup_dir / f"{name}.safetensors")["net.3.weight"].shape == (3, 16), name

    # final = the raw trained weights; anchor = the weights at fit start.
    _assert_state_close(load_file(soup_dir / "final.safetensors"), epochs[2], "final")
    _assert_state_close(load_file(soup_dir / "anchor.safetensors"), capture["initial"], "anchor")

    # CheckpointAveraging(window=2): the float64 mean of the last two epoch snapshots, integers from the newest.
    expected_avg = {k: (epochs[1][k].double() + epochs[2][k].double()) / 2 if k in floats else epochs[2][k] for k in epochs[2]}
    _assert_state_close(load_file(soup_dir / "average.safetensors"), expected_avg, "average")

    # GreedySoup: tried in order of rank zero's scores; the soup is the mean of the accepted ingredients.
    recipe = ranks[0]["recipe"]
    assert recipe == ranks[1]["recipe"], "both ranks must make the same decisions"
    scores = {int(e): s for e, s in ranks[0]["scores"].items()}
    tried = [i["epoch"] for i in recipe["ingredients"]]
    assert tried == sorted(scores, key=lambda e: (-scores[e], e))
    assert [i["score"] for i in recipe["ingredients"]] == pytest.approx([scores[e] for e in tried])
    accepted = [i["epoch"] for i in recipe["ingredients"] if i["accepted"]]
    assert accepted and accepted[0] == tried[0]
    expected_soup = {
        k: sum(epochs[e][k].double() for e in accepted) / len(accepted) if k in floats else epochs[tried[0]][k]
        for k in epochs[0]
    }
    _assert_state_close(load_file(soup_dir / "soup.safetensors"), expected_soup, "soup")
    # The soup's recorded score is what trainer.validate reports for the soup's weights (every rank validated).
    assert ranks[0]["validated_soup"]["val/acc"] == pytest.approx(recipe["soup_score"], abs=1e-6)

    # TaskArithmeticBlend(ratio=0.5) of the soup (listed last among the producers) toward the initial weights.
    expected_blend = {
        k: capture["initial"][k].double() + 0.5 * (expected_soup[k] - capture["initial"][k].double()) if k in floats
        else expected_soup[k]
        for k in expected_soup
    }
    blended = load_file(soup_dir / "blended.safetensors")
    _assert_state_close(blended, expected_blend, "blended")

    # Both ranks end with the blended weights, buffers included (FSDP2 does not synchronise buffers).
    for rank in range(2):
        _assert_state_close(load_file(tmp_path / f"module_rank{rank}.safetensors"), blended, f"module on rank {rank}")
