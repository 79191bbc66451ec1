"""Stage one's batching: token-budget batches of length-sorted pairs, packed into rows.

A forward-only pass takes far more tokens than a training step, so stage one cuts its
batches by a token budget (--max-tokens-per-batch) instead of a pair count and packs each
batch's pairs into rows as stage two packs a micro-batch. What must not change: the values
(fp32: those of one pair per row and of a naive forward per sequence) and stage two's step-0
check, which replays the recorded layout (several pairs per row now) to compare like with like.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from refdpo.precompute.run import main as precompute_main
from refdpo.precompute.score import (
    Batching,
    length_batches,
    pair_tokens,
    score_shard,
    scoring_layout,
)
from refdpo.shared.logprobs import Packer, PairScorer, attention_weight, pack_pairs
from refdpo.shared.shards import shard_metadata, write_shard
from refdpo.shared.tokens import TokenizedPair
from refdpo.train.data import collate, scoring_batch
from refdpo.train.step import SAME_LAYOUT, step0_difference
from tests.conftest import build_model, write_jsonl
from tests.test_dtypes import CHECK
from tests.test_logprobs import naive_token_logps
from tests.test_precompute import good_rows
from tests.test_train import metrics, run_train

VOCAB = 300
PAD = 0


def make_pairs(lengths: list[tuple[int, int, int]], seed: int = 0) -> list[TokenizedPair]:
    """Pairs of random token ids with the given (prompt, chosen, rejected) lengths."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    return [
        TokenizedPair(f"pair-{k}", ids(p), ids(c), ids(r), False, False, False, "", "", "")
        for k, (p, c, r) in enumerate(lengths)
    ]


