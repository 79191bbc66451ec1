"""Kill real processes at a chosen place: arm a fault point, wait until it stops, SIGKILL.

A process that reaches an armed fault point (refdpo/shared/faults.py) stops itself with
SIGSTOP. These helpers find it in the process tree (a launcher's ranks included), check
that it is stopped there, and kill it from outside.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def state(pid: int) -> str | None:
    """The one-letter state of a process from /proc (T: stopped), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # the name in (...) may hold spaces


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def tree(pid: int) -> list[int]:
    """pid and all its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if state(p) not in (None, "Z"):
            out.append(p)
        todo.extend(children(p))
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def runs_module(pid: int, module: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(a == b"-m" and b == module.encode() for a, b in itertools.pairwise(argv))


def rank_pids(
    launcher: int, ranks: int, module: str = "refdpo.train.run", timeout: float = 120
) -> dict[int, int]:
    """{rank: pid} of the processes under a launcher that run `python -m module` with RANK
    in their environment (the launcher's own processes only pass the module name on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for pid in tree(launcher):
            rank = rank_of(pid)
            if rank is not None and runs_module(pid, module):
                found[rank] = pid
        if len(found) == ranks:
            return found
        time.sleep(0.1)
    raise AssertionError(f"did not find {ranks} ranks under {launcher}")


@dataclass
class Run:
    """A command started in the background with its stderr in a file."""

    proc: subprocess.Popen
    log: Path

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)


def start(cmd: list[str], log: Path, env: dict, faults: str = "") -> Run:
    env = {**env, "REFDPO_FAULTS": faults} if faults else env
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return Run(proc, log)


def wait_stopped(run: Run, point: str, timeout: float = 300) -> int:
    """The pid in run's tree that stopped at fault point `point`; fails if the run ends or
    the time runs out first (the fault did not fire)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stopped = [p for p in tree(run.proc.pid) if state(p) == "T"]
        if stopped and f"fault point {point} reached" in run.stderr:
            return stopped[0]
        if run.proc.poll() is not None:
            raise AssertionError(
                f"ended ({run.proc.returncode}) before {point}:\n{run.stderr[-3000:]}"
            )
        time.sleep(0.02)
    raise AssertionError(f"fault point {point} not reached in {timeout} s")


def kill_at(run: Run, point: str, timeout: float = 300) -> int:
    """Wait for the fault point, SIGKILL the stopped process; return its pid."""
    pid = wait_stopped(run, point, timeout)
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_tree(pid: int) -> None:
    for p in tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
