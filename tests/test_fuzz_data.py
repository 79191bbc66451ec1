"""Property-based tests of stage one's data path: every row is kept or counted, nothing crashes.

Rows come in every shape the loader accepts and every way one can go wrong: arbitrary
Unicode, empty and whitespace-only fields, fields of thousands of characters, missing keys,
wrong types, duplicate ids, message lists with wrong roles. Three tiers:

1. in process, per row format: survey + tokenize_rows over a RowSource, exactly what
   precompute runs before scoring; no model, many examples;
2. end to end: a JSON Lines file (with raw non-JSON and non-object lines among the rows)
   through `refdpo.precompute.run.main` on the tiny random Llama; a few examples;
3. a fixed catalogue of named bad rows, each with the one reason it must be dropped under,
   end to end. `python -m tests.test_fuzz_data` prints it as a Markdown table for the docs.

REFDPO_FUZZ_SCALE=20 multiplies the number of examples, for a longer hunt than CI's.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from refdpo.precompute.inspect import validate
from refdpo.precompute.run import main as precompute_main
from refdpo.precompute.score import survey, tokenize_rows
from refdpo.shared.data import DROP_REASONS, RowFormat, RowSource, load_source
from refdpo.shared.shards import MANIFEST, read_manifest
from refdpo.shared.tokens import PROMPT_OVERFLOW, TokenizedPair, Truncation
from tests.test_precompute import WORDS, base_args, good_rows

KEPT = "kept"
# the limits base_args gives precompute; the in-process expectations must use the same
E2E_TRUNCATION = Truncation(max_length=128, max_prompt_length=64)
# drops that need a tokenizer or the whole split, so the survey (no tokenizer) cannot see them
TOKENIZER_REASONS = {
    "duplicate_id",
    "empty_prompt",
    "prompt_too_long",
    "identical_after_truncation",
    "template_error",
}
SCALE = int(os.environ.get("REFDPO_FUZZ_SCALE", "1"))
FAST = settings(
    max_examples=60 * SCALE,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repository; failures print their example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# each example is a whole precompute run (about a second on CPU)
SLOW = settings(FAST, max_examples=20 * SCALE)

# ---------------------------------------------------------------------------- values


def middle(common: Any, rare: list, weight: int) -> st.SearchStrategy:
    """`common` `weight` times as often as each of `rare`. Hypothesis favours the first and
    last items of sampled_from, so `common` takes both ends and the rare ones the middle."""
    half = weight // 2
    return st.sampled_from([common] * half + rare + [common] * (weight - half))


def rarely(n: int) -> st.SearchStrategy:
    """True about once in n draws."""
    return middle(False, [True], n - 1)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, in proportion to its weight, the first also at the far end
    (st.one_of drops repeats, so repeating a strategy there does not weight it)."""
    pool = [s for weight, s in choices for _ in range(weight)]
    half = choices[0][0] // 2
    return st.sampled_from(pool[half:] + pool[:half]).flatmap(lambda s: s)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, odds: int = 4) -> st.SearchStrategy:
    """`good` (odds - 1) times in `odds`, else `bad`: a sample needs plenty of both."""
    return weighted((odds - 1, good), (1, bad))


WORDS_TEXT = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join)
BLANK = st.sampled_from(["", " ", "\n\t  ", "\u3000", "\u00a0\u2003\n"])  # strip() empties them
# not blank to str.strip(), so these count as text: zero-width space, NUL, BOM, combining mark,
# the tokenizer's own special-token text, Jinja syntax, the last code point
ODD = st.sampled_from(
    ["\u200b", "\x00", "\ufeff", "e\u0301", "\U0001f642", "<|im_end|>", "{{ x }}", "\U0010ffff"]
)
# any code point but lone surrogates: only a JSON escape can make one (see LONE_SURROGATE)
UNICODE = st.text(max_size=30)
LONG = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=5), st.integers(500, 2000))
TEXT = weighted((6, WORDS_TEXT), (2, UNICODE), (1, BLANK), (1, ODD), (1, LONG))
NOT_TEXT = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and inf included
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELD = mostly(TEXT, NOT_TEXT, odds=10)
# "7" and 7 give the same pair id; so do two NaNs ("nan")
ID = st.one_of(
    st.sampled_from(["a", "b", "7", ""]), st.integers(6, 8), st.just(7.0), st.just(float("nan"))
)

