"""Tokenize a pair once, into the exact ids both stages score.

prompt_ids + chosen_ids is the sequence scored for y_w (and the same for y_l). Prompt and
completions are tokenized separately and concatenated; never as one string then sliced,
because a BPE merge across the boundary would make the slice point ambiguous.

The truncation rule below is recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from refdpo.shared.data import Pair, RowError

TRUNCATION_RULE = """\
1. A prompt longer than max_prompt_length is dropped (`prompt_too_long`), or, with
   prompt_overflow="keep_end", cut to its last max_prompt_length tokens (the end holds the
   question and the generation prompt).
2. Each completion keeps its first max_length - len(prompt) tokens, EOS included, so that
   prompt + completion <= max_length. A cut completion loses its EOS.
3. A pair whose two completions became equal is dropped (`identical_after_truncation`).
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
        return {**asdict(self), "rule": TRUNCATION_RULE}


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


def check_tokenizer(tokenizer) -> None:
    """Fail before any scoring when the tokenizer cannot give what stage one needs."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions end with EOS")


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before plain text (BOS for Llama-2-like tokenizers)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    cut = len(full) - len(plain)
    return list(full[:cut]) if cut > 0 and full[cut:] == plain else []


def render(pair: Pair, tokenizer) -> tuple[str, str, str]:
    """Prompt and completion text; chat pairs through the tokenizer's chat template.

    The completion text is what the template adds after the generation prompt, with a
    trailing EOS (and whitespace after it) removed: EOS is appended as an id instead.
    """
    if not pair.is_conversational:
        return pair.prompt, pair.chosen, pair.rejected
    if not tokenizer.chat_template:
        raise ValueError("conversational rows need a tokenizer with a chat template")
    try:
        prompt = tokenizer.apply_chat_template(
            pair.prompt, tokenize=False, add_generation_prompt=True
        )
        completions = []
        for answer in (pair.chosen, pair.rejected):
            full = tokenizer.apply_chat_template(pair.prompt + answer, tokenize=False)
            if not full.startswith(prompt):
                raise RowError(
                    "template_error",
                    "the chat template renders the prompt differently when an answer follows",
                )
            text = full[len(prompt) :].rstrip()
            eos = tokenizer.eos_token
            completions.append(text[: -len(eos)] if eos and text.endswith(eos) else text)
    except RowError:
        raise
    except Exception as err:  # a template that raises on this row's messages
        raise RowError("template_error", str(err)) from None
    return prompt, completions[0], completions[1]


def tokenize_pair(pair: Pair, tokenizer, trunc: Truncation) -> TokenizedPair:
    """Render, tokenize and truncate one pair; raise RowError when it cannot be used."""
    prompt, chosen, rejected = render(pair, tokenizer)
    # a chat template writes its own BOS into the text; plain text gets the tokenizer's
    prefix = [] if pair.is_conversational else _special_prefix(tokenizer)
    prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise RowError("empty_prompt", "the prompt has no tokens")
    prompt_truncated = len(prompt_ids) > trunc.max_prompt_length
    if prompt_truncated:
        if trunc.prompt_overflow == "drop":
            raise RowError(
                "prompt_too_long", f"{len(prompt_ids)} > {trunc.max_prompt_length} tokens"
            )
        prompt_ids = prompt_ids[-trunc.max_prompt_length :]

    budget = trunc.max_length - len(prompt_ids)
    completions, cut = [], []
    for text in (chosen, rejected):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        cut.append(len(ids) > budget)
        completions.append(ids[:budget])
    if completions[0] == completions[1]:
        raise RowError("identical_after_truncation")
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
