"""A step's pairs cut into micro-batches by a token budget (`--max-tokens-per-batch`).

The global batch stays a number of pairs (micro batch x accumulation x ranks), so the data
order, the step count and resume are those of the pair-count path; only how a rank's share
is cut into forwards changes. Pure functions of the step's rows, the same on every rank.
"""

from __future__ import annotations

import heapq

from refdpo.train.data import pair_length


def split_by_tokens(lengths: list[int], max_tokens: int, world: int) -> list[list[list[int]]]:
    """A global batch's pairs (their token counts, `pair_length`) as every rank's
    micro-batches of at most `max_tokens` tokens: result[rank][m] holds positions into
    `lengths`, ascending; [] is a padding micro-batch. Deterministic, so every rank computes
    every rank's split locally, without a collective.

    Ranks: longest pair first (equal lengths: the earlier position), each to the rank holding
    the fewest tokens so far (ties: the lower rank). A rank's micro-batches: first-fit
    decreasing by the same order; a pair longer than `max_tokens` has one of its own. Every
    rank must run as many micro-batches (under ZeRO-3 each forward is a chain of all-gathers
    every rank joins): a rank short of the most halves its largest micro-batch of two or more
    pairs (by tokens), again and again, and when none is left to halve it runs padding
    micro-batches, last. Micro-batches are ordered by their first position."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    loads = [(0, r) for r in range(world)]  # a heap of (tokens, rank)
    mine: list[list[int]] = [[] for _ in range(world)]
    for i in order:
        tokens, r = heapq.heappop(loads)
        mine[r].append(i)  # longest first within the rank too
        heapq.heappush(loads, (tokens + lengths[i], r))
    ranks = [_first_fit(positions, lengths, max_tokens) for positions in mine]
    most = max(len(batches) for batches in ranks)
    for batches in ranks:
        while len(batches) < most and any(len(b) > 1 for b in batches):
            largest = max(
                (b for b in batches if len(b) > 1), key=lambda b: sum(lengths[i] for i in b)
            )  # the first of equal ones
            batches.remove(largest)
            batches.extend(_halves(largest, lengths))
        batches.sort(key=min)
        batches.extend([] for _ in range(most - len(batches)))
    return ranks


def _first_fit(positions: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing of `positions` (longest first) into bins of `max_tokens` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in positions:
        k = next((k for k, free in enumerate(room) if lengths[i] <= free), None)
        if k is None:
            bins.append([])
            room.append(max_tokens)
            k = len(bins) - 1
        bins[k].append(i)
        room[k] -= lengths[i]
    return [sorted(b) for b in bins]


def _halves(positions: list[int], lengths: list[int]) -> list[list[int]]:
    """Two non-empty parts of nearly equal tokens: longest first, each to the lighter part."""
    parts: list[list[int]] = [[], []]
    loads = [0, 0]
    for i in sorted(positions, key=lambda i: (-lengths[i], i)):
        k = 0 if loads[0] <= loads[1] else 1
        parts[k].append(i)
        loads[k] += lengths[i]
    return [sorted(p) for p in parts]


def token_micro_batches(
    global_rows: list[dict], max_tokens: int, world: int, rank: int
) -> list[tuple[list[dict], bool]]:
    """This rank's micro-batches of a global batch cut by a token budget (split_by_tokens), as
    (rows, real). A padding micro-batch (`real` False) holds this rank's shortest pair: it runs
    the same forward and backward as the others, and its caller weights it out."""
    lengths = [pair_length(row) for row in global_rows]
    batches = split_by_tokens(lengths, max_tokens, world)[rank]
    pool = [i for b in batches for i in b] or range(len(global_rows))  # G >= world: never empty
    shortest = min(pool, key=lambda i: (lengths[i], i))
    return [
        ([global_rows[i] for i in b], True) if b else ([global_rows[shortest]], False)
        for b in batches
    ]
