"""Run ``soup_worker.run`` in a child process with a timeout, and report how it ended.

On POSIX the child is forked from a ``forkserver`` that has torch and Lightning imported (a fresh interpreter takes
5–20 s just to import them on a loaded two-core machine) but has never run a kernel, so torch's OpenMP pool in the
test process cannot deadlock the child; ``SOUP_CRASH_SPAWN=1`` (or a platform
without ``fork``) runs ``python tests/crash/soup_worker.py`` instead. Either way the child is a real process that
SIGKILL ends with no cleanup, writes only under its ``out`` folder, and logs to ``out/log-<n>.txt``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve().with_name("soup_worker.py")
ROOT = WORKER.parents[2]


def _log_path(out: Path) -> Path:
    n = 0
    while (out / f"log-{n}.txt").exists():
        n += 1
    return out / f"log-{n}.txt"


def tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def run_child(out: Path, *, timeout: float = 240.0, **kwargs: Any) -> tuple[int, Path]:
    """Run ``soup_worker.run(out, **kwargs)`` in a child; return ``(exit code, log)``.

    The exit code follows ``subprocess``: ``-9`` when the child was SIGKILLed (the worker's kill points), ``0`` when
    it finished, ``1`` when it raised (the traceback is in the log).

    Raises:
        AssertionError: the child did not end within ``timeout`` seconds (it is killed first).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _log_path(out)
    if os.environ.get("SOUP_CRASH_SPAWN") == "1" or not hasattr(os, "fork"):
        return _spawn(out, log, timeout, **kwargs), log
    return _fork(out, log, timeout, **kwargs), log


def _warm_imports(flavour: str) -> None:
    """Import in the parent what every child would otherwise import again: Lightning, the callbacks, the plots."""
    import importlib

    from tests.crash.soup_worker import FLAVOURS

    for name in [*FLAVOURS[flavour], "lightning_soup.callbacks._report", "rich.console", "rich.table"]:
        importlib.import_module(name)
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):  # the blend's plot, when installed
        try:
            importlib.import_module(name)
        except ImportError:
            pass


_SERVER: Any = None


def _context(flavour: str) -> Any:
    """A ``forkserver`` context whose server imported torch, Lightning and the callbacks but never computed.

    Children are forked from that clean server, not from the test process: once the test process has run torch's
    OpenMP thread pool (any earlier test that trained a model big enough), a child forked from it hangs in its first
    parallel kernel (GNU OpenMP is not fork-safe). The server starts once per session.
    """
    global _SERVER
    import multiprocessing

    if _SERVER is None:
        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(["tests.crash._child", "tests.crash.soup_worker"])
    _warm_imports(flavour)
    return _SERVER


def _child_main(out: Path, log: Path, kwargs: dict[str, Any]) -> None:
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.setpgid(0, 0)  # its own process group, so a timeout kills anything it started
        _warm_imports(kwargs.get("flavour", "pytorch_lightning"))
        from tests.crash.soup_worker import run

        run(out, **kwargs)
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def _fork(out: Path, log: Path, timeout: float, **kwargs: Any) -> int:
    ctx = _context(kwargs.get("flavour", "pytorch_lightning"))
    sys.stdout.flush()
    sys.stderr.flush()
    proc = ctx.Process(target=_child_main, args=(out, log, kwargs), daemon=False)
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            proc.kill()
        proc.join()
        raise AssertionError(f"soup_worker {kwargs} timed out after {timeout:.0f}s:\n{tail(log)}")
    return proc.exitcode


def _spawn(out: Path, log: Path, timeout: float, **kwargs: Any) -> int:
    argv = [sys.executable, str(WORKER), str(out)]
    if kwargs.get("kill_at"):
        argv += ["--kill-at", kwargs["kill_at"]]
    if kwargs.get("resume"):
        argv.append("--resume")
    if kwargs.get("max_epochs"):
        argv += ["--max-epochs", str(kwargs["max_epochs"])]
    if kwargs.get("flavour"):
        argv += ["--flavour", kwargs["flavour"]]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=str(out), env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"soup_worker {kwargs} timed out after {timeout:.0f}s:\n{tail(log)}") from None
