"""Row formats, drop reasons, loaders and the holdout split of shared/data.py."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from refdpo.shared.data import (
    DROP_REASONS,
    DataError,
    Pair,
    RowError,
    RowFormat,
    RowSource,
    load_source,
    normalize_row,
    split_holdout,
)
from tests.conftest import SHARED_DATA, write_jsonl

FMT = RowFormat()
ALPACA_TEMPLATE = "{{ instruction }}{% if input %}\n\n{{ input }}{% endif %}"
GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def reason_of(row, fmt: RowFormat = FMT) -> str:
    with pytest.raises(RowError) as info:
        normalize_row(row, fmt)
    return info.value.reason


def outcomes(source: RowSource, fmt: RowFormat = FMT) -> Counter:
    counts: Counter = Counter()
    for row in source.get(0, len(source)):
        try:
            normalize_row(row, fmt)
            counts["ok"] += 1
        except RowError as err:
            counts[err.reason] += 1
    return counts


# ---------------------------------------------------------------------------- row formats


def test_explicit_prompt_strings() -> None:
    pair = normalize_row(dict(GOOD), FMT)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("What is 2+2?", "4", "5")
    assert not pair.is_conversational


def test_conversational_message_lists() -> None:
    row = {
        "prompt": [user("Hi")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go away.")],
    }
    pair = normalize_row(row, FMT)
    assert pair.is_conversational
    assert pair.prompt == [user("Hi")]
    assert pair.chosen == [assistant("Hello!")]
    assert pair.rejected == [assistant("Go away.")]


def test_conversational_string_chosen_is_one_assistant_message() -> None:
    row = {"prompt": [user("Hi")], "chosen": "Hello!", "rejected": [assistant("Go away.")]}
    pair = normalize_row(row, FMT)
    assert pair.chosen == [assistant("Hello!")]
    assert pair.rejected == [assistant("Go away.")]


def test_conversational_drops_unknown_message_keys_keeps_name() -> None:
    row = {"prompt": [{**user("Hi"), "name": "x", "weight": 1}], "chosen": "a", "rejected": "b"}
    assert normalize_row(row, FMT).prompt == [{**user("Hi"), "name": "x"}]


def test_implicit_prompt_hh_single_turn() -> None:
    row = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: No idea.",
    }
    pair = normalize_row(row, FMT)
    assert pair.prompt == "\n\nHuman: What is 2+2?\n\nAssistant:"
    assert pair.chosen == " It is 4."
    assert pair.rejected == " No idea."


def test_implicit_prompt_hh_multi_turn_cuts_after_last_shared_marker() -> None:
    history = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2+2?\n\nAssistant:"
    row = {"chosen": history + " It is 4.", "rejected": history + " It is 5."}
    pair = normalize_row(row, FMT)
    assert pair.prompt == history
    assert pair.chosen == " It is 4."
    assert pair.rejected == " It is 5."
    assert pair.prompt + pair.chosen == row["chosen"]


def test_implicit_prompt_hh_shared_answer_start_stays_in_completion() -> None:
    # the shared characters "It is " after the marker belong to the answers, not the prompt
    history = "\n\nHuman: What is 2+2?\n\nAssistant:"
    row = {"chosen": history + " It is 4.", "rejected": history + " It is 5."}
    pair = normalize_row(row, FMT)
    assert pair.prompt == history
    assert pair.chosen.startswith(" It is ")


def test_implicit_conversational_shared_first_messages() -> None:
    history = [user("Hi"), assistant("Hello."), user("What is 2+2?")]
    row = {"chosen": [*history, assistant("4")], "rejected": [*history, assistant("5")]}
    pair = normalize_row(row, FMT)
    assert pair.prompt == history
    assert pair.chosen == [assistant("4")]
    assert pair.rejected == [assistant("5")]


def test_column_mapping_and_template_stack_exchange_layout() -> None:
    fmt = RowFormat(
        chosen_column="response_j",
        rejected_column="response_k",
        prompt_template="Question: {{ question }}\n\nAnswer: ",
    )
    row = {
        "qid": 7,
        "question": "How do I sort?",
        "response_j": "Use sorted().",
        "response_k": "Don't.",
    }
    pair = normalize_row(row, fmt)
    assert pair.prompt == "Question: How do I sort?\n\nAnswer: "
    assert (pair.chosen, pair.rejected) == ("Use sorted().", "Don't.")


def test_template_row_with_a_column_named_self() -> None:
    """Columns reach the template as one mapping: a column called `self` (or any name of
    render()'s own parameters) must not make every row a template_error."""
    fmt = RowFormat(prompt_template="Q: {{ question }}")
    row = {"self": "x", "question": "why?", "chosen": "because", "rejected": "no"}
    assert normalize_row(row, fmt).prompt == "Q: why?"


def _shared_rows() -> list[dict]:
    return json.loads(SHARED_DATA.read_text(encoding="utf-8"))


def test_shared_data_template_with_and_without_input() -> None:
    raw = _shared_rows()
    with_input = next(i for i, r in enumerate(raw) if r["input"])
    without_input = next(i for i, r in enumerate(raw) if not r["input"])
    source = load_source(str(SHARED_DATA))
    fmt = RowFormat(prompt_template=ALPACA_TEMPLATE)

    pair = normalize_row(source.get(with_input, with_input + 1)[0], fmt)
    r = raw[with_input]
    assert pair.prompt == r["instruction"] + "\n\n" + r["input"]
    assert (pair.chosen, pair.rejected) == (r["chosen"], r["rejected"])

    pair = normalize_row(source.get(without_input, without_input + 1)[0], fmt)
    r = raw[without_input]
    assert pair.prompt == r["instruction"]
    assert (pair.chosen, pair.rejected) == (r["chosen"], r["rejected"])


def test_chat_template_wraps_string_rows() -> None:
    pair = normalize_row(dict(GOOD), RowFormat(chat_template=True))
    assert pair.is_conversational
    assert pair.prompt == [user("What is 2+2?")]
    assert pair.chosen == [assistant("4")]
    assert pair.rejected == [assistant("5")]


def test_id_column_used_when_present() -> None:
    assert normalize_row({**GOOD, "id": "row-17"}, FMT).id == "row-17"
    assert normalize_row({**GOOD, "id": 17}, FMT).id == "17"
    assert normalize_row({**GOOD, "key": "k1"}, RowFormat(id_column="key")).id == "k1"


def test_content_id_is_stable() -> None:
    first = normalize_row(dict(GOOD), FMT).id
    # a separately built, reordered row with an extra unrelated column: same content, same id
    again = normalize_row(
        {"rejected": "5", "extra": 1, "chosen": "4", "prompt": "What is 2+2?"}, FMT
    ).id
    assert first == again
    assert isinstance(first, str) and first


def test_content_id_differs_between_pairs() -> None:
    ids = {
        normalize_row(dict(GOOD), FMT).id,
        normalize_row({**GOOD, "chosen": "four"}, FMT).id,
        normalize_row({**GOOD, "prompt": "What is 2+3?"}, FMT).id,
        normalize_row({**GOOD, "chosen": "5", "rejected": "4"}, FMT).id,  # swapped
    }
    assert len(ids) == 4


# ---------------------------------------------------------------------------- drop reasons


def test_malformed_line_from_load_source(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{not json"])
    rows = load_source(str(path)).get(0, 2)
    assert reason_of(rows[1]) == "malformed_line"


def test_non_object_row_is_malformed() -> None:
    assert reason_of(["prompt", "chosen", "rejected"]) == "malformed_line"


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_missing_field(field: str) -> None:
    row = dict(GOOD)
    del row[field]
    assert reason_of(row) == "missing_field"


def test_null_field_is_missing() -> None:
    assert reason_of({**GOOD, "chosen": None}) == "missing_field"


def test_wrong_type_chosen_int() -> None:
    assert reason_of({**GOOD, "chosen": 4}) == "wrong_type"


def test_wrong_type_prompt_int() -> None:
    assert reason_of({**GOOD, "prompt": 4}) == "wrong_type"


def test_wrong_type_implicit_string_and_list() -> None:
    assert reason_of({"chosen": "a", "rejected": [assistant("b")]}) == "wrong_type"


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": [{"content": "Hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "wizard", "content": "Hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"},
        {"prompt": [user("Hi")], "chosen": [user("a")], "rejected": "b"},
        {"prompt": [], "chosen": "a", "rejected": "b"},
    ],
    ids=["missing_role", "unknown_role", "non_string_content", "user_in_chosen", "empty_list"],
)
def test_bad_messages(row: dict) -> None:
    assert reason_of(row) == "bad_messages"


