"""Hub layouts of shared/data.py: UltraFeedback rows, compressed files, folders of data files,
empty inputs, tool-calling messages and their columns, and a quiet datasets fallback."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from refdpo.shared.data import (
    DataError,
    Pair,
    RowError,
    RowFormat,
    RowSource,
    load_source,
    normalize_row,
)
from tests.conftest import write_jsonl
from tests.test_data import FMT, assistant, reason_of, user


def pairs_of(source: RowSource, fmt: RowFormat = FMT) -> list:
    """Each row's Pair, or its drop reason."""
    out = []
    for row in source.get(0, len(source)):
        try:
            out.append(normalize_row(row, fmt))
        except RowError as err:
            out.append(err.reason)
    return out


def old_content_id(prompt, chosen, rejected) -> str:
    """The id rule as it was before tools existed, written out independently."""
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------- UltraFeedback


def ultrafeedback_row(i: int, prompt: str | None = None) -> dict:
    """A row as HuggingFaceH4/ultrafeedback_binarized has it, every column included."""
    question = f"Explain topic {i} briefly."
    good, bad = f"Topic {i} is about this.", f"I will not talk about {i}."
    return {
        "prompt": question if prompt is None else prompt,
        "prompt_id": hashlib.sha256(question.encode()).hexdigest(),
        "chosen": [user(question), assistant(good)],
        "rejected": [user(question), assistant(bad)],
        "messages": [user(question), assistant(good)],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def explicit_twin(i: int) -> Pair:
    row = ultrafeedback_row(i)
    return normalize_row(
        {
            "prompt": [user(row["prompt"])],
            "chosen": [row["chosen"][1]],
            "rejected": [row["rejected"][1]],
        },
        FMT,
    )


def test_ultrafeedback_row_equals_its_conversational_twin() -> None:
    pair = normalize_row(ultrafeedback_row(0), FMT)
    assert pair == explicit_twin(0)
    assert pair.prompt == [user("Explain topic 0 briefly.")]
    assert pair.chosen == [assistant("Topic 0 is about this.")]
    assert pair.id == old_content_id(pair.prompt, pair.chosen, pair.rejected)  # not prompt_id


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ultrafeedback_file_loads_as_conversational_pairs(tmp_path: Path, suffix: str) -> None:
    rows = [ultrafeedback_row(i) for i in range(3)]
    path = tmp_path / f"uf{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        pd.DataFrame(rows).to_parquet(path)
    assert pairs_of(load_source(str(path))) == [explicit_twin(i) for i in range(3)]


def test_ultrafeedback_prompt_compared_stripped() -> None:
    row = ultrafeedback_row(1, prompt="  Explain topic 1 briefly.\n")
    assert normalize_row(row, FMT) == explicit_twin(1)


@pytest.mark.parametrize(
    "prompt", ["Explain topic 9 briefly.", "", "explain topic 0 briefly."], ids=str
)
def test_prompt_column_differing_from_conversations_is_prompt_mismatch(prompt: str) -> None:
    assert reason_of(ultrafeedback_row(0, prompt=prompt)) == "prompt_mismatch"


def test_conversations_not_sharing_the_user_turn_are_prompt_mismatch() -> None:
    row = ultrafeedback_row(0)
    row["rejected"] = [user("Something else"), assistant("x")]
    assert reason_of(row) == "prompt_mismatch"


def test_multi_turn_full_conversations_take_the_last_shared_user_turn() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello."),
        user("Q"),
    ]
    row = {
        "prompt": "Q",
        "chosen": [*history, assistant("A")],
        "rejected": [*history, assistant("B")],
    }
    pair = normalize_row(row, FMT)
    assert pair.prompt == history
    assert (pair.chosen, pair.rejected) == ([assistant("A")], [assistant("B")])
    assert reason_of({**row, "prompt": "Hi"}) == "prompt_mismatch"  # not the last user turn


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_full_conversation_that_is_only_the_prompt_is_empty(side: str) -> None:
    row = ultrafeedback_row(0)
    row[side] = row[side][:1]  # the user turn alone
    assert reason_of(row) == f"empty_{side}"


