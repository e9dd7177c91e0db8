"""Lazy, tensor-by-tensor reading of safetensors files, sharded folders and Lightning/PyTorch checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import torch
from torch import Tensor

from lightning_soup._storage import _format
from lightning_soup._storage._paths import check_regular, confined, open_regular
from lightning_soup.errors import SoupError

INDEX_NAME = "model.safetensors.index.json"
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_KINDS = "a .safetensors file, a sharded folder with model.safetensors.index.json, or a Lightning .ckpt"


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(f"`{x}`" for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def resolve(path: str | os.PathLike) -> tuple[Literal["safetensors", "sharded", "torch"], Path]:
    """Which format ``path`` holds and the file to open for it (the index for a sharded folder).

    Raises:
        SoupError: the path is missing, has an unknown extension, or is a folder without a checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SoupError(f"{p} does not exist. Pass {_KINDS}.")
    if not p.is_dir():
        check_regular(p)  # a FIFO or device would block or never end
    if p.is_dir():
        index = p / INDEX_NAME
        if index.is_file():
            return "sharded", index
        visible = sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith("."))
        indexes = [c for c in visible if c.name.endswith(".safetensors.index.json")]
        if len(indexes) == 1:
            return "sharded", indexes[0]
        if (p / "model.safetensors").is_file():
            return "safetensors", p / "model.safetensors"
        files = [c for c in visible if c.suffix == ".safetensors"]
        if len(files) == 1 and not indexes:
            return "safetensors", files[0]
        found = _few([c.name for c in visible]) or "nothing"
        if p.suffix.lower() == ".ckpt":
            raise SoupError(
                f"{p} is a distributed (FSDP/DeepSpeed) checkpoint folder, not a single file. Consolidate it first: "
                "`python -m lightning.pytorch.utilities.consolidate_checkpoint <folder>` (FSDP) or "
                "`convert_zero_checkpoint_to_fp32_state_dict` (DeepSpeed), then pass the resulting .ckpt."
            )
        raise SoupError(
            f"{p} is a folder but not a checkpoint: it needs {INDEX_NAME} (sharded) or a single model.safetensors "
            f"(it holds {found}). Pass the file itself, or the folder of one sharded checkpoint."
        )
    suffix = p.suffix.lower()
    if p.name.lower().endswith(".index.json"):
        return "sharded", p
    if suffix == ".safetensors":
        return "safetensors", p
    if suffix in _TORCH_SUFFIXES:
        return "torch", p
    raise SoupError(
        f"{p} has an unknown extension {p.suffix!r}: pass {_KINDS} "
        f"(extensions .safetensors, {', '.join(_TORCH_SUFFIXES)}, .index.json)."
    )


