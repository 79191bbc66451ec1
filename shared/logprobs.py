"""Completion log-probs of preference pairs, with the prompt scored once per pair.

Both stages call `pair_logps`: stage one on the frozen reference, stage two on the policy.
Sharing this one function is what makes the step-0 identity (policy == stored reference)
hold to float precision (design.md section 4).

Prefix sharing. A pair (x, y_w, y_l) is laid out as one sequence [x, y_w, y_l]:

    tokens      x0 .. xP-1 | w0 .. wC-1  | l0 .. lR-1
    positions   0  .. P-1  | P  .. P+C-1 | P  .. P+R-1      (rejected restarts after x)
    attends to  causal     | x + causal  | x + causal, never y_w

so y_l sees exactly what it would see in its own forward [x, y_l]. The first token of each
completion is predicted from the last prompt position. Several pairs may share a row
(packing); a token never attends outside its own pair.

Memory. Only completion tokens need logits, so the lm_head runs on the gathered hidden
states of their predictor positions, in chunks, inside one autograd function
(`ChunkedTokenLogps` in `refdpo.shared.output_layer`) that recomputes each chunk's logits in backward: a [batch, seq, vocab]
fp32 tensor never exists, in forward or backward.

Collectives. Under ZeRO-3 every module call is a parameter all-gather. `PairScorer` is the
module both stages call: one decoder call and one `TokenLogps` call per micro-batch, whatever
the number of completion tokens, so every rank issues the same gathers (design.md section 8);
stage two calls it through the DeepSpeed engine so that ZeRO-3 traces and prefetches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refdpo.shared.attention import (
    CHOSEN,
    FLEX_BLOCK,
    PAIR_SDPA,
    PROMPT,
    REJECTED,
    SPANS_FROM,
    attention_bias,
    block_mask,
    compile_flex_statically,
    pair_spans,
    spans_placeholder,
)
from refdpo.shared.models import input_device
from refdpo.shared.output_layer import TokenLogps

FLEX = "flex_attention"


@dataclass
class PackedPairs:
    """A batch of pairs laid out for one forward pass.

    input_ids, position_ids: Shape (rows, length).
    pair_index, part: Shape (rows, length); pair number in the batch (-1 on padding) and
        PROMPT / CHOSEN / REJECTED at every position.
    target_row, predictor_pos, target_ids, target_pair, target_is_rejected:
        Shape (n_targets,); one entry per completion token, in pair order, a pair's chosen
        tokens before its rejected ones.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pair_index: torch.Tensor
    part: torch.Tensor
    target_row: torch.Tensor
    predictor_pos: torch.Tensor
    target_ids: torch.Tensor
    target_pair: torch.Tensor
    target_is_rejected: torch.Tensor
    num_pairs: int
    lengths: torch.Tensor  # Shape (num_pairs, 2): chosen and rejected token counts, on the host
    # vision pairs: the image processor's tensors for the batch's images in the order their
    # tokens appear in the rows (pixel_values, image_grid_thw ...), passed to the scorer
    vision: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> PackedPairs:
        """On `device`, copied without waiting (pinned host memory on CUDA); `lengths` stays on
        the host so that splitting per pair needs no device sync."""
        return self._map(lambda v: v.to(device, non_blocking=True))

    def pin_memory(self) -> PackedPairs:
        return self._map(lambda v: v.pin_memory())

    def _map(self, fn) -> PackedPairs:
        moved = {
            k: (fn(v) if torch.is_tensor(v) and k != "lengths" else v)
            for k, v in vars(self).items()
        }
        if self.vision is not None:
            moved["vision"] = {
                k: fn(v) if torch.is_tensor(v) else v for k, v in self.vision.items()
            }
        return PackedPairs(**moved)

    @property
    def num_tokens(self) -> int:
        """Tokens in the pairs (each prompt once, both completions), padding excluded."""
        return int((self.pair_index >= 0).sum())


