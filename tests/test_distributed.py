"""Distributed and sharded training: DDP, ddp_spawn, several nodes, FSDP2 on CPU, refused strategies, resume.

Multi-process runs are worker scripts in ``tests/dist`` started by ``tests/_launch.py`` (fresh processes, a free
port, a timeout); the workers write what they saw, and the references are computed here in float64.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _launch import launch
from _models import make_data
from safetensors.torch import load_file
from torch import nn

from lightning_soup import SoupError
from lightning_soup.callbacks import _dist


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
    supported = [
        s.SingleDeviceStrategy("cpu"), s.DDPStrategy(), s.DDPStrategy(start_method="spawn"), s.ModelParallelStrategy()
    ]
    for strategy in supported:
        _dist.check_strategy(_fake_trainer(strategy))


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
            _dist.check_strategy(_fake_trainer(strategy), callback)
        message = str(e.value)
        for fragment in [*expected, "`GreedySoup`", "SingleDeviceStrategy", "ddp_spawn", "ModelParallelStrategy"]:
            assert fragment in message, (fragment, message)


def test_every_callback_refuses_fsdp1_at_setup_before_writing(flavour: SimpleNamespace, tmp_path: Path) -> None:
    s = flavour.pl.strategies
    trainer = SimpleNamespace(
        strategy=s.FSDPStrategy(), is_global_zero=True, global_rank=0, world_size=1, limit_val_batches=1.0,
        default_root_dir=str(tmp_path), callbacks=[], state=SimpleNamespace(fn="fit"),
    )
    callbacks = [
        flavour.soup.CheckpointAveraging(),
        flavour.soup.GreedySoup(monitor="val/acc"),
        flavour.soup.TaskArithmeticBlend(ratio=0.5),
    ]
    trainer.callbacks = callbacks
    for callback in callbacks:
        with pytest.raises(SoupError, match=r"does not support `FSDPStrategy`.*ModelParallelStrategy"):
            callback.setup(trainer, None, "fit")
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_state_ownership_and_rank_dirs(flavour: SimpleNamespace, tmp_path: Path, rank: int) -> None:
    s = flavour.pl.strategies
    module = nn.Linear(2, 2)  # plain parameters: before configure_model a sharded module looks like this too
    ddp = _fake_trainer(s.DDPStrategy(), rank)
    assert _dist.owns_state(ddp, module) is (rank == 0)
    assert _dist.rank_dir(ddp, module, tmp_path, ".snapshots") == tmp_path / ".snapshots"
    sharded = _fake_trainer(s.ModelParallelStrategy(), rank)
    assert _dist.owns_state(sharded, module) is True
    folder = _dist.rank_dir(sharded, module, tmp_path, ".snapshots")
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
        assert r["raised_everywhere"] == "rank 1 misses its shard file"
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
        reference = _sequential_forward(_floats64(after), fwd["x"])
        torch.testing.assert_close(fwd["y"].double(), reference, rtol=1e-5, atol=1e-5)

        # Writes into shard tensors taken before an evaluation forward: without a reshard the next forward still
        # uses the root's stale gathered parameters; after _dist.reshard_ it uses the new weights.
        for resharded in (0, 1):
            out = load_file(tmp_path / f"cached_{resharded}_rank{rank}.safetensors")
            weights = {k.removeprefix("w/"): v for k, v in out.items() if k.startswith("w/")}
            correct = torch.allclose(out["y"].double(), _sequential_forward(_floats64(weights), fwd["x"]), atol=1e-5)
            assert correct is bool(resharded), f"rank {rank}, resharded={resharded}"


def _floats64(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def _assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for k in expected:
        if expected[k].is_floating_point():
            torch.testing.assert_close(
                actual[k].double(), expected[k].double(), rtol=1e-6, atol=1e-6, msg=f"{what}: {k}"
            )
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

    # No rank gathered or scattered weights between on_train_start and on_train_end. The only floating
    # broadcasts are rank zero's BatchNorm statistics (2 x 16 values) before each of the 3 validate_average runs.
    for rank, r in enumerate(ranks):
        moved = r["gathers_during_training"]
        assert moved == {}, f"rank {rank} moved whole weights during training: {moved}"
        assert sum(r["broadcast_numel_during_training"]) <= 3 * 2 * 16, r["broadcast_numel_during_training"]

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
    expected_avg = {
        k: (epochs[1][k].double() + epochs[2][k].double()) / 2 if k in floats else epochs[2][k] for k in epochs[2]
    }
    _assert_state_close(load_file(soup_dir / "average.safetensors"), expected_avg, "average")

    # Every candidate is scored on exactly its own weights, with rank zero's buffers: its val/loss is the float64
    # loss on rank zero's half of the validation set (DistributedSampler: samples 0, 2, 4, ...).
    x, y = make_data(40, seed=1).tensors
    x, y = x[0::2], y[0::2]

    def val_loss(state: dict[str, torch.Tensor]) -> float:
        return float(nn.functional.cross_entropy(_sequential_forward(_floats64(state), x), y))

    # validate_average=True scored the sharded average of the last snapshot's window.
    assert ranks[0]["average_val_loss"] == pytest.approx(val_loss(expected_avg), abs=2e-5)

    # GreedySoup (val/loss, min): tried in order of rank zero's scores; the soup is the mean of the accepted ones.
    recipe = ranks[0]["recipe"]
    assert recipe == ranks[1]["recipe"], "both ranks must make the same decisions"
    scores = {int(e): s for e, s in ranks[0]["scores"].items()}
    tried = [i["epoch"] for i in recipe["ingredients"]]
    assert tried == sorted(scores, key=lambda e: (scores[e], e))
    assert [i["score"] for i in recipe["ingredients"]] == pytest.approx([scores[e] for e in tried])
    accepted = [i["epoch"] for i in recipe["ingredients"] if i["accepted"]]
    assert accepted and accepted[0] == tried[0]

    def mean_of(members: list[int]) -> dict[str, torch.Tensor]:
        return {
            k: sum(epochs[e][k].double() for e in members) / len(members) if k in floats else epochs[tried[0]][k]
            for k in epochs[0]
        }

    for e in tried:  # the reference reproduces the ingredients' own scores from training's validation
        assert scores[e] == pytest.approx(val_loss(epochs[e]), abs=2e-5), e
    members: list[int] = []
    for step in recipe["ingredients"]:
        if step["accepted"]:
            members.append(step["epoch"])
            if len(members) > 1:
                assert step["soup_score"] == pytest.approx(val_loss(mean_of(members)), abs=2e-5), members
    expected_soup = mean_of(accepted)
    _assert_state_close(load_file(soup_dir / "soup.safetensors"), expected_soup, "soup")
    # The soup's recorded score is what trainer.validate reports for the soup's weights.
    assert ranks[0]["validated_soup"]["val/loss"] == pytest.approx(recipe["soup_score"], abs=1e-6)

    # TaskArithmeticBlend sweep of the soup (the producer listed last) toward the initial weights: every ratio
    # scored on its own blend, the best one chosen by rank zero and applied on both ranks.
    initial = _floats64(capture["initial"])

    def blend_of(ratio: float) -> dict[str, torch.Tensor]:
        return {
            k: initial[k] + ratio * (expected_soup[k] - initial[k]) if k in floats else expected_soup[k]
            for k in expected_soup
        }

    result = ranks[0]["blend"]
    other = ranks[1]["blend"]
    assert {k: v for k, v in result.items() if k != "anchor"} == {k: v for k, v in other.items() if k != "anchor"}
    losses = [val_loss(blend_of(c["ratio"])) for c in result["candidates"]]
    assert [c["metrics"]["val/loss"] for c in result["candidates"]] == pytest.approx(losses, abs=2e-5)
    assert result["ratio"] == result["candidates"][min(range(len(losses)), key=losses.__getitem__)]["ratio"]
    blended = load_file(soup_dir / "blended.safetensors")
    _assert_state_close(blended, blend_of(result["ratio"]), "blended")

    # Both ranks end with the blended weights, buffers included (FSDP2 does not synchronise buffers).
    for rank in range(2):
        _assert_state_close(load_file(tmp_path / f"module_rank{rank}.safetensors"), blended, f"module on rank {rank}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_fsdp2_crash_and_resume(tmp_path: Path) -> None:
    """FSDP2: a run resumed from a distributed checkpoint ends with the averages of an uninterrupted one."""
    ranks = launch("fsdp2_resume.py", tmp_path, "lightning", timeout=460)
    soup_dir = tmp_path / "soup"
    capture = {p.stem: _floats64(load_file(p)) for p in (tmp_path / "capture").glob("*.safetensors")}
    epochs = [capture[f"epoch{e}"] for e in range(4)]
    floats = [k for k, v in epochs[0].items() if v.is_floating_point()]

    def mean_of(members: list[int], ints_from: int) -> dict[str, torch.Tensor]:
        return {
            k: sum(epochs[e][k] for e in members) / len(members) if k in floats else epochs[ints_from][k]
            for k in epochs[0]
        }

    # The window spans the crash: epoch 1 from the first fit, epochs 2 and 3 from the resumed one.
    _assert_state_close(load_file(soup_dir / "average.safetensors"), mean_of([1, 2, 3], 3), "average")
    recipe = ranks[0]["recipe"]
    assert recipe == ranks[1]["recipe"]
    tried = [i["epoch"] for i in recipe["ingredients"]]
    scores = {int(e): v for e, v in ranks[0]["scores"].items()}
    assert tried == sorted(range(4), key=lambda e: (scores[e], e))  # ingredients from before the crash too
    accepted = [i["epoch"] for i in recipe["ingredients"] if i["accepted"]]
    soup = mean_of(accepted, tried[0])
    _assert_state_close(load_file(soup_dir / "soup.safetensors"), soup, "soup")
    # The anchor is the first fit's initial weights, not the weights the resumed fit started from.
    initial = capture["initial"]
    blended = {k: initial[k] + 0.5 * (soup[k] - initial[k]) if k in floats else soup[k] for k in soup}
    _assert_state_close(load_file(soup_dir / "blended.safetensors"), blended, "blended")
    for rank in range(2):
        _assert_state_close(load_file(tmp_path / f"module_rank{rank}.safetensors"), blended, f"module on rank {rank}")


# ------------------------------------------------------------------------------------------------ DDP family


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_spawn_results_on_disk_when_fit_returns(tmp_path: Path) -> None:
    """With ddp_spawn the callbacks run in spawned processes; the launching process finds every file written."""
    (result,) = launch("ddp_spawn.py", tmp_path, "lightning", nprocs=1, mode="single", timeout=360)
    files = set(result["files"])
    expected = {"average.safetensors", "soup.safetensors", "soup.json", "blended.safetensors", "final.safetensors",
                "anchor.safetensors", "blend.json"}
    assert expected <= files, f"missing after fit returned: {sorted(expected - files)}"
    assert not any(".tmp" in f or f.startswith(".") for f in files), files  # no temporary files left behind
    soup_dir = tmp_path / "soup"
    blended = load_file(soup_dir / "blended.safetensors")
    # Lightning hands rank zero's module back to the launching process: it holds the blended weights.
    _assert_state_close(load_file(tmp_path / "launcher_module.safetensors"), blended, "launcher's module")
    for name in ("average", "soup", "final", "anchor"):
        assert load_file(soup_dir / f"{name}.safetensors").keys() == blended.keys(), name


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_two_nodes_without_shared_filesystem(tmp_path: Path) -> None:
    """DDP on 2 single-process nodes with separate disks: rank 1 writes nothing and still ends with the result."""
    ranks = launch("ddp_nodes.py", tmp_path, "pytorch_lightning", mode="nodes", timeout=360)
    assert ranks[1]["files"] == [], f"rank 1 wrote to its node's disk: {ranks[1]['files']}"
    node0 = set(ranks[0]["files"])
    for name in ("average.safetensors", "soup.safetensors", "soup.json", "blended.safetensors", "blend.json"):
        assert f"soup/{name}" in node0, name
    # Decisions are rank zero's, broadcast: both ranks report the same recipe and the same chosen ratio.
    assert ranks[0]["recipe"] == ranks[1]["recipe"]
    chosen = [{k: v for k, v in r["blend"].items() if k != "anchor"} for r in ranks]  # the anchor names a local path
    assert chosen[0] == chosen[1]
    blended = load_file(tmp_path / "node0" / "soup" / "blended.safetensors")
    for rank in range(2):
        _assert_state_close(load_file(tmp_path / f"module_rank{rank}.safetensors"), blended, f"module on rank {rank}")


# ------------------------------------------------------------------------------------------ cross-package resume


class _Interrupt(Exception):
    pass


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("first", "second"), [("pytorch_lightning", "lightning"), ("lightning", "pytorch_lightning")])
def test_checkpoint_resumes_in_the_other_lightning_package(tmp_path: Path, first: str, second: str) -> None:
    """A run checkpointed with one Lightning package resumes with the other and ends as if never interrupted."""
    import importlib

    from _models import make_model, trainer_kwargs

    packages = {
        "pytorch_lightning": ("pytorch_lightning", "lightning_soup"),
        "lightning": ("lightning.pytorch", "lightning_soup.lightning"),
    }
    captured: dict[int | str, dict[str, torch.Tensor]] = {}
    scores: dict[int, float] = {}

    def run(package: str, max_epochs: int, ckpt_path: str | None, stop_at_epoch: int | None) -> tuple:
        pl, soup = (importlib.import_module(m) for m in packages[package])

        class Capture(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                captured.setdefault("initial", {k: v.clone() for k, v in pl_module.state_dict().items()})

            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == stop_at_epoch:
                    raise _Interrupt  # a crash after the last checkpoint

            def on_validation_end(self, trainer, pl_module):
                scores[trainer.current_epoch] = float(trainer.callback_metrics["val/acc"])

            def on_train_epoch_end(self, trainer, pl_module):
                captured[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}

        soup_dir = str(tmp_path / "soup")
        callbacks = [
            Capture(),
            soup.TaskArithmeticBlend(anchor="initial", ratio=0.5, dirpath=soup_dir),
            soup.CheckpointAveraging(window=3, dirpath=soup_dir),
            soup.GreedySoup(monitor="val/acc", dirpath=soup_dir),
            pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=True),
        ]
        model = make_model(pl, seed=0)
        kwargs = trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True, callbacks=callbacks)
        trainer = pl.Trainer(**kwargs)
        if stop_at_epoch is None:
            trainer.fit(model, ckpt_path=ckpt_path)
        else:
            with pytest.raises(_Interrupt):
                trainer.fit(model, ckpt_path=ckpt_path)
        return model, callbacks

    run(first, max_epochs=4, ckpt_path=None, stop_at_epoch=2)
    assert sorted(k for k in captured if isinstance(k, int)) == [0, 1]
    model, callbacks = run(second, max_epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), stop_at_epoch=None)
    assert sorted(k for k in captured if isinstance(k, int)) == [0, 1, 2, 3]  # resumed at epoch 2, not from scratch

    soup_dir = tmp_path / "soup"
    floats = [k for k, v in captured[0].items() if v.is_floating_point()]
    # The averaging window spans the interruption: epochs 1 (first package), 2 and 3 (second package).
    expected_avg = {
        k: sum(captured[e][k].double() for e in (1, 2, 3)) / 3 if k in floats else captured[3][k] for k in captured[3]
    }
    _assert_state_close(load_file(soup_dir / "average.safetensors"), expected_avg, "average")
    # The soup's ingredients include those taken before the interruption.
    recipe = callbacks[3].recipe
    tried = [i["epoch"] for i in recipe["ingredients"]]
    assert sorted(tried) == [0, 1, 2, 3]
    assert [i["score"] for i in recipe["ingredients"]] == pytest.approx([scores[e] for e in tried])
    accepted = [i["epoch"] for i in recipe["ingredients"] if i["accepted"]]
    expected_soup = {
        k: sum(captured[e][k].double() for e in accepted) / len(accepted) if k in floats else captured[tried[0]][k]
        for k in captured[0]
    }
    _assert_state_close(load_file(soup_dir / "soup.safetensors"), expected_soup, "soup")
    # The blend's anchor is the first run's initial weights, not the weights the second run resumed from.
    initial = captured["initial"]
    expected_blend = {
        k: initial[k].double() + 0.5 * (expected_soup[k] - initial[k].double()) if k in floats else expected_soup[k]
        for k in expected_soup
    }
    _assert_state_close(load_file(soup_dir / "blended.safetensors"), expected_blend, "blended")
    _assert_state_close(dict(model.state_dict()), expected_blend, "module")