def test_string_prompt_with_assistant_only_lists_is_still_wrong_type() -> None:
    row = {"prompt": "Q", "chosen": [assistant("A")], "rejected": [assistant("B")]}
    assert reason_of(row) == "wrong_type"


def test_message_prompt_with_full_conversations_strips_the_prompt() -> None:
    prompt = [{"role": "system", "content": "S"}, user("Q")]
    twin = normalize_row({"prompt": prompt, "chosen": "A", "rejected": "B"}, FMT)
    row = {
        "prompt": prompt,
        "chosen": [*prompt, assistant("A")],
        "rejected": [*prompt, assistant("B")],
    }
    assert normalize_row(row, FMT) == twin
    mixed = {**row, "rejected": [assistant("B")]}  # only one repeats the prompt
    assert normalize_row(mixed, FMT) == twin
    assert reason_of({**row, "chosen": list(prompt)}) == "empty_chosen"
    # an answer that repeats only part of the prompt is not stripped: a user turn in it is bad
    assert reason_of({**row, "chosen": [user("Q"), assistant("A")]}) == "bad_messages"


def test_implicit_messages_with_nothing_left_is_empty_not_bad_messages() -> None:
    history = [user("Q"), assistant("A")]
    assert reason_of({"chosen": history, "rejected": [*history, user("more")]}) == "empty_chosen"


def test_old_layout_ids_are_unchanged() -> None:
    hh = "\n\nHuman: What is 2+2?\n\nAssistant:"
    cases = [
        ({"prompt": "Q", "chosen": "A", "rejected": "B"}, FMT, ("Q", "A", "B")),
        (
            {"prompt": [user("Q")], "chosen": "A", "rejected": [assistant("B")]},
            FMT,
            ([user("Q")], [assistant("A")], [assistant("B")]),
        ),
        ({"chosen": hh + " 4", "rejected": hh + " 5"}, FMT, (hh, " 4", " 5")),
        (
            {"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")]},
            FMT,
            ([user("Q")], [assistant("A")], [assistant("B")]),
        ),
        (
            {"q": "x", "chosen": "A", "rejected": "B"},
            RowFormat(prompt_template="Q: {{ q }}"),
            ("Q: x", "A", "B"),
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B"},
            RowFormat(chat_template=True),
            ("Q", "A", "B"),
        ),
    ]
    for row, fmt, content in cases:
        assert normalize_row(row, fmt).id == old_content_id(*content), row


# ---------------------------------------------------------------------------- compressed files

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]


def gzipped(path: Path) -> Path:
    target = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def test_jsonl_gz_loads_as_the_jsonl_does(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "d.jsonl", ROWS)
    gz = gzipped(plain)
    loaded = load_source(str(gz))
    assert pairs_of(loaded) == pairs_of(load_source(str(plain)))
    assert len(loaded) == 3 and not isinstance(loaded.rows, list)  # datasets read it
    assert loaded.fingerprint == hashlib.sha256(gz.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "bad", ['{"prompt": "p", "chosen": ', "null", "[1, 2]"], ids=["cut", "null", "list"]
)
def test_jsonl_gz_with_bad_line_counts_it_as_the_jsonl_does(tmp_path: Path, bad: str) -> None:
    plain = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], bad, ROWS[1]])
    expected = pairs_of(load_source(str(plain)))
    assert expected[1] == "malformed_line" and len(expected) == 3
    assert pairs_of(load_source(str(gzipped(plain)))) == expected


@pytest.mark.parametrize("broken", [False, True], ids=["good", "bad_element"])
def test_json_gz_loads_as_the_json_does(tmp_path: Path, broken: bool) -> None:
    rows = [*ROWS, {"prompt": "p", "chosen": 5, "rejected": "r"}] if broken else ROWS
    plain = tmp_path / "d.json"
    plain.write_text(json.dumps(rows))
    expected = pairs_of(load_source(str(plain)))
    assert pairs_of(load_source(str(gzipped(plain)))) == expected


