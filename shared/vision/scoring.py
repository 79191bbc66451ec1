"""Completion log-probs of vision-language pairs, each prompt and its images encoded once.

Shared layout (`vision_pair_logps`): the text layout of `refdpo.shared.logprobs` (one
sequence [prompt, chosen, rejected] per pair, rejected positions restarting after the prompt,
a 4D mask in which rejected never sees chosen) with the prompt's image tokens inside it. The
scorer does what the VLMs' own forward does (embed the ids, encode the images, scatter them
into the image tokens, run the language model) with the layout's positions and mask. What
differs per family (positions, mask, where the modules are) comes from its `Family`.

Two-sequence layout (`fallback_pair_logps`): rows [prompt, chosen] and [prompt, rejected]
per pair for set-ups the shared layout does not cover; the images are encoded once and their
features written into both rows, so the tower still runs once per image.

Ground truth (`naive_pair_logps`): the model's own HF forward, once per sequence, alone.

Images of a batch are ordered by the first appearance of their pair in the flattened rows,
each pair's images in prompt order (what the `vision` dict of `process_images` holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from refdpo.shared.attention import CHOSEN, PROMPT, REJECTED
from refdpo.shared.errors import UsageError
from refdpo.shared.logprobs import PackedPairs, PairLogps, pair_logps, pair_sums
from refdpo.shared.models import input_device
from refdpo.shared.output_layer import TokenLogps
from refdpo.shared.vision.base import Family

SHARED, TWO_SEQUENCES = "shared", "two_sequences"


@dataclass
class Segment:
    """One pair's run in a row: [start, stop) in row `row`, prompt first."""

    row: int
    start: int
    stop: int
    pair: int
    prompt_len: int


