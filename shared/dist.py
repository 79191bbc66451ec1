"""Which worker this process is, from whatever launched it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from refdpo.shared.errors import UsageError
from refdpo.shared.logs import TqdmHandler, quiet_libraries


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size), first found of:

    explicit values; RANK/WORLD_SIZE (torchrun, the deepspeed launcher); SLURM_PROCID /
    SLURM_NTASKS (srun); a SLURM job array (task i of n, counted from the array's first id);
    otherwise a single worker.
    """
    env = os.environ
    if rank is None and world_size is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            rank = int(env["SLURM_ARRAY_TASK_ID"]) - first
            world_size = int(env["SLURM_ARRAY_TASK_COUNT"])
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def setup_logging(
    rank: int, world: int, other_ranks_level: int = logging.INFO, verbose: bool = False
) -> None:
    """Timestamped records on stderr, tagged with the rank when there are several, written
    through tqdm so that a progress bar never swallows one (see shared/logs.py).

    refdpo's own loggers are set explicitly so that they also log when a host application
    configured logging first (its handlers and levels are then left alone). Quiet, the
    default, other libraries show warnings and errors only and their progress bars are off;
    verbose shows everything, as without refdpo, and sets REFDPO_VERBOSE=1 for code that
    has no config to read.
    """
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    formatter = logging.Formatter(
        f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(TqdmHandler())
    ours = [h for h in root.handlers if isinstance(h, TqdmHandler)]
    for handler in ours:  # a second call (a test, two stages in one process) may retag
        handler.setFormatter(formatter)
    if ours:  # INFO from torch, the hub, ... only when asked for
        root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("refdpo").setLevel(logging.INFO if rank == 0 else other_ranks_level)
    quiet_libraries(verbose)


def exit_process(code: int) -> None:
    """End a process that joined a process group, skipping the interpreter's teardown.

    Everything refdpo opened is closed by now (metrics, trackers, checkpoints are written
    synchronously). What is left is c10d's: a gloo process group torn down by the
    interpreter's exit moments after it was created (a run refused in preflight) sometimes
    ends in std::terminate, exit -6 instead of the run's own code (seen about once in 40
    runs on CPU). Leaving with os._exit keeps the code."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(code)
