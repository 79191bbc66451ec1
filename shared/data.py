"""Preference data: load a dataset and turn each row into a validated `Pair`.

Row formats (design: issue "stage one", section "Data loading"):
- explicit prompt: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen` / `rejected` lists of assistant
  messages (a plain string is taken as one assistant message);
- implicit prompt: only `chosen` and `rejected`, as strings that share their beginning
  (Anthropic HH), or as message lists that share their first messages;
- other layouts: a column mapping plus a Jinja prompt template over the row's fields.

A row that cannot be used raises `RowError` with one of `DROP_REASONS`; the caller counts it
and goes on. Nothing here knows about tokenizers.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from refdpo.shared.shards import sha256_file

DROP_REASONS = {
    "malformed_line": "a JSON Lines line that is not a JSON object",
    "missing_field": "chosen, rejected or the prompt is absent or null",
    "wrong_type": "a field is not a string (or a list of messages where one is allowed)",
    "bad_messages": "a message without string role/content, an unknown role, or a "
    "non-assistant message in chosen/rejected",
    "template_error": "the prompt template or chat template failed on the row",
    "no_shared_prompt": "implicit-prompt row whose chosen and rejected share no prompt marker",
    "empty_prompt": "the prompt is empty or whitespace only",
    "empty_chosen": "the chosen response is empty or whitespace only",
    "empty_rejected": "the rejected response is empty or whitespace only",
    "identical": "chosen and rejected are the same",
    "prompt_too_long": "the prompt has more tokens than --max-prompt-length",
    "identical_after_truncation": "chosen and rejected are the same after truncation",
    "duplicate_id": "the pair id already appeared earlier in the dataset",
    "nonfinite_logps": "the reference gave a NaN or inf log-prob (never written)",
}
ROLES = ("system", "user", "assistant", "tool")


class RowError(Exception):
    """A row that is skipped: `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataError(Exception):
    """The dataset as a whole cannot be read: the run stops before any model loads."""


@dataclass(frozen=True)
class RowFormat:
    """Where a row's fields are and how to build its prompt."""

    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    id_column: str = "id"
    prompt_template: str | None = None  # Jinja over the row's fields, e.g. "Q: {{ question }}"
    prompt_marker: str = "\n\nAssistant:"  # implicit-prompt rows: the prompt ends after it
    chat_template: bool = False  # wrap string rows as user/assistant messages


Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Pair:
    """One usable preference pair (x, y_w, y_l), as text or as chat messages."""

    id: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


# ---------------------------------------------------------------------------- row -> Pair


class _Malformed:
    """Placeholder for a JSON Lines line (or JSON array element) that is not usable JSON."""

    def __init__(self, where: str, error: str):
        self.where, self.error = where, error


_JINJA = jinja2.sandbox.SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True
)


def _check_messages(value: Any, field: str, assistant_only: bool) -> Messages:
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages", f"{field} is not a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RowError("bad_messages", f"{field}: a message without a string role")
        if not isinstance(m.get("content"), str):
            raise RowError("bad_messages", f"{field}: a message without string content")
        if m["role"] not in ROLES or (assistant_only and m["role"] != "assistant"):
            raise RowError("bad_messages", f"{field}: unexpected role {m['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_text(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    """Implicit prompt: the shared beginning up to and including the last shared marker."""
    shared = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (character-wise is meant)
    cut = shared.rfind(marker)
    if cut < 0:
        raise RowError("no_shared_prompt", f"no shared {marker!r}")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def _split_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt for message lists: the shared messages before the first differing one."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RowError("no_shared_prompt", "chosen and rejected share no first message")
    return chosen[:n], chosen[n:], rejected[n:]


def _text(value: str | Messages) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def content_id(prompt: Any, chosen: Any, rejected: Any) -> str:
    """Stable id from a pair's content, for datasets without an id column."""
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _field(row: dict, name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise RowError("missing_field", f"no {name!r}")
    return value


def _prompt_of(row: dict, fmt: RowFormat) -> Any:
    if fmt.prompt_template is not None:
        try:
            # the row as one dict, not keywords: a column named `self` must not clash
            return _JINJA.from_string(fmt.prompt_template).render(row)
        except Exception as err:  # any template failure is this row's problem
            raise RowError("template_error", str(err)) from None
    return row.get(fmt.prompt_column)


def normalize_row(row: Any, fmt: RowFormat) -> Pair:
    """Validate one raw row and return its Pair, or raise RowError naming the reason."""
    if isinstance(row, _Malformed):
        raise RowError("malformed_line", f"{row.where}: {row.error}")
    if not isinstance(row, dict):
        raise RowError("malformed_line", f"row is a {type(row).__name__}, not an object")
    chosen, rejected = _field(row, fmt.chosen_column), _field(row, fmt.rejected_column)
    prompt = _prompt_of(row, fmt)

    if prompt is None:  # implicit prompt
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = _split_text(chosen, rejected, fmt.prompt_marker)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            chosen = _check_messages(chosen, "chosen", assistant_only=False)
            rejected = _check_messages(rejected, "rejected", assistant_only=False)
            prompt, chosen, rejected = _split_messages(chosen, rejected)
        else:
            raise RowError("wrong_type", "chosen/rejected must both be strings or message lists")

    if isinstance(prompt, list):
        prompt = _check_messages(prompt, "prompt", assistant_only=False)
        chosen = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
        rejected = (
            [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else rejected
        )
        chosen = _check_messages(chosen, "chosen", assistant_only=True)
        rejected = _check_messages(rejected, "rejected", assistant_only=True)
    elif not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        raise RowError("wrong_type", "prompt, chosen and rejected must be strings")

    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not _text(value).strip():
            raise RowError(f"empty_{name}")
    if chosen == rejected:
        raise RowError("identical")

    raw_id = row.get(fmt.id_column)
    pair_id = str(raw_id) if raw_id is not None else content_id(prompt, chosen, rejected)
    if fmt.chat_template and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    return Pair(id=pair_id, prompt=prompt, chosen=chosen, rejected=rejected)


# ---------------------------------------------------------------------------- loading

_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RowSource:
    """Rows of a dataset by position; `indices` selects a split of the underlying rows."""

    rows: Any  # a datasets.Dataset, or a list of dicts / _Malformed
    indices: list[int]
    description: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, start: int, stop: int) -> list[Any]:
        """Raw rows at split positions [start, stop)."""
        picked = self.indices[start:stop]
        if isinstance(self.rows, list):
            return [self.rows[i] for i in picked]
        columns = self.rows[picked]  # datasets returns a dict of columns
        return [
            dict(zip(columns, values, strict=True))
            for values in zip(*columns.values(), strict=True)
        ]

    def subset(self, positions: Sequence[int], description: str) -> RowSource:
        return RowSource(
            self.rows, [self.indices[p] for p in positions], description, self.fingerprint
        )


def _unicode_checked(value: Any, where: str) -> Any:
    """`value`, or _Malformed if a string in it holds a lone surrogate: Python's json accepts
    the escape "\\ud800" (Arrow does not), but no UTF-8 text can hold it, so the id hash,
    the tokenizer and Parquet would all fail on the row later."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError) as err:
        return _Malformed(where, str(err))
    return value


def _read_json_lines(path: Path) -> list[Any]:
    """Line-by-line fallback: keeps good rows, marks bad lines so they are counted."""
    rows: list[Any] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            # ValueError: bad JSON, or a number past int's 4,300-digit limit; RecursionError:
            # nesting deeper than the parser's stack. Either is one bad line, not a bad file.
            except (ValueError, RecursionError) as err:
                rows.append(_Malformed(f"line {number}", str(err)))
                continue
            # only an escape can spell a lone surrogate; skip the check on most lines
            rows.append(_unicode_checked(value, f"line {number}") if "\\u" in line else value)
    return rows


def _read_json_fallback(path: Path) -> list[Any]:
    """For JSON the datasets loader refused (mixed types, bad lines): plain json parsing."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.read(4096).lstrip()
    # a .jsonl file is lines even when its first line is a list (a bad line, not an array)
    if head.startswith("[") and path.suffix.lower() == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as err:  # as in _read_json_lines
            raise DataError(
                f"{path}: not valid JSON ({err}); fix the file or use JSON Lines"
            ) from None
        return [_unicode_checked(row, f"element {i}") for i, row in enumerate(data, start=1)]
    return _read_json_lines(path)


def _has_null_line(path: Path) -> bool:
    """Whether a line starts with `null`. pyarrow's JSON reader then dereferences a null
    pointer and the whole process dies (apache/arrow#47409, still so in pyarrow 26)."""
    with open(path, "rb") as fh:
        return any(
            line.lstrip().removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"null") for line in fh
        )


def _load_file(path: Path, split: str) -> Any:
    import datasets

    kind = _LOADERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file type; use {', '.join(_LOADERS)} or a saved dataset folder"
        )
    if kind == "json" and _has_null_line(path):  # the Python reader counts the line instead
        return _read_json_fallback(path)
    try:
        if kind == "csv":  # a CSV cell is text: an answer "42" must stay a string, not an int
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            features = datasets.Features({name: datasets.Value("string") for name in header})
            return datasets.load_dataset(
                kind, data_files=str(path), split="train", features=features
            )
        loaded = datasets.load_dataset(kind, data_files=str(path), split="train")
        # Arrow's JSON reader does not check UTF-8: invalid bytes would load, then fail when a
        # row is read. A full validation raises here instead, so the fallback reads the file.
        loaded.data.table.validate(full=True)
        return loaded
    except Exception as err:
        if kind != "json":
            raise DataError(f"{path}: could not read as {kind}: {err}") from None
        return _read_json_fallback(path)


def _load_dir(path: Path, split: str) -> Any:
    import datasets

    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise DataError(f"{path}: a folder must be written by datasets.save_to_disk")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"{name!r} is not a file or folder here, and loading it from the hub failed: {err}"
        ) from None


def load_source(dataset: str, split: str = "train") -> RowSource:
    """Open a dataset file, a save_to_disk folder, or a hub dataset name."""
    path = Path(dataset)
    if path.is_file():
        rows, fingerprint = _load_file(path, split), sha256_file(path)
    elif path.is_dir():
        rows = _load_dir(path, split)
        fingerprint = rows._fingerprint
    elif "/" in dataset and not dataset.startswith((".", "/")) and not path.suffix:
        rows = _load_hub(dataset, split)
        fingerprint = rows._fingerprint
    else:
        raise DataError(f"dataset {dataset!r} does not exist")
    if len(rows) == 0:
        raise DataError(f"dataset {dataset!r} has no rows")
    return RowSource(rows, list(range(len(rows))), str(dataset), fingerprint)


def split_holdout(source: RowSource, fraction: float, seed: int) -> tuple[RowSource, RowSource]:
    """Hold out `fraction` of the rows, chosen by `seed`; both keep the source order."""
    n = len(source)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"eval fraction {fraction} leaves no training rows out of {n}")
    eval_positions = set(random.Random(seed).sample(range(n), n_eval))
    train = [p for p in range(n) if p not in eval_positions]
    return (
        source.subset(train, f"{source.description} (train, seed {seed})"),
        source.subset(
            sorted(eval_positions), f"{source.description} (eval {fraction}, seed {seed})"
        ),
    )
