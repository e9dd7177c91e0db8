"""Which files a reader may open or a cleaner may delete: the path rules every read and delete goes through.

Names that come from files (a shard index's ``weight_map``, the file names a checkpoint's callback state records)
are untrusted: :func:`confined` keeps them inside the folder they belong to. Only the *names* are confined, not
where symlinks lead: a Hugging Face cache folder (``snapshots/<rev>/model.safetensors -> ../../blobs/<sha>``) is
the user's own layout and keeps working. :func:`open_regular` opens a file for reading only if it is a regular
file, so a FIFO, socket or device given as a checkpoint is refused at once instead of blocking forever.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from lightning_soup.errors import SoupError


def confined(root: str | os.PathLike, name: object, *, what: str = "a file name") -> Path:
    """``root / name`` for a ``name`` read from an untrusted file, refusing names that leave ``root``.

    ``name`` must be a non-empty relative path without ``..`` parts, backslashes, NUL bytes or a drive
    (``x.safetensors`` and ``sub/x.safetensors`` are fine; ``../x``, ``/etc/passwd``, ``C:x`` and ``a/../../x`` are
    not). The check is on the name only: a symlink inside ``root`` may point anywhere (the user made it).

    Use it for every path built from a name that a file or a checkpoint recorded, before reading or deleting it.

    Args:
        root: the folder the name belongs to.
        name: the recorded name.
        what: what the name is, for the error message (e.g. ``"a shard name in model.safetensors.index.json"``).

    Returns:
        ``Path(root) / name``.

    Raises:
        SoupError: ``name`` is not a string, or it would leave ``root``.

    Example:
        >>> confined("ckpts", "model-00001-of-00002.safetensors").as_posix()
        'ckpts/model-00001-of-00002.safetensors'
        >>> confined("ckpts", "../secret/x.safetensors")
        Traceback (most recent call last):
        ...
        lightning_soup.errors.SoupError: ...
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is not a non-empty string"
    elif "\x00" in name or "\\" in name:
        problem = "it contains a NUL byte or a backslash"
    elif PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        problem = "it is an absolute path"
    elif ".." in PurePosixPath(name).parts:
        problem = "it has a `..` part"
    if problem is not None:
        shown = repr(name)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise SoupError(
            f"{Path(root)}: {what} ({shown}) points outside that folder ({problem}); refusing to use it. "
            "Names recorded in files must be plain names inside their folder; the file is damaged or was crafted."
        )
    return Path(root) / name


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path: Path, mode: int) -> SoupError:
    return SoupError(
        f"{path} is {_kind(mode)}, not a regular file; refusing to read it. Pass a checkpoint file (or the folder "
        "of a sharded checkpoint)."
    )


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for unbuffered binary reading if it is a regular file (a symlink to one is fine).

    The open itself cannot block: a FIFO is opened non-blocking and refused after ``fstat``, before any read.

    Raises:
        SoupError: the path is missing, unreadable, or not a regular file.
    """
    p = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(p, flags)
    except OSError as e:
        raise SoupError(f"Could not open {p}: {e.strerror or e}.") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(p, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0, closefd=True)  # the caller closes it
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike) -> None:
    """Refuse a path that exists but is not a regular file (or a symlink to one), without opening it.

    Raises:
        SoupError: ``path`` is a FIFO, socket, device or folder.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing: the caller's own message says so
    if not stat.S_ISREG(mode):
        raise not_regular(Path(path), mode)