# ---------------------------------------------------------------------------- messages

PROMPT_ROLES = st.sampled_from(["system", "user", "tool", "assistant"])
ANSWER_ROLES = mostly(st.just("assistant"), st.sampled_from(["user", "system", "tool"]), odds=10)
ODD_ROLES = st.one_of(st.sampled_from(["wizard", "", "User", "human", "function"]), NOT_TEXT)
MESSAGE_FLAWS = ["no_role", "no_content", "odd_role", "odd_content", "not_a_dict", "extra_key"]


@st.composite
def message(draw, roles: st.SearchStrategy) -> Any:
    """A chat message; now and then without role or content, with odd ones, or not a dict."""
    flaw = draw(middle("none", MESSAGE_FLAWS, 30))
    if flaw == "not_a_dict":
        return draw(st.one_of(TEXT, NOT_TEXT))
    m = {"role": draw(roles), "content": draw(TEXT)}
    if flaw in ("no_role", "no_content"):
        del m[flaw[3:]]
    elif flaw == "odd_role":
        m["role"] = draw(ODD_ROLES)
    elif flaw == "odd_content":
        m["content"] = draw(NOT_TEXT)
    elif flaw == "extra_key":  # allowed: the loader keeps a string name
        m["name"] = draw(TEXT)
    return m


def conversation(roles: st.SearchStrategy, max_size: int = 3) -> st.SearchStrategy:
    return mostly(st.lists(message(roles), min_size=1, max_size=max_size), st.just([]), odds=20)


# ---------------------------------------------------------------------------- rows per format


def explicit_row() -> st.SearchStrategy:
    return st.fixed_dictionaries({"prompt": FIELD, "chosen": FIELD, "rejected": FIELD})


def conversational_row() -> st.SearchStrategy:
    answer = mostly(conversation(ANSWER_ROLES, 2), FIELD)  # a string is one assistant message
    prompt = mostly(conversation(PROMPT_ROLES), FIELD, odds=6)
    return st.fixed_dictionaries({"prompt": prompt, "chosen": answer, "rejected": answer})


MARKER = RowFormat().prompt_marker
NEAR_MARKERS = st.sampled_from(["", "\n\nAssistant", "\n\nassistant:", "\nAssistant:"])


@st.composite
def hh_row(draw) -> dict:
    """Anthropic HH style: both texts repeat the conversation, up to a shared marker."""
    turns = draw(st.lists(st.tuples(TEXT, TEXT), max_size=2))
    history = "".join(f"\n\nHuman: {q}{MARKER} {a}" for q, a in turns)
    history += f"\n\nHuman: {draw(TEXT)}" + draw(mostly(st.just(MARKER), NEAR_MARKERS))
    chosen, rejected = history + draw(TEXT), history + draw(TEXT)
    if draw(rarely(8)):
        rejected = draw(TEXT)  # an unrelated text: nothing shared
    return {"chosen": chosen, "rejected": rejected}


@st.composite
def shared_messages_row(draw) -> dict:
    """Implicit prompt as messages: the messages both lists start with are the prompt."""
    history = draw(conversation(PROMPT_ROLES))
    chosen = history + draw(conversation(ANSWER_ROLES, 2))
    rejected = copy.deepcopy(history) + draw(conversation(ANSWER_ROLES, 2))
    if draw(rarely(8)):
        rejected = draw(conversation(PROMPT_ROLES))  # unrelated: no shared first message
    return {"chosen": chosen, "rejected": rejected}


TEMPLATE = "Question: {{ question.strip() }}\n\nAnswer: "  # .strip() fails on a non-string
TEMPLATE_FORMAT = RowFormat(
    chosen_column="response_j", rejected_column="response_k", prompt_template=TEMPLATE
)
TEMPLATE_ARGS = [
    "--prompt-template",
    TEMPLATE,
    "--chosen-column",
    "response_j",
    "--rejected-column",
    "response_k",
]


def template_row() -> st.SearchStrategy:
    return st.fixed_dictionaries({"question": FIELD, "response_j": FIELD, "response_k": FIELD})


