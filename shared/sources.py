"""Reading a preference dataset into rows: files, folders and hub names (shared/data.py
turns each row into a Pair).

Inputs: a .json, .jsonl (either also gzip-compressed, .gz), .parquet or .csv file; a folder
written by datasets.save_to_disk; a folder of .parquet or .jsonl(.gz) files, read as one
dataset in sorted order, where file names that start with a split (`train-00000-of-00002`,
`test_prefs-...`) select the files of the requested split; or a hub dataset name. A line
that is not usable JSON becomes a `_Malformed` row, counted later; a file that cannot be
read at all is a `DataError`, before any model loads.
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

from refdpo.shared.errors import InputError
from refdpo.shared.images import undecoded_rows
from refdpo.shared.shards import sha256_file


class DataError(InputError):
    """The dataset as a whole cannot be read: the run stops before any model loads."""


class _Malformed:
    """Placeholder for a JSON Lines line (or JSON array element) that is not usable JSON."""

    def __init__(self, where: str, error: str):
        self.where, self.error = where, error


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
        return undecoded_rows(self.rows, picked)  # images as their files' bytes, not PIL

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
