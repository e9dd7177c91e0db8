"""FileImage: a safetensors file kept in one reusable page-aligned buffer and written with direct I/O.

It writes every snapshot of ``CheckpointAveraging(snapshots="disk")``. The files must be ordinary safetensors
(read here by the reference implementation), exact, atomic, and written correctly where direct I/O is refused.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from lightning_soup import SoupError, storage
from lightning_soup._storage import _format
from lightning_soup._storage._image import ALIGN, FileImage

# Sizes around the block size: the last partial block goes through the page cache, the rest with O_DIRECT.
SPECS = {
    "embed.weight": (torch.bfloat16, (33, 17)),
    "big": (torch.float32, (3 * ALIGN // 4 + 5,)),
    "bn.num_batches_tracked": (torch.int64, ()),
    "scale": (torch.float64, ()),
    "empty": (torch.float32, (0, 4)),
    "mask": (torch.bool, (7,)),
    "half": (torch.float16, (2, 3, 5)),
}


def _values(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (dtype, shape) in SPECS.items():
        if dtype.is_floating_point:
            out[key] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        elif dtype == torch.bool:
            out[key] = torch.rand(shape, generator=g) > 0.5
        else:
            out[key] = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)
    return out


def _fill(image: FileImage, values: dict[str, torch.Tensor]) -> None:
    for key, t in image.tensors.items():
        t.copy_(values[key])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_files_are_exact_safetensors_that_the_reference_reader_loads(tmp_path: Path, direct: bool) -> None:
    image = FileImage(SPECS)
    assert image.nbytes % ALIGN != 0  # the file ends in a partial block
    for i in range(2):  # the buffer is reused: the second file holds the second values, with its own recipe
        values = _values(i)
        _fill(image, values)
        path = image.write(tmp_path / f"s{i}.safetensors", recipe={"epoch": i, "note": "ünïcode"}, direct=direct)
        loaded = safetensors.torch.load_file(str(path))
        assert sorted(loaded) == sorted(values)
        for key, t in values.items():
            assert loaded[key].dtype == t.dtype and loaded[key].shape == t.shape
            assert torch.equal(loaded[key], t), key
        with safetensors.safe_open(str(path), "pt") as f:
            assert list(f.keys()) == sorted(SPECS)
            assert f.metadata()["format"] == "pt"
        assert storage.read_recipe(path) == {"epoch": i, "note": "ünïcode"}
        assert os.path.getsize(path) == image.nbytes
    assert _files(tmp_path) == ["s0.safetensors", "s1.safetensors"]


def test_direct_and_buffered_writes_give_the_same_bytes(tmp_path: Path) -> None:
    image = FileImage(SPECS)
    _fill(image, _values(3))
    a = image.write(tmp_path / "a.safetensors", recipe={"k": 1}, direct=True).read_bytes()
    b = image.write(tmp_path / "b.safetensors", recipe={"k": 1}, direct=False).read_bytes()
    assert a == b


def test_direct_io_is_requested_where_the_platform_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    try:  # tmpfs and some network file systems refuse direct I/O (covered by the test below)
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pytest.skip(f"{tmp_path} does not do direct I/O")
    os.unlink(tmp_path / "probe")
    flags: list[int] = []
    real = os.open

    def spy(path, flag, *args, **kwargs):
        flags.append(flag)
        return real(path, flag, *args, **kwargs)

    image = FileImage(SPECS)
    monkeypatch.setattr(os, "open", spy)
    image.write(tmp_path / "d.safetensors", direct=True)
    image.write(tmp_path / "b.safetensors", direct=False)
    opened = [f for f in flags if f & os.O_CREAT]
    assert [bool(f & os.O_DIRECT) for f in opened] == [True, False]


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_file_systems_that_refuse_direct_io_get_a_buffered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open, real_write = os.open, _format.write_at
    direct_fds: set[int] = set()

    def refusing_open(path, flag, *args, **kwargs):
        if flag & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flag, *args, **kwargs)
        if flag & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_write(fd, view, offset):
        import fcntl

        if fd in direct_fds and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write(fd, view, offset)

    big = {"w": (torch.float32, (5 * ALIGN,))}  # whole blocks to write directly
    image = FileImage(big)
    values = torch.randn(5 * ALIGN)
    image.tensors["w"].copy_(values)
    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(_format, "write_at", refusing_write)
    path = image.write(tmp_path / "w.safetensors", direct=True)
    assert torch.equal(safetensors.torch.load_file(str(path))["w"], values)
    assert _files(tmp_path) == ["w.safetensors"]


def test_a_recipe_larger_than_the_reserved_header_room_is_still_written(tmp_path: Path) -> None:
    image = FileImage(SPECS)
    values = _values(5)
    _fill(image, values)
    recipe = {"notes": ["x" * 1000] * 20}  # 20 kB, beyond the room reserved for the metadata
    path = image.write(tmp_path / "r.safetensors", recipe=recipe)
    assert storage.read_recipe(path) == recipe
    loaded = safetensors.torch.load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in values.items())


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = FileImage(SPECS)
    _fill(image, _values(0))
    path = image.write(tmp_path / "s.safetensors")
    previous = path.read_bytes()
    _fill(image, _values(1))

    def full(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_format, "write_at", full)
    with pytest.raises(SoupError, match=r"disk is full.*s\.safetensors"):
        image.write(path)
    assert path.read_bytes() == previous
    assert _files(tmp_path) == ["s.safetensors"]  # no temporary left behind


def test_the_buffer_is_page_aligned_and_tensors_are_views_of_it() -> None:
    image = FileImage(SPECS, pin_memory=False)
    ptrs = sorted((t.data_ptr(), k) for k, t in image.tensors.items() if t.numel())
    base = image._buffer.data_ptr()
    assert base % ALIGN == 0
    assert all(base <= p < base + image.nbytes for p, _ in ptrs)
    assert all(t.is_contiguous() for t in image.tensors.values())


def test_large_tensors_start_on_cache_lines_even_after_small_int64_counters() -> None:
    """A model's int64 counters (BatchNorm's num_batches_tracked) must not shift the weights off 64-byte lines:
    copying 100 MB into misaligned views was a third slower than into aligned ones."""
    specs = {}
    for i in range(3):
        specs[f"bn{i}.num_batches_tracked"] = (torch.int64, ())
        specs[f"fc{i}.weight"] = (torch.float32, (64, 48))
        specs[f"bn{i}.running_mean"] = (torch.float32, (48,))
    specs["odd"] = (torch.float16, (3,))
    image = FileImage(specs)
    for key, t in image.tensors.items():
        nbytes = t.numel() * t.element_size()
        assert t.data_ptr() % t.element_size() == 0, key
        if nbytes % 64 == 0:
            assert t.data_ptr() % 64 == 0, key
