"""Tokenization, chat rendering, truncation and the tokenizer fingerprint of shared/tokens.py."""

from __future__ import annotations

import pytest

from refdpo.shared.data import Pair, RowError
from refdpo.shared.tokens import Truncation, render, tokenize_pair, tokenizer_fingerprint
from tests.conftest import CHAT_TEMPLATE, build_tokenizer

WIDE = Truncation(max_length=1024, max_prompt_length=512)
PROMPT = "Question: how do I sort a list in Python?\n\nAnswer:"
TEXT_PAIR = Pair(id="t", prompt=PROMPT, chosen=" use sorted(xs).", rejected=" The quick brown fox.")
CHAT_PAIR = Pair(
    id="c",
    prompt=[{"role": "user", "content": "What is two plus two?"}],
    chosen=[{"role": "assistant", "content": "Two plus two is four."}],
    rejected=[{"role": "assistant", "content": "Five."}],
)
LONG = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module")
def bos_tokenizer():
    return build_tokenizer(bos=True)


def plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def eos_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------------- ids


def test_prompt_ids_are_the_prompt_alone(tokenizer) -> None:
    tp = tokenize_pair(TEXT_PAIR, tokenizer, WIDE)
    assert tp.prompt_ids == tokenizer.encode(PROMPT)
    assert not tp.prompt_truncated


def test_completion_ids_are_completion_alone_plus_eos(tokenizer) -> None:
    tp = tokenize_pair(TEXT_PAIR, tokenizer, WIDE)
    assert tp.chosen_ids == [*plain_ids(tokenizer, TEXT_PAIR.chosen), eos_id(tokenizer)]
    assert tp.rejected_ids == [*plain_ids(tokenizer, TEXT_PAIR.rejected), eos_id(tokenizer)]
    assert not (tp.chosen_truncated or tp.rejected_truncated)


def test_boundary_inside_a_word_moves_to_the_natural_one(tokenizer) -> None:
    # "bro" + "wn": tokenized apart, the model would score ids it never reads in "brown"
    pair = Pair(id="b", prompt="The quick bro", chosen="wn fox.", rejected="ken fox.")
    assert plain_ids(tokenizer, "The quick brown fox.") != plain_ids(
        tokenizer, "The quick bro"
    ) + plain_ids(tokenizer, "wn fox.")
    tp = tokenize_pair(pair, tokenizer, WIDE)
    assert tp.boundary_moved
    alone = plain_ids(tokenizer, "The quick bro")
    assert alone[: len(tp.prompt_ids)] == tp.prompt_ids and len(tp.prompt_ids) < len(alone)
    # each scored sequence is the joined text's own tokenization, then the end token
    assert tp.prompt_ids + tp.chosen_ids == [
        *plain_ids(tokenizer, "The quick brown fox."),
        eos_id(tokenizer),
    ]
    assert tp.prompt_ids + tp.rejected_ids == [
        *plain_ids(tokenizer, "The quick broken fox."),
        eos_id(tokenizer),
    ]
    assert tp.chosen == "wn fox."  # the text columns keep the row's own split


def test_prompt_ending_in_a_space_keeps_the_natural_first_word(tokenizer) -> None:
    # the README's template used to end in "Answer: ": a lone space, then a no-space word
    pair = Pair(id="s", prompt="Question: sort?\n\nAnswer: ", chosen="use sorted", rejected="no")
    tp = tokenize_pair(pair, tokenizer, WIDE)
    assert tp.boundary_moved
    assert tp.prompt_ids == plain_ids(tokenizer, "Question: sort?\n\nAnswer:")
    assert tp.chosen_ids == [*plain_ids(tokenizer, " use sorted"), eos_id(tokenizer)]
    assert tp.rejected_ids == [*plain_ids(tokenizer, " no"), eos_id(tokenizer)]


def test_prompt_on_a_boundary_is_untouched(tokenizer) -> None:
    tp = tokenize_pair(TEXT_PAIR, tokenizer, WIDE)
    assert not tp.boundary_moved


# ---------------------------------------------------------------------------- end token


