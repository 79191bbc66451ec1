"""Fault points: named places where a test can freeze a run to kill it from outside.

Reliability tests kill real processes at a chosen place (mid-shard at a byte offset, mid-step,
mid-checkpoint) or poison a value (a NaN loss). Polling from outside cannot hit a place that
lasts microseconds, so the process stops itself there (SIGSTOP) and the test, which sees it
stopped, sends SIGKILL: the kill is real and lands exactly there.

Armed only by the environment variable REFDPO_FAULTS, a comma-separated list of
`name=first[..[last]][@rank]`, on every rank or only on `@rank`. A pause point stops the
process once, at the first call whose counter (a byte offset, a step) is >= first; a
poison point is active while its counter is in [first, last] (`first` alone: just that
one; `first..`: from there on). Unset (always, outside tests), each call is one dict
lookup. Points: shard_bytes, manifest, train_step, checkpoint_save (pause); nan_loss,
inf_grad (poison).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from functools import cache

from refdpo.shared.errors import UsageError

ENV = "REFDPO_FAULTS"


@dataclass(frozen=True)
class Fault:
    first: int
    last: int | None  # None: no upper end
    rank: int | None  # None: every rank


def parse(spec: str) -> dict[str, Fault]:
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            name, value = item.split("=")
            value, _, rank = value.partition("@")
            first, dots, last = value.partition("..")
            upper = int(last) if last else None if dots else int(first)
            faults[name] = Fault(int(first), upper, int(rank) if rank else None)
        except ValueError:
            raise UsageError(
                f"{ENV}: cannot read {item!r}; expected name=first[..[last]][@rank]"
            ) from None
    return faults


@cache
def armed() -> dict[str, Fault]:
    return parse(os.environ.get(ENV, ""))


_fired: set[str] = set()


def _here(fault: Fault) -> bool:
    return fault.rank is None or fault.rank == int(os.environ.get("RANK", "0"))


def pause(name: str, counter: int = 0) -> None:
    """Stop this process (once per point) at the first call with counter >= first."""
    fault = armed().get(name)
    if fault is None or name in _fired or not _here(fault) or counter < fault.first:
        return
    _fired.add(name)
    print(f"refdpo fault point {name} reached at {counter}; stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


def active(name: str, counter: int) -> bool:
    """Whether the poison point `name` covers `counter` on this rank."""
    fault = armed().get(name)
    if fault is None or not _here(fault):
        return False
    return counter >= fault.first and (fault.last is None or counter <= fault.last)
