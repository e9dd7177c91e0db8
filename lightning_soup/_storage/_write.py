"""Streaming, atomic safetensors writing: one file, or a sharded folder with a Hugging Face style index."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch
from torch import Tensor

from lightning_soup._storage import _atomic, _format
from lightning_soup._storage._read import INDEX_NAME, LazyStateDict, _few
from lightning_soup.errors import SoupError

Specs = Mapping[str, "tuple[torch.dtype, tuple[int, ...]]"]


def build_metadata(metadata: Mapping[str, str] | None, recipe: Any) -> dict[str, str]:
    """The ``__metadata__`` to store: ``format: pt`` (which Hugging Face loaders check), the caller's entries and
    the JSON recipe under ``"lightning_soup"``.

    Raises:
        SoupError: a metadata key or value is not a string, the recipe is not JSON-serialisable, or both
            ``metadata`` and ``recipe`` set ``"lightning_soup"``.
    """
    out = {"format": "pt"}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise SoupError(f"`metadata` must be a dict of strings, got {type(metadata).__name__}.")
        bad = [
            f"`{k}`={v!r} ({type(v).__name__})"
            for k, v in metadata.items()
            if not (isinstance(k, str) and isinstance(v, str))
        ]
        if bad:
            raise SoupError(
                f"safetensors metadata maps strings to strings; these entries are not: {', '.join(bad[:5])}. "
                "Convert them with str() or json.dumps(), or pass structured data as `recipe`."
            )
        out.update(metadata)
    if recipe is not None:
        if metadata is not None and _format.RECIPE_KEY in metadata:
            raise SoupError(f"Pass the recipe either as `recipe` or as `metadata[{_format.RECIPE_KEY!r}]`, not both.")
        out[_format.RECIPE_KEY] = _atomic.dumps(recipe, "`recipe`")
    return out


def _check_specs(specs: Specs) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, spec in specs.items():
        if not isinstance(key, str) or key == _format.METADATA_KEY:
            raise SoupError(f"Tensor names must be strings other than {_format.METADATA_KEY!r}, got {key!r}.")
        try:
            dtype, shape = spec
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise SoupError(f"The spec of `{key}` must be (dtype, shape), got {spec!r}.") from None
        if not isinstance(dtype, torch.dtype) or any(d < 0 for d in shape):
            raise SoupError(f"The spec of `{key}` must be (torch.dtype, non-negative shape), got {spec!r}.")
        _format.dtype_name(dtype, key)
        out[key] = (dtype, shape)
    return out


def plan_shards(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], shard_size: int) -> list[list[str]]:
    """Split the keys, in order, into shards of at most ``shard_size`` tensor bytes (a larger tensor gets a shard
    of its own), like Hugging Face's ``max_shard_size``."""
    shards: list[list[str]] = [[]]
    filled = 0
    for key, (dtype, shape) in specs.items():
        size = _format.nbytes_of(dtype, shape)
        if shards[-1] and filled + size > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += size
    return shards


