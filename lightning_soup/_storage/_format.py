"""The safetensors byte format: dtype names, header encoding and validation, raw tensor bytes in and out.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header, space padded><data>``. The header maps each
key to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the start of the data) plus an
optional ``"__metadata__"`` string→string map.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from lightning_soup.errors import SoupError

# The safetensors dtype names torch can represent (safetensors.torch._TYPES minus the packed/exotic ones).
_NAMED_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    }.items()
    if dtype is not None
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _NAMED_DTYPES.items()}

METADATA_KEY = "__metadata__"
RECIPE_KEY = "lightning_soup"
_MAX_HEADER = 100_000_000  # the reference implementation refuses larger headers too
_CHUNK = 1 << 30  # bytes per read/write call: some kernels cap a single transfer just under 2 GiB


def dtype_name(dtype: torch.dtype, key: str = "") -> str:
    """The safetensors name of ``dtype``; SoupError for dtypes the format cannot store."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        where = f" (tensor `{key}`)" if key else ""
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_NAMES)
        raise SoupError(f"safetensors cannot store dtype {dtype}{where}; supported dtypes: {supported}.") from None


def nbytes_of(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in a safetensors file; ``begin``/``end`` are absolute file offsets."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def encode_header(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) and each key's ``(begin, end)`` data offsets, relative to the data.

    The JSON lists the keys in ``specs`` order, so readers that keep header order return the caller's order. The
    data comes first for tensors whose size is a multiple of 64 bytes, then the others by decreasing item size
    (each group in ``specs`` order): every tensor starts at a multiple of its item size, so it can be viewed in
    place, as the reference implementation requires, and the large ones start on a 64-byte boundary of the data, so
    copies into a file image of them (:class:`~lightning_soup._storage._image.FileImage`) run at full speed (a
    model's few int64 counters placed first would shift every weight off the cache lines).
    """
    order = sorted(specs, key=lambda k: (nbytes_of(*specs[k]) % 64 != 0, -specs[k][0].itemsize))
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for key in order:
        dtype, shape = specs[key]
        size = nbytes_of(dtype, shape)
        offsets[key] = (cursor, cursor + size)
        cursor += size
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    for key, (dtype, shape) in specs.items():
        header[key] = {"dtype": dtype_name(dtype, key), "shape": list(shape), "data_offsets": list(offsets[key])}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data start
    return struct.pack("<Q", len(raw)) + raw, offsets


_MAX_INT64 = 2**63


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook that refuses repeated keys, as the reference reader does (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _short(value: object, limit: int = 200) -> str:
    """``value`` as text, cut to ``limit`` characters: header content is shown, never at length."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _not_safetensors(path: Path, why: str) -> SoupError:
    return SoupError(
        f"{path} is not a readable safetensors file: {why}. It is damaged or was not fully copied; "
        "re-create or re-download it."
    )


def read_header(f: BinaryIO, path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and validate the header of an open safetensors file, reading only the header.

    Truncation is detected here, cheaply, by comparing the end of the last tensor with the file size.

    Raises:
        SoupError: the file is too short, truncated, or its header is not valid safetensors JSON.
    """
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    if size < 8:
        raise _not_safetensors(path, f"it is only {size} bytes long")
    first = f.read(8)
    (n,) = struct.unpack("<Q", first)
    if n > min(size - 8, _MAX_HEADER):
        if first.startswith(b"version "):
            raise SoupError(
                f"{path} is a Git LFS pointer, not the weights themselves. Fetch the file with `git lfs pull`."
            )
        if n > _MAX_HEADER:  # no figure in the message: these 8 bytes are whatever the file holds
            raise _not_safetensors(path, "its first 8 bytes are not a safetensors header length")
        raise _not_safetensors(path, f"it is truncated: the header alone needs {n + 8} bytes but the file has {size}")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as e:
        raise _not_safetensors(path, f"its header lists `{_short(e.args[0])}` twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _not_safetensors(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _not_safetensors(path, "its __metadata__ is not a string-to-string map")
    data_start = 8 + n
    entries: dict[str, Entry] = {}
    for key, info in header.items():
        try:
            dtype = _NAMED_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            ok = all(type(d) is int and 0 <= d < _MAX_INT64 for d in (*shape, begin, end))
            ok = ok and math.prod(d for d in shape if d) < _MAX_INT64  # what torch can index, even with a 0 dim
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _not_safetensors(
                path, f"the header entry of `{_short(key)}` is malformed or has an unknown dtype: {_short(info)}"
            )
        if end - begin != nbytes_of(dtype, shape):
            raise _not_safetensors(
                path, f"`{_short(key)}` has shape {list(shape)} and dtype {info['dtype']} but spans {end - begin} bytes"
            )
        entries[key] = Entry(dtype, shape, data_start + begin, data_start + end)
    spans = sorted((e.begin, e.end) for e in entries.values())
    for (_, prev_end), (begin, _) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise _not_safetensors(path, "two tensors overlap in its data section")
    needed = max((end for _, end in spans), default=data_start)
    if needed > size:
        raise _not_safetensors(path, f"it is truncated: its header describes {needed} bytes but the file has {size}")
    return entries, metadata


def _byte_view(t: Tensor) -> memoryview:
    """A writable, zero-copy byte view of a contiguous CPU tensor's data (no numpy needed)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def readinto_exact(f: BinaryIO, view: memoryview, path: Path) -> None:
    """Fill ``view`` from the current position of ``f``, looping over short reads."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done : done + _CHUNK])
        if not got:
            raise _not_safetensors(path, "it ended before the end of a tensor (was it truncated after opening?)")
        done += got


def write_at(fd: int, view: memoryview, offset: int) -> None:
    """Write every byte of ``view`` to file descriptor ``fd`` at ``offset``, looping over short writes.

    Every byte this package writes into a safetensors file goes through here (tests inject disk faults here).
    """
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _CHUNK], offset + done)


def read_tensor(f: BinaryIO, entry: Entry, path: Path) -> Tensor:
    """Read one tensor into fresh CPU memory, touching only its own bytes."""
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=entry.dtype)
    buf = torch.empty(entry.end - entry.begin, dtype=torch.uint8)  # the CPU allocator aligns to 64 bytes
    f.seek(entry.begin)
    readinto_exact(f, _byte_view(buf), path)
    return buf.view(entry.dtype).reshape(entry.shape)


def tensor_bytes(t: Tensor, key: str) -> tuple[Tensor, memoryview]:
    """A contiguous CPU copy (or the tensor itself when it already is one) and a byte view of its data.

    Keep the returned tensor alive while the view is used. Shared storage and strides do not matter: only the
    tensor's own elements, in row-major order, end up in the view.
    """
    if t.layout != torch.strided:
        raise SoupError(f"`{key}` is a {t.layout} tensor; convert it with `.to_dense()` before saving.")
    if t.device.type == "meta":
        raise SoupError(f"`{key}` is a meta tensor: it has no data to save.")
    if hasattr(t, "placements") and hasattr(t, "full_tensor"):  # a DTensor: gathering is a collective
        raise SoupError(f"`{key}` is a sharded DTensor; gather it with `.full_tensor()` on every rank first.")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return t, memoryview(b"")
    return t, _byte_view(t.reshape(-1).view(torch.uint8))


def check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise SoupError("lightning_soup storage needs a little-endian host (safetensors data is little-endian).")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(size: int | str) -> int:
    """A byte count from an int or a string such as ``"500MB"``, ``"2GB"`` or ``"1.5GiB"``.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000 (as in Hugging Face's ``max_shard_size``), ``KiB``/``MiB``/
    ``GiB``/``TiB`` powers of 1024; the final ``B`` and the case do not matter.

    Raises:
        SoupError: not a positive size.

    Example:
        >>> parse_size("2GB"), parse_size("500MiB"), parse_size(4096)
        (2000000000, 524288000, 4096)
    """
    value: float
    if isinstance(size, bool):
        value = -1.0
    elif isinstance(size, int):
        value = size
    elif isinstance(size, str) and (m := _SIZE_RE.match(size)):
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    else:
        value = -1.0
    if not value >= 1:
        raise SoupError(
            f"`shard_size` must be a positive number of bytes such as 2000000000, '2GB' or '500MiB', got {size!r}."
        )
    return int(value)
