"""Micro-batches by a token budget (--max-tokens-per-batch): the split of a step's pairs over
ranks and micro-batches, the loss weighting that keeps a step's gradient the mean over its
global batch, ZeRO-3 with uneven micro-batch counts, resume, and BCO-pair's pooled baseline."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from refdpo.shared.config import load_config
from refdpo.train.batches import split_by_tokens, token_micro_batches
from refdpo.train.config import TrainConfig
from refdpo.train.data import PairStream, pair_length
from refdpo.train.engine import lr_lambda
from tests import test_train
from tests.conftest import write_jsonl
from tests.test_precompute import WORDS
from tests.test_train import metrics, module_state, run_train, train_args

one_rank = test_train.one_rank  # the fixture: 3 steps, global batch 8 (micro batch 8), ZeRO-0


# ---------------------------------------------------------------- the split


def check_split(lengths: list[int], max_tokens: int, world: int) -> list[list[list[int]]]:
    """Every property a split must have; returns it."""
    split = split_by_tokens(lengths, max_tokens, world)
    assert len(split) == world
    counts = {len(batches) for batches in split}
    assert len(counts) == 1, f"ranks run different numbers of micro-batches: {split}"
    seen = sorted(i for batches in split for b in batches for i in b)
    assert seen == list(range(len(lengths))), "every pair exactly once"
    for batches in split:
        real = [b for b in batches if b]
        assert batches[: len(real)] == real, "padding micro-batches come last"
        assert real, "every rank trains on a pair"
        for b in real:
            assert b == sorted(b)
            assert len(b) == 1 or sum(lengths[i] for i in b) <= max_tokens, (b, max_tokens)
        if len(real) < len(batches):  # padding only where nothing is left to halve
            assert all(len(b) == 1 for b in real)
    loads = [sum(lengths[i] for b in batches for i in b) for batches in split]
    assert max(loads) - min(loads) <= max(lengths), f"ranks unbalanced by tokens: {loads}"
    assert split_by_tokens(lengths, max_tokens, world) == split, "deterministic"
    return split


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 400), min_size=8, max_size=64),
    max_tokens=st.integers(1, 1200),
    world=st.integers(1, 8),
)
def test_a_split_holds_every_pair_once_within_the_budget_on_equal_counts(
    lengths, max_tokens, world
):
    check_split(lengths, max_tokens, world)


def test_a_split_by_hand():
    """Ranks: 100 to rank 0, then every pair of 10 to rank 1 (the lighter) while it holds
    less. Rank 1's eight pairs fill budgets of 50 in two micro-batches; rank 0's one pair is
    one, so it runs a padding micro-batch."""
    lengths = [10, 10, 100, 10, 10, 10, 10, 10, 10]
    assert check_split(lengths, 50, 2) == [[[2], []], [[0, 1, 3, 4, 5], [6, 7, 8]]]
    # rank 1 (50 + 50) fits one micro-batch, rank 0 (60 + 45) two: rank 1 halves its own
    assert check_split([60, 50, 45, 50], 100, 2) == [[[0], [2]], [[1], [3]]]
    assert check_split([60, 50, 45, 30, 20], 100, 2) == [[[0, 3], [4]], [[1], [2]]]
    # a pair over the budget is a micro-batch of its own
    assert check_split([10, 500, 10], 100, 1) == [[[0, 2], [1]]]


def test_token_micro_batches_give_rows_and_weight_out_padding():
    """A padding micro-batch holds the rank's shortest pair and is marked not real."""
    rows = [{"id": f"p{i}", "prompt_ids": [1] * n, "chosen_ids": [2], "rejected_ids": [3]}
            for i, n in enumerate([98, 28, 28, 28])]  # fmt: skip
    assert [pair_length(r) for r in rows] == [100, 30, 30, 30]

    def named(rank):
        return [([r["id"] for r in b], real) for b, real in token_micro_batches(rows, 50, 2, rank)]

    assert named(0) == [(["p0"], True), (["p0"], False), (["p0"], False)]
    assert named(1) == [(["p1"], True), (["p2"], True), (["p3"], True)]


def test_the_option_parses_in_both_spellings_and_is_refused_below_zero():
    required = ["--shards", "s", "--model", "m", "--output", "o"]
    for flag in ("--max-tokens-per-batch", "--max_tokens_per_batch"):
        cfg = load_config(TrainConfig, [*required, flag, "512"], "refdpo train", "")
        assert cfg.max_tokens_per_batch == 512
    assert load_config(TrainConfig, required, "refdpo train", "").max_tokens_per_batch == 0
    with pytest.raises((ValueError, SystemExit)):
        load_config(TrainConfig, [*required, "--max-tokens-per-batch", "-1"], "refdpo train", "")


