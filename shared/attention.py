"""The pair layout's attention mask, in the forms the attention kernels take.

Every query position of a packed row may attend to at most two intervals of key positions
(`AllowedKeys`): a prompt or chosen token sees its pair from the pair's first token up to
itself; a rejected token sees its pair's prompt, then its own rejected tokens up to itself
(never the chosen ones); padding sees only itself. Nothing crosses pairs.

- `block_mask`: a FlexAttention BlockMask, built from the intervals at the level of 128 x 128
  blocks (which blocks are empty, full or partial), so no [rows, L, L] tensor ever exists:
  memory grows with L x L / 128 for the block table, and the kernel skips empty blocks, so
  packing many pairs into one row costs no attention work across pairs.
- `attention_bias`: the dense additive mask for SDPA and eager attention, [rows, 1, L, L]
  in the model's dtype, filled a slab of queries at a time so that the only [.., L, L]
  tensor is the result itself.
- `pair_spans` + `pair_sdpa_attention` (kernel `sdpa_pairs`): no mask on long rows, two
  causal SDPA calls per pair instead; memory linear in the row, backward on CPU too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2
FLEX_BLOCK = 128  # FlexAttention's default block size; flex rows are padded to a multiple
_SLAB_ELEMENTS = 1 << 24  # queries x keys filled at once in the dense mask (16 M booleans)


@dataclass
class AllowedKeys:
    """Per query position, the keys it may attend: [first_lo, first_hi) and [second_lo, q].

    All Shape (rows, length), int64. first is the prompt of a rejected query (empty
    elsewhere: lo == hi == 0); second runs from the pair's start (prompt, chosen), the
    rejected part's start (rejected) or the query itself (padding) to the query.
    """

    first_lo: torch.Tensor
    first_hi: torch.Tensor
    second_lo: torch.Tensor


def _latest_start(flags: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the most recent position where `flags` is set (0 if
    none). flags: Shape (rows, length) bool."""
    index = torch.arange(flags.shape[1], device=flags.device).expand_as(flags)
    return torch.where(flags, index, torch.zeros_like(index)).cummax(dim=1).values


def allowed_keys(pair: torch.Tensor, part: torch.Tensor) -> AllowedKeys:
    """The two key intervals of every query (see AllowedKeys), from PackedPairs.pair_index and
    .part. Pairs are laid out as contiguous [prompt, chosen, rejected] runs, padding last."""
    previous_pair = torch.nn.functional.pad(pair[:, :-1], (1, 0), value=-2)
    previous_part = torch.nn.functional.pad(part[:, :-1], (1, 0), value=-1)
    new_pair = pair != previous_pair
    pair_start = _latest_start(new_pair)
    chosen_start = _latest_start((part == CHOSEN) & (previous_part != CHOSEN))
    rejected_start = _latest_start((part == REJECTED) & (previous_part != REJECTED))
    query = torch.arange(pair.shape[1], device=pair.device).expand_as(pair)
    rejected = part == REJECTED
    padding = pair < 0
    zero = torch.zeros_like(query)
    return AllowedKeys(
        first_lo=torch.where(rejected, pair_start, zero),
        first_hi=torch.where(rejected, chosen_start, zero),
        second_lo=torch.where(padding, query, torch.where(rejected, rejected_start, pair_start)),
    )


