"""Atomic file and folder writes: temporary name in the same folder, fsync, ``os.replace``, fsync the folder.

Temporary names look like ``.<final name>.tmp-<pid>-<8 hex><final suffix>`` (``.soup.safetensors.tmp-4242-1a2b3c4d
.safetensors``): hidden, recognisable by :func:`remove_stale_temp_files`, and ending in the final suffix so that
libraries which pick a format from the file name (matplotlib, numpy) write the right one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_soup.errors import SoupError

# ".tmp-": a file being written; ".old-": a previous version set aside while a folder takes its place.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})(?:\.[^.]*)?$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

# Names of the temporaries this process is writing right now (unique: they carry the pid and a random tag);
# remove_stale_temp_files never touches them.
_active: set[str] = set()
_active_lock = threading.Lock()


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def new_temp_path(final: Path, kind: str = "tmp") -> Path:
    """A fresh temporary path next to ``final``, registered as in use until :func:`release` is called."""
    tmp = final.with_name(f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{final.suffix}")
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


def _replaceable_folder(path: Path) -> bool:
    """True for a folder holding only safetensors files and index json (a sharded checkpoint we may overwrite)."""
    return all(
        child.is_file() and (child.name.endswith(".safetensors") or child.name.endswith(".index.json"))
        for child in path.iterdir()
    )


def commit(tmp: Path, final: Path) -> None:
    """Move the finished, fsynced ``tmp`` (file or folder) to ``final`` and make the rename durable.

    A file replaces a file atomically. Renaming cannot swap a folder with anything in one step, so when a folder
    is involved an existing ``final`` is first moved aside under a temporary name, ``tmp`` takes its place, and
    the old one is deleted; if the process dies between the two renames, :func:`remove_stale_temp_files` puts the
    old version back. Folders holding anything but safetensors files and index json are never replaced.

    Raises:
        SoupError: ``final`` is a folder that is not a sharded checkpoint.
        OSError: the rename failed.
    """
    final_is_dir = final.is_dir() and not final.is_symlink()
    if final_is_dir and not _replaceable_folder(final):
        raise SoupError(
            f"{final} is a folder with files other than safetensors shards; refusing to replace it. "
            "Choose another output path or remove the folder yourself."
        )
    if final_is_dir or (tmp.is_dir() and os.path.lexists(final)):
        aside = new_temp_path(final, "old")
        try:
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
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
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file (or folder) under ``path`` all at once or not at all.

    Yields a temporary path in the same folder; write the file there with any library. On a clean exit the
    temporary is fsynced and renamed to ``path`` (replacing any previous file atomically); on an exception it is
    deleted and any previous file under ``path`` is untouched. Missing parent folders are created.

    Raises:
        SoupError: the body wrote nothing, or an ``OSError`` happened (disk full, permissions); it names ``path``.

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
        commit(tmp, final)
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

    Only names of our temporary form (``.<name>.tmp-<pid>-<8 hex>[.<suffix>]``) are considered, and among them only
    those whose writer is gone: another live process's temporaries are kept, and so are this process's own
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
        m = _TEMP_RE.match(child.name)
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