def uneven_rows(n: int) -> list[dict]:
    """Pairs of very uneven lengths: every fifth has a long prompt and a long chosen answer."""
    rows = []
    for i in range(n):
        long = i % 5 == 0
        words = [WORDS[(3 * i + k) % len(WORDS)] for k in range(20 if long else 1 + i % 3)]
        prompt = f"Question {i}: repeat {' '.join(words[:8])}." if long else f"Question {i}: go."
        words = " ".join(words)
        rows.append({"prompt": prompt, "chosen": f"Sure: {words}.", "rejected": f"No {i}."})
    return rows


# ---------------------------------------------------------------- training


def splits(folder: Path, global_batch: int, max_tokens: int, world: int, steps: int) -> list:
    """split_by_tokens of the first global batches, as training computes them."""
    manifest = json.loads((folder / "_manifest.json").read_text())
    batches = PairStream(folder, manifest, global_batch, seed=0).batches(0)
    return [
        split_by_tokens([pair_length(r) for r in next(batches)], max_tokens, world)
        for _ in range(steps)
    ]


def assert_same_training(got: Path, want: Path, steps: int, abs: float = 1e-5) -> None:
    """Losses and gradient norms (step 1's loss is ln 2 whatever the weighting: its gradient
    norm is what shows the step's gradient is the global batch's mean), then the weights."""
    for step in range(1, steps + 1):
        for key in ("loss", "grad_norm"):
            a, b = metrics(got)[step][key], metrics(want)[step][key]
            assert a == pytest.approx(b, abs=abs), (step, key, a, b)
    theirs = module_state(want / "checkpoints" / f"step-{steps:08d}")
    mine = load_file(got / "final" / "model.safetensors")  # ZeRO-3's checkpoint is partitioned
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert torch.allclose(tensor, theirs[name], atol=abs, rtol=0), name


@pytest.mark.parametrize(
    "engine", [["--zero-stage", 0], ["--zero-stage", 2], ["--zero-stage", 3, "--offload"]],
    ids=["zero0", "zero2", "zero3-offload"],
)  # fmt: skip
def test_one_rank_by_tokens_trains_as_by_pairs(shards, tiny_model_dir, tmp_path, one_rank, engine):
    """The same global batch of 8, cut into micro-batches of at most 150 tokens (1 to 4 pairs,
    3 to 6 per step) instead of one of 8 pairs: the same losses, gradient norms and weights
    (fp32; the sums only run in another order)."""
    counts = [len(s[0]) for s in splits(shards / "train", 8, 150, 1, 3)]
    assert min(counts) > 1 and len(set(counts)) > 1, counts  # really another split
    args = train_args(shards, tiny_model_dir, tmp_path, "--max-steps", 3, "--micro-batch-size", 4,
                      "--gradient-accumulation-steps", 2, "--max-tokens-per-batch", 150,
                      *engine)  # fmt: skip
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "micro-batches by token budget: at most 150 tokens" in result.stderr
    assert "the global batch stays 8 pairs" in result.stderr
    assert_same_training(tmp_path, one_rank, 3)
    assert all(metrics(tmp_path)[s]["learning_rate"] == 1e-3 for s in (1, 2, 3))


@pytest.fixture(scope="module")
def uneven_shards(tiny_model_dir, tmp_path_factory) -> Path:
    """48 pairs of 25 to 170 tokens (every fifth long), scored by the tiny reference."""
    from refdpo.precompute.run import main as precompute_main

    root = tmp_path_factory.mktemp("uneven")
    dataset = write_jsonl(root / "pairs.jsonl", uneven_rows(48))
    code = precompute_main([
        "--model", str(tiny_model_dir), "--dataset", str(dataset), "--output", str(root / "train"),
        "--eval-fraction", "0", "--rows-per-shard", "16", "--max-length", "256",
        "--max-prompt-length", "128",
    ])  # fmt: skip
    assert code == 0
    return root


