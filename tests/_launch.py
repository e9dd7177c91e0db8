"""Run a worker script from ``tests/dist`` as real processes and read back what each rank wrote.

Multi-process tests do not run the trainer inside pytest: a worker script is started as fresh processes (one per
rank, the way ``torchrun`` does, or one process that launches its own like ``ddp_spawn``), on a free port, with a
timeout after which every process group started here is killed. Workers write ``rank{R}.json`` (and any tensors)
into the output folder given in ``$SOUP_TEST_OUT``; :func:`launch` returns those results, or fails the test with
the tail of every rank's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DIST = TESTS / "dist"


def free_port() -> int:
    """A TCP port nothing listens on right now, for one launch's ``MASTER_PORT``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return text[-n:]


def _kill(proc: subprocess.Popen) -> None:
    """Kill the process group this module started for ``proc`` (the worker and anything it spawned)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def launch(
    script: str,
    out: Path,
    *args: str,
    nprocs: int = 2,
    mode: Literal["ranks", "nodes", "single"] = "ranks",
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tests/dist/<script>`` and return the results each rank wrote, indexed by global rank.

    Args:
        script: file name under ``tests/dist``.
        out: the folder for the workers' results, logs and outputs (``$SOUP_TEST_OUT``).
        *args: command-line arguments for the worker.
        nprocs: number of ranks.
        mode: ``"ranks"``: ``nprocs`` processes on one node (``LOCAL_RANK`` = rank), for ``devices=nprocs``;
            ``"nodes"``: ``nprocs`` single-process nodes (``NODE_RANK`` = rank, ``LOCAL_RANK=0``), for
            ``num_nodes=nprocs, devices=1``; ``"single"``: one process that starts the others itself
            (``ddp_spawn``), which writes the results of all ranks.
        timeout: seconds before every process is killed and the test fails.
        env: extra environment variables.

    Raises:
        AssertionError: a process failed or timed out, or a rank wrote no result; the message holds the logs.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = {
        **os.environ,
        "SOUP_TEST_OUT": str(out),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        # Two cores are shared by everyone: one thread per rank, and no progress output.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(DIST), str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE"):
        base.pop(var, None)
    ranks = [0] if mode == "single" else list(range(nprocs))
    procs: list[tuple[int, subprocess.Popen, Path]] = []
    try:
        for rank in ranks:
            proc_env = dict(base)
            if mode != "single":
                proc_env.update(
                    WORLD_SIZE=str(nprocs),
                    RANK=str(rank),
                    LOCAL_RANK=str(rank if mode == "ranks" else 0),
                    NODE_RANK=str(0 if mode == "ranks" else rank),
                )
            log = out / f"log_rank{rank}.txt"
            with open(log, "wb") as f:
                proc = subprocess.Popen(
                    [sys.executable, str(DIST / script), *args],
                    cwd=str(out),
                    env=proc_env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so a timeout kills ranks it spawned too
                )
            procs.append((rank, proc, log))
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.poll() is None for _, p, _ in procs):
            now = time.monotonic()
            if any(p.poll() not in (None, 0) for _, p, _ in procs) and failed_at is None:
                failed_at = now  # a dead rank leaves the others blocked in a collective: give them a moment
            if now > deadline or (failed_at is not None and now - failed_at > 15):
                break
            time.sleep(0.1)
        timed_out = any(p.poll() is None for _, p, _ in procs)
    finally:
        for _, p, _ in procs:
            _kill(p)
    codes = {rank: p.returncode for rank, p, _ in procs}
    if timed_out or any(codes.values()):
        logs = "\n".join(f"----- rank {rank} (exit {codes[rank]}) -----\n{_tail(log)}" for rank, _, log in procs)
        what = f"timed out after {timeout:.0f}s" if timed_out else "failed"
        raise AssertionError(f"worker {script} {' '.join(args)} {what}:\n{logs}")
    results = []
    for rank in range(nprocs):
        path = out / f"rank{rank}.json"
        if not path.exists():
            logs = "\n".join(_tail(log) for _, _, log in procs)
            raise AssertionError(f"worker {script} wrote no result for rank {rank}:\n{logs}")
        results.append(json.loads(path.read_text()))
    return results
