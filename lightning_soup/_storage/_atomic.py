"""Atomic file and folder writes: temporary name in the same folder, fsync, ``os.replace``, fsync the folder.

Temporary names look like ``.<final name>.tmp-<pid>-<16 hex><final suffix>`` (``.soup.safetensors.tmp-4242-
1a2b3c4d9e8f7a6b.safetensors``): hidden, ending in the final suffix so that libraries which pick a format from the
file name (matplotlib, numpy) write the right one, and provably ours: the last 8 hex digits are a checksum of the
rest of the name, so :func:`remove_stale_temp_files` never mistakes a user's file or folder that merely looks like
a temporary (``.data.tmp-999999-abcdef12``) for one of ours.

Publishing a result either replaces what is there (``overwrite=True``) or never does (``overwrite=False``: the
rename fails if the name was taken meanwhile, so of two writers racing for one name exactly one wins). A folder is
only ever replaced when it is a previous output of ours (:func:`replace_problem`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_soup.errors import SoupError

# ".tmp-": a file being written; ".old-": a previous version set aside while a folder takes its place.
_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<nonce>[0-9a-f]{8})(?P<check>[0-9a-f]{8})(?:\.[^.]*)?$"
)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

# Names of the temporaries this process is writing right now (unique: they carry the pid and a random tag);
# remove_stale_temp_files never touches them.
_active: set[str] = set()
_active_lock = threading.Lock()


def _checksum(name: str, kind: str, pid: int, nonce: str) -> str:
    return hashlib.sha256(f"lightning_soup\0{name}\0{kind}\0{pid}\0{nonce}".encode()).hexdigest()[:8]


def _match(name: str) -> re.Match[str] | None:
    """The parts of one of our temporary names, or None (a name that only looks like one is not ours)."""
    m = _TEMP_RE.match(name)
    if m is None:
        return None
    expected = _checksum(m.group("name"), m.group("kind"), int(m.group("pid")), m.group("nonce"))
    return m if m.group("check") == expected else None


def is_temp_name(name: str) -> bool:
    """True for a name that our atomic writes made (checksum included)."""
    return _match(name) is not None


def temp_name(final_name: str, kind: str = "tmp", pid: int | None = None, suffix: str = "") -> str:
    """A fresh temporary name for ``final_name`` carrying ``pid`` (default: this process's)."""
    pid = os.getpid() if pid is None else pid
    nonce = uuid.uuid4().hex[:8]
    return f".{final_name}.{kind}-{pid}-{nonce}{_checksum(final_name, kind, pid, nonce)}{suffix}"


def new_temp_path(final: Path, kind: str = "tmp") -> Path:
    """A fresh temporary path next to ``final``, registered as in use until :func:`release` is called."""
    tmp = final.with_name(temp_name(final.name, kind, suffix=final.suffix))
    with _active_lock:
        _active.add(tmp.name)
    return tmp


def release(tmp: Path) -> None:
    with _active_lock:
        _active.discard(tmp.name)


def os_error(e: OSError, path: Path) -> SoupError:
    """A SoupError naming ``path`` that says what went wrong with the disk and what to do."""
    if e.errno in _DISK_FULL:
        return SoupError(
            f"The disk is full: no space left to write {path}. Free some space or choose another output location; "
            "any previous file under that name is unchanged."
        )
    return SoupError(f"Could not write {path}: {e.strerror or e}. Check that the folder exists and is writable.")


def remove(path: Path) -> None:
    """Delete a file or folder if it exists; never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows) or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            fsync_tree(child)
        fsync_dir(path)
    else:
        fsync_file(path)


#: What the writer marks in the index metadata of every sharded folder it writes (with or without a recipe).
WRITER_MARK = ("written_by", "lightning_soup")
#: Files that a model folder written by lightning-soup may hold besides its weights (a Hugging Face model folder).
COMPANION_FILES = frozenset(
    {
        "README.md",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        "adapter_config.json",
    }
)


def _our_weights(folder: Path, names: set[str]) -> set[str] | None:
    """The weight files of a folder written by lightning-soup (its index or model.safetensors says so), or None."""
    from lightning_soup._storage import _format
    from lightning_soup._storage._paths import open_regular

    index_names = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(index_names) == 1:
        try:
            with open_regular(folder / index_names[0]) as f:
                doc = json.loads(f.read(100_000_000).decode("utf-8"))
            metadata, weight_map = doc.get("metadata") or {}, doc["weight_map"]
            ours = metadata.get(WRITER_MARK[0]) == WRITER_MARK[1] or _format.RECIPE_KEY in metadata
            shards = {v for v in weight_map.values() if isinstance(v, str)}
        except (OSError, SoupError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
            return None
        return {index_names[0], *shards} if ours else None
    if not index_names and "model.safetensors" in names:
        try:
            with open_regular(folder / "model.safetensors") as f:
                _, metadata = _format.read_header(f, folder / "model.safetensors")
        except (OSError, SoupError):
            return None
        return {"model.safetensors"} if _format.RECIPE_KEY in metadata else None
    return None


def replace_problem(final: str | os.PathLike) -> str | None:
    """Why the existing folder ``final`` must not be replaced by a new output, or None when it may be.

    A folder is replaced only when it is a previous output of lightning-soup: its shard index carries our mark or
    recipe (or its single ``model.safetensors`` carries a recipe), and it holds nothing else than those weights and
    the files of a Hugging Face model folder (:data:`COMPANION_FILES`) — no sub-folders, links or other files.
    A missing path or a file is no folder: None.
    """
    path = Path(final)
    if not path.is_dir() or path.is_symlink():
        return None
    try:
        children = list(path.iterdir())
    except OSError as e:
        return f"it cannot be listed ({e.strerror or e})"
    odd = [c.name for c in children if c.is_symlink() or not c.is_file()]
    if odd:
        return f"it holds sub-folders or links ({', '.join(sorted(odd)[:3])})"
    names = {c.name for c in children}
    if not names:
        return None  # an empty folder holds nothing to lose
    weights = _our_weights(path, names)
    if weights is None:
        return "it is not a previous lightning-soup output (no shard index or model.safetensors written by us)"
    others = sorted(names - weights - COMPANION_FILES)
    if others:
        more = " …" if len(others) > 3 else ""
        return f"it holds files lightning-soup did not write ({', '.join(others[:3])}{more})"
    return None


def check_replaceable(final: str | os.PathLike) -> None:
    """Raise if ``final`` is a folder that a new output must not replace (see :func:`replace_problem`).

    Raises:
        SoupError: naming the folder and why.
    """
    problem = replace_problem(final)
    if problem is not None:
        raise SoupError(
            f"{final} is a folder and {problem}; refusing to replace it, even when overwriting is allowed. "
            "Choose another output path, or remove the folder yourself."
        )


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return getattr(libc, "renameat2", None)
    except (OSError, AttributeError):  # pragma: no cover - no libc to ask
        return None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` (file or folder) to ``dst`` only if nothing is there, atomically.

    Linux: ``renameat2(RENAME_NOREPLACE)``. Elsewhere, or on a filesystem without it: a file is hard-linked
    (``link`` fails if ``dst`` exists) and the temporary unlinked; a folder first reserves ``dst`` with ``mkdir``
    (exclusive) and then takes its place (renaming a folder onto an empty folder is atomic in POSIX).

    Raises:
        FileExistsError: ``dst`` exists.
        OSError: the rename failed otherwise.
    """
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL), errno.EPERM):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.name == "nt":  # pragma: no cover - Windows renames never replace
        os.rename(src, dst)
        return
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # FileExistsError when taken: the reservation
        try:
            os.rename(src, dst)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            raise
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem: check, then rename (a narrow race remains)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def commit(tmp: Path, final: Path, *, overwrite: bool = True) -> None:
    """Move the finished, fsynced ``tmp`` (file or folder) to ``final`` and make the rename durable.

    With ``overwrite=False`` nothing that exists under ``final`` is ever replaced, not even something that
    appeared while ``tmp`` was being written (:func:`rename_noreplace`). Otherwise a file replaces a file
    atomically. Renaming cannot swap a folder with anything in one step, so when a folder is involved an existing
    ``final`` is first moved aside under a temporary name, ``tmp`` takes its place, and the old one is deleted; if
    the process dies between the two renames, :func:`remove_stale_temp_files` puts the old version back. Only a
    previous output of ours is ever replaced as a folder (:func:`check_replaceable`).

    Raises:
        SoupError: ``final`` exists and ``overwrite`` is False, or it is a folder we must not replace.
        OSError: the rename failed.
    """
    if not overwrite:
        try:
            rename_noreplace(tmp, final)
        except FileExistsError:
            raise SoupError(
                f"{final} already exists (another process may have written it meanwhile); refusing to replace it, "
                "so nothing was written. Choose another output path or allow overwriting (--force)."
            ) from None
        fsync_dir(final.parent)
        return
    final_is_dir = final.is_dir() and not final.is_symlink()
    if final_is_dir:
        check_replaceable(final)
    if final_is_dir or (tmp.is_dir() and os.path.lexists(final)):
        aside = new_temp_path(final, "old")
        try:
            os.replace(final, aside)
            try:
                rename_noreplace(tmp, final)  # a racing writer's output is not deleted with ours
            except OSError:
                os.replace(aside, final)  # put the previous version back
                raise
            fsync_dir(final.parent)
            remove(aside)
        finally:
            release(aside)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