@st.composite
def damaged(draw, rows: st.SearchStrategy) -> dict:
    """A row from `rows`, now and then with a key left out or null, or one field copied over
    another (chosen == rejected), often with an id."""
    row = dict(draw(rows))  # a copy: hypothesis shows a drawn value as it was built
    for key in list(row):
        fate = draw(middle("keep", ["delete", "null"], 20))
        if fate == "delete":
            del row[key]
        elif fate == "null":
            row[key] = None
    if len(row) >= 2 and draw(rarely(8)):
        source, target = draw(st.permutations(list(row)))[:2]
        row[target] = copy.deepcopy(row[source])
    ident = draw(middle("no id", ["null id", "id", "id"], 2))
    if ident == "null id":
        row["id"] = None  # the content hash stands in
    elif ident == "id":
        row["id"] = draw(ID)
    return row


@dataclass(frozen=True)
class Kind:
    """A row format: its options, a strategy for its rows and one row that must be kept."""

    fmt: RowFormat
    rows: st.SearchStrategy
    good: dict


GOOD_ID = "keep-me"  # ID never draws it: the good row is never a duplicate
SAY, YES, NO = "Say alpha.", "alpha", "no"
KINDS = {
    "explicit": Kind(RowFormat(), explicit_row(), {"prompt": SAY, "chosen": YES, "rejected": NO}),
    "explicit_chat_template": Kind(
        RowFormat(chat_template=True),
        explicit_row(),
        {"prompt": SAY, "chosen": YES, "rejected": NO},
    ),
    "conversational": Kind(
        RowFormat(),
        conversational_row(),
        {
            "prompt": [{"role": "user", "content": SAY}],
            "chosen": [{"role": "assistant", "content": YES}],
            "rejected": NO,
        },
    ),
    "implicit_text": Kind(
        RowFormat(),
        hh_row(),
        {"chosen": f"\n\nHuman: {SAY}{MARKER} {YES}", "rejected": f"\n\nHuman: {SAY}{MARKER} {NO}"},
    ),
    "implicit_messages": Kind(
        RowFormat(),
        shared_messages_row(),
        {
            "chosen": [{"role": "user", "content": SAY}, {"role": "assistant", "content": YES}],
            "rejected": [{"role": "user", "content": SAY}, {"role": "assistant", "content": NO}],
        },
    ),
    "column_mapping_template": Kind(
        TEMPLATE_FORMAT, template_row(), {"question": SAY, "response_j": YES, "response_k": NO}
    ),
}


@st.composite
def split_of(draw, kind: Kind) -> list:
    """Rows of one format, some repeated later (duplicate ids), with the good row somewhere."""
    rows = draw(st.lists(damaged(kind.rows), max_size=10))
    if rows:
        copies = draw(st.lists(st.integers(0, len(rows) - 1), max_size=3))
        rows += [copy.deepcopy(rows[i]) for i in copies]
    rows.insert(draw(st.integers(0, len(rows))), {**kind.good, "id": GOOD_ID})
    return rows


@st.composite
def truncations(draw) -> Truncation:
    """Tight limits, so that long fields hit both rules; the good row always fits."""
    prompt = draw(st.integers(32, 64))
    return Truncation(
        max_length=prompt + draw(st.integers(1, 64)),
        max_prompt_length=prompt,
        prompt_overflow=draw(st.sampled_from(PROMPT_OVERFLOW)),
    )


# ---------------------------------------------------------------------------- the data path


def list_source(rows: list) -> RowSource:
    return RowSource(rows, list(range(len(rows))), "fuzzed rows", "none")


def data_path(source: RowSource, fmt: RowFormat, tokenizer, trunc: Truncation):
    """What precompute does to a split before scoring: survey it whole, then tokenize it."""
    found = survey(source, fmt, show=False)
    pairs, dropped, _ = tokenize_rows(
        source, 0, len(source), fmt, tokenizer, trunc, found.duplicates, lambda _: None
    )
    return found, pairs, dropped


def fates(source: RowSource, fmt: RowFormat, tokenizer, trunc: Truncation) -> list:
    """Each row's outcome, KEPT (with its pair) or its drop reason, by precompute's own
    functions run over one row at a time (the survey still sees the whole split)."""
    found = survey(source, fmt, show=False)
    outcomes = []
    for i in range(len(source)):
        pairs, dropped, _ = tokenize_rows(
            source, i, i + 1, fmt, tokenizer, trunc, found.duplicates, lambda _: None
        )
        assert len(pairs) + sum(dropped.values()) == 1, f"row {i}: neither kept nor counted"
        outcomes.append((KEPT, pairs[0]) if pairs else (next(iter(dropped)), None))
    return outcomes