@pytest.mark.multirank  # about 25 s: a 2-rank run and a 1-rank run
def test_two_ranks_under_zero3_with_uneven_micro_batches_match_one_rank(
    uneven_shards, tiny_model_dir, tmp_path
):
    """Budget 64 tokens on 2 ranks: a 166-token pair takes a rank's tokens, so one rank holds
    2 pairs and runs padding micro-batches while the other holds 6 in 4. No hang (every
    rank runs as many forwards and backwards), and the training of one rank with the global
    batch of 8 in one micro-batch."""
    cut = splits(uneven_shards / "train", 8, 64, 2, 3)
    assert any(not b for s in cut for rank in s for b in rank), cut  # padding runs
    assert any(len({sum(map(len, rank)) for rank in s}) > 1 for s in cut), cut  # pairs differ
    two = tmp_path / "two"
    args = train_args(uneven_shards, tiny_model_dir, two, "--max-steps", 3, "--zero-stage", 3,
                      "--max-tokens-per-batch", 64, "--export", "none", "--dist-timeout", 120)  # fmt: skip
    result = run_train(args, ranks=2, port=29681)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    args = train_args(uneven_shards, tiny_model_dir, one, "--max-steps", 3,
                      "--micro-batch-size", 8, "--export", "none")  # fmt: skip
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            a, b = metrics(two)[step][key], metrics(one)[step][key]
            assert a == pytest.approx(b, rel=1e-6, abs=1e-5), (step, key, a, b)  # fp32 sums
        assert metrics(two)[step]["tokens_per_s"] * metrics(two)[step]["step_seconds"] == (
            pytest.approx(metrics(one)[step]["tokens_per_s"] * metrics(one)[step]["step_seconds"])
        )  # padding micro-batches count no tokens


def test_by_tokens_a_nan_step_is_skipped_and_the_schedule_steps_once_per_step(
    shards, tiny_model_dir, tmp_path
):
    """3 to 6 micro-batches a step under a linear decay, step 2's losses NaN: step 2 is
    skipped (weights unchanged, counted) and the learning rate moves once per applied
    step, not once per micro-batch."""
    from tests.test_train import ENV, train_command

    args = train_args(shards, tiny_model_dir, tmp_path, "--max-steps", 4, "--micro-batch-size", 4,
                      "--gradient-accumulation-steps", 2, "--max-tokens-per-batch", 150,
                      "--save-steps", 1, "--save-total-limit", 5, "--export", "none")  # fmt: skip
    args[args.index("--lr-scheduler") + 1] = "linear"
    env = {**ENV, "REFDPO_FAULTS": "nan_loss=2"}
    result = subprocess.run(train_command(args), env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logged = metrics(tmp_path)
    assert [logged[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    rates = [logged[s]["learning_rate"] for s in (1, 2, 3, 4)]
    assert rates == pytest.approx([1e-3 * lr_lambda(n, 4, 0, "linear") for n in (1, 1, 2, 3)])
    states = [module_state(tmp_path / "checkpoints" / f"step-{s:08d}") for s in (1, 2, 3)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[1][k], states[2][k]) for k in states[1])


def test_resume_by_tokens_equals_straight(shards, tiny_model_dir, tmp_path):
    """2 steps + resume + 2 steps equals 4 straight steps, bitwise, with the option on."""
    from tests.test_resume import resumed_equals_straight

    extra = ["--micro-batch-size", 4, "--gradient-accumulation-steps", 2,
             "--max-tokens-per-batch", 150]  # fmt: skip
    resumed_equals_straight(shards, tiny_model_dir, tmp_path, extra)


# ---------------------------------------------------------------- BCO-pair's baseline


def _reward_means(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2 (gloo): mean_over_ranks of micro-batches of unequal sizes."""
    import torch.distributed as dist

    from refdpo.train.step import mean_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mine = torch.tensor([1.0, 2.0, 3.0, 4.0]) if rank == 0 else torch.tensor([10.0, 20.0])
    got = {
        "pooled": float(mean_over_ranks(mine, pooled=True)),
        "padding": float(mean_over_ranks(mine, pooled=True, real=rank == 0)),
        "equal": float(mean_over_ranks(mine, pooled=False)),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


@pytest.mark.multirank
def test_bco_baseline_pools_unequal_micro_batches_by_pairs(tmp_path):
    """Micro-batches of 4 and 2 rewards: the baseline's sample is their pooled mean (40 / 6),
    not the mean of the two means (8.75); a padding micro-batch joins with no weight."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_reward_means, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["pooled"] == pytest.approx(40 / 6)
        assert got["padding"] == pytest.approx(2.5)
        assert got["equal"] == pytest.approx(8.75)  # the pair-count path, unchanged
        assert not math.isnan(got["pooled"])
