"""Untrusted files: what storage and the CLI read, write and delete, and what they refuse (see SECURITY.md).

Every file, index and checkpoint here is treated as crafted by someone else. Each test is written against what a
user would notice: a file outside the folder read or deleted, an input destroyed, a hang, a leak, a traceback.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lightning_soup import SoupError, storage
from lightning_soup._storage import _atomic

LIB = Path(__file__).resolve().parents[1] / "lightning_soup"


def _sharded(folder: Path, weight_map: dict[str, str], shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _call_with_timeout(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """Run ``fn`` on a daemon thread; fail (instead of hanging the suite) when it does not return in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still blocked after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------------------------------ path confinement


@pytest.mark.parametrize(
    "name",
    ["../secret/x.safetensors", "ABSOLUTE", "sub/../../secret/x.safetensors", "..\\secret\\x.safetensors"],
)
def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path: Path, name: str) -> None:
    secret = tmp_path / "secret" / "x.safetensors"
    secret.parent.mkdir()
    save_file({"w": torch.full((2,), 7.0)}, secret)
    if name == "ABSOLUTE":
        name = str(secret)
    model = _sharded(tmp_path / "model", {"w": name}, {})
    for read in (storage.open_state_dict, storage.load_state_dict, storage.read_recipe, storage.sha256_file):
        with pytest.raises(SoupError, match="points outside that folder") as info:
            read(model)
        assert "model.safetensors.index.json" in str(info.value)