def test_template_error_missing_column() -> None:
    fmt = RowFormat(prompt_template="Question: {{ question }}")
    assert reason_of(dict(GOOD), fmt) == "template_error"


def test_no_shared_prompt_text() -> None:
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    assert reason_of(row) == "no_shared_prompt"


def test_no_shared_prompt_messages() -> None:
    row = {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}
    assert reason_of(row) == "no_shared_prompt"


@pytest.mark.parametrize("value", ["", "  \n\t"])
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_empty_field(field: str, value: str) -> None:
    assert reason_of({**GOOD, field: value}) == f"empty_{field}"


def test_empty_chosen_message_content() -> None:
    row = {"prompt": [user("Hi")], "chosen": [assistant("  ")], "rejected": "b"}
    assert reason_of(row) == "empty_chosen"


def test_identical() -> None:
    assert reason_of({**GOOD, "rejected": "4"}) == "identical"


def test_identical_implicit() -> None:
    text = "\n\nHuman: a\n\nAssistant: b"
    assert reason_of({"chosen": text, "rejected": text}) == "identical"


def test_every_row_level_reason_is_known() -> None:
    tested = {
        "malformed_line", "missing_field", "wrong_type", "bad_messages", "template_error",
        "no_shared_prompt", "empty_prompt", "empty_chosen", "empty_rejected", "identical",
    }  # fmt: skip
    assert tested <= set(DROP_REASONS)
    with pytest.raises(AssertionError):
        RowError("not_a_reason")