@pytest.mark.parametrize("tail", ["<|im_end|>", "<|im_end|>\n", " <|im_end|>  "])
def test_text_completion_ending_in_eos_gets_no_second_one(tokenizer, tail: str) -> None:
    pair = Pair(id="e", prompt=PROMPT, chosen=" use sorted(xs)." + tail, rejected=" no")
    tp = tokenize_pair(pair, tokenizer, WIDE)
    assert tp.chosen_ids.count(eos_id(tokenizer)) == 1 and tp.chosen_ids[-1] == eos_id(tokenizer)
    body = " use sorted(xs)." + tail.rstrip().removesuffix("<|im_end|>")
    assert tp.chosen_ids == [*plain_ids(tokenizer, body), eos_id(tokenizer)]
    assert tp.chosen == body


def chatml_base_tokenizer():
    """A base model fine-tuned on ChatML: end of turn <|im_end|>, EOS <|endoftext|>."""
    tok = build_tokenizer()
    tok.eos_token = "<|endoftext|>"
    assert tok.eos_token_id != tok.convert_tokens_to_ids("<|im_end|>")
    return tok


def test_chat_completion_ends_with_end_of_turn_not_eos() -> None:
    tok = chatml_base_tokenizer()
    tp = tokenize_pair(CHAT_PAIR, tok, WIDE)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for ids in (tp.chosen_ids, tp.rejected_ids):
        assert ids[-1] == im_end and ids.count(im_end) == 1
        assert tok.eos_token_id not in ids
    assert tp.chosen_ids == [*plain_ids(tok, "Two plus two is four."), im_end]


def test_text_completion_ending_in_end_of_turn_keeps_it() -> None:
    tok = chatml_base_tokenizer()
    pair = Pair(id="t", prompt=PROMPT, chosen=" yes<|im_end|>", rejected=" no")
    tp = tokenize_pair(pair, tok, WIDE)
    assert tp.chosen_ids == [*plain_ids(tok, " yes"), tok.convert_tokens_to_ids("<|im_end|>")]
    assert tp.rejected_ids == [*plain_ids(tok, " no"), tok.eos_token_id]  # none given: EOS


# ---------------------------------------------------------------------------- templates

