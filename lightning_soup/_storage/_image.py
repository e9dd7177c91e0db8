"""A safetensors file laid out in one reusable host buffer, written with direct I/O.

The snapshot writer of :class:`~lightning_soup.CheckpointAveraging` writes the same layout of tensors every time.
:class:`FileImage` allocates that file once, as a page-aligned host buffer (pinned when the tensors come from CUDA):
a header region with room to spare, then every tensor at its offset in the file. Training copies its weights
straight into :attr:`FileImage.tensors` (views of the buffer), and :meth:`FileImage.write` puts the header in place
and writes the buffer to disk as it is. There is no serialisation copy. Where the file system allows it, the
write uses ``O_DIRECT``, so the bytes go from the buffer to the disk without a copy into the page cache and
without dirty pages left for the kernel to write back later. Measured on a 2-core machine, that costs about
6 ms of CPU for 100 MB against 60–140 ms for a buffered write and fsync. Those cycles would otherwise be taken
from training. The tail of the file that is not a whole number of blocks, and file systems that refuse direct
I/O (tmpfs, some network file systems), are written through the page cache. The file is written under a
temporary name, fsynced and renamed, like every other file this package writes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_soup._storage import _atomic, _format
from lightning_soup._storage._write import Specs, _check_specs, build_metadata, save_state_dict

ALIGN = 4096  # buffer address, file offsets and lengths of direct writes: any block size up to a page
_CHUNK = 64 << 20  # bytes per write call: a multiple of ALIGN
_HEADER_ROOM = 4096  # bytes reserved for the metadata (the recipe) beyond what the bare header needs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class FileImage:
    """One safetensors file's bytes in a page-aligned host buffer that is reused from one write to the next.

    Args:
        specs: ``{key: (dtype, shape)}`` of the tensors; the header lists them in this order.
        pin_memory: allocate pinned memory, so copies from CUDA into :attr:`tensors` can run asynchronously.

    Attributes:
        tensors: ``{key: tensor}``, views of the buffer at each tensor's place in the file; fill them, then
            :meth:`write`.
    """

    def __init__(self, specs: Specs, *, pin_memory: bool = False) -> None:
        self._specs = _check_specs(specs)
        bare, offsets = _format.encode_header(self._specs, build_metadata(None, None))
        # The data starts on a page boundary (the header is padded to it): copies into the tensors run at full speed.
        self._capacity = _round_up(len(bare) + _HEADER_ROOM, ALIGN)  # length prefix included
        data_size = max((end for _, end in offsets.values()), default=0)
        size = self._capacity + data_size
        raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
        shift = (-raw.data_ptr()) % ALIGN
        self._buffer = raw[shift : shift + size]
        self._view = _format._byte_view(self._buffer)
        self.tensors: dict[str, Tensor] = {}
        for key, (dtype, shape) in self._specs.items():
            begin, end = offsets[key]
            flat = self._buffer[self._capacity + begin : self._capacity + end].view(dtype)
            self.tensors[key] = flat.view(shape)

    def touch(self) -> None:
        """Fault the whole buffer in now (the kernel zeroes new pages on first write), off any hot path."""
        self._buffer.zero_()

    @property
    def nbytes(self) -> int:
        """The size of the file :meth:`write` writes (while the metadata fits the reserved room)."""
        return len(self._view)

    def write(
        self, path: str | os.PathLike, *, recipe: Any = None, metadata: Mapping[str, str] | None = None,
        direct: bool = True,
    ) -> Path:
        """Write the buffer, with this header, as the safetensors file ``path`` (atomically, fsynced).

        Args:
            path: the output file; an existing file is replaced atomically.
            recipe: the JSON recipe stored in the metadata (see :func:`~lightning_soup.storage.save_state_dict`).
            metadata: extra string-to-string metadata.
            direct: write with ``O_DIRECT`` where the platform and file system allow it; otherwise (and for the
                last partial block) through the page cache.

        Returns:
            ``path``.

        Raises:
            SoupError: bad metadata or recipe, or a disk error (naming ``path``); a previous file is unchanged.
        """
        path = Path(path)
        header, _ = _format.encode_header(self._specs, build_metadata(metadata, recipe))
        if len(header) > self._capacity:  # a recipe larger than the reserved room: the general writer
            return save_state_dict(self.tensors, path, metadata=metadata, recipe=recipe)
        # The JSON header may end in spaces (the format pads it); pad it to fill the reserved region exactly.
        padded = (self._capacity - 8).to_bytes(8, "little") + header[8:] + b" " * (self._capacity - len(header))
        self._view[: self._capacity] = padded
        _atomic.make_parent(path)
        tmp = _atomic.new_temp_path(path)
        try:
            _write_file(tmp, self._view, direct)
            _atomic.commit(tmp, path)
        except OSError as e:
            _atomic.remove(tmp)
            raise _atomic.os_error(e, path) from e
        except BaseException:
            _atomic.remove(tmp)
            raise
        finally:
            _atomic.release(tmp)
        return path


def _write_file(path: Path, view: memoryview, direct: bool) -> None:
    """Create ``path`` and write ``view`` (page-aligned) to it; ``O_DIRECT`` for whole blocks where allowed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    o_direct = getattr(os, "O_DIRECT", 0) if direct else 0
    fd = -1
    if o_direct:
        try:
            fd = os.open(path, flags | o_direct, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system does not do direct I/O
                raise
            o_direct = 0
    if fd < 0:
        fd = os.open(path, flags, 0o644)
    try:
        done = 0
        if o_direct:
            whole = len(view) - len(view) % ALIGN
            try:
                for done in range(0, whole, _CHUNK):
                    _format.write_at(fd, view[done : min(whole, done + _CHUNK)], done)
                done = whole
            except OSError as e:
                if e.errno != errno.EINVAL:  # refused at write time (alignment rules stricter than a page)
                    raise
            _buffered(fd)
        _format.write_at(fd, view[done:], done)
        os.fsync(fd)
    finally:
        os.close(fd)


def _buffered(fd: int) -> None:
    """Clear ``O_DIRECT`` on ``fd``, so the rest of the file goes through the page cache."""
    import fcntl  # POSIX only, like O_DIRECT itself

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