def test_damaged_gzip_is_a_data_error(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i}", "chosen": str(i * i), "rejected": "?"} for i in range(9000)]
    data = gzipped(write_jsonl(tmp_path / "d.jsonl", rows)).read_bytes()
    (tmp_path / "head.jsonl.gz").write_bytes(data[:40])  # cut in the first block
    (tmp_path / "tail.jsonl.gz").write_bytes(data[: len(data) * 3 // 4])  # a good start
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train-0.jsonl.gz").write_bytes(data[: len(data) // 2])
    for name in ("head.jsonl.gz", "tail.jsonl.gz", "fake.jsonl.gz", "folder"):
        with pytest.raises(DataError, match="gzip"):
            load_source(str(tmp_path / name))


def test_csv_gz_is_not_a_known_file_type(tmp_path: Path) -> None:
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b"prompt,chosen,rejected\np,a,b\n"))
    with pytest.raises(DataError, match="unknown file type"):
        load_source(str(tmp_path / "d.csv.gz"))


# ---------------------------------------------------------------------------- folders


def parquet_snapshot(root: Path) -> Path:
    """A hub snapshot: README, data/ with two splits, one in two files."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("# a dataset card\n")
    rows = [ultrafeedback_row(i) for i in range(5)]
    pd.DataFrame(rows[2:4]).to_parquet(root / "data" / "train_prefs-00001-of-00002.parquet")
    pd.DataFrame(rows[:2]).to_parquet(root / "data" / "train_prefs-00000-of-00002.parquet")
    pd.DataFrame(rows[4:]).to_parquet(root / "data" / "test_prefs-00000-of-00001.parquet")
    return root


def test_parquet_folder_selects_the_split_in_file_order(tmp_path: Path) -> None:
    root = parquet_snapshot(tmp_path / "uf")
    train = load_source(str(root), split="train_prefs")
    assert pairs_of(train) == [explicit_twin(i) for i in range(4)]
    assert pairs_of(load_source(str(root), split="test_prefs")) == [explicit_twin(4)]
    assert "train_prefs" in train.description


def test_parquet_folder_missing_split_names_the_ones_there(tmp_path: Path) -> None:
    root = parquet_snapshot(tmp_path / "uf")
    with pytest.raises(DataError) as info:
        load_source(str(root), split="train")
    message = str(info.value)
    assert "'train'" in message and "test_prefs" in message and "train_prefs" in message


def test_folder_fingerprint_covers_names_and_contents(tmp_path: Path) -> None:
    root = parquet_snapshot(tmp_path / "uf")
    first = load_source(str(root), split="train_prefs").fingerprint
    assert load_source(str(root), split="train_prefs").fingerprint == first
    assert load_source(str(root), split="test_prefs").fingerprint != first
    (root / "README.md").write_text("changed\n")  # not a data file
    assert load_source(str(root), split="train_prefs").fingerprint == first
    data = root / "data"
    pd.DataFrame([ultrafeedback_row(9)]).to_parquet(data / "train_prefs-00001-of-00002.parquet")
    assert load_source(str(root), split="train_prefs").fingerprint != first


def test_folder_without_split_names_is_one_dataset(tmp_path: Path) -> None:
    for i, name in enumerate(["part-b.parquet", "part-a.parquet"]):
        pd.DataFrame([ROWS[i]]).to_parquet(tmp_path / name)
    source = load_source(str(tmp_path))
    assert [p.prompt for p in pairs_of(source)] == ["p1", "p0"]  # part-a first


def test_jsonl_folder_mixed_compression_with_bad_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train-0.jsonl", [ROWS[0], "{oops"])
    gzipped(write_jsonl(tmp_path / "train-1.jsonl", [ROWS[1]]))
    (tmp_path / "train-1.jsonl").unlink()
    write_jsonl(tmp_path / "test-0.jsonl", [ROWS[2]])
    source = load_source(str(tmp_path), split="train")
    got = pairs_of(source)
    assert [g if isinstance(g, str) else g.prompt for g in got] == ["p0", "malformed_line", "p1"]
    with pytest.raises(RowError, match=r"train-0\.jsonl: line 2"):
        normalize_row(source.get(1, 2)[0], FMT)


def test_folder_mixing_parquet_and_jsonl_is_refused(tmp_path: Path) -> None:
    pd.DataFrame(ROWS).to_parquet(tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", ROWS)
    with pytest.raises(DataError, match="mixes"):
        load_source(str(tmp_path))


# ---------------------------------------------------------------------------- empty inputs


def write_empty(tmp_path: Path, case: str) -> Path:
    if case == "zero_rows.parquet":
        pd.DataFrame({"prompt": [], "chosen": [], "rejected": []}).to_parquet(tmp_path / case)
    elif case == "empty.jsonl.gz":
        (tmp_path / case).write_bytes(gzip.compress(b"\n  \n"))
    else:
        content = {"empty.jsonl": "", "blank.jsonl": " \n\n\t\n", "array.json": " [\n ]\n"}
        content["header.csv"] = "prompt,chosen,rejected\n"
        (tmp_path / case).write_text(content[case])
    return tmp_path / case


EMPTY = ["empty.jsonl", "blank.jsonl", "array.json", "header.csv", "zero_rows.parquet"]


@pytest.mark.parametrize("case", [*EMPTY, "empty.jsonl.gz"])
def test_empty_file_says_so_before_datasets_is_asked(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("datasets was asked to read an empty file")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    path = write_empty(tmp_path, case)
    with pytest.raises(DataError, match="the file has no rows") as info:
        load_source(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("contents", ["nothing", "readme", "empty_files"])
def test_folder_without_rows_says_so(tmp_path: Path, contents: str) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    if contents == "readme":
        (folder / "README.md").write_text("# card\n")
        (folder / ".cache").mkdir()
        write_jsonl(folder / ".cache" / "x.jsonl", ROWS)  # hidden: not data
    elif contents == "empty_files":
        (folder / "a.jsonl").write_text("")
        (folder / "b.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="the folder has no rows") as info:
        load_source(str(folder))
    assert str(folder) in str(info.value)


# ---------------------------------------------------------------------------- tool calls

CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
TOOL_ROW = {
    "prompt": [
        {"role": "system", "content": "Use tools."},
        user("What is 2+2?"),
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "add"},
    ],
    "chosen": [{"role": "assistant", "content": "4.", "reasoning_content": "the tool said 4"}],
    "rejected": [{"role": "assistant", "tool_calls": [{**CALL, "id": "c2"}]}],
}
TOOL_PAIR_PROMPT = [
    {"role": "system", "content": "Use tools."},
    user("What is 2+2?"),
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "add"},
]


def test_tool_messages_keep_their_keys() -> None:
    pair = normalize_row(TOOL_ROW, FMT)
    assert pair.prompt == TOOL_PAIR_PROMPT
    assert pair.chosen == [{**assistant("4."), "reasoning_content": "the tool said 4"}]
    # a chosen or rejected that only calls a tool is not empty
    assert pair.rejected == [{**assistant(""), "tool_calls": [{**CALL, "id": "c2"}]}]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_tool_messages_round_trip_through_files(tmp_path: Path, suffix: str) -> None:
    """Arrow gives every message every key (absent ones null): the pairs must not change."""
    plain = {"prompt": [user("Hi")], "chosen": [assistant("Hello")], "rejected": [assistant("Go")]}
    path = tmp_path / f"tools{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [TOOL_ROW, plain])
    else:
        pd.DataFrame([TOOL_ROW, plain]).to_parquet(path)
    source = load_source(str(path))
    assert not isinstance(source.rows, list)  # Arrow read it, nulls and all
    assert pairs_of(source) == [normalize_row(TOOL_ROW, FMT), normalize_row(plain, FMT)]


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": "x", "tool_calls": "add()"},
        {"role": "assistant", "content": "x", "tool_calls": ["add()"]},
        {"role": "assistant", "content": "x", "reasoning_content": 3},
        {"role": "tool", "content": "x", "tool_call_id": 7},
        {"role": "user", "content": "x", "name": ["bob"]},
        {"role": "user", "content": None, "tool_calls": [CALL]},  # only an assistant may
        {"role": "assistant", "content": None},
    ],
    ids=["calls_str", "call_not_dict", "reasoning_int", "call_id_int", "name_list", "user", "none"],
)
def test_mistyped_tool_keys_are_bad_messages(message: dict) -> None:
    assert reason_of({"prompt": [user("Q"), message], "chosen": "a", "rejected": "b"}) == (
        "bad_messages"
    )


def test_reasoning_only_chosen_is_not_empty_but_blank_one_is() -> None:
    row = {"prompt": [user("Q")], "rejected": "b"}
    thought = {"role": "assistant", "content": " ", "reasoning_content": "think"}
    assert normalize_row({**row, "chosen": [thought]}, FMT).chosen == [thought]
    blank = {**thought, "reasoning_content": "  "}
    assert reason_of({**row, "chosen": [blank]}) == "empty_chosen"


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
KWARGS = {"enable_thinking": False}


@pytest.mark.parametrize("as_json", [False, True], ids=["objects", "json_text"])
def test_tools_and_template_kwargs_columns(as_json: bool) -> None:
    row = {**TOOL_ROW, "tools": TOOLS, "chat_template_kwargs": KWARGS}
    if as_json:
        row.update(tools=json.dumps(TOOLS), chat_template_kwargs=json.dumps(KWARGS))
    pair = normalize_row(row, FMT)
    assert (pair.tools, pair.template_kwargs) == (TOOLS, KWARGS)
    bare = normalize_row(TOOL_ROW, FMT)
    assert (bare.tools, bare.template_kwargs) == (None, None)
    assert bare.id == old_content_id(bare.prompt, bare.chosen, bare.rejected)
    assert pair.id != bare.id  # the same messages with tools are another pair
    assert normalize_row({**row, "chat_template_kwargs": None}, FMT).id not in (pair.id, bare.id)


def test_tools_columns_follow_the_row_format() -> None:
    fmt = RowFormat(tools_column="functions", template_kwargs_column="opts")
    pair = normalize_row({**TOOL_ROW, "functions": TOOLS, "opts": KWARGS, "tools": 5}, fmt)
    assert (pair.tools, pair.template_kwargs) == (TOOLS, KWARGS)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("tools", {"name": "add"}),
        ("tools", ["add"]),
        ("tools", 3),
        ("tools", "[not json"),
        ("tools", json.dumps({"name": "add"})),
        ("chat_template_kwargs", [KWARGS]),
        ("chat_template_kwargs", "true"),
        ("chat_template_kwargs", True),
    ],
)
def test_mistyped_tools_columns_are_wrong_type(column: str, value) -> None:
    assert reason_of({**TOOL_ROW, column: value}) == "wrong_type"


def test_tools_and_kwargs_from_parquet_lose_arrow_nulls(tmp_path: Path) -> None:
    other = [{"type": "function", "function": {"name": "mul", "description": "times"}}]
    rows = [
        {**TOOL_ROW, "tools": TOOLS, "chat_template_kwargs": KWARGS},
        {**TOOL_ROW, "tools": other, "chat_template_kwargs": {"reasoning": "high"}},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    got = pairs_of(load_source(str(tmp_path / "t.parquet")))
    assert got == [normalize_row(r, FMT) for r in rows]


# ---------------------------------------------------------------------------- quiet fallback


def test_fallback_reads_a_bad_line_without_datasets_error(
    tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    from datasets.utils import logging as ds_logging

    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "{broken", ROWS[1]])
    level = ds_logging.get_verbosity()
    with caplog.at_level(logging.DEBUG):
        source = load_source(str(path))
    assert isinstance(source.rows, list)  # the fallback read it
    assert pairs_of(source)[1] == "malformed_line"
    captured = capfd.readouterr()
    assert "Failed to load JSON" not in captured.err + captured.out
    assert "Generating train split" not in captured.err
    assert not [r for r in caplog.records if r.name.startswith("datasets")]
    assert ds_logging.get_verbosity() == level


def test_verbose_shows_datasets_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("REFDPO_VERBOSE", "1")
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "{broken"])
    with caplog.at_level(logging.ERROR):
        assert isinstance(load_source(str(path)).rows, list)
    assert any("Failed to load JSON" in r.getMessage() for r in caplog.records)