def make_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, final) from e


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Write a file (or folder) under ``path`` all at once or not at all.

    Yields a temporary path in the same folder; write the file there with any library. On a clean exit the
    temporary is fsynced and renamed to ``path`` (replacing any previous file atomically, unless ``overwrite`` is
    False: then an existing ``path``, even one created meanwhile, is never replaced); on an exception it is
    deleted and any previous file under ``path`` is untouched. Missing parent folders are created. A folder is
    only ever replaced by a new output when it is a previous output of ours (:func:`check_replaceable`).

    Raises:
        SoupError: the body wrote nothing, ``path`` exists and ``overwrite`` is False, ``path`` is a folder that
            must not be replaced, or an ``OSError`` happened (disk full, permissions); it names ``path``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_write(folder / "notes.txt") as tmp:
        ...     _ = tmp.write_text("hello")
        >>> (folder / "notes.txt").read_text(), [p.name for p in folder.iterdir()]
        ('hello', ['notes.txt'])
    """
    final = Path(path).expanduser()
    make_parent(final)
    tmp = new_temp_path(final)
    try:
        yield tmp
        if not tmp.exists():
            raise SoupError(f"Nothing was written for {final}: write to the path that `atomic_write` yields.")
        fsync_tree(tmp)
        commit(tmp, final, overwrite=overwrite)
    except OSError as e:
        remove(tmp)
        raise os_error(e, final) from e
    except BaseException:
        remove(tmp)
        raise
    finally:
        release(tmp)


def json_default(obj: Any) -> Any:
    """JSON encoding for the values recipes typically hold: paths, tensors and numpy scalars/arrays."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any, what: str, **kwargs: Any) -> str:
    try:
        return json.dumps(obj, default=json_default, ensure_ascii=False, **kwargs)
    except (TypeError, ValueError) as e:
        raise SoupError(f"{what} must be JSON-serialisable (dicts, lists, str, numbers, bools, None): {e}.") from e


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON data: non-finite floats become ``None`` (strict JSON readers refuse ``NaN``), tuples
    become lists and mapping keys strings.

    Example:
        >>> json_safe({"score": float("nan"), "scales": (0.5, 1.0), 1: [float("inf")]})
        {'score': None, 'scales': [0.5, 1.0], '1': [None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON (newline-terminated) to ``path`` atomically.

    Paths, tensors and numpy values are converted (``str``/``tolist()``); non-finite floats are written as
    ``NaN``/``Infinity``, which Python's :mod:`json` reads back.

    Returns:
        The path written.

    Raises:
        SoupError: ``obj`` is not JSON-serialisable, or the file cannot be written.

    Example:
        >>> import tempfile
        >>> path = write_json({"ratio": 0.5}, Path(tempfile.mkdtemp()) / "blend.json")
        >>> json.loads(path.read_text())
        {'ratio': 0.5}
    """
    text = dumps(obj, "The object to write", indent=indent) + "\n"
    final = Path(path).expanduser()
    with atomic_write(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders our atomic writes left behind in ``folder`` when a process died.

    Only names of our temporary form (``.<name>.tmp-<pid>-<16 hex>[.<suffix>]``) with a valid checksum are
    considered (a user's ``.data.tmp-999999-abcdef12`` is not ours and is kept), and among them only those whose
    writer is gone: another live process's temporaries are kept, and so are this process's own
    writes in flight. A temporary carrying this process's id but not in flight is stale (a restarted container
    often reuses the same process id). A previous version set aside while a sharded folder was being replaced
    (``.<name>.old-...``) is moved back to ``<name>`` if nothing took its place, and deleted otherwise. Missing
    folders are fine.

    Returns:
        The paths removed (not those moved back).
    """
    root = Path(folder).expanduser()
    try:
        children = list(root.iterdir())
    except OSError:
        return []
    removed = []
    me = os.getpid()
    for child in children:
        m = _match(child.name)
        if m is None:
            continue
        with _active_lock:
            in_flight = child.name in _active
        pid = int(m.group("pid"))
        if in_flight or (pid != me and _pid_alive(pid)):
            continue
        original = root / m.group("name")
        if m.group("kind") == "old" and not os.path.lexists(original):
            try:
                os.replace(child, original)
                continue
            except OSError:
                pass
        remove(child)
        removed.append(child)
    return removed
