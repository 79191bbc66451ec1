"""Checkpoints that a resume can trust, and stopping on SIGTERM / SIGUSR1.

A checkpoint is `output/checkpoints/step-NNNNNNNN/`: DeepSpeed's files (model, optimizer,
scheduler), one RNG file per rank, and last `refdpo-complete.json`, written by rank 0 after
every rank has finished saving. Only folders with that marker are ever resumed from, so a
save interrupted half way is never picked; older checkpoints are deleted only after a newer
one is complete.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from refdpo.shared import faults
from refdpo.shared.errors import EXIT_REQUEUE, FolderRefused, MissingPath
from refdpo.shared.shards import write_atomic_bytes

logger = logging.getLogger(__name__)
COMPLETE = "refdpo-complete.json"
REQUEUE_EXIT_CODE = EXIT_REQUEUE  # stopped on a signal after saving; requeue and resume


@dataclass
class LoopState:
    """Everything the training loop carries from one step to the next, beside what DeepSpeed
    saves (weights, optimizer, schedule) and each rank's RNG file. The data position is the
    step: the order is a function of (seed, epoch, step). Saved whole in the completion
    marker, so a new piece of state cannot be forgotten in one place and kept in another."""

    step: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for NaN/inf, in all
    skipped_in_a_row: int = 0  # towards --max-nonfinite-steps
    reward_baseline: dict | None = None  # bco_pair's RunningMean.state_dict(), same on all ranks

    @classmethod
    def from_marker(cls, marker: dict) -> LoopState:
        if "loop" in marker:
            return cls(**marker["loop"])
        # markers written before the loop state had its own object
        return cls(step=marker["step"], skipped_steps=marker.get("skipped_steps", 0))


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume: str | None, output: str | Path) -> Path | None:
    """The checkpoint to resume from; 'auto' with none found means a fresh start."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output))
        if not found:
            logger.info(
                "--resume-from-checkpoint auto: no complete checkpoint in %s, starting fresh",
                checkpoint_root(output),
            )
            return None
        return found[-1]
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise MissingPath(
            f"--resume-from-checkpoint {resume}: not a complete refdpo checkpoint (no {COMPLETE})"
        )
    return path


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def save(engine, output: str | Path, state: LoopState, keep: int, settings: dict) -> Path:
    """Save on every rank, then mark complete and prune (rank 0). `settings`: the run's
    resolved configuration, compared by a resume (train/resume.py)."""
    root = checkpoint_root(output)
    step = state.step
    tag = f"step-{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save(_rng_state(), root / tag / f"rng-rank{rank:05d}.pt")
    faults.pause("checkpoint_save", step)  # test-only: files written, marker not yet
    dist.barrier()
    if rank == 0:
        marker = {"step": step, "world_size": world, "loop": asdict(state), "settings": settings}
        write_atomic_bytes(root / tag / COMPLETE, json.dumps(marker, indent=2).encode())
        logger.info("saved checkpoint %s", root / tag)
        prune(root, step, keep)
    dist.barrier()
    return root / tag


def prune(root: Path, step: int, keep: int) -> None:
    """Keep the checkpoint just written and the newest keep - 1 before it. Checkpoints of
    later steps belong to a run this one replaced (resumed from an earlier checkpoint): a
    later `--resume auto` would pick them, so they go too. Interrupted saves go."""
    for path in root.glob("step-*"):
        other = int(path.name.split("-")[1])
        if other > step:
            logger.warning(
                "removed %s: a later step than this run's %d (the run was resumed from an "
                "earlier checkpoint, which replaces it)", path, step,
            )  # fmt: skip
            shutil.rmtree(path, ignore_errors=True)
        elif other < step and not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)
    older = [p for p in complete_checkpoints(root) if int(p.name.split("-")[1]) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def read_marker(path: Path) -> dict:
    return json.loads((path / COMPLETE).read_text())


def load(engine, path: Path) -> LoopState:
    """Restore model, optimizer, scheduler and this rank's RNG; return the loop state."""
    marker = read_marker(path)
    world = dist.get_world_size()
    if marker["world_size"] != world:
        raise FolderRefused(
            f"{path} was saved by {marker['world_size']} ranks; resume it with {world} ranks"
        )
    engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    state = torch.load(path / f"rng-rank{dist.get_rank():05d}.pt", weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    return LoopState.from_marker(marker)


class StopSignal:
    """SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) only set a flag; the loop asks at each step
    boundary, all ranks together, so that every rank stops after the same step and saves.
    Ctrl-C in a terminal reaches every rank (one process group): without this it raised
    KeyboardInterrupt inside autograd, a long traceback and no checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # keep it minimal: no I/O in a signal handler
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