class _SafetensorsSource:
    """One open safetensors file. The handle stays open so that a file replaced on disk meanwhile (an atomic
    rewrite under the same name) keeps being read consistently from the version whose header was parsed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = open_regular(path)  # closed by close()
        try:
            self.entries, self.metadata = _format.read_header(self.file, path)
        except BaseException:
            self.file.close()
            raise
        self.lock = threading.Lock()  # seek + read must not interleave across threads

    def read(self, key: str) -> Tensor:
        with self.lock:
            return _format.read_tensor(self.file, self.entries[key], self.path)

    def meta(self, key: str) -> Tensor:
        e = self.entries[key]
        return torch.empty(e.shape, dtype=e.dtype, device="meta")

    def close(self) -> None:
        self.file.close()


class _TorchSource:
    """The ``state_dict`` of a torch-saved checkpoint, memory-mapped: tensor data is read when a tensor is."""

    metadata: dict[str, str] = {}

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, Tensor] = _torch_state_dict(path)
        self.specs = {k: (t.dtype, t.shape) for k, t in self.tensors.items()}

    def read(self, key: str) -> Tensor:
        # A private copy: the mapped pages stay reclaimable page cache, and callers may modify the result.
        return self.tensors[key].clone(memory_format=torch.contiguous_format)

    def meta(self, key: str) -> Tensor:
        dtype, shape = self.specs[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def close(self) -> None:
        self.tensors = {}  # drops the memory map


def _torch_load(path: Path) -> Any:
    try:
        with open_regular(path) as f:  # a FIFO is refused here instead of blocking torch.load
            magic = f.read(4)
            try:
                is_zip = zipfile.is_zipfile(f)
            except zipfile.BadZipFile:  # e.g. "zipfiles that span multiple disks are not supported"
                is_zip = False
    except OSError as e:
        raise SoupError(f"Could not open {path}: {e.strerror or e}.") from e
    if not is_zip and not magic.startswith(b"\x80"):  # neither torch.save's zip format nor its legacy pickle
        raise SoupError(
            f"{path} is not a PyTorch checkpoint (a file written by torch.save / Trainer.save_checkpoint), "
            "or it is truncated. Check the file, or re-create it."
        )
    try:
        # mmap needs the zip format; the legacy format is read eagerly.
        return torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            raise SoupError(f"{path} is a damaged or truncated PyTorch checkpoint: {e}") from e
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), str(e))
        raise SoupError(
            f"{path} holds Python objects besides tensors that `torch.load(weights_only=True)` refuses to "
            f"unpickle ({detail}). If you trust the file, allow them with "
            "`torch.serialization.add_safe_globals([...])` before loading, or re-save just the weights: "
            "`torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, new_path)`."
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # a damaged pickle fails in any way (KeyError, IndexError, struct.error, ...)
        detail = _format._short(f"{type(e).__name__}: {e}")
        raise SoupError(f"{path} is a damaged or truncated PyTorch checkpoint ({detail}).") from e


_MAX_EXPANDED = 1 << 28  # 256 MiB


def _check_claimed_size(path: Path, key: str, t: Tensor) -> None:
    """Refuse a tensor that claims far more elements than its storage holds (``expand``/stride tricks).

    Reading a tensor materialises every claimed element: a few bytes in the file can claim terabytes. A state dict
    holds dense tensors or views of them, which fit in their storage, and at most small expanded buffers (Hugging
    Face's ``position_ids = arange(n).expand(1, -1)``), so an overlapping view may claim up to
    ``_MAX_EXPANDED`` bytes.
    """
    if t.layout != torch.strided:
        raise SoupError(
            f"{path}: `{_format._short(key)}` is a {t.layout} tensor; only dense tensors are read. "
            "Re-save the state dict with `.to_dense()` tensors."
        )
    if t.is_quantized:
        raise SoupError(
            f"{path}: `{_format._short(key)}` is a quantised {t.dtype} tensor; only plain tensors are read. "
            "Re-save the state dict with `.dequantize()` tensors."
        )
    if t.device.type != "cpu":  # map_location="cpu" moves everything that has data; a meta tensor has none
        raise SoupError(
            f"{path}: `{_format._short(key)}` is a {t.device.type} tensor without data; save real weights."
        )
    claimed = t.numel() * t.element_size()
    held = t.untyped_storage().nbytes()
    if claimed > max(held, _MAX_EXPANDED):
        raise SoupError(
            f"{path}: `{_format._short(key)}` claims {list(t.shape)} = {t.numel()} elements ({claimed} bytes) but its "
            f"data holds only {held} bytes (an expanded or strided view); refusing to materialise it. Re-save the "
            "checkpoint with `.contiguous()` tensors if you made it."
        )


def _torch_state_dict(path: Path) -> dict[str, Tensor]:
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise SoupError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint dict; save `{{'state_dict': model.state_dict()}}`."
        )
    state = obj.get("state_dict")
    if not isinstance(state, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            state = obj  # a bare torch.save(model.state_dict()) file
        else:
            raise SoupError(
                f"{path} has no `state_dict` entry; its top-level keys are {_few([str(k) for k in obj], 10)}. "
                "Pass a checkpoint written by Lightning (Trainer.save_checkpoint / ModelCheckpoint) or by "
                "`torch.save({'state_dict': model.state_dict()}, path)`."
            )
    tensors: dict[str, Tensor] = {}
    skipped = []
    for key, value in state.items():
        if not isinstance(key, str):
            raise SoupError(f"{path}: its state_dict has a non-string key {_format._short(key)}.")
        if isinstance(value, Tensor):
            _check_claimed_size(path, key, value)
            tensors[key] = value
        else:
            skipped.append(key)
    if skipped:
        warnings.warn(
            f"{path}: ignoring state_dict entries that are not tensors: {_few(skipped)}.", UserWarning, stacklevel=4
        )
    return tensors


_MAX_INDEX = 100_000_000  # bytes; Hugging Face indexes of the largest models are a few MB


def read_index(index: Path) -> tuple[dict, dict[str, str]]:
    """The parsed shard index and its ``weight_map``, every shard name checked with :func:`confined`.

    Raises:
        SoupError: the index is unreadable, not a regular file, not JSON, has no ``weight_map``, or names a shard
            outside its folder.
    """
    try:
        with open_regular(index) as f:
            raw = f.read(_MAX_INDEX + 1)
    except OSError as e:
        raise SoupError(f"Could not read {index}: {e.strerror or e}.") from e
    if len(raw) > _MAX_INDEX:
        raise SoupError(f"{index} is larger than {_MAX_INDEX} bytes; it is not a shard index.")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_format._refuse_duplicates)
    except _format._DuplicateKey as e:
        raise SoupError(f"{index} lists `{_format._short(e.args[0])}` twice; re-create or re-download it.") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SoupError(f"{index} is not valid JSON; re-create or re-download the index.") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SoupError(f'{index} has no "weight_map" mapping tensor names to shard files; it is not a shard index.')
    for name in dict.fromkeys(weight_map.values()):
        confined(index.parent, name, what=f"a shard name in {index.name}")
    return doc, weight_map


def _open_sharded(index: Path) -> tuple[list[_SafetensorsSource], dict[str, tuple[_SafetensorsSource, str]], dict]:
    doc, weight_map = read_index(index)
    names = sorted(set(weight_map.values()))  # model-00001-of-N first: keys come back in the order written
    missing = [n for n in names if not (index.parent / n).exists()]
    if missing:
        raise SoupError(
            f"{index} references shard files that are missing from {index.parent}: {_few(missing)}. "
            "The copy or download is incomplete; fetch every shard."
        )
    sources: list[_SafetensorsSource] = []
    keys: dict[str, tuple[_SafetensorsSource, str]] = {}
    try:
        duplicates = []
        for name in names:
            source = _SafetensorsSource(index.parent / name)
            sources.append(source)
            for key in source.entries:
                if key in keys:
                    duplicates.append(f"`{key}` ({keys[key][0].path.name} and {name})")
                keys[key] = (source, key)
        if duplicates:
            raise SoupError(
                f"{index.parent}: these tensors are stored in more than one shard: {', '.join(duplicates[:5])}"
                f"{' …' if len(duplicates) > 5 else ''}. The shards come from different checkpoints; "
                "re-download them."
            )
        wrong = [k for k, n in weight_map.items() if k not in keys or keys[k][0].path != index.parent / n]
        if wrong:
            raise SoupError(
                f"{index} does not match its shards: {_few(wrong)} are not in the shard it names. "
                "The index and the shards come from different checkpoints; re-download them."
            )
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources, keys, doc


def _normalise_prefix(prefix: str | None) -> str:
    if not prefix:
        return ""
    return prefix if prefix.endswith(".") else prefix + "."


class LazyStateDict(Mapping[str, Tensor]):
    """A read-only ``Mapping[str, Tensor]`` over a checkpoint on disk; each tensor is read when it is accessed.

    Build it with :func:`open_state_dict`. Every access reads the tensor again into fresh CPU memory (cache it
    yourself if you need it twice); nothing else is read: opening parses only the headers, and :meth:`meta` gives
    shapes and dtypes without touching data. Keys iterate in file order (shard by shard for a sharded folder).
    Reads may come from several threads (a prefetching reader). Use it as a context manager, or call
    :meth:`close`, to release the file handles.

    Attributes:
        path: the path it was opened from.
        files: every file it reads (a sharded folder's index and shards), as opened (symlinks not resolved).
    """

    def __init__(
        self,
        path: Path,
        sources: list[_SafetensorsSource] | list[_TorchSource],
        keys: dict[str, tuple[Any, str]],
        metadata: dict[str, str],
        files: list[Path] | None = None,
    ) -> None:
        self.path = path
        self.files: list[Path] = list(files) if files is not None else [s.path for s in sources]
        self._sources = sources
        self._keys = keys
        self._metadata = metadata
        self._closed = False

    def __getitem__(self, key: str) -> Tensor:
        source, inner = self._keys[key]
        if self._closed:
            raise SoupError(f"{self.path} was closed; open it again with `open_state_dict`.")
        return source.read(inner)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def meta(self) -> dict[str, Tensor]:
        """``{key: meta-device tensor}`` with every tensor's shape and dtype; reads no tensor data."""
        return {key: source.meta(inner) for key, (source, inner) in self._keys.items()}

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (the first shard's for a sharded folder; empty for a ``.ckpt``)."""
        return dict(self._metadata)

    @property
    def recipe(self) -> Any:
        """The recipe ``lightning_soup`` stored with these weights (decoded JSON), or None."""
        return decode_recipe(self._metadata, self.path)

    def close(self) -> None:
        """Release the file handles; later accesses raise :class:`SoupError`."""
        self._closed = True
        for source in self._sources:
            source.close()

    def __enter__(self) -> LazyStateDict:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LazyStateDict({str(self.path)!r}, {len(self)} tensors)"


def decode_recipe(metadata: Mapping[str, str], path: Path) -> Any:
    raw = metadata.get(_format.RECIPE_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise SoupError(f"{path}: its `{_format.RECIPE_KEY}` metadata is not valid JSON.") from None


def open_state_dict(path: str | os.PathLike, *, prefix: str | None = None) -> LazyStateDict:
    """Open a checkpoint for lazy, tensor-by-tensor reading.

    Args:
        path: a ``.safetensors`` file; a sharded folder (``model.safetensors.index.json`` plus its shards; a
            folder holding a single ``model.safetensors`` works too) or the index file itself; or a Lightning
            ``.ckpt`` (its ``state_dict``; also ``.pt``/``.pth``/``.bin`` files, whose ``state_dict`` entry or
            whole content is used), loaded with ``torch.load(mmap=True, weights_only=True)``.
        prefix: keep only the keys under this module path and strip it, e.g. ``"model"`` turns
            ``model.encoder.weight`` into ``encoder.weight`` (a trailing ``.`` is implied).

    Returns:
        A :class:`LazyStateDict`; close it (or use ``with``) when done.

    Raises:
        SoupError: the path is missing, has an unknown extension, is corrupt or truncated, is a checkpoint without
            a ``state_dict``, is a shard index whose shards are missing or overlap, or no key starts with
            ``prefix``.

    Example:
        >>> import tempfile, torch
        >>> from lightning_soup.storage import save_state_dict
        >>> path = save_state_dict({"model.w": torch.ones(2, 3)}, Path(tempfile.mkdtemp()) / "w.safetensors")
        >>> with open_state_dict(path, prefix="model") as sd:
        ...     list(sd), sd.meta()["w"].shape, sd["w"].sum().item()
        (['w'], torch.Size([2, 3]), 6.0)
    """
    _format.check_byteorder()
    kind, file = resolve(path)
    sources: list[Any]
    files = [file]
    if kind == "safetensors":
        source = _SafetensorsSource(file)
        sources, keys, metadata = [source], {k: (source, k) for k in source.entries}, source.metadata
    elif kind == "sharded":
        sources, keys, doc = _open_sharded(file)
        files += [s.path for s in sources]
        metadata = dict(sources[0].metadata) if sources else {}
        index_meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        if _format.RECIPE_KEY not in metadata and isinstance(index_meta.get(_format.RECIPE_KEY), str):
            metadata[_format.RECIPE_KEY] = index_meta[_format.RECIPE_KEY]
    else:
        torch_source = _TorchSource(file)
        sources, keys, metadata = [torch_source], {k: (torch_source, k) for k in torch_source.tensors}, {}
    stem = _normalise_prefix(prefix)
    if stem:
        selected = {k[len(stem) :]: v for k, v in keys.items() if k.startswith(stem)}
        if not selected:
            for s in sources:
                s.close()
            tops = list(dict.fromkeys(k.split(".", 1)[0] for k in keys))
            raise SoupError(
                f"No key of {file} starts with `{stem}` (`prefix={prefix!r}`). Its keys look like "
                f"{_few(list(keys), 3) or 'nothing (it is empty)'}; top-level names: {_few(tops) or 'none'}."
            )
        keys = selected
    return LazyStateDict(Path(path).expanduser(), sources, keys, metadata, files)


def load_state_dict(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, prefix: str | None = None
) -> dict[str, Tensor]:
    """Read a whole checkpoint (any format :func:`open_state_dict` accepts) into a ``dict`` on ``device``.

    Raises:
        SoupError: as :func:`open_state_dict`.
    """
    with open_state_dict(path, prefix=prefix) as sd:
        return {key: sd[key].to(device) for key in sd}


def read_recipe(path: str | os.PathLike) -> Any:
    """The recipe stored in a safetensors file or sharded folder by ``lightning_soup``, or None.

    Reads only headers. Torch checkpoints (``.ckpt``) carry no recipe: None.

    Raises:
        SoupError: the path is missing or not a readable checkpoint.
    """
    kind, file = resolve(path)
    if kind == "torch":
        return None
    with open_state_dict(file) as sd:
        return sd.recipe


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, or of a sharded checkpoint folder; streamed, so memory stays small.

    For a folder the digest covers the index and every shard it references (or the single ``.safetensors``
    file): it is the SHA-256 of the ``sha256sum``-style manifest ``"<file digest>  <name>\\n"`` with the files
    sorted by name, so ``cd folder && sha256sum $(ls model*) | sha256sum`` reproduces it for a folder holding
    only those files.

    Raises:
        SoupError: the path is missing or unreadable.
    """
    p = Path(path).expanduser()
    try:
        if not p.is_dir():
            if not p.exists():
                raise SoupError(f"{p} does not exist.")
            return _sha256(p)
        kind, file = resolve(p)
        files = [file]
        if kind == "sharded":
            _, weight_map = read_index(file)  # shard names confined to the folder
            files += [file.parent / n for n in dict.fromkeys(weight_map.values())]
        manifest = "".join(f"{_sha256(f)}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    except SoupError:
        raise
    except OSError as e:
        raise SoupError(f"Could not read {p}: {e.strerror or e}.") from e
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()

