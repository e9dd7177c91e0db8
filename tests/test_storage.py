"""Storage layer: formats, laziness, atomic and streaming writes, and the errors users see for bad files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lightning_soup import SoupError, storage
from lightning_soup._storage import _atomic, _format

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values of any dtype, built from random bytes so every bit pattern family appears."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point and dtype.itemsize >= 2:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
        if t.numel() >= 4:  # values a careless round trip would lose
            flat = t.view(-1)
            flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")], dtype=torch.float64).to(dtype)
        return t
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor's elements in row-major order (bit-exact comparison, NaN and -0.0 included)."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert _bits(got) == _bits(want), key


def _mixed_state() -> dict[str, torch.Tensor]:
    state = {f"t.{str(d).removeprefix('torch.')}": _sample(d, (3, 5), seed=i) for i, d in enumerate(DTYPES)}
    state["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    state["scalar_int"] = torch.tensor(7)
    state["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    state["empty_bool"] = torch.empty(0, dtype=torch.bool)
    return state


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------------- imports


def test_importing_storage_does_not_import_lightning() -> None:
    code = (
        "import sys, lightning_soup.storage\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_file_round_trip_is_bit_exact_for_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {"matrix": _sample(dtype, (7, 3)), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 2))}
    path = storage.save_state_dict(state, tmp_path / "w.safetensors")
    _assert_same(storage.load_state_dict(path), state)
    reference = safetensors.torch.load_file(path)  # the reference reader agrees
    assert set(reference) == set(state)
    _assert_same({k: reference[k] for k in state}, state)


def test_mixed_dtypes_keep_key_order_and_alignment(tmp_path: Path) -> None:
    state = _mixed_state()
    path = storage.save_state_dict(state, tmp_path / "w.safetensors")
    with storage.open_state_dict(path) as lazy:
        assert list(lazy) == list(state)  # the model's order, not alphabetical
        _assert_same(dict(lazy.items()), state)
        # every tensor starts at a multiple of its item size, so readers can view it in place
        for key, entry in lazy._sources[0].entries.items():
            assert entry.begin % state[key].element_size() == 0, key
    reference = safetensors.torch.load_file(path)
    _assert_same({k: reference[k] for k in state}, state)


def test_reads_files_written_by_the_reference_writer(tmp_path: Path) -> None:
    state = {"a": torch.randn(4, 4), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3), "c": torch.tensor(1.0)}
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(state, path, metadata={"lightning_soup": '{"method": "x"}', "note": "hi"})
    with storage.open_state_dict(path) as lazy:
        assert set(lazy) == set(state)
        _assert_same({k: lazy[k] for k in state}, state)
        assert lazy.metadata == {"lightning_soup": '{"method": "x"}', "note": "hi"}
        assert lazy.recipe == {"method": "x"}


def test_load_state_dict_moves_to_device_and_returns_fresh_writable_tensors(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 3)}
    path = storage.save_state_dict(state, tmp_path / "w.safetensors")
    first = storage.load_state_dict(path, device="meta")
    assert first["w"].device.type == "meta" and first["w"].shape == (3, 3)
    with storage.open_state_dict(path) as lazy:
        a, b = lazy["w"], lazy["w"]
        a.add_(1)  # each access is a private copy
        torch.testing.assert_close(b, state["w"], rtol=0, atol=0)


def test_shared_and_non_contiguous_tensors_are_saved_not_rejected(tmp_path: Path) -> None:
    base = torch.randn(6, 8)
    state = {
        "embed.weight": base,
        "head.weight": base,  # tied weights: the same tensor twice
        "transposed": base.T,  # non-contiguous view of the same storage
        "slice": base[2:4, ::3],  # strided view with a storage offset
        "expanded": torch.randn(1, 4).expand(3, 4),  # zero stride
        "row": base[5],
    }
    with pytest.raises(RuntimeError):  # what the reference writer does, for comparison
        safetensors.torch.save_file(state, tmp_path / "ref.safetensors")
    path = storage.save_state_dict(state, tmp_path / "shared.safetensors")
    _assert_same(storage.load_state_dict(path), {k: v.contiguous() for k, v in state.items()})
    # only each view's own elements are stored (no whole shared storage per key)
    elements = sum(v.numel() for v in state.values())
    assert path.stat().st_size < elements * 4 + 2048


def test_parameters_requiring_grad_and_module_state_dicts(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model[1].running_mean.normal_()
    state = model.state_dict(keep_vars=True)
    path = storage.save_state_dict(state, tmp_path / "m.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(safetensors.torch.load_file(path))
    _assert_same(dict(fresh.state_dict()), {k: v.detach() for k, v in state.items()})


def test_unsupported_values_raise_soup_error(tmp_path: Path) -> None:
    with pytest.raises(SoupError, match="not: `n`"):
        storage.save_state_dict({"w": torch.ones(1), "n": 3}, tmp_path / "a.safetensors")  # type: ignore[dict-item]
    with pytest.raises(SoupError, match=r"cannot store dtype torch.complex128 \(tensor `c`\)"):
        storage.save_state_dict({"c": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "a.safetensors")
    with pytest.raises(SoupError, match="sparse|to_dense"):
        storage.save_state_dict({"s": torch.eye(3).to_sparse()}, tmp_path / "a.safetensors")
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------------------------------ laziness


def _big_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    # 8 tensors of 2 MiB: 16 MiB in all
    state = {f"layer{i}.weight": torch.full((512, 1024), float(i)) for i in range(8)}
    return storage.save_state_dict(state, tmp_path / "big.safetensors"), state


def test_open_and_meta_read_no_tensor_data_and_access_reads_only_that_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, state = _big_file(tmp_path)
    reads: list[int] = []
    real = _format.readinto_exact
    monkeypatch.setattr(_format, "readinto_exact", lambda f, view, p: (reads.append(len(view)), real(f, view, p)))
    with storage.open_state_dict(path) as lazy:
        meta = lazy.meta()
        assert reads == []
        assert all(t.device.type == "meta" for t in meta.values())
        assert {k: (t.shape, t.dtype) for k, t in meta.items()} == {k: (v.shape, v.dtype) for k, v in state.items()}
        assert torch.equal(lazy["layer3.weight"], state["layer3.weight"])
        assert reads == [512 * 1024 * 4]


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_measured_bytes_read_match_the_accessed_tensor(tmp_path: Path) -> None:
    path, state = _big_file(tmp_path)
    size = path.stat().st_size
    before = _bytes_read()
    lazy = storage.open_state_dict(path)
    lazy.meta()
    opened = _bytes_read() - before
    lazy["layer5.weight"]
    accessed = _bytes_read() - before - opened
    lazy.close()
    assert opened < 64 * 1024, opened  # the header only
    tensor = 512 * 1024 * 4
    assert tensor <= accessed < tensor + 64 * 1024, (accessed, size)


def test_closed_mapping_refuses_reads(tmp_path: Path) -> None:
    path = storage.save_state_dict({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    lazy = storage.open_state_dict(path)
    lazy.close()
    with pytest.raises(SoupError, match="was closed"):
        lazy["w"]
    with pytest.raises(KeyError):
        lazy["missing"]
    assert lazy.get("missing") is None


def test_open_file_keeps_reading_the_version_it_opened_after_an_atomic_rewrite(tmp_path: Path) -> None:
    path = storage.save_state_dict({"w": torch.zeros(1000)}, tmp_path / "w.safetensors")
    with storage.open_state_dict(path) as lazy:
        storage.save_state_dict({"other": torch.ones(10), "w": torch.ones(1000)}, path)  # replaced on disk
        assert torch.equal(lazy["w"], torch.zeros(1000))
    assert torch.equal(storage.load_state_dict(path)["w"], torch.ones(1000))


# ------------------------------------------------------------------------------------------------------- sharded


def test_sharded_round_trip_and_index_content(tmp_path: Path) -> None:
    state = _mixed_state() | {"big": torch.randn(100, 10)}  # 4000 bytes: larger than a shard
    out = storage.save_state_dict(state, tmp_path / "sharded", shard_size=200, recipe={"method": "ties"})
    names = _files(out)
    shards = [n for n in names if n != "model.safetensors.index.json"]
    n = len(shards)
    assert n > 3 and "model.safetensors.index.json" in names
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        part = safetensors.torch.load_file(out / shard)  # every shard is a valid file on its own
        assert all(index["weight_map"][k] == shard for k in part)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 200 or len(part) == 1
    # the folder, the index path, and the eager loader all read it back bit-exactly, in the original order
    for where in (out, out / "model.safetensors.index.json"):
        with storage.open_state_dict(where) as lazy:
            _assert_same(dict(lazy.items()), state)
            assert lazy.recipe == {"method": "ties"} == storage.read_recipe(where)
    _assert_same(storage.load_state_dict(out), state)


def test_parse_size_strings_drive_sharding(tmp_path: Path) -> None:
    assert storage.parse_size("2GB") == 2 * 10**9
    assert storage.parse_size("500MB") == 500 * 10**6
    assert storage.parse_size("1.5 GiB") == 3 * 2**29
    assert storage.parse_size(" 64kb ") == 64_000
    assert storage.parse_size("512") == 512
    for bad in ("", "GB", "-1GB", "0", "1.5XB", True, 0, 2.5):
        with pytest.raises(SoupError, match="`shard_size`"):
            storage.parse_size(bad)  # type: ignore[arg-type]
    state = {f"w{i}": torch.zeros(250) for i in range(4)}  # 1000 bytes each
    out = storage.save_state_dict(state, tmp_path / "s", shard_size="2KB")
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 4
    assert len(_files(out)) == 3  # two shards of two tensors + the index


def test_folder_with_a_single_model_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    state = {"w": torch.randn(2, 2)}
    storage.save_state_dict(state, folder / "model.safetensors")
    _assert_same(storage.load_state_dict(folder), state)


def test_existing_sharded_output_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "s"
    storage.save_state_dict({f"w{i}": torch.zeros(100) for i in range(6)}, out, shard_size=400)
    assert len(_files(out)) == 7
    state = {"w": torch.ones(10)}
    storage.save_state_dict(state, out, shard_size=400)
    assert _files(out) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    _assert_same(storage.load_state_dict(out), state)
    assert _files(tmp_path) == ["s"]  # no temporary or set-aside folder left


def test_files_and_sharded_folders_replace_each_other(tmp_path: Path) -> None:
    out = tmp_path / "out"
    storage.save_state_dict({"w": torch.zeros(3)}, out)  # a file named "out"
    storage.save_state_dict({"w": torch.ones(3)}, out, shard_size=100)
    assert out.is_dir() and torch.equal(storage.load_state_dict(out)["w"], torch.ones(3))
    storage.save_state_dict({"w": torch.full((3,), 2.0)}, out)
    assert out.is_file() and torch.equal(safetensors.torch.load_file(out)["w"], torch.full((3,), 2.0))
    assert _files(tmp_path) == ["out"]


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc/self/fd")
def test_sharded_writer_keeps_only_the_shard_being_filled_open(tmp_path: Path) -> None:
    specs = {f"w{i}": (torch.float32, (16,)) for i in range(40)}  # 64 bytes each: 40 shards of 64 bytes
    baseline = len(os.listdir("/proc/self/fd"))
    peak = 0
    with storage.SafetensorsWriter(tmp_path / "s", specs, shard_size=64) as writer:
        for key in specs:
            writer.write(key, torch.zeros(16))
            peak = max(peak, len(os.listdir("/proc/self/fd")) - baseline)
    assert peak <= 1
    assert len(_files(tmp_path / "s")) == 41


def test_a_folder_with_other_files_is_never_replaced(tmp_path: Path) -> None:
    precious = tmp_path / "my_project"
    precious.mkdir()
    (precious / "train.py").write_text("print('hi')")
    with pytest.raises(SoupError, match="refusing to replace"):
        storage.save_state_dict({"w": torch.ones(1)}, precious, shard_size="1MB")
    with pytest.raises(SoupError, match="refusing to replace"):
        storage.save_state_dict({"w": torch.ones(1)}, precious)
    assert _files(precious) == ["train.py"] and _files(tmp_path) == ["my_project"]


# ------------------------------------------------------------------------------------------------------- ckpt


def _lightning_like_ckpt(path: Path, state: dict[str, torch.Tensor], **kwargs: object) -> Path:
    torch.save({"epoch": 1, "global_step": 10, "state_dict": state, "optimizer_states": [], **kwargs}, path)
    return path


def test_ckpt_state_dict_is_read_lazily_with_prefix_stripping(tmp_path: Path) -> None:
    inner = {"encoder.weight": torch.randn(4, 3), "encoder.bias": torch.randn(4), "steps": torch.tensor(5)}
    state = {f"model.{k}": v for k, v in inner.items()} | {"loss_fn.pos_weight": torch.ones(1)}
    path = _lightning_like_ckpt(tmp_path / "last.ckpt", state, hyper_parameters={"lr": 0.1})
    with storage.open_state_dict(path) as lazy:
        assert lazy.metadata == {} and lazy.recipe is None
        assert {k: v.shape for k, v in lazy.meta().items()} == {k: v.shape for k, v in state.items()}
        _assert_same(dict(lazy.items()), state)
    with storage.open_state_dict(path, prefix="model") as lazy:  # same as prefix="model."
        _assert_same(dict(lazy.items()), inner)
    assert storage.read_recipe(path) is None
    # the result converts to safetensors, streamed
    with storage.open_state_dict(path, prefix="model.") as lazy:
        out = storage.save_state_dict(lazy, tmp_path / "converted.safetensors")
    reference = safetensors.torch.load_file(out)
    _assert_same({k: reference[k] for k in inner}, inner)
    assert set(reference) == set(inner)


def test_plain_and_legacy_torch_files(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 3), "b": torch.zeros(3, dtype=torch.float16)}
    torch.save(state, tmp_path / "weights.pt")
    _assert_same(storage.load_state_dict(tmp_path / "weights.pt"), state)
    torch.save({"state_dict": state}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    _assert_same(storage.load_state_dict(tmp_path / "legacy.ckpt"), state)


def test_ckpt_without_state_dict_lists_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "opt.ckpt"
    torch.save({"epoch": 3, "optimizer_states": [{}], "loops": {}}, path)
    with pytest.raises(SoupError, match=r"opt\.ckpt has no `state_dict`.*`epoch`, `optimizer_states`, `loops`"):
        storage.open_state_dict(path)


def test_ckpt_that_is_not_a_torch_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights")
    with pytest.raises(SoupError, match=r"notes\.ckpt is not a PyTorch checkpoint"):
        storage.open_state_dict(text)
    real = _lightning_like_ckpt(tmp_path / "real.ckpt", {"w": torch.randn(100, 100)})
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    with pytest.raises(SoupError, match=r"cut\.ckpt"):
        storage.open_state_dict(cut)


def test_ckpt_with_objects_weights_only_refuses(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hparams": _Opaque()}, path)
    message = r"(?s)pickled\.ckpt holds Python objects.*test_storage\._Opaque.*add_safe_globals"
    with pytest.raises(SoupError, match=message):
        storage.open_state_dict(path)


class _Opaque:
    pass


# ------------------------------------------------------------------------------------------------------- prefix


def test_prefix_that_matches_nothing_lists_keys(tmp_path: Path) -> None:
    path = storage.save_state_dict(
        {"model.a.weight": torch.ones(1), "model.b.weight": torch.ones(1), "ema.a": torch.ones(1)},
        tmp_path / "w.safetensors",
    )
    with pytest.raises(SoupError, match=r"starts with `net\.`.*`model\.a\.weight`.*top-level names: `model`, `ema`"):
        storage.open_state_dict(path, prefix="net")
    with storage.open_state_dict(path, prefix="model.a") as lazy:
        assert list(lazy) == ["weight"]  # dot-bounded: "model.a" does not swallow "model.ab..."


# ------------------------------------------------------------------------------------------------------- atomicity


def _boom_after(n: int):
    """A replacement for ``_format.write_at`` that fails on its ``n``-th call (0: the header)."""
    calls = []
    real = _format.write_at

    def write_at(fd, view, offset):
        if len(calls) == n:
            raise RuntimeError("simulated crash mid-write")
        calls.append(1)
        real(fd, view, offset)

    return write_at


@pytest.mark.parametrize("shard_size", [None, 64], ids=["file", "sharded"])
@pytest.mark.parametrize("fail_at", [0, 2])
def test_failure_mid_write_leaves_previous_output_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard_size: int | None, fail_at: int
) -> None:
    out = tmp_path / ("sharded" if shard_size else "w.safetensors")
    old = {"w": torch.zeros(8)}
    storage.save_state_dict(old, out, shard_size=shard_size)
    before = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
    monkeypatch.setattr(_format, "write_at", _boom_after(fail_at))
    with pytest.raises(RuntimeError, match="simulated crash"):
        storage.save_state_dict({f"w{i}": torch.ones(8) for i in range(5)}, out, shard_size=shard_size)
    after = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
    assert after == before
    assert _files(tmp_path) == [out.name]


def test_disk_full_is_a_soup_error_naming_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "soup.safetensors"
    storage.save_state_dict({"w": torch.zeros(4)}, out)
    previous = out.read_bytes()

    def full(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_format, "write_at", full)
    with pytest.raises(SoupError, match=r"disk is full.*soup\.safetensors") as info:
        storage.save_state_dict({"w": torch.ones(4)}, out)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(SoupError, match=r"disk is full.*blend\.json"):
        with storage.atomic_write(tmp_path / "blend.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert out.read_bytes() == previous and _files(tmp_path) == ["soup.safetensors"]


def test_atomic_write_commits_on_success_and_rolls_back_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "blend.png"
    with storage.atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".blend.png.tmp-") and tmp.suffix == ".png"
        assert not target.exists()
        tmp.write_bytes(b"v1")
    assert target.read_bytes() == b"v1"
    with pytest.raises(KeyError):
        with storage.atomic_write(target) as tmp:
            tmp.write_bytes(b"half of v2")
            raise KeyError("boom")
    assert target.read_bytes() == b"v1" and _files(target.parent) == ["blend.png"]
    with pytest.raises(SoupError, match="Nothing was written"):
        with storage.atomic_write(tmp_path / "never.txt"):
            pass
    assert not (tmp_path / "never.txt").exists()


def test_write_json_is_atomic_and_readable(tmp_path: Path) -> None:
    obj = {"ratio": [0.0, 0.5], "path": tmp_path, "score": torch.tensor(0.25), "name": "sûp"}
    path = storage.write_json(obj, tmp_path / "blend.json")
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "ratio": [0.0, 0.5], "path": str(tmp_path), "score": 0.25, "name": "sûp"
    }
    assert path.read_text(encoding="utf-8").endswith("\n")
    with pytest.raises(SoupError, match="JSON-serialisable"):
        storage.write_json({"f": object()}, tmp_path / "bad.json")
    assert _files(tmp_path) == ["blend.json"]


# ------------------------------------------------------------------------------------------------- streaming writer


def test_streaming_writer_in_any_order_equals_save_state_dict(tmp_path: Path) -> None:
    state = _mixed_state()
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    recipe = {"method": "uniform_soup", "inputs": ["a.ckpt", "b.safetensors"], "weights": [1.0, 2.0]}
    saved = storage.save_state_dict(state, tmp_path / "saved.safetensors", recipe=recipe, metadata={"run": "7"})
    with storage.SafetensorsWriter(tmp_path / "streamed.safetensors", specs, recipe=recipe, metadata={"run": "7"}) as w:
        assert not (tmp_path / "streamed.safetensors").exists()  # nothing under the final name until commit
        for key in reversed(list(state)):
            w.write(key, state[key])
    streamed = tmp_path / "streamed.safetensors"
    assert streamed.read_bytes() == saved.read_bytes()
    reference = safetensors.torch.load_file(streamed)
    _assert_same({k: reference[k] for k in state}, state)


def test_streaming_writer_sharded_equals_save_state_dict(tmp_path: Path) -> None:
    state = _mixed_state()
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    saved = storage.save_state_dict(state, tmp_path / "saved", shard_size="100B")
    with storage.SafetensorsWriter(tmp_path / "streamed", specs, shard_size=100) as w:
        for key in state:
            w.write(key, state[key])
    assert _files(saved) == _files(w.path)
    for name in _files(saved):
        assert (saved / name).read_bytes() == (w.path / name).read_bytes(), name


def test_streaming_writer_rejects_mistakes_and_commits_nothing_unfinished(tmp_path: Path) -> None:
    specs = {"w": (torch.float32, (2, 3)), "b": (torch.float16, (3,))}
    out = tmp_path / "out.safetensors"
    declared = r"`w` was declared as torch.float32 \[2, 3\] but the tensor is torch.float32 \[3, 2\]"
    with pytest.raises(SoupError, match=declared):
        with storage.SafetensorsWriter(out, specs) as w:
            w.write("w", torch.zeros(3, 2))
    with pytest.raises(SoupError, match="float16"):
        with storage.SafetensorsWriter(out, specs) as w:
            w.write("b", torch.zeros(3))
    with pytest.raises(SoupError, match="`x` is not among"):
        with storage.SafetensorsWriter(out, specs) as w:
            w.write("x", torch.zeros(1))
    with pytest.raises(SoupError, match="already written"):
        with storage.SafetensorsWriter(out, specs) as w:
            w.write("w", torch.zeros(2, 3))
            w.write("w", torch.zeros(2, 3))
    with pytest.raises(SoupError, match=r"1 declared tensors were never written \(`b`\)"):
        with storage.SafetensorsWriter(out, specs) as w:
            w.write("w", torch.zeros(2, 3))
    with pytest.warns(ResourceWarning, match="without close"):
        w = storage.SafetensorsWriter(out, specs)
        w.write("w", torch.zeros(2, 3))
        del w
    assert _files(tmp_path) == []


def test_writer_specs_and_metadata_are_validated(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(SoupError, match=r"metadata maps strings to strings.*`epoch`=3 \(int\)"):
        storage.SafetensorsWriter(out, {}, metadata={"epoch": 3})  # type: ignore[dict-item]
    with pytest.raises(SoupError, match="either as `recipe` or as `metadata"):
        storage.SafetensorsWriter(out, {}, metadata={"lightning_soup": "{}"}, recipe={})
    with pytest.raises(SoupError, match="`recipe` must be JSON-serialisable"):
        storage.SafetensorsWriter(out, {}, recipe={"model": torch.nn.Linear(1, 1)})
    with pytest.raises(SoupError, match="__metadata__"):
        storage.SafetensorsWriter(out, {"__metadata__": (torch.float32, (1,))})
    with pytest.raises(SoupError, match=r"spec of `w`"):
        storage.SafetensorsWriter(out, {"w": (torch.float32, (-1,))})
    assert _files(tmp_path) == []


def test_writer_writes_accelerator_style_and_sliced_inputs(tmp_path: Path) -> None:
    big = torch.randn(10, 10)
    specs = {"col": (torch.float32, (10,)), "block": (torch.float32, (3, 3))}
    with storage.SafetensorsWriter(tmp_path / "v.safetensors", specs) as w:
        w.write("col", big[:, 4])
        w.write("block", big[2:5, 5:8])
    loaded = storage.load_state_dict(tmp_path / "v.safetensors")
    assert torch.equal(loaded["col"], big[:, 4]) and torch.equal(loaded["block"], big[2:5, 5:8])


# ------------------------------------------------------------------------------------------------------- recipes


def test_recipe_round_trip(tmp_path: Path) -> None:
    recipe = {
        "method": "greedy_soup",
        "ingredients": [
            {"index": 0, "score": 0.91, "accepted": True, "soup_score": 0.91, "skipped": False},
            {"index": 1, "score": float("nan"), "accepted": False, "soup_score": None, "skipped": True},
        ],
        "monitor": "val/acc",
        "note": "ünïcode ✓",
    }
    path = storage.save_state_dict({"w": torch.ones(1)}, tmp_path / "soup.safetensors", recipe=recipe)
    got = storage.read_recipe(path)
    assert got["ingredients"][1]["score"] != got["ingredients"][1]["score"]  # NaN survives
    got["ingredients"][1]["score"] = recipe["ingredients"][1]["score"] = None
    assert got == recipe
    with safe_open_metadata(path) as meta:
        assert json.loads(meta["lightning_soup"])["method"] == "greedy_soup" and meta["format"] == "pt"
    assert storage.read_recipe(storage.save_state_dict({"w": torch.ones(1)}, tmp_path / "plain.safetensors")) is None


class safe_open_metadata:  # noqa: N801 - reads metadata with the reference implementation
    def __init__(self, path: Path) -> None:
        self.handle = safetensors.safe_open(str(path), framework="pt")

    def __enter__(self) -> dict[str, str]:
        return self.handle.__enter__().metadata()

    def __exit__(self, *exc: object) -> None:
        self.handle.__exit__(*exc)


# ------------------------------------------------------------------------------------------------------- bad files


def _valid(tmp_path: Path) -> Path:
    return storage.save_state_dict({"a": torch.randn(16), "b": torch.randn(16)}, tmp_path / "ok.safetensors")


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_missing_path_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(SoupError, match=r"nope\.safetensors does not exist"):
        storage.open_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(SoupError, match=r"w\.npz has an unknown extension '\.npz'.*\.safetensors"):
        storage.open_state_dict(tmp_path / "w.npz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SoupError, match=r"empty_dir is a folder but not a checkpoint.*model\.safetensors\.index\.json"):
        storage.open_state_dict(tmp_path / "empty_dir")
    (tmp_path / "epoch=3.ckpt").mkdir()
    with pytest.raises(SoupError, match=r"epoch=3\.ckpt is a distributed .*consolidate_checkpoint"):
        storage.open_state_dict(tmp_path / "epoch=3.ckpt")


@pytest.mark.parametrize("cut", [1, 40, 70])
def test_truncated_safetensors_is_detected_on_open(tmp_path: Path, cut: int) -> None:
    path = _valid(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - cut])
    with pytest.raises(SoupError, match=r"cut\.safetensors is not a readable safetensors file: it is truncated"):
        storage.open_state_dict(bad)


def test_corrupt_headers(tmp_path: Path) -> None:
    data = _valid(tmp_path).read_bytes()
    n = _header_len(tmp_path / "ok.safetensors")
    cases = {
        "tiny": (b"\x01\x02", "only 2 bytes long"),
        "huge_len": (struct.pack("<Q", 2**40) + data[8:], "not a safetensors header length"),
        "header_past_end": (struct.pack("<Q", len(data)) + data[8:], "truncated: the header alone"),
        "bad_json": (data[:8] + b"{" * n + data[8 + n :], "not valid JSON"),
        "not_object": (data[:8] + b"[1]".ljust(n) + data[8 + n :], "not a JSON object"),
        "wrong_span": (data.replace(b'"shape":[16]', b'"shape":[15]', 1), "spans 64 bytes"),
        "bad_dtype": (data.replace(b'"F32"', b'"Q99"', 1), "malformed or has an unknown dtype"),
        "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "git lfs pull"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(SoupError, match=message) as info:
            storage.open_state_dict(bad)
        assert bad.name in str(info.value), name


def test_overlapping_tensors_are_corrupt(tmp_path: Path) -> None:
    data = _valid(tmp_path).read_bytes()
    n = _header_len(tmp_path / "ok.safetensors")
    header = json.loads(data[8 : 8 + n])
    header["b"]["data_offsets"] = [32, 96]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    bad = tmp_path / "overlap.safetensors"
    bad.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(SoupError, match="overlap"):
        storage.open_state_dict(bad)


def _sharded(tmp_path: Path) -> Path:
    state = {f"w{i}": torch.full((4,), float(i)) for i in range(4)}
    return storage.save_state_dict(state, tmp_path / "s", shard_size=16)


def test_sharded_index_referencing_missing_shards(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    (out / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(SoupError, match=r"missing from .*`model-00003-of-00004\.safetensors`.*fetch every shard"):
        storage.open_state_dict(out)


def test_sharded_duplicate_keys_and_mismatched_index(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    # shard 2 now also holds w0 (as if taken from another checkpoint)
    storage.save_state_dict({"w0": torch.zeros(4), "w1": torch.ones(4)}, out / "model-00002-of-00004.safetensors")
    message = r"more than one shard: `w0` \(model-00001-of-00004\.safetensors and model-00002"
    with pytest.raises(SoupError, match=message):
        storage.open_state_dict(out)
    storage.save_state_dict({"w1": torch.ones(4)}, out / "model-00002-of-00004.safetensors")
    index["weight_map"]["w1"] = "model-00004-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(SoupError, match=r"does not match its shards: `w1`"):
        storage.open_state_dict(out)
    index_path.write_text("{not json")
    with pytest.raises(SoupError, match="not valid JSON"):
        storage.open_state_dict(out)
    index_path.write_text('{"metadata": {}}')
    with pytest.raises(SoupError, match="weight_map"):
        storage.open_state_dict(index_path)


# ------------------------------------------------------------------------------------------------- housekeeping


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_temp_files_removes_only_dead_writers_temps(tmp_path: Path) -> None:
    dead, me, alive = _dead_pid(), os.getpid(), os.getppid()
    stale = [
        tmp_path / _atomic.temp_name("soup.safetensors", pid=dead, suffix=".safetensors"),
        tmp_path / _atomic.temp_name("blend.png", pid=me, suffix=".png"),  # our pid, not in flight: a past incarnation
        tmp_path / _atomic.temp_name("sharded", pid=dead),
    ]
    kept = [
        tmp_path / _atomic.temp_name("soup.safetensors", pid=alive, suffix=".safetensors"),  # a live writer's
        tmp_path / "soup.safetensors",
        tmp_path / ".hidden.tmp-notes",
        tmp_path / f"x.tmp-{dead}-0123abcd0123abcd",  # not hidden: not ours
        tmp_path / f".soup.safetensors.tmp-{dead}-0123abcd0123abcd.safetensors",  # wrong checksum: not ours
    ]
    for p in stale[:2] + kept:
        p.write_bytes(b"x")
    stale[2].mkdir()
    (stale[2] / "model-00001-of-00001.safetensors").write_bytes(b"x")
    with storage.atomic_write(tmp_path / "live.json") as in_flight:
        in_flight.write_text("{}")
        removed = storage.remove_stale_temp_files(tmp_path)
        assert in_flight.exists()
    assert sorted(removed) == sorted(stale)
    assert _files(tmp_path) == sorted([p.name for p in kept] + ["live.json"])
    assert storage.remove_stale_temp_files(tmp_path / "missing") == []


def test_a_folder_set_aside_by_a_killed_writer_is_put_back(tmp_path: Path) -> None:
    dead = _dead_pid()
    aside = tmp_path / _atomic.temp_name("soup", "old", pid=dead)  # the previous output, moved aside mid-replacement
    storage.save_state_dict({"w": torch.ones(2)}, aside, shard_size=100)
    new = tmp_path / _atomic.temp_name("soup", pid=dead)  # the new output, never renamed into place
    storage.save_state_dict({"w": torch.zeros(2)}, new, shard_size=100)
    assert storage.remove_stale_temp_files(tmp_path) == [new]
    assert _files(tmp_path) == ["soup"] and torch.equal(storage.load_state_dict(tmp_path / "soup")["w"], torch.ones(2))
    # when the new version did arrive, the old one is simply deleted
    stale_old = tmp_path / _atomic.temp_name("soup", "old", pid=dead)
    storage.save_state_dict({"w": torch.ones(2)}, stale_old, shard_size=100)
    assert storage.remove_stale_temp_files(tmp_path) == [stale_old]
    assert _files(tmp_path) == ["soup"]


def test_sha256_of_files_and_sharded_folders(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    assert storage.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    out = _sharded(tmp_path)
    manifest = "".join(
        f"{hashlib.sha256((out / name).read_bytes()).hexdigest()}  {name}\n" for name in _files(out)
    )
    digest = storage.sha256_file(out)
    assert digest == hashlib.sha256(manifest.encode()).hexdigest()
    (out / "notes.txt").write_text("not part of the checkpoint")
    assert storage.sha256_file(out) == digest
    storage.save_state_dict({"w1": torch.full((4,), 9.0)}, out / "model-00002-of-00004.safetensors")
    assert storage.sha256_file(out) != digest
    with pytest.raises(SoupError, match="does not exist"):
        storage.sha256_file(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------------------------ gpu


@pytest.mark.gpu
def test_accelerator_tensors_are_written_and_loaded_onto_the_device(tmp_path: Path) -> None:
    base = torch.randn(64, 32, device="cuda")
    state = {"w": base, "w_t": base.T, "half": base[:, :8].to(torch.bfloat16), "steps": torch.tensor(3, device="cuda")}
    path = storage.save_state_dict(state, tmp_path / "gpu.safetensors")
    loaded = storage.load_state_dict(path, device="cuda")
    assert all(t.device.type == "cuda" for t in loaded.values())
    _assert_same({k: v.cpu() for k, v in loaded.items()}, {k: v.cpu() for k, v in state.items()})