def attention_bias(pair: torch.Tensor, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask: 0 where a query may attend a key, dtype-min elsewhere.

    pair, part: PackedPairs.pair_index and .part, Shape (rows, length).
    Causal within each pair; rejected tokens never see chosen ones; padding sees only
    itself (a fully masked row would give NaN in softmax). Shape: (rows, 1, length, length).
    """
    rows, length = pair.shape
    keys = allowed_keys(pair, part)
    bias = torch.full(
        (rows, 1, length, length), torch.finfo(dtype).min, dtype=dtype, device=pair.device
    )
    key = torch.arange(length, device=pair.device)
    slab = max(1, _SLAB_ELEMENTS // max(1, rows * length))
    for start in range(0, length, slab):
        q = slice(start, start + slab)
        query = key[q, None]
        allowed = (key >= keys.first_lo[:, q, None]) & (key < keys.first_hi[:, q, None])
        allowed |= (key >= keys.second_lo[:, q, None]) & (key <= query)
        bias[:, 0, q].masked_fill_(allowed, 0.0)
    return bias


def _overlap(lo: torch.Tensor, hi: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    """How many keys of each key block lie in [lo, hi), per query. lo, hi: Shape (rows, L).
    Returns Shape (rows, L, blocks)."""
    starts = torch.arange(blocks, device=lo.device) * block
    first = torch.maximum(lo[..., None], starts)
    last = torch.minimum(hi[..., None], starts + block)
    return (last - first).clamp_(min=0)


def block_tables(
    pair: torch.Tensor, part: torch.Tensor, block: int = FLEX_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) pairs are partly and which wholly allowed.

    Counts, for every query, its allowed keys in each key block from the two intervals, then
    reduces over the block's queries. Returns (partial, full), bool, Shape (rows, q_blocks,
    k_blocks). A block cut short by the row's end is never full (its missing keys count as
    masked), so the kernel applies the mask there."""
    rows, length = pair.shape
    blocks = -(-length // block)
    keys = allowed_keys(pair, part)
    query = torch.arange(length, device=pair.device).expand_as(pair)
    counts = _overlap(keys.first_lo, keys.first_hi, block, blocks)
    counts += _overlap(keys.second_lo, query + 1, block, blocks)
    padded = blocks * block - length
    counts = torch.nn.functional.pad(counts, (0, 0, 0, padded), value=0)
    counts = counts.view(rows, blocks, block, blocks)
    any_allowed = (counts > 0).any(dim=2)
    full = (counts == block).all(dim=2)
    return any_allowed & ~full, full


def _ordered(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's (num_blocks, indices) of a bool block table: the set blocks first, in key
    order. Shapes (rows, 1, q_blocks) and (rows, 1, q_blocks, k_blocks), int32."""
    counts = table.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def block_mask(pair: torch.Tensor, part: torch.Tensor):
    """The pair layout as a FlexAttention BlockMask (H broadcast): the kernel skips empty
    blocks, runs full blocks unmasked and evaluates `mask_mod` on partial ones only."""
    from torch.nn.attention.flex_attention import BlockMask

    keys = allowed_keys(pair, part)
    first_lo, first_hi, second_lo = keys.first_lo, keys.first_hi, keys.second_lo

    def mask_mod(b, h, q, k):
        in_prompt = (k >= first_lo[b, q]) & (k < first_hi[b, q])
        return in_prompt | ((k >= second_lo[b, q]) & (k <= q))

    partial, full = block_tables(pair, part)
    kv_num, kv_indices = _ordered(partial)
    full_num, full_indices = _ordered(full)
    length = pair.shape[1]
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


@functools.cache
def compile_flex_statically() -> None:
    """On CPU, compile transformers' FlexAttention once per shape (dynamic=False).

    transformers compiles flex_attention with torch.compile's defaults, which retries a
    second shape as a dynamic-shape kernel; torch 2.13's C++ code generation for that kernel
    does not compile (an undeclared `cur_kvSplitSize` in the generated source). Static
    kernels work, at one compile per row shape (a few seconds each), so the limit on
    recompiles is raised to 256 shapes: rows up to 32k tokens in steps of 128.
    Called once per process before the first CPU FlexAttention forward (inference only:
    FlexAttention has no CPU backward)."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    wrapper = hf_flex.WrappedFlexAttention(training=False)  # a singleton
    wrapper._compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)


PAIR_SDPA = "sdpa_pairs"  # the kernel name models are set to for per-pair SDPA
SPANS_FROM = 2048  # row length from which sdpa_pairs uses spans instead of the dense mask


def spans_placeholder(rows: int, device) -> torch.Tensor:
    """The attention_mask passed beside pair spans: a 4D tensor, so that transformers uses it
    as given instead of building a causal (or packed-sequence) mask of [rows, 1, L, L], and
    empty, so that it costs nothing. pair_sdpa_attention ignores it."""
    return torch.empty(rows, 1, 0, 0, device=device)


def pair_spans(pair: torch.Tensor, part: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per row, each pair's (start, prompt, chosen, rejected) token counts, in row order.
    Reads the layout on the host (a device sync on CUDA)."""
    spans = []
    for row_pair, row_part in zip(pair.tolist(), part.tolist(), strict=True):
        row: list[list[int]] = []
        for pos, (i, p) in enumerate(zip(row_pair, row_part, strict=True)):
            if i < 0:
                break
            if not row or i != row_pair[row[-1][0]]:
                row.append([pos, 0, 0, 0])
            row[-1][1 + p] += 1
        spans.append([tuple(span) for span in row])
    return spans


def _causal(query, key, value, scaling, dropout, gqa):
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
    )


def pair_sdpa_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, pair_spans=None, **kw
):
    """transformers attention function for the pair layout without a dense mask.

    With `pair_spans` (PairScorer passes them for long rows): per pair, one causal SDPA call
    over [prompt, chosen] and one over [prompt, rejected] (its prompt queries recomputed and
    dropped: the one waste, prompt^2 / 2 scores), so memory grows linearly with the row and
    the backward runs everywhere SDPA's does, CPU included. Padding outputs are zero (no
    target reads them). Without spans: plain SDPA with the dense mask it was given.
    query: Shape (rows, heads, L, D); key, value: (rows, kv_heads, L, D).
    Returns (Shape (rows, L, heads, D), None), as transformers' attention functions do.
    With spans, `attention_mask` is an empty placeholder (`spans_placeholder`)."""
    if pair_spans is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw
        )
    gqa = query.shape[1] != key.shape[1]
    length = query.shape[2]
    rows = []
    for b, spans in enumerate(pair_spans):
        pieces = []
        for start, prompt, chosen, rejected in spans:
            first = slice(start, start + prompt + chosen)
            q, k, v = (t[b : b + 1, :, first] for t in (query, key, value))
            pieces.append(_causal(q, k, v, scaling, dropout, gqa))
            keep = torch.cat([
                torch.arange(start, start + prompt),
                torch.arange(first.stop, first.stop + rejected),
            ]).to(query.device)  # fmt: skip
            q, k, v = (t[b : b + 1].index_select(2, keep) for t in (query, key, value))
            pieces.append(_causal(q, k, v, scaling, dropout, gqa)[:, :, prompt:])
        used = sum(p + c + r for _, p, c, r in spans)
        if used < length:
            pieces.append(query.new_zeros(1, query.shape[1], length - used, query.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


@functools.cache
def register_pair_sdpa() -> None:
    """Make `sdpa_pairs` a kernel name transformers models accept. Outside refdpo's pair
    layout (generation, a plain forward) it is plain SDPA: same masks, same function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PAIR_SDPA, pair_sdpa_attention)
    AttentionMaskInterface.register(PAIR_SDPA, sdpa_mask)


def flex_available() -> bool:
    """Whether this torch has FlexAttention (2.5 and later)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return False
    return True