def test_no_byte_of_a_foreign_file_appears_in_an_error(tmp_path: Path) -> None:
    """An index pointing at /etc/passwd used to print its first 8 bytes (as a header length) in the error."""
    foreign = tmp_path / "passwd"
    foreign.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    (n,) = struct.unpack("<Q", foreign.read_bytes()[:8])
    model = _sharded(tmp_path / "model", {"w": str(foreign)}, {})
    renamed = tmp_path / "passwd.safetensors"  # the same bytes given directly, as a user's own bad file
    renamed.write_bytes(foreign.read_bytes())
    for path in (model, renamed):
        with pytest.raises(SoupError) as info:
            storage.open_state_dict(path)
        message = str(info.value)
        assert str(n) not in message and "root" not in message.replace(str(tmp_path), ""), message


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hugging_face_cache_symlinks_keep_working(tmp_path: Path, layout: str) -> None:
    """snapshots/<rev>/<name> -> ../../blobs/<sha>: the names are inside the folder, the targets are not."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    if layout == "single":
        save_file(state, blobs / "sha-model")
        (snapshot / "model.safetensors").symlink_to("../../blobs/sha-model")
    else:
        save_file({"a": state["a"]}, blobs / "sha-1")
        save_file({"b": state["b"]}, blobs / "sha-2")
        index = {"metadata": {}, "weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
        (blobs / "sha-index").write_text(json.dumps(index))
        for name, blob in [("model-1.safetensors", "sha-1"), ("model-2.safetensors", "sha-2")]:
            (snapshot / name).symlink_to(f"../../blobs/{blob}")
        (snapshot / "model.safetensors.index.json").symlink_to("../../blobs/sha-index")
    loaded = storage.load_state_dict(snapshot)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert len(storage.sha256_file(snapshot)) == 64


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("x.safetensors", True),
        ("sub/x.safetensors", True),
        ("..", False),
        ("../x", False),
        ("a/../../x", False),
        ("/etc/passwd", False),
        ("C:x", False),
        ("C:\\x", False),
        ("a\\..\\..\\x", False),
        ("", False),
        ("x\x00", False),
        (7, False),
    ],
)
def test_confined_keeps_recorded_names_inside_their_folder(tmp_path: Path, name: Any, ok: bool) -> None:
    if ok:
        assert storage.confined(tmp_path, name) == tmp_path / name
    else:
        with pytest.raises(SoupError, match="outside that folder"):
            storage.confined(tmp_path, name, what="a snapshot name")


# ------------------------------------------------------------------------------------ non-regular files


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("where", ["safetensors", "ckpt", "index", "shard"])
def test_a_fifo_is_refused_at_once_never_read(tmp_path: Path, where: str) -> None:
    if where == "safetensors":
        path = _fifo(tmp_path / "model.safetensors")
    elif where == "ckpt":
        path = _fifo(tmp_path / "last.ckpt")
    elif where == "index":
        path = _fifo(tmp_path / "model.safetensors.index.json")
    else:
        path = _sharded(tmp_path / "m", {"w": "model-1.safetensors"}, {})
        _fifo(path / "model-1.safetensors")
    for read in (storage.open_state_dict, storage.sha256_file):
        with pytest.raises(SoupError, match="FIFO"):
            _call_with_timeout(lambda read=read: read(path))


# ----------------------------------------------------------------------------------------- crafted headers


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"[" * 50_000, b"", "not valid JSON"),  # RecursionError in json
        (b'{"w":{"dtype":"F32","shape":[9223372036854775808,0],"data_offsets":[0,0]}}', b"", "malformed"),
        (b'{"w":{"dtype":"F32","shape":[4611686018427387904,4,0],"data_offsets":[0,0]}}', b"", "malformed"),
        (
            (
                b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
            ),
            b"\0" * 8,
            "lists `w` twice",
        ),
    ],
    ids=["deep-nesting", "dim-2**63", "dims-overflow-int64", "duplicate-key"],
)
def test_crafted_safetensors_headers_are_soup_errors(tmp_path: Path, header: bytes, data: bytes, message: str) -> None:
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SoupError, match=message):
        storage.load_state_dict(path)


@pytest.mark.parametrize(
    "index",
    ["[" * 50_000, '{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}'],
    ids=["deep-nesting", "duplicate-key"],
)
def test_crafted_shard_indexes_are_soup_errors(tmp_path: Path, index: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(1)}, folder / "a.safetensors")
    save_file({"w": torch.zeros(1)}, folder / "b.safetensors")
    (folder / "model.safetensors.index.json").write_text(index)
    for read in (storage.open_state_dict, storage.sha256_file):
        with pytest.raises(SoupError, match="not valid JSON|twice"):
            read(folder)


def test_a_ckpt_tensor_claiming_more_than_its_storage_is_refused_before_reading(tmp_path: Path) -> None:
    """A few bytes on disk must not make a reader allocate 4.4 TB (2**40 float32 through `expand`)."""
    path = tmp_path / "bomb.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1).expand(2**40), "ok": torch.ones(3)}}, path)
    with pytest.raises(SoupError, match=r"claims .*1099511627776 elements.* holds only 4 bytes"):
        storage.open_state_dict(path)


def test_small_expanded_buffers_of_real_models_still_load(tmp_path: Path) -> None:
    """Hugging Face models register `position_ids = arange(n).expand(1, -1)`; small overlapping views are fine."""
    path = tmp_path / "hf.ckpt"
    state = {"position_ids": torch.arange(16).expand(1, -1), "tiled": torch.arange(4.0).expand(3, -1)}
    torch.save({"state_dict": state}, path)
    loaded = storage.load_state_dict(path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickle_is_never_executed(tmp_path: Path) -> None:
    """A .ckpt whose pickle would run code is refused by `weights_only=True`; the code never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Evil()}, path)
    with pytest.raises(SoupError, match="weights_only"):
        storage.open_state_dict(path)
    assert not marker.exists()


def test_every_torch_load_in_the_package_uses_weights_only() -> None:
    """Every call of torch.load (and torch.serialization.load) passes `weights_only=True`; nothing unpickles."""
    calls = []
    for source in LIB.rglob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = ast.unparse(node.func.value)
                if owner in ("torch", "torch.serialization"):
                    safe = any(
                        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in node.keywords
                    )
                    calls.append((source.name, node.lineno, safe))
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch") and node.names:
                assert not {a.name for a in node.names} & {"load", "loads", "Unpickler"}, (source, node.lineno)
    assert calls, "no torch.load call found: the check looks in the wrong place"
    assert all(safe for *_, safe in calls), calls
    assert not [p for p in LIB.rglob("*.py") if re.search(r"\bpickle\.(loads?|Unpickler)\(", p.read_text())]


