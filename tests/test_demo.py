"""The demo path (task generator, refdpo eval, refdpo demo) on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from refdpo.demo import task
from refdpo.train.evaluate import exact_match
from refdpo.train.evaluate import main as eval_main
from tests.conftest import write_jsonl
from tests.test_precompute import good_rows

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def test_task_is_deterministic_and_held_out_prompts_are_unseen(tmp_path):
    first = task.generate(tmp_path / "a", seed=3, train=50, held_out=20)
    again = task.generate(tmp_path / "b", seed=3, train=50, held_out=20)
    other = task.generate(tmp_path / "c", seed=4, train=50, held_out=20)
    assert first["train"].read_text() == again["train"].read_text()
    assert first["train"].read_text() != other["train"].read_text()
    train = [json.loads(line) for line in first["train"].read_text().splitlines()]
    held = [json.loads(line) for line in first["eval"].read_text().splitlines()]
    assert len(train) == 50 and len(held) == 20
    assert not {r["prompt"][0]["content"] for r in train} & {
        r["prompt"][0]["content"] for r in held
    }
    for row in train:
        a, b = (int(x) for x in row["id"].split("-")[1:])
        assert row["chosen"] == row["answer"] == f"{a} + {b} = {a + b}"
        assert row["rejected"] != row["chosen"] and not exact_match(row["rejected"], row["answer"])


@pytest.mark.parametrize(
    ("generation", "answer", "expected"),
    [
        ("42", "42", True),
        (" 42.\n", "42", True),
        ("42 apples", "42", False),
        ("142", "42", False),
        ("", "4", False),
    ],
)
def test_exact_match(generation, answer, expected):
    assert exact_match(generation, answer) is expected


def test_eval_of_the_reference_on_its_own_shards(tmp_path, tiny_model_dir, capsys):
    from refdpo.precompute.run import main as precompute

    paths = task.generate(tmp_path / "data", train=12, held_out=6)
    shards = tmp_path / "shards"
    assert (
        precompute(
            [
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(paths["eval"]),
                "--output",
                str(shards),
            ]
        )
        == 0
    )
    code = eval_main(["--model", str(tiny_model_dir), "--shards", str(shards), "--prompts", str(paths["eval"]),
                      "--output", str(tmp_path / "eval"), "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    # the reference against its own stored values: every implicit reward is 0
    assert summary["pairwise"]["pairs"] == 6
    assert summary["pairwise"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert summary["pairwise"]["reward_accuracy"] == 0.5  # all ties
    assert summary["pairwise"]["loss"] == pytest.approx(0.693147, abs=1e-5)
    generations = (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 6 and "correct" in json.loads(generations[0])


@pytest.mark.parametrize("source", ["builtin", "dataset"])
def test_demo_runs_end_to_end(tmp_path, tiny_model_dir, source):
    args = ["--model", str(tiny_model_dir), "--output", str(tmp_path / "demo"), "--max-steps", "3",
            "--micro-batch-size", "4", "--learning-rate", "1e-3", "--max-new-tokens", "4"]  # fmt: skip
    if source == "builtin":
        args += ["--train-pairs", "32", "--eval-pairs", "8"]
    else:
        args += ["--dataset", str(write_jsonl(tmp_path / "pairs.jsonl", good_rows(40)))]
    result = subprocess.run([sys.executable, "-m", "refdpo.demo.run", *args], env=ENV, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    for name in ("report.md", "training.png", "before_after.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert summary["after"]["reward_margin"] != summary["before"]["reward_margin"]
    assert ("exact_match" in summary["after"]) == (source == "builtin")
    assert "held-out metric" in result.stdout