THINK_TEMPLATE = (  # like DeepSeek-R1-distill: the generation prompt opens a think block
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def think_tokenizer():
    tok = build_tokenizer()
    tok.chat_template = THINK_TEMPLATE
    return tok


def test_generation_prompt_not_a_prefix_splits_at_first_differing_token() -> None:
    tok = think_tokenizer()
    tp = tokenize_pair(CHAT_PAIR, tok, WIDE)  # dropped as template_error before
    assert tp.boundary_moved
    full = tok.apply_chat_template(CHAT_PAIR.prompt + CHAT_PAIR.chosen, tokenize=False).rstrip()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tp.prompt_ids + tp.chosen_ids == [
        *plain_ids(tok, full.removesuffix("<|im_end|>")),
        im_end,
    ]
    gen = tok.apply_chat_template(CHAT_PAIR.prompt, add_generation_prompt=True, tokenize=False)
    assert plain_ids(tok, gen)[: len(tp.prompt_ids)] == tp.prompt_ids
    assert "<think>" not in tok.decode(tp.prompt_ids)


def test_chat_template_kwargs_reach_the_template_and_the_row_wins() -> None:
    tok = think_tokenizer()
    off = tokenize_pair(CHAT_PAIR, tok, WIDE, {"enable_thinking": False})
    assert "<think>\n\n</think>" in off.prompt
    row = Pair(**{**CHAT_PAIR.__dict__, "template_kwargs": {"enable_thinking": True}})
    on = tokenize_pair(row, tok, WIDE, {"enable_thinking": False})
    assert "</think>" not in on.prompt and on.prompt.endswith("<think>\n")


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{{ m['content'] }}{% for c in m.get('tool_calls') or [] %}<call>{{ c['function']['name'] }}"
    "</call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def test_tools_and_tool_calls_are_rendered_by_the_template() -> None:
    tok = build_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    pair = Pair(
        id="tool",
        prompt=[{"role": "user", "content": "2+2?"}],
        chosen=[{"role": "assistant", "content": "", "tool_calls": [call]}],
        rejected=[{"role": "assistant", "content": "5", "reasoning_content": "guess"}],
        tools=[{"type": "function", "function": {"name": "add", "parameters": {}}}],
    )
    tp = tokenize_pair(pair, tok, WIDE)
    assert "tools: add" in tp.prompt
    assert tp.chosen == "<call>add</call>"
    assert tp.rejected == "<think>guess</think>5"
    assert not tp.boundary_moved


def test_text_pair_renders_unchanged(tokenizer) -> None:
    assert render(TEXT_PAIR, tokenizer) == (TEXT_PAIR.prompt, TEXT_PAIR.chosen, TEXT_PAIR.rejected)


def test_bos_once_at_prompt_start_and_not_in_completions(bos_tokenizer) -> None:
    bos = bos_tokenizer.convert_tokens_to_ids("<s>")
    tp = tokenize_pair(TEXT_PAIR, bos_tokenizer, WIDE)
    assert tp.prompt_ids[0] == bos
    assert tp.prompt_ids.count(bos) == 1
    assert tp.prompt_ids[1:] == plain_ids(bos_tokenizer, PROMPT)
    assert bos not in tp.chosen_ids
    assert bos not in tp.rejected_ids
    assert tp.chosen_ids == [*plain_ids(bos_tokenizer, TEXT_PAIR.chosen), eos_id(bos_tokenizer)]


def test_no_bos_without_bos_tokenizer(tokenizer) -> None:
    tp = tokenize_pair(TEXT_PAIR, tokenizer, WIDE)
    assert tokenizer.convert_tokens_to_ids("<s>") not in tp.prompt_ids


# ---------------------------------------------------------------------------- chat


def test_chat_prompt_is_generation_prompt(tokenizer) -> None:
    prompt, _, _ = render(CHAT_PAIR, tokenizer)
    assert prompt == tokenizer.apply_chat_template(
        CHAT_PAIR.prompt, add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_completion_text_drops_end_marker(tokenizer) -> None:
    _, chosen, rejected = render(CHAT_PAIR, tokenizer)
    assert chosen == "Two plus two is four."
    assert rejected == "Five."


def test_chat_completion_ends_with_one_eos(tokenizer) -> None:
    tp = tokenize_pair(CHAT_PAIR, tokenizer, WIDE)
    eos = eos_id(tokenizer)
    assert tp.chosen_ids == [*plain_ids(tokenizer, "Two plus two is four."), eos]
    assert tp.chosen_ids.count(eos) == 1
    assert tp.rejected_ids.count(eos) == 1 and tp.rejected_ids[-1] == eos


def test_chat_prompt_ids_match_template_text(tokenizer) -> None:
    tp = tokenize_pair(CHAT_PAIR, tokenizer, WIDE)
    text = tokenizer.apply_chat_template(
        CHAT_PAIR.prompt, add_generation_prompt=True, tokenize=False
    )
    assert tp.prompt_ids == plain_ids(tokenizer, text)
    assert tp.prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_chat_pair_without_chat_template_fails() -> None:
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError):
        render(CHAT_PAIR, tok)


# ---------------------------------------------------------------------------- truncation


def test_long_prompt_dropped(tokenizer) -> None:
    pair = Pair(id="l", prompt=LONG, chosen=" yes", rejected=" no")
    assert len(tokenizer.encode(LONG)) > 8
    with pytest.raises(RowError) as info:
        tokenize_pair(pair, tokenizer, Truncation(max_length=64, max_prompt_length=8))
    assert info.value.reason == "prompt_too_long"


def test_prompt_exactly_at_limit_kept(tokenizer) -> None:
    n = len(tokenizer.encode(PROMPT))
    tp = tokenize_pair(TEXT_PAIR, tokenizer, Truncation(max_length=n + 50, max_prompt_length=n))
    assert tp.prompt_ids == tokenizer.encode(PROMPT)
    assert not tp.prompt_truncated


def test_long_prompt_keep_end(tokenizer) -> None:
    pair = Pair(id="l", prompt=LONG, chosen=" yes", rejected=" no")
    trunc = Truncation(max_length=64, max_prompt_length=8, prompt_overflow="keep_end")
    tp = tokenize_pair(pair, tokenizer, trunc)
    assert tp.prompt_ids == tokenizer.encode(LONG)[-8:]
    assert tp.prompt_truncated
    assert tp.chosen_ids == [*plain_ids(tokenizer, " yes"), eos_id(tokenizer)]


def test_completion_cut_to_budget_loses_eos(tokenizer) -> None:
    n = len(tokenizer.encode(PROMPT))
    pair = Pair(id="c", prompt=PROMPT, chosen=" " + LONG, rejected=" no")
    tp = tokenize_pair(pair, tokenizer, Truncation(max_length=n + 5, max_prompt_length=n))
    assert tp.chosen_ids == plain_ids(tokenizer, " " + LONG)[:5]
    assert eos_id(tokenizer) not in tp.chosen_ids
    assert tp.chosen_truncated
    assert len(tp.prompt_ids) + len(tp.chosen_ids) == n + 5
    # the short one fits and keeps its EOS
    assert tp.rejected_ids == [*plain_ids(tokenizer, " no"), eos_id(tokenizer)]
    assert not tp.rejected_truncated


def test_completion_exactly_filling_budget_keeps_eos(tokenizer) -> None:
    n = len(tokenizer.encode(PROMPT))
    k = len(plain_ids(tokenizer, TEXT_PAIR.chosen)) + 1  # with EOS
    tp = tokenize_pair(TEXT_PAIR, tokenizer, Truncation(max_length=n + k, max_prompt_length=n))
    assert tp.chosen_ids[-1] == eos_id(tokenizer)
    assert not tp.chosen_truncated


def test_identical_after_truncation(tokenizer) -> None:
    shared = " The quick brown fox jumps over the lazy dog."
    chosen, rejected = shared + " Yes, thank you!", shared + " Could you?"
    a, b = plain_ids(tokenizer, chosen), plain_ids(tokenizer, rejected)
    assert a != b and a[:4] == b[:4]  # they differ only after the first 4 tokens
    n = len(tokenizer.encode(PROMPT))
    pair = Pair(id="i", prompt=PROMPT, chosen=chosen, rejected=rejected)
    with pytest.raises(RowError) as info:
        tokenize_pair(pair, tokenizer, Truncation(max_length=n + 4, max_prompt_length=n))
    assert info.value.reason == "identical_after_truncation"
    # with room for the difference the pair is kept
    tokenize_pair(pair, tokenizer, WIDE)


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length"),
    [(10, 10), (10, 11), (10, 0)],
)
def test_truncation_limits_rejected(max_length: int, max_prompt_length: int) -> None:
    with pytest.raises(ValueError):
        Truncation(max_length=max_length, max_prompt_length=max_prompt_length)


def test_truncation_unknown_overflow_rejected() -> None:
    with pytest.raises(ValueError):
        Truncation(max_length=10, max_prompt_length=5, prompt_overflow="keep_start")


# ---------------------------------------------------------------------------- fingerprint


def test_fingerprint_equal_for_same_build() -> None:
    assert tokenizer_fingerprint(build_tokenizer()) == tokenizer_fingerprint(build_tokenizer())


def test_fingerprint_changes_with_chat_template() -> None:
    other = build_tokenizer()
    other.chat_template = CHAT_TEMPLATE.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}"
    )
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(build_tokenizer())


def test_fingerprint_changes_with_added_token() -> None:
    other = build_tokenizer()
    other.add_tokens(["<extra_token>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(build_tokenizer())


def test_fingerprint_changes_with_bos() -> None:
    assert tokenizer_fingerprint(build_tokenizer(bos=True)) != tokenizer_fingerprint(
        build_tokenizer()
    )