def uneven_lengths(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Mostly short pairs and a few long ones, every part at least one token."""
    rng = random.Random(seed)
    lengths = [(rng.randint(1, 30), rng.randint(1, 20), rng.randint(1, 20)) for _ in range(n)]
    for k in range(0, n, 9):
        lengths[k] = (rng.randint(40, 90), rng.randint(20, 60), rng.randint(1, 40))
    return lengths


@pytest.fixture(scope="module")
def model():
    return build_model(VOCAB, seed=3)


def per_token(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        r["id"]: (np.asarray(r["ref_win_per_token_logp"]), np.asarray(r["ref_rej_per_token_logp"]))
        for r in rows
    }


# --- the batches


@pytest.mark.parametrize("max_pairs", [None, 1, 4])
@pytest.mark.parametrize("max_tokens", [1, 60, 250, 10_000])
def test_batches_cover_every_pair_once_within_the_budget(max_tokens, max_pairs):
    pairs = make_pairs(uneven_lengths(50, seed=max_tokens))
    tokens = [pair_tokens(p) for p in pairs]
    batches = length_batches(pairs, max_tokens, max_pairs)
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))  # each pair once
    order = [i for b in batches for i in b]
    assert [tokens[i] for i in order] == sorted(tokens, reverse=True)  # longest first
    for k, batch in enumerate(batches):
        used = sum(tokens[i] for i in batch)
        assert used <= max_tokens or len(batch) == 1  # only a lone pair may be over
        assert max_pairs is None or len(batch) <= max_pairs
        if k + 1 < len(batches):  # a batch closes only when the next pair cannot join it
            following = tokens[batches[k + 1][0]]
            assert used + following > max_tokens or len(batch) == max_pairs
    assert length_batches(pairs, max_tokens, max_pairs) == batches  # deterministic


def test_pairs_of_equal_length_keep_their_order():
    ties = make_pairs([(3, 2, 2)] * 7)
    assert length_batches(ties, 21) == [[0, 1, 2], [3, 4, 5], [6]]
    assert length_batches(ties, 10**6, 2) == [[0, 1], [2, 3], [4, 5], [6]]


def test_the_default_budget_is_not_a_pair_count():
    """Eight pairs per forward was the old default; 40 short pairs now share one batch."""
    from refdpo.precompute.config import PrecomputeConfig

    cfg = PrecomputeConfig(model="m", dataset="d", output="o")
    assert (cfg.max_tokens_per_batch, cfg.batch_size, cfg.packing, cfg.pack_length) == (
        16384, None, True, 0
    )  # fmt: skip
    pairs = make_pairs(uneven_lengths(40))
    assert len(length_batches(pairs, cfg.max_tokens_per_batch, cfg.batch_size)) == 1
    with pytest.raises(ValueError, match="batch_size"):
        PrecomputeConfig(model="m", dataset="d", output="o", batch_size=0)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        PrecomputeConfig(model="m", dataset="d", output="o", max_tokens_per_batch=0)


# --- the values


def packed_batching(model, max_tokens: int, capacity: int = 0) -> Batching:
    return Batching(max_tokens, None, Packer(capacity, attention_weight(model.config)))


def score(model, pairs, batching: Batching, pad_multiple: int = 1, chunk: int = 1024):
    return score_shard(pairs, model, PAD, batching, chunk, False, lambda *_: None, pad_multiple)


@pytest.mark.parametrize(("capacity", "pad_multiple", "chunk"), [(0, 1, 1024), (160, 128, 7)])
def test_packed_budget_batches_give_the_values_of_one_pair_per_row(
    model, capacity, pad_multiple, chunk
):
    """fp32, uneven lengths: token-budget batches packed into rows (the cost model's layout,
    or rows of 160 tokens) equal one pair per row in batches of 8 pairs (the old default)
    and a naive forward per sequence, each within 1e-5 per token."""
    pairs = make_pairs(uneven_lengths(40, seed=1), seed=1)
    packed, _, layout = score(
        model, pairs, packed_batching(model, 400, capacity), pad_multiple, chunk
    )
    plain, _, plain_layout = score(model, pairs, Batching(10**9, 8, None), pad_multiple, chunk)
    # the layout really is packed: several batches, several rows per batch, pairs sharing rows
    assert len(layout["batches"]) > 1 and any(len(b) > 1 for b in layout["batches"])
    assert any(len(row) > 1 for b in layout["batches"] for row in b)
    assert all(len(row) == 1 for b in plain_layout["batches"] for row in b)
    assert sorted(i for b in layout["batches"] for row in b for i in row) == list(range(40))
    got, want = per_token(packed), per_token(plain)
    assert [r["id"] for r in packed] == [p.id for p in pairs]  # dataset order
    for pair in pairs:
        (win, rej), (win0, rej0) = got[pair.id], want[pair.id]
        assert len(win) == len(pair.chosen_ids) and len(rej) == len(pair.rejected_ids)
        assert np.abs(win - win0).max() < 1e-5 and np.abs(rej - rej0).max() < 1e-5
        naive_win = naive_token_logps(model, pair.prompt_ids, pair.chosen_ids).numpy()
        naive_rej = naive_token_logps(model, pair.prompt_ids, pair.rejected_ids).numpy()
        assert np.abs(win - naive_win).max() < 1e-5 and np.abs(rej - naive_rej).max() < 1e-5


def test_a_nonfinite_pair_costs_only_itself_in_a_packed_row(model):
    """With a dense mask a NaN key spoils every query of its row, masked or not: the pairs
    packed beside a poisoned pair are scored again alone, keep the values of one pair per row,
    and the recorded layout holds each in its own forward; the batch they shared is left out."""
    pairs = make_pairs(uneven_lengths(12, seed=2), seed=2)
    poison = VOCAB - 1
    pairs[5].chosen_ids.append(poison)
    broken = build_model(VOCAB, seed=3)
    with torch.no_grad():
        broken.model.embed_tokens.weight[poison] = float("nan")
    rows, dropped, layout = score(broken, pairs, packed_batching(broken, 10**6, capacity=10**6))
    assert dropped == {"nonfinite_logps": 1} and len(rows) == 11
    assert "pair-5" not in {r["id"] for r in rows}
    # every pair shared one row; the others were redone alone, each its own recorded forward
    assert sorted(layout["batches"]) == [[[k]] for k in range(11)]
    plain, _, _ = score(broken, pairs, Batching(10**9, 1, None))
    assert {k: [v.tolist() for v in vs] for k, vs in per_token(rows).items()} == {
        k: [v.tolist() for v in vs] for k, vs in per_token(plain).items()
    }


def test_a_pair_finite_only_alone_is_kept_and_its_shared_forward_not_recorded(model, monkeypatch):
    """Should a pair come out non-finite only when packed beside others (a layout-dependent
    overflow), it is redone alone and kept; the forward it shared no longer made every stored
    value of its batch, so that batch is not recorded, only the pairs' own forwards."""
    from refdpo.precompute import score as stage_one

    real = stage_one.score_pairs

    def overflowing(model, pairs, pad, chunk, pad_multiple=1, rows=None, vision=None):
        values = real(model, pairs, pad, chunk, pad_multiple, rows, vision)
        shared = {k for row in rows or [] if len(row) > 1 for k in row}
        return [(w * np.inf if k in shared and k == min(shared) else w, r)
                for k, (w, r) in enumerate(values)]  # fmt: skip

    monkeypatch.setattr(stage_one, "score_pairs", overflowing)
    pairs = make_pairs([(5, 3, 3), (2, 1, 1), (2, 1, 2), (6, 4, 4)], seed=5)
    rows, dropped, layout = score(model, pairs, packed_batching(model, 10**6, capacity=14))
    assert dropped == {} and len(rows) == 4
    # rows [3], [0], [2, 1]: pairs 2 and 1 redone alone, each its own recorded forward; the
    # forward that held them with 0 and 3 is not recorded
    assert sorted(layout["batches"]) == [[[1]], [[2]]]
    assert all(np.isfinite(np.concatenate(v)).all() for v in per_token(rows).values())


def test_scoring_layout_records_packed_rows_and_leaves_out_a_dropped_pairs_batch():
    """Pair indices per row per forward become shard rows per row per forward; a forward that
    held a pair dropped after scoring (pair 3) is left out whichever row held it."""
    batches = [[[4, 0], [2]], [[3, 1], [5]], [[6]]]
    row_of = {0: 0, 1: 1, 2: 2, 4: 3, 5: 4, 6: 5}  # pair 3 dropped
    layout = scoring_layout(batches, row_of, chunk_size=7, pad_multiple=128)
    assert layout == {
        "batches": [[[3, 0], [2]], [[5]]], "logit_chunk_size": 7, "pad_multiple": 128,
    }  # fmt: skip


# --- stage two's replay of the layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stage_two_replays_packed_batches_exactly(tmp_path, monkeypatch, dtype):
    """Each recorded forward, read back by stage two (`scoring_batch`, then `collate` with
    the layout: rows of several pairs), is the same input as stage one's, tensor for tensor
    (to the order of the output layer's targets, which sets its chunks), and run through the
    same model gives the stored values exactly, in fp32 and in bf16."""
    from refdpo.precompute import score as stage_one

    built = []

    def recording(*args, **kwargs):
        built.append(pack_pairs(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(stage_one, "pack_pairs", recording)
    model = build_model(VOCAB, seed=3).to(dtype)
    pairs = make_pairs(uneven_lengths(30, seed=4), seed=4)
    rows, _, layout = score(model, pairs, packed_batching(model, 300, capacity=120), 1, 16)
    assert any(len(row) > 1 for b in layout["batches"] for row in b)
    meta = {"scoring": layout, "source_start": 0, "source_stop": len(pairs), "rows": len(rows)}
    write_shard(tmp_path / "part-00000-00000.parquet", rows, False, meta)
    assert shard_metadata(tmp_path / "part-00000-00000.parquet")["scoring"] == json.loads(
        json.dumps(layout)
    )
    scorer = PairScorer(model, 16)
    for batch, inputs in zip(layout["batches"], built, strict=True):  # no redo: one each
        first = batch[0][0]
        check_rows, replay, scoring = scoring_batch(tmp_path, ("part-00000-00000.parquet", first))
        assert [[check_rows[k]["id"] for k in row] for row in replay] == [
            [rows[i]["id"] for i in row] for row in batch
        ]
        packed = collate(check_rows, PAD, layout=replay, pad_multiple=scoring["pad_multiple"])
        for name, value in vars(inputs).items():
            again = getattr(packed.packed, name)
            assert torch.equal(value, again) if torch.is_tensor(value) else value == again, name
        assert step0_difference(scorer, packed, scoring["logit_chunk_size"]) == 0.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_refdpo_train_passes_step0_on_packed_shards(tiny_model_dir, tmp_path, dtype):
    """`refdpo precompute` with packed token-budget batches, then `refdpo train` for 1 step:
    the step-0 check runs in stage one's layout and passes; fp32 gives ln 2."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(24))
    shards = tmp_path / "shards"
    code = precompute_main([
        "--model", str(tiny_model_dir), "--dataset", str(dataset), "--output", str(shards),
        "--dtype", dtype, "--max-tokens-per-batch", "160", "--pack-length", "80",
        "--max-length", "128", "--max-prompt-length", "64",
    ])  # fmt: skip
    assert code == 0
    for path in sorted(shards.glob("part-*.parquet")):
        batches = shard_metadata(path)["scoring"]["batches"]
        assert any(len(row) > 1 for b in batches for row in b)  # pairs share rows
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--shards", shards, "--output", out, "--max-steps", 1,
            "--micro-batch-size", 4, "--export", "none"]  # fmt: skip
    result = run_train([str(a) for a in args])
    assert result.returncode == 0, result.stderr[-3000:]
    check = CHECK.search(result.stderr)
    assert check, result.stderr[-3000:]
    assert check["layout"] == "stage one's layout" and check["stored"] == dtype
    assert float(check["worst"]) <= SAME_LAYOUT[dtype]
    if dtype == "fp32":
        assert metrics(out)[1]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)


def test_step0_on_another_attention_kernel_than_stage_ones_says_so(tiny_model_dir, tmp_path):
    """Shards scored with plain sdpa, a policy on auto (sdpa_pairs on CPU): the check replays
    stage one's layout, says the kernel differs and uses the other-layout tolerance; the
    values still agree (short rows take the same dense path)."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(8))
    shards = tmp_path / "shards"
    code = precompute_main([
        "--model", str(tiny_model_dir), "--dataset", str(dataset), "--output", str(shards),
        "--attn-implementation", "sdpa",
    ])  # fmt: skip
    assert code == 0
    (path,) = shards.glob("part-*.parquet")
    assert shard_metadata(path)["scoring"]["batching"]["attn_implementation"] == "sdpa"
    args = ["--model", tiny_model_dir, "--shards", shards, "--output", tmp_path / "run",
            "--max-steps", 1, "--export", "none"]  # fmt: skip
    result = run_train([str(a) for a in args])
    assert result.returncode == 0, result.stderr[-3000:]
    check = CHECK.search(result.stderr)
    assert check["layout"] == "stage one's layout on another attention kernel (now sdpa_pairs)"
    assert float(check["worst"]) <= SAME_LAYOUT["fp32"]
