"""Turn one range of dataset rows into shard rows: validate, tokenize, score, count drops."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from refdpo.shared.data import RowError, RowFormat, RowSource, normalize_row
from refdpo.shared.logprobs import pack_pairs, pair_logps
from refdpo.shared.shards import reference_columns
from refdpo.shared.tokens import TokenizedPair, Truncation, tokenize_pair

logger = logging.getLogger(__name__)
SHOW_DROPPED = 5  # dropped rows logged with their reason, per worker and split


@dataclass
class Survey:
    """What a pass over the whole split finds before any model is loaded."""

    rows: int
    duplicates: set[int]  # positions whose id appeared at an earlier position
    dropped: Counter = field(default_factory=Counter)

    @property
    def usable(self) -> int:
        return self.rows - len(self.duplicates) - sum(self.dropped.values())


def survey(source: RowSource, fmt: RowFormat, show: bool, block: int = 10_000) -> Survey:
    """Validate every row (no tokenizer) to find duplicate ids and text-level drops.

    Every worker runs it over the whole split so that all agree on which copy of a
    duplicated id is kept: the first in dataset order.
    """
    seen: set[str] = set()
    result = Survey(rows=len(source), duplicates=set())
    shown = 0
    for start in range(0, len(source), block):
        for offset, row in enumerate(source.get(start, start + block)):
            try:
                pair_id = normalize_row(row, fmt).id
            except RowError as err:
                result.dropped[err.reason] += 1
                if show and shown < SHOW_DROPPED:
                    logger.warning(
                        "dataset row %d dropped: %s", source.indices[start + offset], err
                    )
                    shown += 1
                continue
            if pair_id in seen:
                result.duplicates.add(start + offset)
            seen.add(pair_id)
    return result


def tokenize_rows(
    source: RowSource,
    start: int,
    stop: int,
    fmt: RowFormat,
    tokenizer,
    trunc: Truncation,
    duplicates: set[int],
    warn: Callable[[str], None],
    template_kwargs: dict | None = None,
) -> tuple[list[TokenizedPair], Counter, Counter]:
    """Usable pairs of rows [start, stop) in dataset order, drops and truncations counted
    (`truncated` also counts `boundary_moved`: prompts cut back to a natural token boundary)."""
    pairs: list[TokenizedPair] = []
    dropped: Counter = Counter()
    truncated: Counter = Counter()
    for position, row in enumerate(source.get(start, stop), start=start):
        try:
            pair = normalize_row(row, fmt)  # its failures were shown by the survey
        except RowError as err:
            dropped[err.reason] += 1
            continue
        try:
            if position in duplicates:
                raise RowError("duplicate_id", f"id {pair.id!r} first seen at an earlier row")
            pair = tokenize_pair(pair, tokenizer, trunc, template_kwargs)
        except RowError as err:
            dropped[err.reason] += 1
            warn(f"dataset row {source.indices[position]} dropped: {err}")
            continue
        for part in ("prompt", "chosen", "rejected"):
            truncated[part] += getattr(pair, f"{part}_truncated")
        truncated["boundary_moved"] += pair.boundary_moved
        pairs.append(pair)
    return pairs, dropped, truncated


def length_batches(pairs: list[TokenizedPair], batch_size: int) -> list[list[int]]:
    """Indices grouped so that pairs of similar length share a batch (little padding)."""
    order = sorted(
        range(len(pairs)),
        key=lambda i: (
            -(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids))
        ),
    )
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_pairs(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    pad_token_id: int,
    chunk_size: int,
    pad_multiple: int = 1,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-token reference log-probs (chosen, rejected) of each pair, fp32, in order; one pair
    per row, rows padded to a multiple of `pad_multiple`."""
    batch = pack_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        pad_token_id,
        pad_multiple=pad_multiple,
    )
    chosen, rejected = pair_logps(model, batch, chunk_size).per_token()
    return [(c.cpu().numpy(), r.cpu().numpy()) for c, r in zip(chosen, rejected, strict=True)]


def shard_row(pair: TokenizedPair, win: np.ndarray, rej: np.ndarray, keep_text: bool) -> dict:
    win_sum, win_avg, win_tokens = reference_columns(win)
    rej_sum, rej_avg, rej_tokens = reference_columns(rej)
    row = {
        "id": pair.id,
        "prompt_ids": pair.prompt_ids,
        "chosen_ids": pair.chosen_ids,
        "rejected_ids": pair.rejected_ids,
        "ref_win_logp": win_sum,
        "ref_rej_logp": rej_sum,
        "ref_win_avg_logp": win_avg,
        "ref_rej_avg_logp": rej_avg,
        "ref_win_per_token_logp": win_tokens,
        "ref_rej_per_token_logp": rej_tokens,
    }
    if keep_text:
        row.update(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected)
    return row


def score_shard(
    pairs: list[TokenizedPair],
    model: torch.nn.Module,
    pad_token_id: int,
    batch_size: int,
    chunk_size: int,
    keep_text: bool,
    on_batch: Callable[[int, int], None],
    pad_multiple: int = 1,
) -> tuple[list[dict], Counter, dict]:
    """Shard rows in dataset order; a pair with non-finite log-probs is dropped, not written.

    Also returns the scoring layout (`scoring_layout`): which rows shared each forward, so
    that stage two's step-0 check can run the policy on exactly the same batches."""
    scored: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(pairs)
    batches = length_batches(pairs, batch_size)
    for indices in batches:
        chunk = [pairs[i] for i in indices]
        values_of_chunk = score_pairs(model, chunk, pad_token_id, chunk_size, pad_multiple)
        for i, values in zip(indices, values_of_chunk, strict=True):
            scored[i] = values
        on_batch(
            len(chunk),
            sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in chunk),
        )
    rows, dropped = [], Counter()
    row_of: dict[int, int] = {}  # pair index -> its row in the shard
    for i, (pair, values) in enumerate(zip(pairs, scored, strict=True)):
        win, rej = values
        if not (np.isfinite(win).all() and np.isfinite(rej).all()):
            dropped["nonfinite_logps"] += 1
            logger.warning(
                "pair %s dropped: non-finite reference log-probs (try --dtype fp32)", pair.id
            )
            continue
        row_of[i] = len(rows)
        rows.append(shard_row(pair, win, rej, keep_text))
    return rows, dropped, scoring_layout(batches, row_of, chunk_size, pad_multiple)


def scoring_layout(
    batches: list[list[int]], row_of: dict[int, int], chunk_size: int, pad_multiple: int
) -> dict:
    """How the shard's rows were laid out when scored, stored in its metadata.

    batches: for each forward, its packed rows, each a list of shard row indices (today one
    pair per row). In bf16 a matmul's result depends on the shapes around it (kernels are
    not batch-invariant), so the policy reproduces stored values bit for bit only in the same
    layout; stage two's step-0 check uses this to compare like with like. A batch holding a
    pair that was dropped after scoring is left out (its layout can no longer be rebuilt).
    """
    kept = [b for b in batches if all(i in row_of for i in b)]
    return {
        "batches": [[[row_of[i]] for i in b] for b in kept],
        "logit_chunk_size": chunk_size,
        "pad_multiple": pad_multiple,
    }
