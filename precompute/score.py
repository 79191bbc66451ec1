"""Turn one range of dataset rows into shard rows: validate, tokenize, score, count drops."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from refdpo.precompute.config import PrecomputeConfig
from refdpo.shared.data import RowError, RowFormat, RowSource, image_key, normalize_row
from refdpo.shared.logprobs import Packer, pack_pairs, packer_for, pair_logps
from refdpo.shared.shards import reference_columns
from refdpo.shared.tokens import TokenizedPair, Truncation, tokenize_pair
from refdpo.shared.vision_pairs import VisionContext, tokenize_vision_pair

logger = logging.getLogger(__name__)
SHOW_DROPPED = 5  # dropped rows logged with their reason, per worker and split


@dataclass
class Survey:
    """What a pass over the whole split finds before any model is loaded."""

    rows: int
    duplicates: set[int]  # positions whose id appeared at an earlier position
    dropped: Counter = field(default_factory=Counter)
    # vision runs: the first position whose row refers to each image (`image_key`): that
    # row's shard stores the image, so an image many pairs share is stored once per split
    image_owners: dict[str, int] = field(default_factory=dict)

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
                pair = normalize_row(row, fmt)
                pair_id = pair.id
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
            for value in pair.images:
                result.image_owners.setdefault(image_key(value), start + offset)
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
    vision: VisionContext | None = None,
) -> tuple[list[TokenizedPair], Counter, Counter]:
    """Usable pairs of rows [start, stop) in dataset order, drops and truncations counted
    (`truncated` also counts `boundary_moved`: prompts cut back to a natural token boundary).
    vision: the pairs' images are read and decoded, and the processor tokenizes them."""
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
            if vision is not None:
                pair = tokenize_vision_pair(pair, tokenizer, trunc, template_kwargs, vision)
            else:
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


def pair_tokens(pair: TokenizedPair) -> int:
    """Tokens of a pair in its row: the prompt once, then both completions."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


@dataclass(frozen=True)
class Batching:
    """How stage one groups pairs into forwards and lays a forward's pairs out in rows.

    A forward-only pass holds no activations for backward, so it takes far more tokens than a
    training step: batches are cut by a token budget (`max_tokens`), with an optional cap on
    pairs (`max_pairs`, None: none), and `packer` lays each batch's pairs out in rows (None:
    one pair per row)."""

    max_tokens: int
    max_pairs: int | None = None
    packer: Packer | None = None
    kernel: str = "sdpa"  # the attention kernel the model runs (model.config._attn_implementation)

    def describe(self) -> str:
        cap = f", at most {self.max_pairs} pairs" if self.max_pairs else ""
        if self.packer is None:
            layout = "one pair per row"
        elif self.packer.capacity:
            layout = f"packed into rows of {self.packer.capacity} tokens"
        elif self.packer.block_sparse:
            layout = "packed into one row each (block-sparse mask: no attention across pairs)"
        else:
            layout = "packed into rows of least modeled work"
        return f"batches of up to {self.max_tokens} tokens{cap}, {layout}"

    def record(self) -> dict:
        """The settings as the shard's scoring record keeps them (a description, not compared
        on rerun: each shard's own layout is what stage two replays)."""
        return {
            "max_tokens_per_batch": self.max_tokens,
            "batch_size": self.max_pairs,
            "packing": self.packer is not None,
            "pack_length": self.packer.capacity if self.packer else 0,
            "attn_implementation": self.kernel,
        }


def batching_for(cfg: PrecomputeConfig, model_config, vision: bool = False) -> Batching:
    """Forwards of up to --max-tokens-per-batch tokens (and --per-device-batch-size pairs when
    given), their pairs packed into rows as stage two packs a micro-batch (--packing,
    --pack-length; the cost model of the loaded model's `model_config`). Vision pairs get a
    row each: the family layouts place one pair's images per row."""
    text_config = getattr(model_config, "text_config", None) or model_config
    packer = packer_for(text_config, cfg.pack_length) if cfg.packing and not vision else None
    kernel = model_config._attn_implementation
    return Batching(cfg.max_tokens_per_batch, cfg.batch_size, packer, kernel)


def length_batches(
    pairs: list[TokenizedPair], max_tokens: int, max_pairs: int | None = None
) -> list[list[int]]:
    """Indices of the pairs, longest first, cut into batches of at most `max_tokens` tokens
    (`pair_tokens`) and `max_pairs` pairs (None: no cap): pairs of similar length share a
    batch, so little padding. A batch closes when the next pair would overflow it; a pair
    longer than `max_tokens` is a batch of its own. Deterministic: ties keep input order."""
    order = sorted(range(len(pairs)), key=lambda i: -pair_tokens(pairs[i]))
    batches: list[list[int]] = []
    used = 0
    for i in order:
        tokens = pair_tokens(pairs[i])
        if not batches or used + tokens > max_tokens or len(batches[-1]) == max_pairs:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += tokens
    return batches


def batch_rows(
    pairs: list[TokenizedPair], batch: list[int], packer: Packer | None
) -> list[list[int]]:
    """A batch's rows, each a list of indices into `pairs`: laid out by `packer` (None: one
    pair per row)."""
    if packer is None:
        return [[i] for i in batch]
    rows = packer.rows([pair_tokens(pairs[i]) for i in batch])
    return [[batch[k] for k in row] for row in rows]