# ---------------------------------------------------------------------------- loaders

ROWS = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
    {"prompt": "p3", "chosen": "c3", "rejected": "r3"},
]


def _pairs(source: RowSource) -> list[tuple]:
    return [
        (p.prompt, p.chosen, p.rejected)
        for p in map(lambda r: normalize_row(r, FMT), source.get(0, len(source)))
    ]


EXPECTED = [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert _pairs(load_source(str(path))) == EXPECTED


def test_load_jsonl(tmp_path: Path) -> None:
    source = load_source(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert len(source) == 3
    assert _pairs(source) == EXPECTED


def test_load_parquet(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    assert _pairs(load_source(str(path))) == EXPECTED


def test_load_csv(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "d.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    assert _pairs(load_source(str(path))) == EXPECTED


def test_load_csv_numeric_looking_cells_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("id,prompt,chosen,rejected\n7,2+2?,4,5\n8,3+3?,6,7.0\n")
    source = load_source(str(path))
    pairs = [normalize_row(r, FMT) for r in source.get(0, len(source))]
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("7", "2+2?", "4", "5"),
        ("8", "3+3?", "6", "7.0"),
    ]


def test_load_csv_empty_cell_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,chosen,rejected\nDo x,,a,b\nDo y,ctx,,b\n")
    rows = load_source(str(path)).get(0, 2)
    assert normalize_row(rows[0], RowFormat(prompt_template=ALPACA_TEMPLATE)).prompt == "Do x"
    assert reason_of(rows[1], RowFormat(prompt_template=ALPACA_TEMPLATE)) == "missing_field"


def test_load_save_to_disk_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert _pairs(load_source(str(tmp_path / "ds"))) == EXPECTED


def test_load_save_to_disk_dataset_dict_split(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:1]),
            "test": datasets.Dataset.from_list(ROWS[1:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _pairs(load_source(str(tmp_path / "dd"), split="test")) == EXPECTED[1:]
    assert _pairs(load_source(str(tmp_path / "dd"), split="train")) == EXPECTED[:1]
    with pytest.raises(DataError):
        load_source(str(tmp_path / "dd"), split="validation")


def test_load_jsonl_with_malformed_line(tmp_path: Path) -> None:
    lines = [ROWS[0], ROWS[1], '{"prompt": "p", "chosen": ', ROWS[2]]
    source = load_source(str(write_jsonl(tmp_path / "d.jsonl", lines)))
    counts = outcomes(source)
    assert counts == Counter({"ok": 3, "malformed_line": 1})
    assert sum(counts.values()) == len(lines)
    good = [normalize_row(r, FMT) for i, r in enumerate(source.get(0, len(source))) if i != 2]
    assert [(p.prompt, p.chosen, p.rejected) for p in good] == EXPECTED


def test_load_jsonl_mixed_types_in_column(tmp_path: Path) -> None:
    lines = [ROWS[0], {"prompt": "p", "chosen": 5, "rejected": "r"}, ROWS[1]]
    source = load_source(str(write_jsonl(tmp_path / "d.jsonl", lines)))
    assert len(source) == 3
    assert reason_of(source.get(1, 2)[0]) == "wrong_type"
    assert outcomes(source) == Counter({"ok": 2, "wrong_type": 1})


def test_load_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        load_source(str(tmp_path / "nope.json"))


def test_load_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text(json.dumps(ROWS))
    with pytest.raises(DataError):
        load_source(str(path))


def test_load_folder_not_from_save_to_disk(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError):
        load_source(str(tmp_path / "plain"))


def test_load_hub_name_offline_is_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read these variables at import, which may already have happened
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    start = time.monotonic()
    with pytest.raises(DataError):
        load_source("someorg/somedata")
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------- holdout


def _list_source(n: int) -> RowSource:
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(n)]
    return RowSource(rows, list(range(n)), "test rows", "fp")


def _prompts(source: RowSource) -> list[str]:
    return [r["prompt"] for r in source.get(0, len(source))]


def test_split_holdout_sizes_disjoint_and_complete() -> None:
    source = _list_source(100)
    train, held = split_holdout(source, 0.1, seed=1)
    assert (len(train), len(held)) == (90, 10)
    assert not set(_prompts(train)) & set(_prompts(held))
    assert sorted(_prompts(train) + _prompts(held)) == sorted(_prompts(source))


def test_split_holdout_keeps_source_order() -> None:
    train, held = split_holdout(_list_source(50), 0.2, seed=3)
    for part in (train, held):
        numbers = [int(p[1:]) for p in _prompts(part)]
        assert numbers == sorted(numbers)


def test_split_holdout_deterministic_for_seed() -> None:
    a = split_holdout(_list_source(100), 0.1, seed=7)
    b = split_holdout(_list_source(100), 0.1, seed=7)
    assert _prompts(a[1]) == _prompts(b[1])
    assert _prompts(a[0]) == _prompts(b[0])


def test_split_holdout_differs_for_other_seed() -> None:
    _, a = split_holdout(_list_source(100), 0.1, seed=7)
    _, b = split_holdout(_list_source(100), 0.1, seed=8)
    assert _prompts(a) != _prompts(b)


def test_split_holdout_on_loaded_dataset(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(20)]
    source = load_source(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    train, held = split_holdout(source, 0.25, seed=0)
    assert (len(train), len(held)) == (15, 5)
    assert sorted(_prompts(train) + _prompts(held)) == sorted(r["prompt"] for r in rows)


def test_split_holdout_rejects_fraction_leaving_no_training_rows() -> None:
    with pytest.raises(DataError):
        split_holdout(_list_source(3), 0.9, seed=0)


# ---------------------------------------------------------------------------- the real file


def test_shared_data_loads_all_rows_and_counts_add_up() -> None:
    raw = _shared_rows()
    assert len(raw) == 1100
    source = load_source(str(SHARED_DATA))
    assert len(source) == 1100
    counts = outcomes(source, RowFormat(prompt_template=ALPACA_TEMPLATE))
    assert sum(counts.values()) == 1100
    assert set(counts) - {"ok"} <= set(DROP_REASONS)
    # independent expectation from the raw JSON
    usable = [
        r
        for r in raw
        if r["instruction"].strip()
        and r["chosen"].strip()
        and r["rejected"].strip()
        and r["chosen"] != r["rejected"]
    ]
    assert counts["ok"] == len(usable)
    assert counts["identical"] == sum(r["chosen"] == r["rejected"] for r in raw)


def test_shared_data_pairs_have_distinct_content_ids() -> None:
    source = load_source(str(SHARED_DATA))
    fmt = RowFormat(prompt_template=ALPACA_TEMPLATE)
    pairs: list[Pair] = []
    for row in source.get(0, len(source)):
        with contextlib.suppress(RowError):
            pairs.append(normalize_row(row, fmt))
    distinct_content = {(p.prompt, p.chosen, p.rejected) for p in pairs}
    assert len({p.id for p in pairs}) == len(distinct_content)
