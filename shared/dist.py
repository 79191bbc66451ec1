"""Which worker this process is, from whatever launched it."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys

import torch

from refdpo.shared.errors import UsageError
from refdpo.shared.logs import TqdmHandler, quiet_libraries, quiet_prints


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


def init_distributed(timeout_s: int = 1800) -> tuple[int, int]:
    """Start the process group however we were launched; (rank, world size).

    `timeout_s` bounds every collective: if a peer dies or hangs, the others fail after it
    instead of waiting forever (a dead peer usually fails them sooner: its sockets close).

    The deepspeed launcher and torchrun set RANK/WORLD_SIZE/MASTER_*; srun sets SLURM_*
    (the job script exports MASTER_ADDR/MASTER_PORT); a plain `refdpo train` is one rank.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with quiet_prints():  # its CPU build prints "... built successfully" to stdout
        deepspeed.init_distributed(
            dist_backend=backend, verbose=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def bound_collectives(timeout: datetime.timedelta) -> None:
    """Give every process group the --dist-timeout. DeepSpeed makes its own groups (new_group)
    with torch's default timeout (30 min for gloo), not the one given at init, so a hung peer
    would stall the others that long. Set after the groups exist, as torchtitan does, with
    torch's private setter (there is no public one)."""
    c10d = torch.distributed.distributed_c10d
    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)