def check_pair(pair: TokenizedPair, tokenizer, trunc: Truncation) -> None:
    """A kept pair holds what stage two relies on."""
    assert pair.prompt_ids and pair.chosen_ids and pair.rejected_ids
    assert pair.chosen_ids != pair.rejected_ids
    assert len(pair.prompt_ids) <= trunc.max_prompt_length
    assert not (pair.prompt_truncated and trunc.prompt_overflow == "drop")
    assert all(0 <= t < len(tokenizer) for t in pair.prompt_ids + pair.chosen_ids)
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    if pair.boundary_moved:  # the prompt ids end at the last token shared with the answers
        if not pair.prompt_truncated:
            assert pair.prompt.startswith(decode(pair.prompt_ids))
            for ids, text in ((pair.chosen_ids, pair.chosen), (pair.rejected_ids, pair.rejected)):
                body = ids[:-1] if ids[-1] == tokenizer.eos_token_id else ids
                joined = tokenizer(pair.prompt + text, add_special_tokens=False)["input_ids"]
                assert joined[: len(pair.prompt_ids) + len(body)] == pair.prompt_ids + body
        return
    if not pair.prompt_truncated:  # the stored ids are the text's own tokens
        assert decode(pair.prompt_ids) == pair.prompt
    for ids, text, cut in (
        (pair.chosen_ids, pair.chosen, pair.chosen_truncated),
        (pair.rejected_ids, pair.rejected, pair.rejected_truncated),
    ):
        assert len(pair.prompt_ids) + len(ids) <= trunc.max_length
        if cut:  # cut to exactly the budget, EOS lost with the tail
            assert len(pair.prompt_ids) + len(ids) == trunc.max_length
        else:
            decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            assert ids[-1] == tokenizer.eos_token_id and decoded == text + tokenizer.eos_token


@pytest.mark.parametrize("kind", list(KINDS))
@FAST
@given(data=st.data())
def test_every_row_is_kept_or_counted_in_process(kind, tokenizer, data):
    rows = data.draw(split_of(KINDS[kind]), label="rows")
    trunc = data.draw(truncations(), label="truncation")
    fmt = KINDS[kind].fmt
    # anything but a RowError (which the data path counts) escapes here and fails the test
    found, pairs, dropped = data_path(list_source(rows), fmt, tokenizer, trunc)
    note(f"kept {len(pairs)}, dropped {dict(dropped)}")
    for reason in dropped:
        event(f"dropped: {reason}")
    event(f"kept besides the good row: {min(len(pairs) - 1, 3)}{'+' * (len(pairs) > 3)}")

    assert set(dropped) <= set(DROP_REASONS)
    assert len(pairs) + sum(dropped.values()) == len(rows)
    # the survey (no tokenizer) and tokenization agree; tokenization only adds its own reasons
    assert not found.dropped - dropped
    assert set(dropped - found.dropped) <= TOKENIZER_REASONS
    assert dropped["duplicate_id"] == len(found.duplicates)

    ids = [p.id for p in pairs]
    assert len(set(ids)) == len(ids)
    assert GOOD_ID in ids  # bad neighbours never take a good row down with them
    for pair in pairs:
        check_pair(pair, tokenizer, trunc)


# ---------------------------------------------------------------------------- end to end

# lines that once crashed the loader or took the whole file down; now each is one counted row
NINES = "9" * 5000  # past the 4,300 digits Python turns into an int
HUGE_NUMBER = '{"prompt": "p", "chosen": ' + NINES + ', "rejected": "b"}'
DEEP = "[" * 100_000  # deeper than json's recursion limit
NOT_UTF8 = b'\xff\xfe{"prompt": "p", "chosen": "a", "rejected": "b"}'
# valid JSON around Latin-1 bytes: Arrow reads the file, then fails on the row unless checked
NOT_UTF8_IN_STRING = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
LONE_SURROGATE = {"prompt": "p\ud800", "chosen": "a", "rejected": "b"}  # json.dumps escapes it
RAW_LINES = st.one_of(
    st.sampled_from(["{not json", '{"prompt": "p", "chosen": ', "[1, 2", "}{", "NaN", "'single'"]),
    # random text: a line break would make two lines, and a blank line is not a row
    st.text(max_size=30).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s),
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.lists(st.integers())
    ).map(json.dumps),
    st.sampled_from([HUGE_NUMBER, DEEP, NOT_UTF8, NOT_UTF8_IN_STRING]),
)