def pack_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    rows: Sequence[Sequence[int]] | None = None,
    pad_multiple: int = 1,
) -> PackedPairs:
    """Lay pairs out as [prompt, chosen, rejected] sequences, right-padded.

    rows: which pairs share each row (indices into the inputs); default one pair per row.
    pad_multiple: row length rounded up to a multiple of it (`pad_multiple_for`).
    Every prompt needs at least one token: its last one predicts the first completion token.
    """
    n = len(prompt_ids)
    if rows is None:
        rows = [[i] for i in range(n)]
    length = padded_length(
        max(
            sum(len(prompt_ids[i]) + len(chosen_ids[i]) + len(rejected_ids[i]) for i in row)
            for row in rows
        ),
        pad_multiple,
    )
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    pair_index = torch.full(shape, -1, dtype=torch.long)
    part = torch.full(shape, PROMPT, dtype=torch.long)
    per_pair: dict[int, list[torch.Tensor]] = {}  # pair -> [row, pos, pred, id, is_rejected]

    for r, row in enumerate(rows):
        start = 0
        for i in row:
            p, c, j = prompt_ids[i], chosen_ids[i], rejected_ids[i]
            if not len(p) or not len(c) or not len(j):
                raise ValueError(f"pair {i}: prompt, chosen and rejected need >= 1 token each")
            P, C, R = len(p), len(c), len(j)
            end = start + P + C + R
            input_ids[r, start:end] = torch.tensor([*p, *c, *j], dtype=torch.long)
            position_ids[r, start:end] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
            pair_index[r, start:end] = i
            part[r, start + P : start + P + C] = CHOSEN
            part[r, start + P + C : end] = REJECTED
            pos = torch.arange(start + P, end)
            pred = pos - 1
            pred[C] = start + P - 1  # the rejected part is predicted from the prompt's end
            completion = torch.tensor([*c, *j], dtype=torch.long)
            per_pair[i] = [torch.full_like(pos, r), pos, pred, completion, torch.arange(C + R) >= C]
            start = end

    cols = [torch.cat([per_pair[i][k] for i in range(n)]) for k in range(5)]
    target_pair = torch.cat(
        [torch.full((len(per_pair[i][1]),), i, dtype=torch.long) for i in range(n)]
    )
    return PackedPairs(
        input_ids=input_ids,
        position_ids=position_ids,
        pair_index=pair_index,
        part=part,
        target_row=cols[0],
        predictor_pos=cols[2],
        target_ids=cols[3],
        target_pair=target_pair,
        target_is_rejected=cols[4],
        num_pairs=n,
        lengths=torch.tensor([[len(chosen_ids[i]), len(rejected_ids[i])] for i in range(n)]),
    )


# cuDNN's fused SDPA backward with an explicit mask returns NaN gradients when the sequence
# length mod 128 is 64 (pytorch/pytorch#196678, huggingface/trl#7181); cuDNN is tried first on
# Hopper, and refdpo always passes a mask. Rows of a multiple of 128 tokens never hit it.
CUDA_PAD_MULTIPLE = 128


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple


def pad_multiple_for(device: torch.device | str, kernel: str | None = None) -> int:
    """Row-length multiple for a device and attention kernel: 128 on CUDA (cuDNN SDPA bug
    above) and with FlexAttention (its block size: whole blocks only), 1 elsewhere (on CPU
    the padding would be pure cost). Both stages use it, so their layouts agree."""
    if torch.device(device).type == "cuda" or kernel == FLEX:
        return max(CUDA_PAD_MULTIPLE, FLEX_BLOCK)
    return 1


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pairs assigned to rows of at most `capacity` tokens, first-fit decreasing.

    Padding-free batching: instead of one pair per row padded to the longest, short pairs
    share a row, so few padding tokens go through the model. A pair longer than `capacity`
    gets a row of its own. Deterministic: ties keep input order. Returns indices per row.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@dataclass(frozen=True)