@torch.inference_mode()
def score_pairs(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    pad_token_id: int,
    chunk_size: int,
    pad_multiple: int = 1,
    rows: list[list[int]] | None = None,
    vision=None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-token reference log-probs (chosen, rejected) of each pair, fp32, in order; `rows`:
    which pairs share each row (indices into `pairs`; default one pair per row), rows padded to
    a multiple of `pad_multiple`. vision (refdpo.precompute.vision.VisionScoring): the pairs'
    images go through the image processor and the family's layout."""
    batch = pack_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        pad_token_id,
        rows=rows,
        pad_multiple=pad_multiple,
    )
    if vision is None:
        logps = pair_logps(model, batch, chunk_size)
    else:
        logps = vision.pair_logps(model, batch, pairs, chunk_size)
    chosen, rejected = logps.per_token()
    return [(c.cpu().numpy(), r.cpu().numpy()) for c, r in zip(chosen, rejected, strict=True)]


def shard_row(
    pair: TokenizedPair, win: np.ndarray, rej: np.ndarray, keep_text: bool, vision: bool = False
) -> dict:
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
    if pair.images or vision:
        row.update(
            image_sha256=[image.sha256 for image in pair.images],
            image_tokens=[image.info.tokens for image in pair.images],
            image_extras=[list(image.info.extras) for image in pair.images],
        )
    if keep_text:
        row.update(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected)
    return row


def score_batch(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    rows: list[list[int]],
    pad_token_id: int,
    chunk_size: int,
    pad_multiple: int,
    vision=None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """One forward over `rows` (indices into `pairs` per row): {pair index: its values}.

    The pairs go to pack_pairs in row order, as stage two's replay of this layout
    (`scoring_batch` in train/data.py) orders them, so the replay is the same computation down
    to the output layer's chunks."""
    order = [i for row in rows for i in row]
    local, start = [], 0
    for row in rows:
        local.append(list(range(start, start + len(row))))
        start += len(row)
    chunk = [pairs[i] for i in order]
    values = score_pairs(model, chunk, pad_token_id, chunk_size, pad_multiple, local, vision)
    return dict(zip(order, values, strict=True))


def _finite(values: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.isfinite(values[0]).all() and np.isfinite(values[1]).all())


def score_shard(
    pairs: list[TokenizedPair],
    model: torch.nn.Module,
    pad_token_id: int,
    batching: Batching,
    chunk_size: int,
    keep_text: bool,
    on_batch: Callable[[int, int], None],
    pad_multiple: int = 1,
    vision=None,
) -> tuple[list[dict], Counter, dict]:
    """Shard rows in dataset order; a pair with non-finite log-probs is dropped, not written.

    Also returns the scoring layout (`scoring_layout`): which rows shared each forward, so
    that stage two's step-0 check can run the policy on exactly the same batches."""
    scored: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(pairs)
    batches: list[list[list[int]]] = []
    for batch in length_batches(pairs, batching.max_tokens, batching.max_pairs):
        packed = batch_rows(pairs, batch, batching.packer)
        found = score_batch(model, pairs, packed, pad_token_id, chunk_size, pad_multiple, vision)
        for i, values in found.items():
            scored[i] = values
        on_batch(len(batch), sum(pair_tokens(pairs[i]) for i in batch))
        # With a dense mask a NaN key spoils every query of its row, masked or not (NaN plus
        # the mask's minimum is NaN), so the pairs that shared a row with a non-finite pair
        # are scored again, each alone: a pair is dropped for its own values only. The
        # batch's layout then no longer made every stored value, so it is not recorded; each
        # pair's own forward is.
        spoiled = [r for r in packed if len(r) > 1 and not all(_finite(found[i]) for i in r)]
        redo = [i for row in spoiled for i in row]
        if not redo:
            batches.append(packed)
        for i in redo:
            scored[i] = score_batch(
                model, pairs, [[i]], pad_token_id, chunk_size, pad_multiple, vision
            )[i]
            batches.append([[i]])
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
        rows.append(shard_row(pair, win, rej, keep_text, vision is not None))
    layout = scoring_layout(batches, row_of, chunk_size, pad_multiple)
    return rows, dropped, layout | {"batching": batching.record()}


def scoring_layout(
    batches: list[list[list[int]]], row_of: dict[int, int], chunk_size: int, pad_multiple: int
) -> dict:
    """How the shard's rows were laid out when scored, stored in its metadata.

    batches: for each forward, its packed rows, each a list of pair indices (`row_of` maps a
    kept pair to its shard row). Stored as "batches": per forward, its rows, each a list of
    shard row indices. In bf16 a matmul's result depends on the shapes around it (kernels are
    not batch-invariant), so the policy reproduces stored values bit for bit only in the same
    layout; stage two's step-0 check uses this to compare like with like. A batch holding a
    pair that was dropped after scoring is left out (its layout can no longer be rebuilt).
    """
    kept = [b for b in batches if all(i in row_of for row in b for i in row)]
    return {
        "batches": [[[row_of[i] for i in row] for row in b] for b in kept],
        "logit_chunk_size": chunk_size,
        "pad_multiple": pad_multiple,
    }