@dataclass
class Layout:
    """A batch's rows as the families see them (tensors Shape (rows, length)), plus, on the
    host: the pairs' segments, each pair's prompt ids and its images' vision tensors."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pair_index: torch.Tensor
    part: torch.Tensor
    segments: list[Segment]
    prompts: dict[int, list[int]]
    pair_vision: dict[int, dict] = field(default_factory=dict)
    pair_counts: dict[int, list[int]] = field(default_factory=dict)

    def first_appearance(self) -> list[int]:
        """Pairs in the order their first segment appears (the images' order)."""
        return list(dict.fromkeys(s.pair for s in self.segments))


def segments(pair_index: torch.Tensor, part: torch.Tensor) -> list[Segment]:
    """Every pair's run in every row, row-major. pair_index, part: Shape (rows, length)."""
    out = []
    for r, (pairs, parts) in enumerate(zip(pair_index.tolist(), part.tolist(), strict=True)):
        start = 0
        while start < len(pairs):
            pair = pairs[start]
            stop = start + 1
            while stop < len(pairs) and pairs[stop] == pair:
                stop += 1
            if pair >= 0:
                prompt = sum(1 for p in parts[start:stop] if p == PROMPT)
                out.append(Segment(r, start, stop, pair, prompt))
            start = stop
    return out


def build_layout(family: Family, config, input_ids, position_ids, pair_index, part, vision):
    """The Layout of a batch: segments, prompts and each pair's share of `vision`."""
    segs = segments(pair_index, part)
    ids = input_ids.tolist()
    layout = Layout(input_ids, position_ids, pair_index, part, segs, {})
    for s in segs:
        layout.prompts.setdefault(s.pair, ids[s.row][s.start : s.start + s.prompt_len])
    order = layout.first_appearance()
    layout.pair_counts = {p: family.image_token_counts(config, layout.prompts[p]) for p in order}
    counts = [c for p in order for c in layout.pair_counts[p]]
    pieces = family.split_images(vision, counts) if vision else []
    if len(pieces) != len(counts):
        raise ValueError(f"the prompts hold {len(counts)} images, the vision inputs {len(pieces)}")
    at = 0
    for p in order:
        n = len(layout.pair_counts[p])
        layout.pair_vision[p] = family.join_images(pieces[at : at + n])
        at += n
    return layout


DUMMY_PREFIX = "dummy_"


class VisionPairScorer(torch.nn.Module):
    """A VLM as a module whose forward is the pair log-prob computation (cf. PairScorer).

    forward(input_ids, position_ids, pair_index, part, target_row, predictor_pos, target_ids,
    **vision) -> per-token completion log-probs, Shape (n_targets,). Children: `policy` (the
    VLM) and `head` (TokenLogps). The inputs are always the shared layout (pack_pairs);
    `layout` is how the scorer runs them: "shared" as they are, or "two_sequences" (rows
    [prompt, chosen] and [prompt, rejected] made inside forward), in both the images
    encoded once and their features scattered into every row that holds their pair, then
    the language model alone. Positions and the mask are built inside forward by the family
    from pair_index / part (Qwen ignores `position_ids` and computes M-RoPE positions; the
    others use them as given).
    """

    def __init__(self, model, family: Family, layout: str = SHARED, chunk_size: int = 1024):
        super().__init__()
        if layout not in (SHARED, TWO_SEQUENCES):
            raise ValueError(f"layout {layout!r}: use {SHARED!r} or {TWO_SEQUENCES!r}")
        self.policy = model
        self.family = family
        self.layout = layout
        self.head = TokenLogps(model.get_output_embeddings(), family.softcap(model), chunk_size)

    @property
    def config(self):
        return self.policy.config

    def forward(
        self,
        input_ids,
        position_ids,
        pair_index,
        part,
        target_row,
        predictor_pos,
        target_ids,
        **vision,
    ) -> torch.Tensor:
        dtype = self.head.lm_head.weight.dtype
        vision = {k: v.to(dtype) if v.is_floating_point() else v for k, v in vision.items()}
        # a text-only micro-batch of a ZeRO-3 vision run carries a dummy image (DUMMY_PREFIX
        # keys): the vision tower runs on it, so every rank joins the tower's gathers
        dummy = {
            k[len(DUMMY_PREFIX) :]: vision.pop(k)
            for k in list(vision)
            if k.startswith(DUMMY_PREFIX)
        }
        if self.layout == TWO_SEQUENCES:
            rows = two_sequence_rows(input_ids.cpu(), pair_index.cpu(), part.cpu())
            input_ids, position_ids, pair_index, part, target_row, predictor_pos = (
                t.to(input_ids.device) for t in rows
            )
        family, config = self.family, self.policy.config
        layout = build_layout(family, config, input_ids, position_ids, pair_index, part, vision)
        positions = family.positions(self.policy, layout, vision)
        mask = family.attention_mask(self.policy, layout, positions, dtype)
        embeds, extra = self._embeds_with_images(layout, vision, dummy)
        out = family.decoder(self.policy)(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            **family.decoder_inputs(layout.input_ids == family.image_token_id(config), extra),
        )
        hidden = out.last_hidden_state[target_row, predictor_pos]  # (n_targets, H)
        return self.head(hidden, target_ids)

    def _embeds_with_images(self, layout: Layout, vision: dict, dummy: dict):
        """Token embeddings with every image's features (encoded once) written into the image
        tokens of each row that holds its pair, Shape (rows, length, hidden); and the
        family's other per-token image features (Family.encode_images) in the same order,
        Shape (image tokens of the rows, hidden) each.

        The VLMs' own forward does the same (embed the ids, encode the images, scatter them
        into the image tokens, run the decoder); calling those modules here, in that order,
        in every micro-batch keeps ZeRO-3's parameter gathers in step across ranks: a text-only
        micro-batch of a ZeRO-3 run encodes its `dummy` image at the same point and adds the
        features times zero (the values are those without it, x + 0.0 being x; the tower's
        gradients zeros), where a call of the VLM's own forward without images would skip the
        tower and leave the other ranks waiting in its gathers."""
        token_id = self.family.image_token_id(self.policy.config)
        is_image = layout.input_ids == token_id
        ids = layout.input_ids.masked_fill(is_image, 0)  # the image id may lie outside the vocab
        embeds = self.policy.get_input_embeddings()(ids)
        if dummy:
            features = self.family.image_features(self.policy, dummy)
            return embeds + 0.0 * features.sum().to(embeds.dtype), []
        if not vision:
            return embeds, []
        order = layout.first_appearance()
        sizes = [sum(layout.pair_counts[p]) for p in order]
        laid_out = []
        for features in self.family.encode_images(self.policy, vision):
            per_pair = dict(zip(order, torch.split(features, sizes), strict=True))
            # row-major, like the mask and the image tokens
            laid_out.append(torch.cat([per_pair[s.pair] for s in layout.segments]))
        rows, extra = laid_out[0], laid_out[1:]
        return embeds.masked_scatter(is_image[..., None], rows.to(embeds.dtype)), extra


def _vision_to(vision: dict, device) -> dict:
    return {k: v.to(device) for k, v in vision.items()}


def _as_scorer(model, family: Family, layout: str, chunk_size: int):
    """`model` itself when it is a VisionPairScorer (or a DeepSpeed engine around one) of
    that layout, else a new scorer around the VLM."""
    inner = getattr(model, "module", model)
    if isinstance(inner, VisionPairScorer):
        if inner.layout != layout:
            raise ValueError(f"a {inner.layout!r} scorer asked for the {layout!r} layout")
        return model
    return VisionPairScorer(model, family, layout, chunk_size)


def _score(scorer, batch: PackedPairs, vision: dict) -> PairLogps:
    """The text path's pair_logps with the batch's image inputs: one log-prob function for
    both stages and both kinds of pairs."""
    return pair_logps(scorer, dataclasses.replace(batch, vision=vision))


def vision_pair_logps(
    model, family: Family, packed: PackedPairs, vision: dict, chunk_size: int = 1024
) -> PairLogps:
    """Log-probs of the pairs in `packed` (pack_pairs of the expanded prompt ids) with their
    images (`vision`, process_images of the batch's images in layout order), shared layout:
    one model call. model: a VLM, a VisionPairScorer or a DeepSpeed engine around one."""
    scorer = _as_scorer(model, family, SHARED, chunk_size)
    return _score(scorer, packed, vision)


def two_sequence_rows(input_ids, pair_index, part) -> tuple[torch.Tensor, ...]:
    """The pairs of a batch in the shared layout (tensors Shape (rows, length), on the host)
    as rows [prompt, chosen] and [prompt, rejected], right-padded with the batch's padding
    id, in the first-appearance order of the pairs (so the images keep their order).
    Completions are marked CHOSEN in `part`, so the pair mask is plain causal in every row.

    Returns (input_ids, position_ids, pair_index, part, target_row, predictor_pos); the
    targets in the order pack_pairs makes them: pair by pair, chosen then rejected."""
    segs = segments(pair_index, part)
    ids, parts = input_ids.tolist(), part.tolist()
    padding = input_ids[pair_index < 0]
    pad = int(padding[0]) if len(padding) else 0
    seqs: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for s in segs:
        if s.pair in seqs:
            continue
        row, span = ids[s.row], range(s.start, s.stop)
        prompt = [row[i] for i in span if parts[s.row][i] == PROMPT]
        chosen = [row[i] for i in span if parts[s.row][i] == CHOSEN]
        rejected = [row[i] for i in span if parts[s.row][i] == REJECTED]
        seqs[s.pair] = (prompt, chosen, rejected)
    order = list(seqs)
    rows = [(p, seqs[p][0], c) for p in order for c in (seqs[p][1], seqs[p][2])]
    length = max(len(prompt) + len(c) for _, prompt, c in rows)
    shape = (len(rows), length)
    new_ids = torch.full(shape, pad, dtype=torch.long)
    new_pairs = torch.full(shape, -1, dtype=torch.long)
    new_part = torch.full(shape, PROMPT, dtype=torch.long)
    position_ids = torch.arange(length).expand(shape).clone()
    for r, (p, prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        new_ids[r, :n] = torch.tensor(prompt + completion)
        new_pairs[r, :n] = p
        new_part[r, len(prompt) : n] = CHOSEN
    target_row, predictor_pos = [], []
    row_of = {p: 2 * k for k, p in enumerate(order)}
    for p in sorted(seqs):
        prompt, chosen, rejected = seqs[p]
        for offset, completion in ((0, chosen), (1, rejected)):
            target_row += [row_of[p] + offset] * len(completion)
            predictor_pos += range(len(prompt) - 1, len(prompt) - 1 + len(completion))
    targets = torch.tensor(target_row), torch.tensor(predictor_pos)
    return new_ids, position_ids, new_pairs, new_part, *targets


def two_sequence_layout(packed: PackedPairs) -> PackedPairs:
    """`packed` (on the host) in the two-sequence layout of two_sequence_rows."""
    ids, positions, pairs, part, target_row, predictor_pos = two_sequence_rows(
        packed.input_ids, packed.pair_index, packed.part
    )
    return dataclasses.replace(
        packed,
        input_ids=ids,
        position_ids=positions,
        pair_index=pairs,
        part=part,
        target_row=target_row,
        predictor_pos=predictor_pos,
    )


def fallback_pair_logps(
    model, family: Family, packed: PackedPairs, vision: dict, chunk_size: int = 1024
) -> PairLogps:
    """Same inputs and output as vision_pair_logps, two-sequence layout (images encoded once,
    their features reused for both rows of their pair)."""
    scorer = _as_scorer(model, family, TWO_SEQUENCES, chunk_size)
    return _score(scorer, packed, vision)


def naive_pair_logps(model, family: Family, packed: PackedPairs, vision: dict) -> PairLogps:
    """Ground truth: the model's own forward (`model(input_ids, pixels..., attention_mask=1)
    .logits`) on [prompt, chosen] and on [prompt, rejected] of every pair, each alone; fp32
    log-softmax, gathered at the completion tokens. Independent of the layout code above but
    for cutting the batch's vision tensors per pair."""
    packed = packed.to("cpu")
    two = two_sequence_layout(packed)
    layout = build_layout(
        family, model.config, two.input_ids, two.position_ids, two.pair_index, two.part, vision
    )
    device = input_device(model)
    values: dict[tuple[int, int], torch.Tensor] = {}
    for k, p in enumerate(layout.first_appearance()):
        for which in (0, 1):
            row = 2 * k + which
            n = int((two.pair_index[row] >= 0).sum())
            ids = two.input_ids[row : row + 1, :n].to(device)
            prompt_len = len(layout.prompts[p])
            logits = (
                model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    **_vision_to(layout.pair_vision[p], device),
                    **family.naive_kwargs(model.config, ids, prompt_len=prompt_len),
                )
                .logits[0]
                .float()
            )
            logps = torch.log_softmax(logits[prompt_len - 1 : n - 1], dim=-1)
            values[p, which] = logps.gather(-1, ids[0, prompt_len:, None]).squeeze(-1)
    token_logps = torch.cat([values[p, w] for p in range(packed.num_pairs) for w in (0, 1)])
    return pair_sums(token_logps, packed)


def encode_prompt(
    processor, family: Family, text: str, images, *, add_special_tokens: bool = False
) -> tuple[list[int], dict]:
    """The processor on one prompt text with its images: (prompt ids with every image
    placeholder expanded into its image tokens, the images' vision tensors).

    The text is a rendered chat template, which writes its own special tokens, hence
    add_special_tokens=False. Raises UsageError when the text's placeholders
    (processor.image_token) do not number the images, or the ids disagree with the images.
    """
    images = list(images or [])
    token = processor.image_token
    found = text.count(token)
    if found != len(images):
        raise UsageError(
            f"the prompt has {found} image placeholders ({token}) for {len(images)} images"
        )
    out = family.encode(processor, text, images, add_special_tokens)
    ids = out["input_ids"][0].tolist()
    processed = {k: out[k] for k in family.vision_keys if k in out}  # not processed again
    infos = family.image_infos(processor, processed, ids)
    expected = sum(1 for t in ids if t == family.processor_token_id(processor))
    if len(infos) != len(images) or sum(i.tokens for i in infos) != expected:
        raise UsageError(
            f"the processor made {expected} image tokens of {len(images)} images, the images "
            f"account for {sum(i.tokens for i in infos)} in {len(infos)} images"
        )
    return ids, processed


@dataclass
class VisionPasses:
    """How many times the vision tower ran (one call encodes all the images given to it)."""

    calls: int = 0


@contextlib.contextmanager
def count_vision_passes(model, family: Family | None = None) -> Iterator[VisionPasses]:
    """Count the calls of the model's vision tower inside the block (a forward hook)."""
    if family is None:
        from refdpo.shared.vision import family_for

        family = family_for(model)
    counter = VisionPasses()

    def hook(module, args, output):
        counter.calls += 1

    handle = family.vision_module(model).register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