@st.composite
def with_lone_surrogate(draw, rows: st.SearchStrategy) -> dict:
    """A row with a lone surrogate in one string field: valid JSON, invalid Unicode."""
    row = dict(draw(rows))  # a copy: hypothesis shows a drawn value as it was built
    strings = [k for k, v in row.items() if isinstance(v, str)]
    if strings:
        key = draw(st.sampled_from(strings))
        at = draw(st.integers(0, len(row[key])))
        row[key] = row[key][:at] + draw(st.characters(categories=["Cs"])) + row[key][at:]
    return row


GOOD_ROW = st.integers(0, 10**6).map(lambda i: good_rows(1, offset=i)[0])
E2E_LINE = weighted(
    (4, GOOD_ROW),
    (2, damaged(explicit_row())),
    (1, damaged(conversational_row())),
    (1, damaged(hh_row())),
    (1, damaged(shared_messages_row())),
    (1, with_lone_surrogate(GOOD_ROW)),
    (2, RAW_LINES),
)


def write_lines(path: Path, lines: list) -> Path:
    """One line per item: bytes and str as they are, anything else as JSON (ASCII, so a lone
    surrogate is written as its escape)."""
    with open(path, "wb") as fh:
        for line in lines:
            if isinstance(line, str):
                line = line.encode("utf-8")
            elif not isinstance(line, bytes):
                line = json.dumps(line).encode("ascii")
            fh.write(line + b"\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


FOLDERS = itertools.count()  # hypothesis reruns a test body many times: one folder per run


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Messages of refdpo's loggers (pytest's caplog is per test, not per example)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("refdpo")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def check_stored_values(df: pd.DataFrame) -> None:
    """No NaN or inf anywhere; each sum and average agrees with its per-token values."""
    for side, completion in (("win", "chosen"), ("rej", "rejected")):
        per_token = df[f"ref_{side}_per_token_logp"].map(lambda v: np.asarray(v, np.float64))
        assert all(np.isfinite(v).all() for v in per_token)
        total, average = df[f"ref_{side}_logp"], df[f"ref_{side}_avg_logp"]
        assert np.isfinite(total).all() and np.isfinite(average).all()
        assert (per_token.map(len) == df[f"{completion}_ids"].map(len)).all()
        np.testing.assert_allclose(total, per_token.map(np.sum), rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(average, total / per_token.map(len), rtol=1e-9)


@SLOW
@given(lines=st.lists(E2E_LINE, min_size=1, max_size=14))
def test_every_line_is_kept_or_counted_end_to_end(lines, workdir, tiny_model_dir, tokenizer):
    folder = workdir / f"run-{next(FOLDERS)}"
    folder.mkdir()
    dataset, out = write_lines(folder / "pairs.jsonl", lines), folder / "out"
    # the expectation: precompute's own functions over the file as loaded, one row at a time
    source = load_source(str(dataset))
    event(f"read by {'Arrow' if not isinstance(source.rows, list) else 'the json fallback'}")
    expected = fates(source, RowFormat(), tokenizer, E2E_TRUNCATION)
    kept_ids = sorted(pair.id for fate, pair in expected if fate == KEPT)
    dropped = Counter(fate for fate, _ in expected if fate != KEPT)
    assert len(expected) == len(lines)
    event(f"usable rows: {'some' if kept_ids else 'none'}")

    with captured_logs() as logs:
        code = precompute_main([str(a) for a in base_args(tiny_model_dir, dataset, out)])
    if not kept_ids:  # documented: no usable row is an error naming the drop counts
        assert code == 2 and any("no usable rows" in m for m in logs)
        assert not (out / MANIFEST).exists()
        return
    assert code == 0
    manifest, _ = validate(out)  # checksums, per-row invariants, ids unique
    assert manifest["input_rows"] == len(lines)
    assert manifest["rows"] + sum(manifest["dropped"].values()) == manifest["input_rows"]
    assert manifest["dropped"] == dict(sorted(dropped.items()))
    df = pd.read_parquet(out)
    assert df["id"].is_unique and sorted(df["id"]) == kept_ids
    check_stored_values(df)


# ---------------------------------------------------------------------------- the catalogue


class Entry(NamedTuple):
    name: str
    line: Any  # a row (written as JSON) or a raw line (str or bytes)
    reason: str  # a DROP_REASONS key, or KEPT


def user(text: Any) -> dict:
    return {"role": "user", "content": text}


def assistant(text: Any) -> dict:
    return {"role": "assistant", "content": text}


def row(prompt: Any = "p", chosen: Any = "a", rejected: Any = "b", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


HH = "\n\nHuman: hi\n\nAssistant:"
GOOD_LINES = good_rows(4)  # the catalogue follows these in its file
CATALOGUE = [
    Entry("not JSON", "{not json", "malformed_line"),
    Entry("a JSON list, not an object", ["p", "a", "b"], "malformed_line"),
    Entry("a JSON string, not an object", json.dumps("just text"), "malformed_line"),
    Entry("null, not an object", None, "malformed_line"),
    Entry("a number of 5,000 digits", HUGE_NUMBER, "malformed_line"),
    Entry("arrays nested 100,000 deep", DEEP, "malformed_line"),
    Entry("a lone surrogate escape (\\ud800)", LONE_SURROGATE, "malformed_line"),
    Entry("bytes that are not UTF-8, outside a string", NOT_UTF8, "malformed_line"),
    Entry("no chosen key", {"prompt": "p", "rejected": "b"}, "missing_field"),
    Entry("rejected is null", row(rejected=None), "missing_field"),
    Entry("an empty object", {}, "missing_field"),
    Entry("chosen is a number", row(chosen=5), "wrong_type"),
    Entry("prompt is a float", row(prompt=2.5), "wrong_type"),
    Entry("rejected is a bool", row(rejected=True), "wrong_type"),
    Entry("chosen is an object", row(chosen={"text": "a"}), "wrong_type"),
    Entry("message-list answers to a string prompt", row(chosen=[assistant("a")]), "wrong_type"),
    Entry(
        "implicit: chosen a string, rejected a list",
        {"chosen": HH + " a", "rejected": [assistant("b")]},
        "wrong_type",
    ),
    Entry("unknown role", row(prompt=[{"role": "wizard", "content": "hi"}]), "bad_messages"),
    Entry("capitalised role", row(prompt=[{"role": "User", "content": "hi"}]), "bad_messages"),
    Entry("message without role", row(prompt=[{"content": "hi"}]), "bad_messages"),
    Entry("message content is a number", row(prompt=[user(3)]), "bad_messages"),
    Entry("a message that is a string", row(prompt=["hi"]), "bad_messages"),
    Entry("empty prompt message list", row(prompt=[]), "bad_messages"),
    Entry("user message in chosen", row(prompt=[user("hi")], chosen=[user("a")]), "bad_messages"),
    Entry(
        "system message in rejected",
        row(prompt=[user("hi")], rejected=[{"role": "system", "content": "b"}]),
        "bad_messages",
    ),
    Entry(
        "implicit texts without a shared marker",
        {"chosen": "\n\nHuman: a" + HH + " x", "rejected": "\n\nHuman: b" + HH + " y"},
        "no_shared_prompt",
    ),
    Entry(
        "implicit messages differing from the first",
        {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
        "no_shared_prompt",
    ),
    Entry("empty prompt", row(prompt=""), "empty_prompt"),
    Entry("prompt of ideographic space and tab", row(prompt="\u3000\t"), "empty_prompt"),
    Entry("prompt message of spaces", row(prompt=[user("   ")]), "empty_prompt"),
    Entry("whitespace-only chosen", row(chosen="   "), "empty_chosen"),
    Entry(
        "chosen assistant message empty",
        row(prompt=[user("hi")], chosen=[assistant("")]),
        "empty_chosen",
    ),
    Entry("rejected of newlines", row(rejected="\n\n"), "empty_rejected"),
    Entry("chosen equals rejected", row(chosen="same", rejected="same"), "identical"),
    Entry(
        "equal message lists",
        row(prompt=[user("hi")], chosen=[assistant("x")], rejected="x"),
        "identical",
    ),
    Entry(
        "implicit texts that are equal", {"chosen": HH + " x", "rejected": HH + " x"}, "identical"
    ),
    Entry("prompt of 5,000 characters", row(prompt="long " * 1000), "prompt_too_long"),
    Entry(
        "answers equal in their first 200 tokens",
        row(chosen="alpha " * 200 + "1", rejected="alpha " * 200 + "2"),
        "identical_after_truncation",
    ),
    Entry("exact copy of an earlier row", GOOD_LINES[0], "duplicate_id"),
    Entry("first row with id 'twice'", row(chosen="first", id="twice"), KEPT),
    Entry("second row with id 'twice'", row(chosen="second", id="twice"), "duplicate_id"),
    Entry("row with id '7' (a string)", row(chosen="s7", id="7"), KEPT),
    Entry("id 7 (a number) after id '7'", row(chosen="c7", id=7), "duplicate_id"),
    Entry(
        "emoji, combining mark, NUL, zero-width space",
        row("caf\u00e9 \U0001f642 e\u0301", "\u200b", "\x00"),
        KEPT,
    ),
    Entry("chosen of 3,000 characters (cut to --max-length)", row(chosen="alpha " * 500), KEPT),
    Entry("a name on a message (kept)", row(prompt=[{**user("hi"), "name": "bob"}]), KEPT),
    Entry(
        "prompt string beside full conversations (UltraFeedback)",
        row("hi", [user("hi"), assistant("uf-a")], [user("hi"), assistant("uf-b")], prompt_id="x"),
        KEPT,
    ),
    Entry(
        "prompt column differing from the conversations' user turn",
        row("other", [user("hi"), assistant("a")], [user("hi"), assistant("b")]),
        "prompt_mismatch",
    ),
    Entry(
        "system, user and tool messages",
        row(
            prompt=[{"role": "system", "content": "s"}, user("u"), {"role": "tool", "content": "t"}]
        ),
        KEPT,
    ),
]
# alone in a file of valid JSON, so that Arrow's reader takes it before the fallback does
ARROW_CATALOGUE = [
    Entry("non-UTF-8 bytes inside a string (read as U+FFFD)", NOT_UTF8_IN_STRING, KEPT)
]


def first_line(entry: Entry) -> list[Entry]:
    """A file that starts with `entry` (such lines once took the whole file down), then a
    good row so that the run has a pair to write."""
    return [entry, Entry("a good row after it", good_rows(1, offset=90)[0], KEPT)]


TEMPLATE_CATALOGUE = [  # with --prompt-template and mapped chosen/rejected columns
    Entry("template's column missing", {"response_j": "a", "response_k": "b"}, "template_error"),
    Entry(
        "template calls .strip() on a number",
        {"question": 5, "response_j": "a", "response_k": "b"},
        "template_error",
    ),
    Entry("mapped chosen column missing", {"question": "q", "response_k": "b"}, "missing_field"),
    Entry(
        "whitespace-only mapped answer",
        {"question": "q", "response_j": "a", "response_k": " "},
        "empty_rejected",
    ),
]
TEMPLATE_GOOD = [
    {"question": f"q{i}", "response_j": f"yes {i}", "response_k": f"no {i}"} for i in range(3)
]


class Group(NamedTuple):
    label: str  # the table's "file" column
    good: list  # rows written before the entries
    entries: list[Entry]
    fmt: RowFormat
    options: list  # precompute's options beyond base_args


GROUPS = {
    "default": Group("mixed lines", GOOD_LINES, CATALOGUE, RowFormat(), []),
    "arrow": Group(
        "valid JSON otherwise", good_rows(3, offset=50), ARROW_CATALOGUE, RowFormat(), []
    ),
    "null-first": Group(
        "null first",
        [],
        first_line(Entry("null as the first line (crashed pyarrow)", None, "malformed_line")),
        RowFormat(),
        [],
    ),
    "list-first": Group(
        "a list first",
        [],
        first_line(Entry("a JSON list as a .jsonl's first line", [1, 2], "malformed_line")),
        RowFormat(),
        [],
    ),
    "template": Group(
        "--prompt-template, mapped columns",
        TEMPLATE_GOOD,
        TEMPLATE_CATALOGUE,
        TEMPLATE_FORMAT,
        TEMPLATE_ARGS,
    ),
}
NOT_IN_CATALOGUE = {
    "nonfinite_logps",  # only a model that returns NaN/inf triggers it
    # vision runs only (a text model ignores images): tests/test_images.py makes each image
    # reason from a real bad file, tests/test_vision_stages.py counts them in stage one
    *(r for r in DROP_REASONS if r.startswith("image_")),
}


class Outcome(NamedTuple):
    fates: list[str]  # per catalogue entry, in order
    manifest: dict
    code: int  # precompute's exit code
    good: int  # good rows written before the entries


def run_catalogue(group: str, model_dir: Path, folder: Path, tokenizer) -> Outcome:
    """Write a group's good rows then its entries, run precompute, and find each row's fate."""
    g = GROUPS[group]
    dataset = write_lines(folder / f"{group}.jsonl", [*g.good, *(e.line for e in g.entries)])
    args = base_args(model_dir, dataset, folder / f"{group}-out", *g.options)
    code = precompute_main([str(a) for a in args])
    per_row = fates(load_source(str(dataset)), g.fmt, tokenizer, E2E_TRUNCATION)
    fates_of_entries = [fate for fate, _ in per_row[len(g.good) :]]
    return Outcome(fates_of_entries, read_manifest(folder / f"{group}-out"), code, len(g.good))


def test_catalogue_covers_every_row_level_reason():
    listed = {e.reason for g in GROUPS.values() for e in g.entries}
    assert listed | NOT_IN_CATALOGUE == set(DROP_REASONS) | {KEPT}


@pytest.mark.parametrize("group", list(GROUPS))
def test_bad_row_catalogue(group, tmp_path, tiny_model_dir, tokenizer):
    entries = GROUPS[group].entries
    outcome = run_catalogue(group, tiny_model_dir, tmp_path, tokenizer)
    assert outcome.code == 0
    # every named row lands under its own reason, not just the right totals
    for entry, fate in zip(entries, outcome.fates, strict=True):
        assert fate == entry.reason, f"{entry.name!r}: {fate}, expected {entry.reason}"
    want = Counter(e.reason for e in entries if e.reason != KEPT)
    manifest = outcome.manifest
    assert manifest["dropped"] == dict(sorted(want.items()))
    assert manifest["rows"] == outcome.good + sum(e.reason == KEPT for e in entries)
    assert manifest["input_rows"] == outcome.good + len(entries)
    if group == "default":  # truncation is counted for kept pairs only: the 3,000-char chosen
        assert manifest["truncated"].get("chosen") == 1


# ---------------------------------------------------------------------------- Markdown


def _excerpt(line: Any, width: int = 44) -> str:
    """The start of a catalogue line as written, for a Markdown table cell."""
    if isinstance(line, bytes):
        text = repr(line)[2:-1]
    else:
        text = line if isinstance(line, str) else json.dumps(line)
    text = text if len(text) <= width else text[: width - 1] + "\u2026"
    return "`" + text.replace("|", "\\|") + "`"


def catalogue_markdown() -> str:
    """The catalogue, each row's measured fate and the manifests' counts, as Markdown."""
    from tests.conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    lines = ["| # | row | line (start) | file | outcome |", "|---|---|---|---|---|"]
    listed: Counter = Counter()
    counted: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(len(tokenizer)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        number = 0
        for group, g in GROUPS.items():
            outcome = run_catalogue(group, model_dir, Path(tmp), tokenizer)
            counted.update(outcome.manifest["dropped"])
            counted[KEPT] += outcome.manifest["rows"] - outcome.good
            for entry, fate in zip(g.entries, outcome.fates, strict=True):
                number += 1
                shown = f"`{fate}`" if fate == entry.reason else f"**{fate}** ({entry.reason}?)"
                cells = [str(number), entry.name, _excerpt(entry.line), g.label, shown]
                lines.append("| " + " | ".join(cells) + " |")
                listed[entry.reason] += 1
    lines += ["", "| outcome | rows in the catalogue | counted in the manifests |", "|---|---|---|"]
    for reason in [*DROP_REASONS, KEPT]:
        lines.append(f"| `{reason}` | {listed[reason]} | {counted[reason]} |")
    return "\n".join(lines)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr: native code (the tokenizer trainer) prints there too."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    logging.disable(logging.WARNING)  # the table only; drop warnings are the point of it
    with stdout_to_stderr():
        table = catalogue_markdown()
    sys.stdout.write(table + "\n")