class _File:
    """One output file. It is open only while it has tensors left to write, so a sharded writer holds as many
    file handles as shards being filled (one or two when tensors come in order), not one per shard."""

    __slots__ = ("handle", "path", "pending")

    def __init__(self, path: Path, pending: int) -> None:
        self.path, self.pending = path, pending
        self.handle: BinaryIO | None = None

    def put(self, offset: int, view: memoryview) -> None:
        if self.handle is None:
            self.handle = open(self.path, "r+b", buffering=0)  # noqa: SIM115 - closed below or by close()
        _format.write_at(self.handle.fileno(), view, offset)

    def done_one(self) -> None:
        """One more tensor written; once all are, the file is fsynced and closed."""
        self.pending -= 1
        if self.pending == 0 and self.handle is not None:
            os.fsync(self.handle.fileno())
            self.close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class _Slot:
    __slots__ = ("begin", "dtype", "file", "shape")

    def __init__(self, file: _File, begin: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.file, self.begin, self.dtype, self.shape = file, begin, dtype, shape


class SafetensorsWriter:
    """Write a safetensors file (or sharded folder) one tensor at a time, atomically.

    The header is written up front from the known shapes and dtypes; then :meth:`write` puts each tensor's bytes
    at its precomputed place, **in any order**, each key exactly once. :meth:`close` (or leaving the ``with``
    block normally) checks that every key was written, fsyncs and renames the result to ``path``; an exception
    in the block, a missing key, or a writer dropped unfinished deletes the temporary and leaves any previous
    file under ``path`` untouched. Only the tensor being written is held in memory (plus its CPU copy when it
    lives on an accelerator or is not contiguous).

    With ``shard_size``, ``path`` is a folder holding ``model-00001-of-0000N.safetensors`` shards (keys split in
    ``specs`` order, at most ``shard_size`` tensor bytes each) and ``model.safetensors.index.json``
    (``{"metadata": {"total_size": ...}, "weight_map": {key: shard}}``), built in a temporary folder and renamed
    as a whole. Every shard carries the metadata and recipe; the index also marks the folder as written by
    lightning_soup. An existing folder under ``path`` is replaced only when it is a previous output of ours (a
    folder written by this writer, possibly with the files of a Hugging Face model folder beside the weights); any
    other folder is refused (see :func:`lightning_soup.storage.check_replaceable`).

    Args:
        path: the output file (or folder with ``shard_size``); missing parent folders are created.
        specs: ``{key: (dtype, shape)}`` of every tensor to write, in the order readers will list them.
        metadata: extra string-to-string safetensors metadata.
        recipe: a JSON-serialisable description of how the weights were made, stored as JSON in the metadata
            under ``"lightning_soup"`` (read back with :func:`read_recipe`).
        shard_size: bytes per shard, as an int or a string such as ``"2GB"`` (see :func:`parse_size`).
        overwrite: replace what exists under ``path`` (the default). With False, an existing ``path`` is refused
            up front, and one that appears while writing is never replaced: the commit fails and nothing is
            written, so of two writers racing for one path exactly one succeeds.

    Raises:
        SoupError: bad specs, metadata or recipe; ``path`` exists and ``overwrite`` is False, or is a folder that
            must not be replaced; on :meth:`write`, an unknown or repeated key or a dtype/shape different from its
            spec; on any disk error (a full disk says so, naming ``path``).

    Example:
        >>> import tempfile, torch
        >>> from lightning_soup.storage import load_state_dict
        >>> path = Path(tempfile.mkdtemp()) / "out.safetensors"
        >>> specs = {"w": (torch.float32, (2, 2)), "b": (torch.float32, (2,))}
        >>> with SafetensorsWriter(path, specs, recipe={"method": "example"}) as writer:
        ...     writer.write("b", torch.zeros(2))
        ...     writer.write("w", torch.eye(2))
        >>> load_state_dict(path)["w"]
        tensor([[1., 0.],
                [0., 1.]])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Specs,
        *,
        metadata: Mapping[str, str] | None = None,
        recipe: Any = None,
        shard_size: int | str | None = None,
        overwrite: bool = True,
    ) -> None:
        _format.check_byteorder()
        self.path = Path(path).expanduser()
        self._overwrite = bool(overwrite)
        self._done = True  # nothing to clean up if a check below fails
        if not self._overwrite and os.path.lexists(self.path):
            raise SoupError(f"{self.path} already exists; refusing to replace it (overwrite=False).")
        _atomic.check_replaceable(self.path)
        self._specs = _check_specs(specs)
        self._metadata = build_metadata(metadata, recipe)
        self._shard_size = None if shard_size is None else _format.parse_size(shard_size)
        self._files: list[_File] = []
        self._slots: dict[str, _Slot] = {}
        self._pending = set(self._specs)
        self._weight_map: dict[str, str] = {}
        self._done = self._committed = False
        _atomic.make_parent(self.path)
        self._tmp = _atomic.new_temp_path(self.path)
        try:
            if self._shard_size is None:
                self._open_file(self._tmp, list(self._specs))
            else:
                groups = plan_shards(self._specs, self._shard_size)
                self._tmp.mkdir()
                for i, keys in enumerate(groups, 1):
                    name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                    self._open_file(self._tmp / name, keys)
                    self._weight_map.update(dict.fromkeys(keys, name))
        except OSError as e:
            self._discard()
            raise _atomic.os_error(e, self.path) from e
        except BaseException:
            self._discard()
            raise

    def _open_file(self, path: Path, keys: list[str]) -> None:
        specs = {k: self._specs[k] for k in keys}
        header, offsets = _format.encode_header(specs, self._metadata)
        file = _File(path, len(keys))
        self._files.append(file)
        with open(path, "xb", buffering=0) as f:
            _format.write_at(f.fileno(), memoryview(header), 0)
            if not keys:
                os.fsync(f.fileno())
        for key, (begin, _) in offsets.items():
            self._slots[key] = _Slot(file, len(header) + begin, *specs[key])

    def write(self, key: str, tensor: Tensor) -> None:
        """Write ``tensor`` as ``key``: any device, layout or strides, exactly the dtype and shape of its spec.

        Raises:
            SoupError: the writer is closed, ``key`` is unknown or already written, the dtype or shape differs from
                the spec, or the disk fails (the writer is then aborted).
        """
        if self._done:
            raise SoupError(f"The writer for {self.path} is already closed.")
        slot = self._slots.get(key)
        if slot is None:
            raise SoupError(f"`{key}` is not among the tensors declared for {self.path} ({_few(list(self._specs))}).")
        if key not in self._pending:
            raise SoupError(f"`{key}` was already written to {self.path}; each key is written once.")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise SoupError(
                f"`{key}` was declared as {slot.dtype} {list(slot.shape)} but the tensor is {tensor.dtype} "
                f"{list(tensor.shape)}; cast or reshape it, or declare it as it is."
            )
        owner, view = _format.tensor_bytes(tensor, key)
        try:
            slot.file.put(slot.begin, view)
            self._pending.discard(key)
            slot.file.done_one()
        except OSError as e:
            self._discard()
            raise _atomic.os_error(e, self.path) from e
        finally:
            del owner, view

    def close(self) -> Path:
        """Commit: fsync every file and rename the result to :attr:`path` atomically.

        Returns:
            :attr:`path`.

        Raises:
            SoupError: some declared keys were never written (nothing is written then), or the disk fails.
        """
        if self._done:
            if self._committed:
                return self.path
            raise SoupError(f"The writer for {self.path} was aborted; nothing was written.")
        if self._pending:
            missing = [k for k in self._specs if k in self._pending]
            self._discard()
            raise SoupError(
                f"{self.path} was not written: {len(missing)} declared tensors were never written "
                f"({_few(missing)}). Write every key in `specs`."
            )
        try:  # every file was fsynced and closed when its last tensor was written
            if self._shard_size is not None:
                total = sum(_format.nbytes_of(*spec) for spec in self._specs.values())
                metadata = {"total_size": total, **self._metadata, _atomic.WRITER_MARK[0]: _atomic.WRITER_MARK[1]}
                index = {"metadata": metadata, "weight_map": self._weight_map}
                text = _atomic.dumps(index, "The index", indent=2, sort_keys=True) + "\n"
                (self._tmp / INDEX_NAME).write_text(text, encoding="utf-8")
                _atomic.fsync_file(self._tmp / INDEX_NAME)
                _atomic.fsync_dir(self._tmp)
            _atomic.commit(self._tmp, self.path, overwrite=self._overwrite)
        except OSError as e:
            self._discard()
            raise _atomic.os_error(e, self.path) from e
        except BaseException:
            self._discard()
            raise
        self._done = self._committed = True
        _atomic.release(self._tmp)
        return self.path

    def abort(self) -> None:
        """Give up: delete the temporary output; :attr:`path` keeps whatever it held before."""
        if not self._done:
            self._discard()

    def _discard(self) -> None:
        self._done, self._committed = True, False
        for file in self._files:
            file.close()
        _atomic.remove(self._tmp)
        _atomic.release(self._tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            warnings.warn(
                f"A SafetensorsWriter for {self.path} was dropped without close(); nothing was written.",
                ResourceWarning,
                stacklevel=2,
            )
            self._discard()


def save_state_dict(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    recipe: Any = None,
    metadata: Mapping[str, str] | None = None,
    shard_size: int | str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a state dict as safetensors (or a sharded folder with ``shard_size``), atomically.

    Tensors may share storage (tied weights), be views or non-contiguous, or live on any device: each key gets
    its own copy of its elements. A :class:`LazyStateDict` is streamed, one tensor in memory at a time. See
    :class:`SafetensorsWriter` for ``recipe``, ``metadata``, ``shard_size``, ``overwrite`` and the sharded layout.

    Returns:
        ``path``.

    Raises:
        SoupError: a value is not a tensor, a dtype safetensors cannot store, bad metadata or recipe, a disk
            error (a full disk says so); the previous file under ``path``, if any, is then unchanged.

    Example:
        >>> import tempfile, torch
        >>> from lightning_soup.storage import read_recipe
        >>> w = torch.randn(3, 3)
        >>> path = save_state_dict({"w": w, "w_t": w.T}, Path(tempfile.mkdtemp()) / "tied.safetensors",
        ...                        recipe={"method": "uniform_soup", "inputs": ["a", "b"]})
        >>> read_recipe(path)
        {'method': 'uniform_soup', 'inputs': ['a', 'b']}
    """
    if isinstance(state_dict, LazyStateDict):
        specs = {k: (t.dtype, tuple(t.shape)) for k, t in state_dict.meta().items()}
    else:
        bad = [str(k) for k, v in state_dict.items() if not isinstance(v, Tensor)]
        if bad:
            raise SoupError(f"Only tensors can be saved as safetensors; these entries are not: {_few(bad)}.")
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in state_dict.items()}
    with SafetensorsWriter(
        path, specs, metadata=metadata, recipe=recipe, shard_size=shard_size, overwrite=overwrite
    ) as writer:
        for key in specs:
            writer.write(key, state_dict[key])
    return writer.path
