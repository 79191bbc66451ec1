"""ZeRO-3 on several ranks: every rank issues the same collectives whatever its data, the
forward goes through the engine (trace and prefetch), and gradient accumulation gives the
gradients of the same global batch without it (design.md section 8).

All of these hung or trained wrongly before the forward went through DeepSpeed's engine and
the lm_head became one call per micro-batch: see docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from refdpo.train.data import PairStream, micro_batches
from tests import test_train
from tests.test_train import ENV, metrics, run_train, train_args

pytestmark = pytest.mark.multirank
one_rank = test_train.one_rank  # the fixture: 3 steps, global batch 8 on one rank


def completion_tokens_per_rank(shards: Path, micro: int, world: int, steps: int) -> list[list[int]]:
    """Completion tokens in each rank's micro-batch, per step (what decides the chunk count)."""
    folder = shards / "train"
    manifest = json.loads((folder / "_manifest.json").read_text())
    batches = PairStream(folder, manifest, micro * world, seed=0).batches(0)
    counts = []
    for _ in range(steps):
        rows = next(batches)
        counts.append([
            sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in mb[0])
            for mb in (micro_batches(rows, micro, world, rank) for rank in range(world))
        ])  # fmt: skip
    return counts


def assert_same_training(got: Path, want: Path, steps, keys=("loss", "grad_norm")) -> None:
    for step in steps:
        for key in keys:
            a, b = metrics(got)[step][key], metrics(want)[step][key]
            if not (math.isnan(a) and math.isnan(b)):
                assert a == pytest.approx(b, abs=1e-5), (step, key, a, b)


def test_two_ranks_with_uneven_chunk_counts_match_one_rank(
    shards, tiny_model_dir, tmp_path, one_rank
):
    """--logit-chunk-size 4: the two ranks' micro-batches hold different numbers of chunks. When
    each chunk was an lm_head call (an all-gather under ZeRO-3), the ranks waited on each
    other until the timeout."""
    counts = completion_tokens_per_rank(shards, micro=4, world=2, steps=3)
    assert any(math.ceil(a / 4) != math.ceil(b / 4) for a, b in counts), counts
    args = train_args(shards, tiny_model_dir, tmp_path, "--max-steps", 3, "--zero-stage", 3,
                      "--logit-chunk-size", 4, "--export", "none", "--dist-timeout", 120)  # fmt: skip
    result = run_train(args, ranks=2, port=29671)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(tmp_path, one_rank, (1, 2, 3), keys=("loss",))


def test_zero3_gradient_accumulation_matches_one_large_micro_batch(
    shards, tiny_model_dir, tmp_path, one_rank
):
    """Global batch 8 as 2 micro-batches of 4 under ZeRO-3. With the forward around the engine,
    ZeRO-3 never advanced its micro-step counter and each micro-batch's gradient overwrote the
    last one (grad norm 0.69x; bench/zero3_accumulation.py shows it without refdpo)."""
    args = train_args(shards, tiny_model_dir, tmp_path, "--max-steps", 3, "--zero-stage", 3,
                      "--gradient-accumulation-steps", 2, "--export", "none")  # fmt: skip
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(tmp_path, one_rank, (1, 2, 3))


def test_three_ranks_evaluate_a_set_not_divisible_by_three(shards, tiny_model_dir, tmp_path):
    """16 eval pairs in micro-batches of 4: 4 micro-batches over 3 ranks. Rank 0 ran a second
    forward (all-gathers) while the others waited in the all-reduce; now the others run a
    padding batch that counts for nothing. The eval metrics equal one rank's."""
    common = ["--max-steps", 2, "--eval-shards", shards / "train-eval", "--eval-steps", 1,
              "--export", "none"]  # fmt: skip
    three = tmp_path / "three"
    args = train_args(shards, tiny_model_dir, three, *common, "--zero-stage", 3,
                      "--dist-timeout", 120)  # fmt: skip
    result = run_train(args, ranks=3, port=29672)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"  # the same global batch of 12 on one rank
    args = train_args(shards, tiny_model_dir, one, *common, "--zero-stage", 0,
                      "--gradient-accumulation-steps", 3)  # fmt: skip
    assert run_train(args).returncode == 0
    for step in (1, 2):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            got, want = metrics(three, "eval")[step][key], metrics(one, "eval")[step][key]
            assert got == pytest.approx(want, abs=1e-5), (step, key)


PROBE = """
import json
import sys
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
import refdpo.train.run as run

counts = {"fetched": 0, "ready": 0, "complete_trace": 0, "calls": 0}
build = run.build_engine

def probed(*args, **kwargs):
    engine = build(*args, **kwargs)
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    fetch = coordinator.fetch_sub_module

    def counting(module, forward):
        if forward:
            counts["calls"] += 1
            counts["complete_trace"] += coordinator.is_complete_trace()
            params = [*module.parameters(recurse=False), *module._external_params.values()]
            for p in params:
                if not getattr(p, "ds_persist", False):
                    counts["fetched"] += 1
                    counts["ready"] += p.ds_status != ZeroParamStatus.NOT_AVAILABLE
        return fetch(module, forward)

    coordinator.fetch_sub_module = counting
    return engine

run.build_engine = probed
code = run.main(sys.argv[1:])
# a file per rank: the ranks' stdout lines interleave under the launcher
import os, pathlib
pathlib.Path(os.environ["PROBE_DIR"], f"probe-{os.environ['RANK']}.json").write_text(json.dumps(counts))
sys.exit(code)
"""


def test_zero3_records_a_trace_and_prefetches(shards, tiny_model_dir, tmp_path):
    """Read DeepSpeed's own state on 2 ranks: after the first steps the coordinator has a
    complete module trace, and most parameters a module needs in forward were gathered ahead
    of its call (prefetched) rather than fetched blocking. Called around the engine, the trace
    was never recorded and no parameter was prefetched."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    launcher = Path(sys.executable).with_name("deepspeed")
    args = train_args(shards, tiny_model_dir, tmp_path / "out", "--max-steps", 4,
                      "--zero-stage", 3, "--export", "none")  # fmt: skip
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", "29673", str(script), *args]
    env = {**ENV, "PROBE_DIR": str(tmp_path)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    probes = sorted(tmp_path.glob("probe-*.json"))
    assert [p.name for p in probes] == ["probe-0.json", "probe-1.json"]
    for path in probes:
        counts = json.loads(path.read_text())
        assert counts["complete_trace"] > counts["calls"] / 2, counts
        assert counts["ready"] > counts["fetched"] / 2, counts