# ------------------------------------------------------------------------------------------ atomic outputs


def test_a_folder_of_unrelated_checkpoints_is_never_replaced(tmp_path: Path) -> None:
    """Only safetensors files and an index, but not written by us: a user's checkpoints, never deleted."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "run1.safetensors")
    save_file({"w": torch.zeros(2)}, folder / "run2.safetensors")
    downloaded = _sharded(tmp_path / "hub", {"w": "model-1.safetensors"}, {"model-1.safetensors": {"w": torch.ones(1)}})
    for target in (folder, downloaded):
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        for shard_size in (None, "1MB"):
            with pytest.raises(SoupError, match="refusing to replace it"):
                storage.save_state_dict({"w": torch.ones(1)}, target, shard_size=shard_size)
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_a_previous_output_folder_is_replaced_even_with_model_folder_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    storage.save_state_dict({"w": torch.zeros(100)}, out, shard_size=100)
    (out / "config.json").write_text("{}")  # a Hugging Face model folder around our weights
    storage.save_state_dict({"w": torch.ones(3)}, out, shard_size=100)
    assert torch.equal(storage.load_state_dict(out)["w"], torch.ones(3))
    (out / "notes.txt").write_text("mine")  # ... but a file we did not write keeps it
    with pytest.raises(SoupError, match=r"did not write \(notes.txt\)"):
        storage.save_state_dict({"w": torch.ones(3)}, out, shard_size=100)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_user_folder_named_like_a_temporary_is_never_deleted(tmp_path: Path) -> None:
    user = tmp_path / ".data.tmp-999999-abcdef12"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    look_alike = tmp_path / ".soup.safetensors.tmp-999999-0123abcd0123abcd.safetensors"
    look_alike.write_text("keep me too")
    ours = tmp_path / _atomic.temp_name("soup.safetensors", pid=999_999_999, suffix=".safetensors")
    ours.write_text("half written")
    assert storage.remove_stale_temp_files(tmp_path) == [ours]
    assert (user / "precious.txt").read_text() == "keep me" and look_alike.exists()


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-mkdir-fallback"])
@pytest.mark.parametrize("shard_size", [None, 100])
def test_without_overwrite_an_output_created_meanwhile_is_never_replaced(
    tmp_path: Path, shard_size: Any, renameat2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers racing for one name without overwrite: the second to finish fails, the first's file stays.
    The same with the portable fallback (hard link for a file, mkdir reservation for a folder)."""
    if not renameat2:
        monkeypatch.setattr(_atomic, "_renameat2", lambda: None)
    out = tmp_path / ("out.safetensors" if shard_size is None else "out")
    specs = {"w": (torch.float32, (3,))}
    writer = storage.SafetensorsWriter(out, specs, overwrite=False, shard_size=shard_size)
    writer.write("w", torch.zeros(3))
    storage.save_state_dict({"w": torch.ones(3)}, out, overwrite=False, shard_size=shard_size)  # the other one
    with pytest.raises(SoupError, match="already exists"):
        writer.close()
    assert torch.equal(storage.load_state_dict(out)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left
    with pytest.raises(SoupError, match="already exists"):
        storage.save_state_dict({"w": torch.ones(3)}, out, overwrite=False)


def test_concurrent_writers_without_overwrite_exactly_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    barrier = threading.Barrier(8)
    results: list[str] = []

    def race(i: int) -> None:
        writer = storage.SafetensorsWriter(out, {"w": (torch.float32, (1,))}, overwrite=False)
        writer.write("w", torch.full((1,), float(i)))
        barrier.wait()
        try:
            writer.close()
            results.append(f"won {i}")
        except SoupError:
            results.append("lost")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r.startswith("won")]
    assert len(results) == 8 and len(winners) == 1, results
    assert storage.load_state_dict(out)["w"].item() == float(winners[0].split()[1])


# --------------------------------------------------------------------------------------------------- the CLI


