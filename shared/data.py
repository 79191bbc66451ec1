"""Preference data: load a dataset and turn each row into a validated `Pair`.

Row formats (design: issue "stage one", section "Data loading"):
- explicit prompt: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen` / `rejected` lists of assistant
  messages (a plain string is taken as one assistant message); answers that repeat the
  prompt's messages first have them stripped;
- full conversations (HuggingFaceH4/ultrafeedback_binarized): `prompt` a string, `chosen` /
  `rejected` whole conversations that start with it; their shared first messages are the
  prompt, whose last user message must equal the `prompt` column (else `prompt_mismatch`);
- implicit prompt: only `chosen` and `rejected`, as strings that share their beginning
  (Anthropic HH), or as message lists that share their first messages;
- other layouts: a column mapping plus a Jinja prompt template over the row's fields.

Messages hold `role` and `content`, and may hold `tool_calls`, `reasoning_content`, `name`
and `tool_call_id` (other keys are dropped; null ones count as absent, as Arrow fills them).
An assistant message with tool calls may lack content. Optional columns `tools` (function
schemas) and `chat_template_kwargs` (a dict), each also as a JSON string, ride along on the
Pair for the chat template.

Inputs: a .json, .jsonl (either also gzip-compressed, .gz), .parquet or .csv file; a folder
written by datasets.save_to_disk; a folder of .parquet or .jsonl(.gz) files, read as one
dataset in sorted order, where file names that start with a split (`train-00000-of-00002`,
`test_prefs-...`) select the files of the requested split; or a hub dataset name.

A row that cannot be used raises `RowError` with one of `DROP_REASONS`; the caller counts it
and goes on. Nothing here knows about tokenizers.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import hashlib
import json
import os
import random
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import jinja2
import jinja2.sandbox

from refdpo.shared.errors import InputError
from refdpo.shared.shards import sha256_file

DROP_REASONS = {
    "malformed_line": "a JSON Lines line that is not a JSON object",
    "missing_field": "chosen, rejected or the prompt is absent or null",
    "wrong_type": "a field is not a string (or a list of messages where one is allowed), or "
    "tools / chat_template_kwargs are not a list / dict (or its JSON)",
    "bad_messages": "a message without string role/content, an unknown role, a mistyped "
    "tool_calls / reasoning_content / name / tool_call_id, or a non-assistant message in "
    "chosen/rejected",
    "prompt_mismatch": "chosen and rejected are full conversations whose shared first messages "
    "do not end in a user message equal to the prompt column",
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
# keys a message may carry beside role and content, with their types
MESSAGE_KEYS = {"tool_calls": list, "reasoning_content": str, "name": str, "tool_call_id": str}


class RowError(Exception):
    """A row that is skipped: `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataError(InputError):
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
    tools_column: str = "tools"  # function schemas for the chat template
    template_kwargs_column: str = "chat_template_kwargs"  # e.g. {"enable_thinking": false}


Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Pair:
    """One usable preference pair (x, y_w, y_l), as text or as chat messages, with the
    row's tool schemas and chat-template options when it has them."""

    id: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    tools: list[dict] | None = None
    template_kwargs: dict | None = None

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


def _without_nulls(value: Any) -> Any:
    """`value` with null-valued dict keys dropped at every depth: Arrow gives every struct all
    the keys any row has, the absent ones as null, so a null key is taken as never written."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _check_message(m: Any, field: str, assistant_only: bool) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RowError("bad_messages", f"{field}: a message without a string role")
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content")}
    for key, kind in MESSAGE_KEYS.items():
        value = m.get(key)
        if value is not None and not isinstance(value, kind):
            raise RowError("bad_messages", f"{field}: {key} is not a {kind.__name__}")
        if key == "tool_calls" and value:
            if not all(isinstance(call, dict) for call in value):
                raise RowError("bad_messages", f"{field}: a tool call that is not an object")
            value = _without_nulls(value)
        if value:  # an empty tool_calls list (or name) is the same as none
            out[key] = value
    if out["content"] is None and "tool_calls" in out and out["role"] == "assistant":
        out["content"] = ""  # an assistant turn that only calls tools
    if not isinstance(out["content"], str):
        raise RowError("bad_messages", f"{field}: a message without string content")
    if out["role"] not in ROLES or (assistant_only and out["role"] != "assistant"):
        raise RowError("bad_messages", f"{field}: unexpected role {out['role']!r}")
    return out


def _check_messages(value: Any, field: str, assistant_only: bool) -> Messages:
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages", f"{field} is not a non-empty list of messages")
    return [_check_message(m, field, assistant_only) for m in value]


def _split_text(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    """Implicit prompt: the shared beginning up to and including the last shared marker."""
    shared = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (character-wise is meant)
    cut = shared.rfind(marker)
    if cut < 0:
        raise RowError("no_shared_prompt", f"no shared {marker!r}")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def _shared_count(chosen: Messages, rejected: Messages) -> int:
    """How many first messages (already checked) the two lists share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _rest(messages: Messages, n: int, field: str) -> Messages:
    """An answer: the messages after the `n` prompt messages, all from the assistant."""
    if len(messages) <= n:
        raise RowError(f"empty_{field}", f"{field} holds only the prompt's messages")
    return [_check_message(m, field, assistant_only=True) for m in messages[n:]]


def _split_messages(chosen: Any, rejected: Any) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt for message lists: the shared messages before the first differing one."""
    chosen = _check_messages(chosen, "chosen", assistant_only=False)
    rejected = _check_messages(rejected, "rejected", assistant_only=False)
    n = _shared_count(chosen, rejected)
    if n == 0:
        raise RowError("no_shared_prompt", "chosen and rejected share no first message")
    return chosen[:n], _rest(chosen, n, "chosen"), _rest(rejected, n, "rejected")


def _split_conversations(prompt: str, chosen: Any, rejected: Any) -> tuple[Messages, ...]:
    """A prompt string beside whole conversations (UltraFeedback): the conversations' shared
    first messages are the prompt, and must end in a user message saying the same."""
    chosen = _check_messages(chosen, "chosen", assistant_only=False)
    rejected = _check_messages(rejected, "rejected", assistant_only=False)
    if all(m["role"] == "assistant" for m in chosen + rejected):
        raise RowError("wrong_type", "a string prompt needs string answers or whole conversations")
    n = _shared_count(chosen, rejected)
    asked = [m["content"] for m in chosen[:n] if m["role"] == "user"]
    if not asked or asked[-1].strip() != prompt.strip():
        raise RowError(
            "prompt_mismatch", "the conversations' shared user turn differs from the prompt"
        )
    return chosen[:n], _rest(chosen, n, "chosen"), _rest(rejected, n, "rejected")


def _answer(value: Any, prompt: Messages, field: str) -> Messages:
    """An answer to a message-list prompt; one that repeats the prompt first loses it."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    messages = _check_messages(value, field, assistant_only=False)
    n = len(prompt)
    if messages[:n] == prompt and any(m["role"] != "assistant" for m in prompt):
        return _rest(messages, n, field)
    return _rest(messages, 0, field)


def _is_blank(value: str | Messages) -> bool:
    """No text: a tool call or reasoning counts as text, as the chat template renders them."""
    if isinstance(value, str):
        return not value.strip()
    return not any(
        m["content"].strip() or m.get("reasoning_content", "").strip() or m.get("tool_calls")
        for m in value
    )


def content_id(
    prompt: Any, chosen: Any, rejected: Any, tools: Any = None, template_kwargs: Any = None
) -> str:
    """Stable id from a pair's content, for datasets without an id column. Tools and
    template options enter only when present, so rows without them keep their old ids."""
    parts = [prompt, chosen, rejected]
    if tools is not None or template_kwargs is not None:
        parts.append({"tools": tools, "chat_template_kwargs": template_kwargs})
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True)
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


def _json_column(row: dict, column: str, kind: type) -> Any:
    """An optional list / dict column, given as such or as its JSON text; empty is none."""
    value = row.get(column)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as err:
            raise RowError("wrong_type", f"{column} is text but not JSON: {err}") from None
    if value is None:
        return None
    listed = kind is list and isinstance(value, list)
    if not isinstance(value, kind) or (listed and not all(isinstance(t, dict) for t in value)):
        want = "a list of objects" if kind is list else "an object"
        raise RowError("wrong_type", f"{column} is not {want}")
    return _without_nulls(value) or None


def _layout(prompt: Any, chosen: Any, rejected: Any, fmt: RowFormat) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of one of the accepted row formats, checked."""
    both_lists = isinstance(chosen, list) and isinstance(rejected, list)
    if prompt is None:  # implicit prompt
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _split_text(chosen, rejected, fmt.prompt_marker)
        if not both_lists:
            raise RowError("wrong_type", "chosen/rejected must both be strings or message lists")
        return _split_messages(chosen, rejected)
    if isinstance(prompt, str) and both_lists:
        return _split_conversations(prompt, chosen, rejected)
    if isinstance(prompt, list):
        prompt = _check_messages(prompt, "prompt", assistant_only=False)
        return prompt, _answer(chosen, prompt, "chosen"), _answer(rejected, prompt, "rejected")
    if not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        raise RowError("wrong_type", "prompt, chosen and rejected must be strings")
    return prompt, chosen, rejected


def normalize_row(row: Any, fmt: RowFormat) -> Pair:
    """Validate one raw row and return its Pair, or raise RowError naming the reason."""
    if isinstance(row, _Malformed):
        raise RowError("malformed_line", f"{row.where}: {row.error}")
    if not isinstance(row, dict):
        raise RowError("malformed_line", f"row is a {type(row).__name__}, not an object")
    chosen, rejected = _field(row, fmt.chosen_column), _field(row, fmt.rejected_column)
    prompt, chosen, rejected = _layout(_prompt_of(row, fmt), chosen, rejected, fmt)
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if _is_blank(value):
            raise RowError(f"empty_{name}")
    if chosen == rejected:
        raise RowError("identical")
    tools = _json_column(row, fmt.tools_column, list)
    kwargs = _json_column(row, fmt.template_kwargs_column, dict)

    raw_id = row.get(fmt.id_column)
    if raw_id is not None:
        pair_id = str(raw_id)
    else:
        pair_id = content_id(prompt, chosen, rejected, tools, kwargs)
    if fmt.chat_template and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    return Pair(pair_id, prompt, chosen, rejected, tools=tools, template_kwargs=kwargs)


# ---------------------------------------------------------------------------- reading files

_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_GZIP = (".json.gz", ".jsonl.gz")  # what may come compressed
_FOLDER_FILES = (".parquet", ".jsonl", ".jsonl.gz")  # what a folder of data files may hold
_SPLIT_WORD = re.compile(r"(train|test|validation|valid|val|dev|eval)(_|$)")


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


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        return "json" if name.endswith(_GZIP) else None
    return _LOADERS.get(path.suffix.lower())


def _is_gzip(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _open_text(path: Path, errors: str = "replace") -> IO[str]:
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs an ERROR (and draws progress bars) for a file its JSON reader refuses,
    which the fallback then reads fine: keep it quiet unless REFDPO_VERBOSE=1."""
    if os.environ.get("REFDPO_VERBOSE") == "1":
        yield
        return
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    with warnings.catch_warnings():  # an env var that forces bars on warns on disabling them
        warnings.simplefilter("ignore")
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds_logging.enable_progress_bar()


def _unicode_checked(value: Any, where: str) -> Any:
    """`value`, or _Malformed if a string in it holds a lone surrogate: Python's json accepts
    the escape "\\ud800" (Arrow does not), but no UTF-8 text can hold it, so the id hash,
    the tokenizer and Parquet would all fail on the row later."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError) as err:
        return _Malformed(where, str(err))
    return value


def _read_json_lines(path: Path, label: str = "") -> list[Any]:
    """Line-by-line fallback: keeps good rows, marks bad lines so they are counted."""
    rows: list[Any] = []
    with _open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            # ValueError: bad JSON, or a number past int's 4,300-digit limit; RecursionError:
            # nesting deeper than the parser's stack. Either is one bad line, not a bad file.
            except (ValueError, RecursionError) as err:
                rows.append(_Malformed(f"{label}line {number}", str(err)))
                continue
            # only an escape can spell a lone surrogate; skip the check on most lines
            where = f"{label}line {number}"
            rows.append(_unicode_checked(value, where) if "\\u" in line else value)
    return rows


def _is_json_array_file(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(".json")


def _read_json_fallback(path: Path, label: str = "") -> list[Any]:
    """For JSON the datasets loader refused (mixed types, bad lines): plain json parsing."""
    with _open_text(path) as fh:
        head = fh.read(4096).lstrip()
    # a .jsonl file is lines even when its first line is a list (a bad line, not an array)
    if head.startswith("[") and _is_json_array_file(path):
        try:
            with _open_text(path, errors="strict") as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as err:  # as in _read_json_lines
            raise DataError(
                f"{path}: not valid JSON ({err}); fix the file or use JSON Lines"
            ) from None
        return [_unicode_checked(row, f"{label}element {i}") for i, row in enumerate(data, start=1)]
    return _read_json_lines(path, label)


def _has_null_line(path: Path) -> bool:
    """Whether a line starts with `null`. pyarrow's JSON reader then dereferences a null
    pointer and the whole process dies (apache/arrow#47409, still so in pyarrow 26)."""
    with _open_bytes(path) as fh:
        return any(
            line.lstrip().removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"null") for line in fh
        )


def _leading_text(path: Path, count: int) -> str:
    """The file's first `count` characters that are not whitespace (or a byte order mark)."""
    found = ""
    with _open_text(path) as fh:
        while len(found) < count and (chunk := fh.read(1 << 16)):
            found += "".join(chunk.replace("\ufeff", " ").split())
    return found[:count]


def _has_rows(path: Path, kind: str) -> bool:
    """Cheaply, whether a data file holds any row: an empty or blank file, `[]`, a CSV header
    alone and a Parquet file of no rows do not (datasets fails on some with a traceback)."""
    if path.stat().st_size == 0:
        return False
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows > 0
        except Exception as err:
            raise DataError(f"{path}: could not read as parquet: {err}") from None
    if kind == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            next(reader, None)  # the header
            return any(any(cell.strip() for cell in record) for record in reader)
    try:
        head = _leading_text(path, 2)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: a damaged gzip file: {err}") from None
    return bool(head) and not (head == "[]" and _is_json_array_file(path))


def _with_datasets(kind: str, files: list[Path]) -> Any:
    import datasets

    features = None
    if kind == "csv":  # a CSV cell is text: an answer "42" must stay a string, not an int
        with open(files[0], newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        features = datasets.Features({name: datasets.Value("string") for name in header})
    with _quiet_datasets():
        loaded = datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train", features=features
        )
    # Arrow's JSON reader does not check UTF-8: invalid bytes would load, then fail when a row
    # is read. A full validation raises here instead, so the fallback reads the file.
    loaded.data.table.validate(full=True)
    return loaded


def _load_files(files: list[Path], kind: str, root: Path | None = None) -> Any:
    """Rows of one file, or of a folder's files in order (`root`: the folder)."""
    where = root or files[0]

    def fallback() -> list[Any]:
        labels = [f"{f.relative_to(root).as_posix()}: " if root else "" for f in files]
        return [
            row for f, at in zip(files, labels, strict=True) for row in _read_json_fallback(f, at)
        ]

    try:
        for path in files:
            if kind == "json" and _has_null_line(path):  # the Python reader counts the line instead
                return fallback()
        try:
            return _with_datasets(kind, files)
        except Exception as err:
            if kind != "json":
                raise DataError(f"{where}: could not read as {kind}: {err}") from None
            return fallback()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{where}: a damaged gzip file: {err}") from None


def _load_file(path: Path) -> Any:
    kind = _kind_of(path)
    if kind is None:
        raise DataError(
            f"{path}: unknown file type; use {', '.join([*_LOADERS, *_GZIP])} or a folder"
        )
    if not _has_rows(path, kind):  # before anything costly: datasets is not even imported
        raise DataError(f"{path}: the file has no rows")
    return _load_files([path], kind)


# ---------------------------------------------------------------------------- folders


def _split_of(name: str) -> str:
    """The split a data file's name starts with: `train_prefs-00000-of-00001.parquet` gives
    train_prefs, `train.jsonl.gz` and `train_0.parquet` give train."""
    return re.sub(r"_\d+$", "", re.split(r"[-.]", name, maxsplit=1)[0])


def _data_files(path: Path, split: str) -> tuple[list[Path], bool]:
    """The folder's data files (hidden and `_` names skipped) of `split`, in sorted order,
    and whether file names chose them (else the folder is one split)."""
    found = sorted(
        (f for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(_FOLDER_FILES)),
        key=lambda f: f.relative_to(path).as_posix(),
    )
    found = [f for f in found if not any(p[0] in "._" for p in f.relative_to(path).parts)]
    if not found:
        raise DataError(
            f"{path}: the folder has no rows: no {', '.join(_FOLDER_FILES)} files in it, "
            "and it was not written by datasets.save_to_disk"
        )
    if len({_kind_of(f) for f in found}) > 1:
        raise DataError(f"{path}: the folder mixes Parquet and JSON Lines files; keep one kind")
    names = {f: _split_of(f.name) for f in found}
    if split in names.values():
        return [f for f in found if names[f] == split], True
    splits = sorted({n for n in names.values() if _SPLIT_WORD.match(n)})
    if splits:
        raise DataError(
            f"{path}: no split {split!r} among its files; its file names give the splits "
            f"{splits}; choose one with --split"
        )
    return found, False


def _load_dir(path: Path, split: str) -> tuple[Any, str, str]:
    """(rows, fingerprint, description) of a folder."""
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return loaded, loaded._fingerprint, str(path)
    files, by_split = _data_files(path, split)
    kind = _kind_of(files[0])
    assert kind is not None
    files = [f for f in files if _has_rows(f, kind)]
    if not files:
        raise DataError(f"{path}: the folder has no rows (split {split!r})")
    digest = hashlib.sha256()
    for f in files:
        digest.update(json.dumps([f.relative_to(path).as_posix(), sha256_file(f)]).encode())
    description = f"{path} ({f'split {split!r}, ' if by_split else ''}{len(files)} files)"
    return _load_files(files, kind, root=path), digest.hexdigest(), description


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"{name!r} is not a file or folder here, and loading it from the hub failed: {err}"
        ) from None


def load_source(dataset: str, split: str = "train") -> RowSource:
    """Open a dataset file, a folder (save_to_disk, or data files), or a hub dataset name."""
    path = Path(dataset)
    description = str(dataset)
    if path.is_file():
        rows, fingerprint = _load_file(path), sha256_file(path)
    elif path.is_dir():
        rows, fingerprint, description = _load_dir(path, split)
    elif "/" in dataset and not dataset.startswith((".", "/")) and not path.suffix:
        rows = _load_hub(dataset, split)
        fingerprint = rows._fingerprint
    else:
        raise DataError(f"dataset {dataset!r} does not exist")
    if len(rows) == 0:
        raise DataError(f"{dataset}: the dataset has no rows")
    return RowSource(rows, list(range(len(rows))), description, fingerprint)


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
