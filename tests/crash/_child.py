"""Run ``soup_worker.run`` in a child process with a timeout, and report how it ended.

On POSIX the child is forked from the test process, so torch and Lightning are already imported (a fresh
interpreter takes 5–20 s just to import them on a loaded two-core machine); ``SOUP_CRASH_SPAWN=1`` (or a platform
without ``fork``) runs ``python tests/crash/soup_worker.py`` instead. Either way the child is a real process that
SIGKILL ends with no cleanup, writes only under its ``out`` folder, and logs to ``out/log-<n>.txt``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def _fork(out: Path, log: Path, timeout: float, **kwargs: Any) -> int:
    _warm_imports(kwargs.get("flavour", "pytorch_lightning"))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.setpgid(0, 0)  # its own process group, so a timeout kills anything it started
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
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"soup_worker {kwargs} timed out after {timeout:.0f}s:\n{tail(log)}")
        time.sleep(0.05)


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