class Packer:
    """How a micro-batch's pairs are laid out in rows.

    capacity > 0: rows of max(capacity, longest pair) tokens. capacity == 0: the layout
    with the lowest modeled cost. With a block-sparse mask (block_sparse, FlexAttention)
    no score across pairs is computed, so a row costs its length whatever it holds: all
    pairs in one row leave the least padding. With a dense attention mask every row costs
    length x (1 + attention_weight x length): the first term is the per-token work (linear
    layers), the second attention over the whole row, cross-pair blocks included, since a
    masked score is still computed. So packing short pairs together pays until the rows grow
    long enough for attention to eat the padding saved.
    """

    capacity: int = 0
    attention_weight: float = 0.0
    block_sparse: bool = False

    def rows(self, lengths: Sequence[int]) -> list[list[int]]:
        longest = max(lengths)
        if self.capacity > 0:
            return pack_rows(lengths, max(self.capacity, longest))
        if self.block_sparse:
            return pack_rows(lengths, sum(lengths))
        # candidate row lengths: the longest pair, 1.5x, 2x, ... up to everything in one row
        candidates = sorted({longest * k // 2 for k in range(2, 2 * len(lengths) + 1)})
        layouts = [pack_rows(lengths, c) for c in candidates if c < sum(lengths) + longest]

        def cost(rows: list[list[int]]) -> float:
            length = max(sum(lengths[i] for i in row) for row in rows)  # rows pad to the longest
            return len(rows) * length * (1.0 + self.attention_weight * length)

        return min(layouts, key=cost)  # ties: the first, i.e. the shortest rows


def packer_for(config, capacity: int = 0) -> Packer:
    """The Packer for a model as loaded: its cost model follows the attention kernel."""
    sparse = getattr(config, "_attn_implementation", None) == FLEX
    return Packer(capacity, attention_weight(config), block_sparse=sparse)


def attention_weight(config) -> float:
    """Attention work per token and per attended position, relative to a token's linear-layer
    work, for a Llama-style decoder layer (Packer's cost model). Both counted in multiply-adds:
    q, k, v, o projections and a gated MLP per token; q.k and the weighted sum of v per key."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    ff = getattr(config, "intermediate_size", None) or 4 * d
    linear = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * ff
    return 2 * heads * head_dim / linear


@dataclass
class PairLogps:
    """Completion log-probs of a batch of pairs, fp32.

    chosen_logps, rejected_logps: Shape (num_pairs,); sums over completion tokens.
    chosen_lengths, rejected_lengths: Shape (num_pairs,); completion token counts.
    token_logps: Shape (n_targets,); per-token values in PackedPairs target order.
    lengths: Shape (num_pairs, 2); the same counts on the host (splitting needs no sync).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    token_logps: torch.Tensor
    lengths: torch.Tensor

    def per_token(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-token log-probs split per pair: (chosen list, rejected list)."""
        pieces = torch.split(self.token_logps, self.lengths.flatten().tolist())
        return list(pieces[0::2]), list(pieces[1::2])


class PairScorer(torch.nn.Module):
    """A causal LM as a module whose forward is the pair log-prob computation.

    forward(input_ids, position_ids, pair_index, part, target_row, predictor_pos, target_ids)
    -> per-token completion log-probs, Shape (n_targets,). The model is a child named `policy`
    (stage two's checkpoints carry that prefix); `TokenLogps` is the only other child.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.policy = model
        softcap = getattr(model.config, "final_logit_softcapping", None)
        self.head = TokenLogps(model.get_output_embeddings(), softcap, chunk_size)

    @property
    def config(self):
        return self.policy.config

    def forward(
        self, input_ids, position_ids, pair_index, part, target_row, predictor_pos, target_ids
    ) -> torch.Tensor:
        kernel, spans = self.policy.config._attn_implementation, {}
        if kernel == FLEX:
            if input_ids.device.type == "cpu":
                compile_flex_statically()
            mask = block_mask(pair_index, part)
        elif kernel == PAIR_SDPA and input_ids.shape[1] >= SPANS_FROM:
            mask = spans_placeholder(input_ids.shape[0], input_ids.device)
            spans = {"pair_spans": pair_spans(pair_index, part)}
        else:
            mask = attention_bias(pair_index, part, self.head.lm_head.weight.dtype)
        out = self.policy.get_decoder()(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=False,
            **spans,
        )
        hidden = out.last_hidden_state[target_row, predictor_pos]  # (n_targets, H)
        return self.head(hidden, target_ids)


def _is_scorer(module) -> bool:
    """A PairScorer, or another scorer with its interface (refdpo.shared.vision's
    VisionPairScorer: the `policy` model and the `head` output layer as children)."""
    return isinstance(module, PairScorer) or (
        isinstance(module, torch.nn.Module)
        and hasattr(module, "policy")
        and hasattr(module, "head")
    )


def pair_logps(model, batch: PackedPairs, chunk_size: int = 1024) -> PairLogps:
    """Sum and per-token log-probs of every chosen and rejected completion in `batch`.

    model: a causal LM, a PairScorer, or the DeepSpeed engine that wraps a PairScorer (stage
    two: its forward hooks are what let ZeRO-3 prefetch). Runs the decoder once over the
    packed rows, then the lm_head and an fp32 log-softmax on `chunk_size` completion
    positions at a time. The caller picks the mode: torch.inference_mode() for the
    reference, grad mode for the policy.
    """
    if _is_scorer(getattr(model, "module", None)):  # a DeepSpeed engine around a scorer
        device = model.device
    else:
        if not _is_scorer(model):
            model = PairScorer(model, chunk_size)
        device = input_device(model)
    batch = batch.to(device)
    token_logps = model(
        batch.input_ids,
        batch.position_ids,
        batch.pair_index,
        batch.part,
        batch.target_row,
        batch.predictor_pos,
        batch.target_ids,
        **(batch.vision or {}),  # a vision scorer's image inputs (refdpo.shared.vision)
    )
    token_logps = token_logps.to(device)  # from the lm_head's device (--device-map)
    return pair_sums(token_logps, batch)


def pair_sums(token_logps: torch.Tensor, batch: PackedPairs) -> PairLogps:
    """PairLogps from per-token values in PackedPairs target order (a pair's chosen tokens,
    then its rejected ones): the sums per pair and completion, fp32, on the values' device."""
    device = token_logps.device
    slot = batch.target_pair.to(device) * 2 + batch.target_is_rejected.to(device).long()
    sums = torch.zeros(batch.num_pairs * 2, dtype=torch.float32, device=device)
    sums = sums.index_add(0, slot, token_logps.float())
    counts = batch.lengths.to(device, non_blocking=True)
    return PairLogps(
        chosen_logps=sums[0::2],
        rejected_logps=sums[1::2],
        chosen_lengths=counts[:, 0],
        rejected_lengths=counts[:, 1],
        token_logps=token_logps,
        lengths=batch.lengths,
    )
