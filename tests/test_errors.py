"""One error story (README: Exit codes): a user's mistake is one sentence and its class's exit
code, decided before the model loads where it can be; a bug keeps its traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from refdpo.precompute import run as precompute_run
from refdpo.shared import errors
from refdpo.shared.data import DataError
from refdpo.shared.shards import ShardError
from refdpo.train.step import NonFiniteError, Step0Error
from tests.conftest import write_jsonl
from tests.test_precompute import base_args, good_rows

README = Path(__file__).resolve().parents[1] / "README.md"


def run(*args) -> int:
    return precompute_run.main([str(a) for a in args])


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the reference would be loaded."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(precompute_run, "load_reference", refuse)


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.UsageError, 2),
        (errors.MissingPath, 2),
        (DataError, 2),
        (ShardError, 2),
        (errors.NoUsableRows, 2),
        (errors.FolderRefused, 2),
        (Step0Error, 3),
        (NonFiniteError, 4),
    ],
)
def test_each_class_returns_its_documented_code(cls, code) -> None:
    log = logging.getLogger("test")
    assert errors.run_command(lambda: (_ for _ in ()).throw(cls("what went wrong")), log) == code
    # the README's table says the same
    assert f"| {code} |" in README.read_text()


def test_a_bug_is_not_caught() -> None:
    def bug() -> int:
        raise ValueError("a programming error")  # not a RefdpoError

    with pytest.raises(ValueError, match="a programming error"):
        errors.run_command(bug, logging.getLogger("test"))


def test_no_usable_rows_is_2_before_the_model_loads(tmp_path, tiny_model_dir, no_model, caplog):
    rows = [{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in good_rows(5)]  # fmt: skip
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 2
    assert "no usable rows" in caplog.text and "no_shared_prompt" in caplog.text
    assert not list(out.glob("*.parquet"))


def test_rows_that_all_drop_when_tokenized_fail_before_the_model_loads(
    tmp_path, tiny_model_dir, no_model, caplog
):
    """Every prompt over --max-prompt-length: known from tokenizing, before any model."""
    rows = [{**r, "prompt": "long " * 100 + r["prompt"]} for r in good_rows(6)]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 2
    assert "once tokenized" in caplog.text and "prompt_too_long" in caplog.text
    assert not list(out.glob("*.parquet"))  # no empty shard for a rerun to keep


def test_a_refused_folder_is_2(tmp_path, tiny_model_dir, caplog):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(6))
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    assert run(*base_args(tiny_model_dir, dataset, out, "--seed", 3)) == 2
    assert "holds shards made with seed=0" in caplog.text


def test_missing_model_folder_is_2(tmp_path):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(3))
    assert run(*base_args(tmp_path / "nope", dataset, tmp_path / "out")) == 2


def test_a_bug_mid_run_shows_its_traceback(tmp_path, tiny_model_dir, monkeypatch):
    """A ValueError from refdpo's own code inside the loop is a bug: it propagates."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(6))

    def broken(*_args, **_kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(precompute_run, "score_shard", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        run(*base_args(tiny_model_dir, dataset, tmp_path / "out"))


def test_cli_prints_one_line_for_a_user_error(tmp_path, tiny_model_dir):
    rows = [{"q": "x", "chosen": "a", "rejected": "b"}]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cmd = [sys.executable, "-m", "refdpo.shared.cli", "precompute",
           *map(str, base_args(tiny_model_dir, dataset, tmp_path / "out"))]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no usable rows" in result.stderr