def _cli(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from lightning_soup.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _pair(folder: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    w = torch.randn(4, 4, generator=g)
    save_file({"w": w, "b": torch.zeros(4)}, a)
    save_file({"w": w + 0.01 * torch.randn(4, 4, generator=g), "b": torch.ones(4)}, b)
    return a, b


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "target", ["shard", "input-file", "input-folder", "symlink-target", "folder-holding-input", "same-file"]
)
def test_cli_never_writes_over_an_input_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    a, _ = _pair(tmp_path)
    sharded = storage.save_state_dict(storage.load_state_dict(a), tmp_path / "sharded", shard_size=40)
    blob = tmp_path / "blobs" / "sha"
    blob.parent.mkdir()
    blob.write_bytes(a.read_bytes())
    (tmp_path / "linked.safetensors").symlink_to(blob)
    inputs = [sharded, tmp_path / "linked.safetensors", a]
    output, extra = {
        "shard": (sharded / "model-00001-of-00002.safetensors", []),
        "input-file": (a, []),
        "input-folder": (sharded, ["--shard-size", "1MB"]),
        "symlink-target": (blob.with_name("sha.safetensors"), []),
        "folder-holding-input": (sharded, ["--shard-size", "1MB"]),  # a previous output of ours, but read now
        "same-file": (tmp_path / "also-a.safetensors", []),  # another name of one file (hard link, bind mount)
    }[target]
    if target == "same-file":
        os.link(a, output)
    if target == "folder-holding-input":
        inputs = [sharded / "model-00001-of-00002.safetensors", a]
    if target == "symlink-target":  # the blob itself, given under a .safetensors name
        blob.rename(output)
        (tmp_path / "linked.safetensors").unlink()
        (tmp_path / "linked.safetensors").symlink_to(output)
    before = _snapshot(tmp_path)
    rc, err = _cli(["average", *inputs, "-o", output, "--force", *extra], capsys)
    assert rc == 1 and "an input is never overwritten, even with --force" in err, err
    assert _snapshot(tmp_path) == before


def test_cli_force_replaces_only_a_previous_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _pair(tmp_path)
    mine = tmp_path / "ckpts"
    mine.mkdir()
    save_file({"w": torch.ones(1)}, mine / "run1.safetensors")
    save_file({"w": torch.ones(1)}, mine / "run2.safetensors")
    before = _snapshot(mine)
    rc, err = _cli(["average", a, b, "-o", mine, "--force", "--shard-size", "1MB"], capsys)
    assert rc == 1 and "not a previous lightning-soup output" in err and "refusing to replace it" in err, err
    assert _snapshot(mine) == before
    out = tmp_path / "out"
    assert _cli(["average", a, b, "-o", out, "--shard-size", "1MB"], capsys)[0] == 0
    assert _cli(["average", a, b, "-o", out, "--shard-size", "40", "--force"], capsys)[0] == 0  # ours: replaced
    assert len(list(out.glob("*.safetensors"))) == 2


def test_cli_keeps_a_user_folder_named_like_a_temporary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _pair(tmp_path)
    user = tmp_path / ".data.tmp-999999-abcdef12"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert _cli(["average", a, b, "-o", tmp_path / "data"], capsys)[0] == 2  # usage: needs .safetensors
    assert _cli(["average", a, b, "-o", tmp_path / "data", "--shard-size", "1MB"], capsys)[0] == 0
    assert (user / "notes.txt").read_text() == "mine"


def test_cli_an_output_that_appears_while_writing_is_not_replaced_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic form of two runs racing for one -o: the other run's file lands while this one writes."""
    a, b = _pair(tmp_path)
    out = tmp_path / "out.safetensors"
    real = storage.SafetensorsWriter.write

    def write_then_race(self: Any, key: str, tensor: torch.Tensor) -> None:
        real(self, key, tensor)
        if not out.exists():
            out.write_bytes(b"the other run's output")

    monkeypatch.setattr(storage.SafetensorsWriter, "write", write_then_race)
    rc, err = _cli(["average", a, b, "-o", out], capsys)
    assert rc == 1 and "already exists" in err and "nothing was written" in err, err
    assert out.read_bytes() == b"the other run's output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "out.safetensors"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_two_runs_writing_one_output_exactly_one_succeeds(tmp_path: Path) -> None:
    import subprocess
    import sys

    a, b = _pair(tmp_path)
    out = tmp_path / "out.safetensors"
    argv = [sys.executable, "-m", "lightning_soup", "average", str(a), str(b), "-o", str(out), "-q"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    assert "already exists" in next(err for rc, err in results if rc == 1)
    assert set(storage.load_state_dict(out)) == {"w", "b"}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("command", ["average", "inspect"])
def test_cli_a_fifo_input_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    a, _ = _pair(tmp_path)
    fifo = _fifo(tmp_path / "pipe.safetensors")
    out = ["-o", tmp_path / "out.safetensors"] if command == "average" else []
    rc, err = _call_with_timeout(lambda: _cli([command, a, fifo, *out], capsys))
    assert rc == 1 and "is a FIFO (named pipe), not a regular file" in err, err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_blend_anchor_fails_before_training(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup
    from tests._models import make_model, trainer_kwargs

    fifo = _fifo(tmp_path / "anchor.safetensors")
    model = make_model(pl)
    blend = soup.TaskArithmeticBlend(anchor=str(fifo), ratio=0.5)
    trainer = pl.Trainer(callbacks=[blend], **trainer_kwargs(tmp_path))
    with pytest.raises(SoupError, match="is a FIFO"):
        _call_with_timeout(lambda: trainer.fit(model))
    assert model.training_steps == 0


@pytest.mark.parametrize("command", ["inspect", "average"])
def test_cli_escape_sequences_in_tensor_names_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A key from a crafted file holding ESC/BEL/bidi controls is shown escaped, in tables and in errors."""
    key = "w\x1b[31m\x1b]0;owned\x07\u202e"
    paths = []
    for i, value in enumerate([1.0, 2.0, float("nan") if command == "average" else 3.0]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({key: torch.tensor([value, -value]), "b": torch.tensor([float(i)])}, paths[-1])
    from lightning_soup.cli import main

    argv = ["inspect", paths[1], paths[2], "--base", paths[0]] if command == "inspect" else ["average", *paths[1:]]
    rc = main([str(a) for a in argv] + (["-o", str(tmp_path / "out.safetensors")] if command == "average" else []))
    out, err = capsys.readouterr()
    assert rc == (0 if command == "inspect" else 1), err
    shown = out + err
    assert "\\x1b[31m" in shown and "\\u202e" in shown, shown
    assert not set(shown) & {"\x1b", "\x07", "\u202e"}, repr(shown)


@pytest.mark.parametrize("kind", ["meta", "quantised", "sparse"])
def test_ckpt_tensors_without_plain_data_are_soup_errors(tmp_path: Path, kind: str) -> None:
    import warnings

    path = tmp_path / f"{kind}.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_per_tensor is deprecated
        tensor = {
            "meta": lambda: torch.empty(3, 3, device="meta"),
            "quantised": lambda: torch.quantize_per_tensor(torch.randn(3, 3), 0.1, 0, torch.qint8),
            "sparse": lambda: torch.eye(3).to_sparse(),
        }[kind]()
        torch.save({"state_dict": {"w": tensor, "b": torch.ones(3)}}, path)
    with pytest.raises(SoupError, match="without data|quantised torch.qint8|sparse_coo tensor; only dense"):
        storage.open_state_dict(path)


def test_callback_summary_tables_show_metric_names_and_paths_as_text() -> None:
    """A metric or path with `[/]` in it used to raise rich's MarkupError at the end of fit, after the files."""
    import io

    from rich.console import Console

    from lightning_soup._posthoc_report import compose_table, soup_table
    from lightning_soup.callbacks._report import averaging_table, blend_table, greedy_soup_table

    name = "val/acc[/][bold]"
    tables = [
        blend_table(
            [{"ratio": 0.5, "metrics": {name: 0.9}, "meets_constraint": True}],
            chosen=0,
            monitor=name,
            constraint=[f"{name}>=0.5"],
            anchor="runs/[/]base.safetensors",
        ),
        greedy_soup_table(
            {
                "monitor": name,
                "mode": "max",
                "soup_score": 0.9,
                "ingredients": [{"epoch": 0, "step": 1, "score": 0.9, "status": "skipped", "reason": "[/] odd"}],
            }
        ),
        averaging_table({"window": 2, "averaged": [{"epoch": 1, "global_step": 2}]}, "out[/]/average.safetensors"),
    ]
    tables += [
        soup_table(
            {
                "method": "greedy_soup",
                "monitor": name,
                "checkpoints": [{"path": "sweep/[/]lr1e-5/last.ckpt", "score": 0.9, "accepted": True}],
            }
        ),
        compose_table(
            {
                "method": "ties",
                "monitor": name,
                "constraint": [f"{name}>=0.5"],
                "index": 0,
                "references": [{"name": "base[/]", "metrics": {name: 0.4}}],
                "candidates": [{"scales": 0.5, "metrics": {name: 0.8}, "meets_constraint": True}],
            }
        ),
    ]
    buffer = io.StringIO()
    console = Console(file=buffer, width=300)
    for table in tables:
        console.print(table)
    text = buffer.getvalue()
    assert text.count("val/acc[/][bold]") >= 5 and "runs/[/]base" in text and "[/] odd" in text, text
    assert "out[/]/average" in text and "sweep/[/]lr1e-5" in text and "base[/]" in text


def test_callback_messages_with_markup_in_paths_are_printed_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from lightning_soup.callbacks._dist import print_on_rank_zero

    print_on_rank_zero(SimpleNamespace(is_global_zero=True), "resumed from 'runs/[/]x/last.ckpt'")
    assert "runs/[/]x/last.ckpt" in capsys.readouterr().out


def test_a_deeply_nested_recipe_is_a_soup_error(tmp_path: Path) -> None:
    path = tmp_path / "r.safetensors"
    save_file({"w": torch.ones(1)}, path, metadata={"lightning_soup": "[" * 50_000})
    with pytest.raises(SoupError, match="metadata is not valid JSON"):
        storage.read_recipe(path)


@pytest.mark.parametrize("fmt", ["ckpt", "legacy-ckpt", "safetensors", "index"])
def test_damaged_files_only_ever_raise_soup_errors(tmp_path: Path, fmt: str) -> None:
    """Random byte damage (a bit-rotted or crafted file): opening and reading every tensor either works or raises
    a SoupError; KeyError, IndexError, struct.error, BadZipFile and friends from the parsers never escape."""
    import random
    import warnings

    state = {"a.w": torch.randn(3, 4), "a.b": torch.arange(5), "c": torch.tensor(2.0)}
    folder = tmp_path / "model"
    if fmt == "ckpt":
        source = tmp_path / "x.ckpt"
        torch.save({"state_dict": state, "epoch": 1}, source)
    elif fmt == "legacy-ckpt":
        source = tmp_path / "x.ckpt"
        torch.save({"state_dict": state}, source, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        source = tmp_path / "x.safetensors"
        save_file(state, source, metadata={"lightning_soup": '{"method": "m"}'})
    else:
        storage.save_state_dict(state, folder, shard_size=40)
        source = folder / "model.safetensors.index.json"
    original = source.read_bytes()
    rng = random.Random(0)
    escaped = []
    for _ in range(120):
        data = bytearray(original)
        for _ in range(rng.choice([1, 2, 4, 8])):
            data[rng.randrange(len(data))] = rng.choice([0, 255, ord("["), ord("9"), rng.randrange(256)])
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data))]
        source.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with storage.open_state_dict(folder if fmt == "index" else source) as sd:
                    for key in sd:
                        _ = sd[key]
                    _ = sd.recipe
        except SoupError:
            pass
        except Exception as e:  # noqa: BLE001 - what the test looks for
            escaped.append(f"{type(e).__name__}: {e}"[:120])
    assert not escaped, escaped
