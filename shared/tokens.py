"""Tokenize a pair once, into the exact ids both stages score.

prompt_ids + chosen_ids is the sequence scored for y_w (and the same for y_l). Each
completion is tokenized together with its prompt, as a model reads it, and the shared
prompt ids are the first tokens on which both joined sequences agree with the prompt
tokenized alone (BOUNDARY_RULE): a prompt ending in a space, or a chat template whose
generation prompt is not what precedes an answer, cannot leave a token the model would
never see at the boundary.

The truncation and end-of-completion rules below are recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from refdpo.shared.data import Pair, RowError
from refdpo.shared.errors import UsageError

TRUNCATION_RULE = """\
1. A prompt longer than max_prompt_length is dropped (`prompt_too_long`), or, with
   prompt_overflow="keep_end", cut to its last max_prompt_length tokens (the end holds the
   question and the generation prompt).
2. Each completion keeps its first max_length - len(prompt) tokens, its end token included,
   so that prompt + completion <= max_length. A cut completion loses its end token.
3. A pair whose two completions became equal is dropped (`identical_after_truncation`).
"""

END_RULE = """\
Every completion ends with exactly one end token. Chat rows: the completion is what the chat
template writes after the generation prompt, trailing whitespace removed; when it ends with a
special token (the template's end of turn: <|im_end|>, <|eot_id|>, <end_of_turn>), that token
ends the completion and the tokenizer's EOS is not appended (a base model fine-tuned on
ChatML stops at <|im_end|>, not at a following <|endoftext|>). Otherwise EOS is appended.
Text rows: a completion already ending with a special token (EOS or an end of turn, trailing
whitespace ignored) keeps that one token; any other gets EOS appended.
"""

BOUNDARY_RULE = """\
The prompt is tokenized alone and each completion joined to it. The prompt ids kept are the
longest run of leading ids that both joined sequences share with the prompt alone, so that
prompt_ids + completion_ids is always the joined text's own tokenization. Where that is
shorter than the prompt alone (a prompt ending in a space, a word cut in two, a chat template
whose generation prompt differs from what precedes an answer), the row is kept and counted as
`boundary_moved`. When not one token of the prompt would be left (a one-token prompt merging
with the answer), the prompt and the completions keep their own tokens instead.
"""

PROMPT_OVERFLOW = ("drop", "keep_end")


@dataclass(frozen=True)
class Truncation:
    """Length limits, in tokens."""

    max_length: int = 1024  # prompt + one completion
    max_prompt_length: int = 512
    prompt_overflow: str = "drop"  # "drop" or "keep_end"

    def __post_init__(self) -> None:
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length "
                f"({self.max_length}) so every completion keeps at least one token"
            )
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ValueError(f"prompt_overflow must be one of {PROMPT_OVERFLOW}")

    def describe(self) -> dict:
        return {**asdict(self), "rule": TRUNCATION_RULE, "end": END_RULE, "boundary": BOUNDARY_RULE}


@dataclass
class TokenizedPair:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    chosen_truncated: bool
    rejected_truncated: bool
    prompt: str  # text as rendered (chat template applied), for the shard's text columns
    chosen: str
    rejected: str
    boundary_moved: bool = False  # the prompt ids were cut back to a natural boundary
    images: list = field(default_factory=list)  # vision pairs: refdpo.shared.vision_pairs.PairImage


def check_tokenizer(tokenizer) -> None:
    """Fail before any scoring when the tokenizer cannot give what stage one needs."""
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token; completions end with EOS")


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before plain text (BOS for Llama-2-like tokenizers)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    cut = len(full) - len(plain)
    return list(full[:cut]) if cut > 0 and full[cut:] == plain else []


def _end_tokens(tokenizer) -> list[tuple[str, int]]:
    """(text, id) of the tokens that may end a completion: the special tokens, longest first."""
    found = {str(t): tokenizer.convert_tokens_to_ids(str(t)) for t in tokenizer.all_special_tokens}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            found.setdefault(str(added), token_id)
    return sorted(
        ((text, i) for text, i in found.items() if text and isinstance(i, int)),
        key=lambda item: -len(item[0]),
    )


def split_end(text: str, tokenizer) -> tuple[str, int, bool]:
    """(text without its end token, the end token's id, whether the text carried it).

    A text ending, trailing whitespace aside, in a special token keeps that token (END_RULE);
    otherwise the tokenizer's EOS is the end."""
    stripped = text.rstrip()
    for token, token_id in _end_tokens(tokenizer):
        if stripped.endswith(token):
            return stripped[: -len(token)], token_id, True
    return text, tokenizer.eos_token_id, False


def chat_kwargs(pair: Pair, defaults: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for apply_chat_template: the option's, then the row's, then tools."""
    kwargs = {**(defaults or {}), **(pair.template_kwargs or {})}
    if pair.tools:
        kwargs["tools"] = pair.tools
    return kwargs


def render_texts(
    pair: Pair, tokenizer, template_kwargs: dict[str, Any] | None = None
) -> tuple[str, list[str]]:
    """The prompt text and the two full texts (prompt + completion) that are tokenized.

    Chat pairs go through the chat template of `tokenizer` (a vision run passes its
    processor, whose template renders image parts); the full texts lose trailing
    whitespace (after the end-of-turn token) so that the end token is the last one."""
    if not pair.is_conversational:
        return pair.prompt, [pair.prompt + pair.chosen, pair.prompt + pair.rejected]
    if not tokenizer.chat_template:
        raise UsageError("conversational rows need a tokenizer with a chat template")
    kwargs = chat_kwargs(pair, template_kwargs)
    try:
        prompt = tokenizer.apply_chat_template(
            pair.prompt, tokenize=False, add_generation_prompt=True, **kwargs
        )
        fulls = [
            tokenizer.apply_chat_template(pair.prompt + answer, tokenize=False, **kwargs).rstrip()
            for answer in (pair.chosen, pair.rejected)
        ]
    except Exception as err:  # a template that raises on this row's messages
        raise RowError("template_error", str(err)) from None
    return prompt, fulls


def _shared_start(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _completion_texts(pair: Pair, prompt: str, fulls: list[str], tokenizer) -> list[str]:
    """Each completion as text: what its full text adds after the prompt, end token removed."""
    if not pair.is_conversational:
        return [split_end(c, tokenizer)[0] for c in (pair.chosen, pair.rejected)]
    return [split_end(full[_shared_start(prompt, full) :], tokenizer)[0] for full in fulls]


def render(
    pair: Pair, tokenizer, template_kwargs: dict[str, Any] | None = None
) -> tuple[str, str, str]:
    """Prompt and completion text as stored in the shard's text columns (the end token is
    an id, not text)."""
    prompt, fulls = render_texts(pair, tokenizer, template_kwargs)
    chosen, rejected = _completion_texts(pair, prompt, fulls, tokenizer)
    return prompt, chosen, rejected


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass(frozen=True)
class Encoder:
    """How a vision run turns text into ids: its processor, which expands every image
    placeholder into the image's tokens (`encode`: texts -> ids, special tokens not added),
    the processor for the chat template, and the image-token ids a cut must not touch."""

    templater: Any
    encode: Callable[[list[str]], list[list[int]]]
    image_token_ids: frozenset[int]


def tokenize_pair(
    pair: Pair,
    tokenizer,
    trunc: Truncation,
    template_kwargs: dict[str, Any] | None = None,
    encoder: Encoder | None = None,
) -> TokenizedPair:
    """Render, tokenize and truncate one pair; raise RowError when it cannot be used.

    encoder (vision pairs): the prompt and both joined texts are encoded by the processor, so
    the stored prompt ids hold the images' tokens and the boundary rule sees them; a prompt
    longer than the limit is dropped rather than cut when the cut would take image tokens."""
    prompt, fulls = render_texts(pair, encoder.templater if encoder else tokenizer, template_kwargs)
    # a chat template writes its own BOS into the text; plain text gets the tokenizer's
    prefix = [] if pair.is_conversational else _special_prefix(tokenizer)
    ends = [split_end(full, tokenizer) for full in fulls]
    texts = [prompt, ends[0][0], ends[1][0]]
    if encoder:
        encoded = encoder.encode(texts)
    else:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt_ids = prefix + list(encoded[0])
    joined = [prefix + list(encoded[1]), prefix + list(encoded[2])]
    if len(prompt_ids) == len(prefix):
        raise RowError("empty_prompt", "the prompt has no tokens")
    shared = min(_common_length(prompt_ids, j) for j in joined)
    if shared <= len(prefix):
        # the prompt's first token already merges with the answer (a one-token prompt such
        # as "p" before "ython"): nothing would be left of it, so keep both sides' own tokens
        alone = tokenizer(
            _completion_texts(pair, prompt, fulls, tokenizer), add_special_tokens=False
        )
        joined = [prompt_ids + list(ids) for ids in alone["input_ids"]]
        shared = len(prompt_ids)
    boundary_moved = shared < len(prompt_ids)
    prompt_ids = prompt_ids[:shared]
    completions = [[*j[shared:], end_id] for j, (_, end_id, _) in zip(joined, ends, strict=True)]

    prompt_truncated = len(prompt_ids) > trunc.max_prompt_length
    if prompt_truncated:
        lost = prompt_ids[: -trunc.max_prompt_length]
        if encoder and any(i in encoder.image_token_ids for i in lost):
            raise RowError(
                "prompt_too_long",
                f"{len(prompt_ids)} > {trunc.max_prompt_length} tokens, and cutting its start "
                "would cut an image",
            )
        if trunc.prompt_overflow == "drop":
            raise RowError(
                "prompt_too_long", f"{len(prompt_ids)} > {trunc.max_prompt_length} tokens"
            )
        prompt_ids = prompt_ids[-trunc.max_prompt_length :]
    budget = trunc.max_length - len(prompt_ids)
    cut = [len(ids) > budget for ids in completions]
    completions = [ids[:budget] for ids in completions]
    if completions[0] == completions[1]:
        raise RowError("identical_after_truncation")
    chosen, rejected = _completion_texts(pair, prompt, fulls, tokenizer)
    return TokenizedPair(
        id=pair.id,
        prompt_ids=prompt_ids,
        chosen_ids=completions[0],
        rejected_ids=completions[1],
        prompt_truncated=prompt_truncated,
        chosen_truncated=cut[0],
        rejected_truncated=cut[1],
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        boundary_moved=boundary_moved,
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the ids: vocabulary, special tokens, chat template, and the
    ids of a few probe strings (which catches normalizer and pre-tokenizer changes)."""
    probes = [
        "Hello world!",
        "  two  spaces\n\ttab",
        "naïve café 東京 🙂",
        "x=1;y=[2,3]",
        "<|im_end|>",
    ]
    blob = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "chat_template": tokenizer.chat_template,
        "probes": [tokenizer(p, add_special_tokens=True)["input_ids"] for p in probes],
    }
    return hashlib.sha256(json.dumps(blob, default=str).encode()).hexdigest()
