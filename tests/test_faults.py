"""Every fault of design section 7, injected for real, with the outcome users are owed.

Processes are killed with SIGKILL from outside at a place the test picks (a byte offset of
the shards, a training step, the middle of a checkpoint save): the process stops itself at
an armed fault point (shared/faults.py) and the test kills it there, after checking that it
did stop there. docs/reliability.md lists these tests beside the faults they cover.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refdpo.shared.shards import MANIFEST, WRITE_BLOCK, sha256_file
from refdpo.train.checkpoint import COMPLETE, REQUEUE_EXIT_CODE
from tests import faultkit
from tests.conftest import wait_for_lines, write_jsonl
from tests.test_precompute import base_args, good_rows, read_sorted
from tests.test_train import (
    ENV,
    LN2,
    metrics,
    module_state,
    run_train,
    train_args,
    train_command,
)

# ---------------------------------------------------------------- stage one


def precompute_cmd(model: Path, dataset: Path, output: Path) -> list[str]:
    """150 pairs per shard with their text: ~44 kB shards, several write blocks each."""
    args = [str(a) for a in base_args(model, dataset, output, "--keep-text")]
    args[args.index("--rows-per-shard") + 1] = "150"
    return [sys.executable, "-m", "refdpo.precompute.run", *args]


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory, tiny_model_dir):
    """A dataset of 3 shards and the folder an uninterrupted run writes for it."""
    root = tmp_path_factory.mktemp("stage-one")
    dataset = write_jsonl(root / "pairs.jsonl", good_rows(450))
    clean = root / "clean"
    subprocess.run(precompute_cmd(tiny_model_dir, dataset, clean), check=True, capture_output=True)
    sizes = [p.stat().st_size for p in sorted(clean.glob("part-*.parquet"))]
    assert len(sizes) == 3 and min(sizes) > 2 * WRITE_BLOCK, sizes
    return dataset, clean, sizes


def test_writer_killed_mid_shard_leaves_a_temp_file_and_a_rerun_redoes_it(
    stage_one, tiny_model_dir, tmp_path
):
    dataset, clean, sizes = stage_one
    offset = sizes[0] + WRITE_BLOCK + 100  # inside the second shard, in its second block
    out = tmp_path / "out"
    cmd = precompute_cmd(tiny_model_dir, dataset, out)
    faultkit.kill_at(
        faultkit.start(cmd, tmp_path / "log", ENV, f"shard_bytes={offset}"), "shard_bytes"
    )
    (temp,) = out.glob(".part-00000-00001.parquet.*.tmp")
    assert temp.stat().st_size == 2 * WRITE_BLOCK  # killed right after the block holding offset
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000-00000.parquet"]
    assert not (out / MANIFEST).exists()
    kept = (out / "part-00000-00000.parquet").stat().st_mtime_ns

    assert subprocess.run(cmd, env=ENV, capture_output=True).returncode == 0
    assert (out / "part-00000-00000.parquet").stat().st_mtime_ns == kept  # complete shard kept
    assert not list(out.glob(".*.tmp"))
    pd.testing.assert_frame_equal(read_sorted(out), read_sorted(clean))


def test_writer_killed_before_the_manifest_training_refuses_and_a_rerun_finishes(
    stage_one, tiny_model_dir, tmp_path
):
    dataset, clean, _ = stage_one
    out = tmp_path / "out"
    cmd = precompute_cmd(tiny_model_dir, dataset, out)
    faultkit.kill_at(faultkit.start(cmd, tmp_path / "log", ENV, "manifest=0"), "manifest")
    assert len(list(out.glob("part-*.parquet"))) == 3 and not (out / MANIFEST).exists()

    result = run_train(["--shards", str(out), "--model", str(tiny_model_dir), "--output",
                        str(tmp_path / "train"), "--max-steps", "1"])  # fmt: skip
    assert result.returncode == 2 and MANIFEST in result.stderr
    assert "stage one has not finished" in result.stderr

    assert subprocess.run(cmd, env=ENV, capture_output=True).returncode == 0
    assert (out / MANIFEST).exists()
    pd.testing.assert_frame_equal(read_sorted(out), read_sorted(clean))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_anywhere_in_a_shard_stops_training_naming_the_shard(
    stage_one, tiny_model_dir, tmp_path, where
):
    _, clean, _ = stage_one
    folder = tmp_path / "shards"
    folder.mkdir()
    for path in clean.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    target = folder / "part-00000-00001.parquet"
    data = bytearray(target.read_bytes())
    data[{"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]] ^= 0x01
    target.write_bytes(bytes(data))
    result = run_train(["--shards", str(folder), "--model", str(tiny_model_dir), "--output",
                        str(tmp_path / "train"), "--max-steps", "1"])  # fmt: skip
    assert result.returncode == 2
    assert "part-00000-00001.parquet: sha256 differs" in result.stderr
    assert "step-0 check" not in result.stderr  # refused before the policy was built


def rewrite(folder: Path, change) -> None:
    """Rewrite every shard with change(table) and update the manifest's checksums, as a
    buggy tool would: only the step-0 check can notice."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        table = pq.read_table(path)
        pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), path)
        entry["sha256"] = sha256_file(path)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def set_column(table: pa.Table, name: str, values: list) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, name, pa.array(values, table.schema.field(name).type))


def reverse_tokens(table: pa.Table) -> pa.Table:
    """Per-token values in reverse order: sums and averages stay right, tokens do not."""
    for name in ("ref_win_per_token_logp", "ref_rej_per_token_logp"):
        table = set_column(table, name, [row[::-1] for row in table[name].to_pylist()])
    return table


def shift_values(table: pa.Table) -> pa.Table:
    """Every per-token value off by 0.01 (sums moved to match)."""
    for side in ("win", "rej"):
        rows = [[v - 0.01 for v in row] for row in table[f"ref_{side}_per_token_logp"].to_pylist()]
        table = set_column(table, f"ref_{side}_per_token_logp", rows)
        table = set_column(table, f"ref_{side}_logp", [sum(r) for r in rows])
    return table


def rotate_rows(table: pa.Table) -> pa.Table:
    """Each pair gets the next pair's reference values: misaligned with its token ids."""
    for name in [n for n in table.column_names if n.startswith("ref_")]:
        values = table[name].to_pylist()
        table = set_column(table, name, values[1:] + values[:1])
    return table


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (reverse_tokens, 3, "does not reproduce the stored reference log-probs"),
        (shift_values, 3, "does not reproduce the stored reference log-probs"),
        (rotate_rows, 2, "values for"),
    ],
    ids=["reversed-tokens", "shifted", "rows-rotated"],
)
def test_wrong_reference_values_are_refused(
    shards_copy, tiny_model_dir, tmp_path, change, code, message
):
    rewrite(shards_copy, change)
    result = run_train(train_args(shards_copy.parent, tiny_model_dir, tmp_path / "out",
                                  "--max-steps", 1))  # fmt: skip
    assert result.returncode == code, result.stderr[-2000:]
    assert message in result.stderr


@pytest.fixture
def shards_copy(shards, tmp_path) -> Path:
    """A private copy of the training shards (tests/test_train.py) to damage."""
    folder = tmp_path / "copy" / "train"
    folder.mkdir(parents=True)
    for path in (shards / "train").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_unknown_schema_version_is_refused(shards_copy, tiny_model_dir, tmp_path):
    manifest = json.loads((shards_copy / MANIFEST).read_text())
    manifest["schema_version"] = 2
    (shards_copy / MANIFEST).write_text(json.dumps(manifest))
    result = run_train(train_args(shards_copy.parent, tiny_model_dir, tmp_path / "out",
                                  "--max-steps", 1))  # fmt: skip
    assert result.returncode == 2 and "schema_version 2" in result.stderr


# ---------------------------------------------------------------- stage two


def optimizer_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer state files of a checkpoint, by file and key path."""
    found = {}

    def walk(node, prefix):
        if isinstance(node, torch.Tensor):
            found[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}/{i}")

    for path in sorted(checkpoint.glob("*optim_states.pt")):  # ZeRO 1-3: partitioned files
        walk(torch.load(path, weights_only=False), path.name)
    if not found:  # ZeRO-0 (the one-rank default) keeps it beside the weights
        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)
        walk(states["optimizer"], "optimizer")
    assert found, f"no optimizer state in {checkpoint}"
    return found


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(shards, tiny_model_dir, tmp_path_factory) -> Path:
    """6 uninterrupted steps, a checkpoint every 2: what an interrupted run must equal."""
    output = tmp_path_factory.mktemp("straight")
    result = run_train(train_args(shards, tiny_model_dir, output, *RESUMABLE))
    assert result.returncode == 0, result.stderr[-3000:]
    return output


RESUMABLE = ["--max-steps", 6, "--save-steps", 2, "--save-total-limit", 5, "--export", "none",
             "--resume", "auto"]  # fmt: skip


@pytest.mark.parametrize(
    ("point", "resumed_from"),
    [("train_step=5", 4), ("checkpoint_save=4", 2)],
    ids=["mid-step", "mid-checkpoint-save"],
)
def test_killed_run_resumes_to_exactly_the_uninterrupted_run(
    shards, tiny_model_dir, straight, tmp_path, point, resumed_from
):
    """Killed mid-step 5 (after the forward, before the backward), or while step 4's
    checkpoint is half saved (DeepSpeed's files written, the completion marker not): the
    rerun resumes from the newest complete checkpoint and ends bitwise equal to an
    uninterrupted run: losses, weights, optimizer state, and so the data order."""
    output = tmp_path / "run"
    args = [str(a) for a in train_args(shards, tiny_model_dir, output, *RESUMABLE)]
    faultkit.kill_at(
        faultkit.start(train_command(args), tmp_path / "log", ENV, point), point.split("=")[0]
    )
    checkpoints = output / "checkpoints"
    if point.startswith("checkpoint_save"):
        assert (checkpoints / "step-00000004" / "mp_rank_00_model_states.pt").exists()
        assert not (checkpoints / "step-00000004" / COMPLETE).exists()

    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"resumed from {checkpoints / f'step-{resumed_from:08d}'} at step {resumed_from}"
        in result.stderr
    )
    for step in range(1, 7):  # bitwise on CPU fp32
        assert metrics(output)[step]["loss"] == metrics(straight)[step]["loss"], step
    mine, theirs = (d / "checkpoints" / "step-00000006" for d in (output, straight))
    assert_same_tensors(module_state(mine), module_state(theirs))
    assert_same_tensors(optimizer_state(mine), optimizer_state(theirs))


def test_resume_auto_with_nothing_to_resume_starts_fresh_and_says_so(
    shards, tiny_model_dir, tmp_path
):
    args = train_args(shards, tiny_model_dir, tmp_path / "out", "--max-steps", 1, "--export",
                      "none", "--resume", "auto")  # fmt: skip
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no complete checkpoint" in result.stderr and "starting fresh" in result.stderr
    assert metrics(tmp_path / "out")[1]["loss"] == pytest.approx(LN2, abs=1e-5)


def weights(output: Path, step: int) -> dict[str, torch.Tensor]:
    return module_state(output / "checkpoints" / f"step-{step:08d}")


EVERY_STEP = ["--save-steps", 1, "--save-total-limit", 20, "--export", "none"]


@pytest.mark.multirank
def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(shards, tiny_model_dir, tmp_path):
    """ZeRO-2 on 2 ranks, rank 1's loss NaN at step 3: neither rank updates (weights and
    optimizer state of step 3 equal step 2's), the step is counted, training goes on."""
    output = tmp_path / "out"
    args = train_args(shards, tiny_model_dir, output, "--max-steps", 4, *EVERY_STEP)
    run = faultkit.start(train_command(args, 2, 29671), tmp_path / "log", ENV, "nan_loss=3@1")
    assert run.wait() == 0, run.stderr[-3000:]
    assert "step 3: NaN/inf loss or gradient; update skipped on every rank" in run.stderr
    logged = metrics(output)
    assert [logged[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert_same_tensors(weights(output, 2), weights(output, 3))
    ckpt = output / "checkpoints"
    assert_same_tensors(
        optimizer_state(ckpt / "step-00000002"), optimizer_state(ckpt / "step-00000003")
    )
    after3, after4 = weights(output, 3), weights(output, 4)
    assert not all(torch.equal(after3[k], after4[k]) for k in after3)  # step 4 trained


def test_nonfinite_steps_are_skipped_then_abort_after_k_in_a_row(shards, tiny_model_dir, tmp_path):
    """ZeRO-0 in fp32, where DeepSpeed itself would apply a NaN update: inf gradients behind
    a finite loss at steps 2-3 are skipped; NaN losses from step 5 on stop the run after 3
    in a row (--max-nonfinite-steps 3) with exit 4, no weight ever NaN."""
    output = tmp_path / "out"
    args = train_args(shards, tiny_model_dir, output, "--max-steps", 10, "--zero-stage", 0,
                      "--max-nonfinite-steps", 3, *EVERY_STEP)  # fmt: skip
    run = faultkit.start(train_command(args), tmp_path / "log", ENV,
                         "inf_grad=2..3,nan_loss=5..")  # fmt: skip
    assert run.wait() == 4, run.stderr[-3000:]
    assert "steps 5-7: 3 optimizer steps in a row had a NaN/inf loss or gradient" in run.stderr
    logged = metrics(output)
    assert max(logged) == 7 and math.isfinite(logged[2]["loss"])  # inf_grad: a finite loss
    assert [logged[s]["skipped_steps"] for s in range(1, 8)] == [0, 1, 2, 2, 3, 4, 5]
    states = {s: weights(output, s) for s in range(1, 7)}
    for same in ((1, 2), (2, 3), (4, 5), (5, 6)):
        assert_same_tensors(*(states[s] for s in same))
    assert not all(torch.equal(states[3][k], states[4][k]) for k in states[3])  # step 4 trained
    assert all(torch.isfinite(t).all() for s in states.values() for t in s.values())


@pytest.mark.multirank
@pytest.mark.parametrize("fault", ["killed", pytest.param("hung", marks=pytest.mark.slow)])
def test_a_rank_lost_mid_step_stops_the_others_in_bounded_time(
    shards, tiny_model_dir, tmp_path, fault
):
    """Rank 1 stops mid-step 3 (after its forward, before the gradient all-reduce). Killed:
    rank 0 sees the connection drop and fails at once. Hung (stopped, never killed): rank 0
    fails when --dist-timeout runs out. Either way the launcher ends non-zero, no process
    is left, and nothing hangs."""
    timeout = {"killed": 600, "hung": 20}[fault]
    args = train_args(shards, tiny_model_dir, tmp_path / "out", "--max-steps", 10,
                      "--export", "none", "--dist-timeout", timeout)  # fmt: skip
    run = faultkit.start(train_command(args, 2, 29672 + (fault == "hung")), tmp_path / "log", ENV,
                         "train_step=3@1")  # fmt: skip
    try:
        pid = faultkit.wait_stopped(run, "train_step")
        assert faultkit.rank_of(pid) == 1
        if fault == "killed":
            os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        code = run.wait(timeout=timeout + 60)
        elapsed = time.monotonic() - started
    finally:
        faultkit.kill_tree(run.proc.pid)
    assert code != 0
    assert not faultkit.tree(run.proc.pid)
    assert elapsed < (30 if fault == "killed" else timeout + 45), elapsed
    assert max(metrics(tmp_path / "out")) == 2  # step 3 never completed


@pytest.mark.multirank
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_to_one_rank_stops_all_at_the_same_step_and_saves_once(
    shards, tiny_model_dir, tmp_path, sig
):
    """Only rank 1 gets the signal (a node-local preemption notice): the ranks agree at the
    next step boundary, save one checkpoint together, and exit with the requeue code."""
    output = tmp_path / "out"
    args = train_args(shards, tiny_model_dir, output, "--max-steps", 40, "--export", "none")
    run = faultkit.start(
        train_command(args, 2, 29675 + (sig == signal.SIGTERM)), tmp_path / "log", ENV
    )
    try:
        wait_for_lines(output / "metrics.jsonl", 2)
        ranks = faultkit.rank_pids(run.proc.pid, 2)
        os.kill(ranks[1], sig)
        code = run.wait(timeout=300)
    finally:
        faultkit.kill_tree(run.proc.pid)
    assert code == REQUEUE_EXIT_CODE, run.stderr[-3000:]
    saved = list((output / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / COMPLETE).exists()
    stopped_at = json.loads((saved[0] / COMPLETE).read_text())["step"]
    assert 2 <= stopped_at < 40 and max(metrics(output)) == stopped_at
    assert sorted(p.name for p in saved[0].glob("rng-rank*.pt")) == [
        "rng-rank00000.pt",
        "rng-rank00001.pt",
    ]
    stops = re.findall(r"\[rank (\d)/2\] WARNING .*stopped by signal after step (\d+)", run.stderr)
    assert sorted(stops) == [("0", str(stopped_at)), ("1", str(stopped_at))]  # same step


def test_shards_of_another_max_length_are_refused_naming_the_field(tiny_model_dir, tmp_path):
    """A shard from a run with another --max-length dropped into a folder (by hand, or two
    job arrays sharing an --output): the manifest is refused, naming the setting."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(16))
    for name, length in (("a", 128), ("b", 96)):
        args = [str(a) for a in base_args(tiny_model_dir, dataset, tmp_path / name)]
        args[args.index("--max-length") + 1] = str(length)
        assert subprocess.run([sys.executable, "-m", "refdpo.precompute.run", *args],
                              env=ENV, capture_output=True).returncode == 0  # fmt: skip
    folder = tmp_path / "a"
    (folder / "part-00000-00001.parquet").write_bytes(
        (tmp_path / "b" / "part-00000-00001.parquet").read_bytes()
    )
    (folder / MANIFEST).unlink()
    args = [str(a) for a in base_args(tiny_model_dir, dataset, folder, "--finalize-only")]
    result = subprocess.run([sys.executable, "-m", "refdpo.precompute.run", *args], env=ENV,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and not (folder / MANIFEST).exists()
    assert "part-00000-00001.parquet: written with a different" in result.stderr
    assert "max_length" in result.stderr


def test_duplicated_or_missing_ids_are_named_by_inspect(stage_one, tmp_path, capsys):
    """A folder whose manifest lists a shard twice under two names (duplicated ids), or
    lists a shard that is gone (missing ids): `refdpo inspect` names the file."""
    from refdpo.precompute.inspect import main as inspect_main

    _, clean, _ = stage_one
    for case in ("duplicated", "missing"):
        folder = tmp_path / case
        folder.mkdir()
        for path in clean.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        manifest = json.loads((folder / MANIFEST).read_text())
        if case == "duplicated":
            copy = dict(manifest["shards"][0], file="part-00000-00003.parquet")
            (folder / copy["file"]).write_bytes((folder / "part-00000-00000.parquet").read_bytes())
            manifest["shards"].append(copy)
            manifest["rows"] += copy["rows"]
        else:
            (folder / "part-00000-00002.parquet").unlink()
        (folder / MANIFEST).write_text(json.dumps(manifest))
        capsys.readouterr()
        assert inspect_main([str(folder)]) == 1
        err = capsys.readouterr().err
        want = "part-00000-00003.parquet" if case == "duplicated" else "part-00000-00002.parquet"
        assert want in err, err


def test_a_reference_giving_nan_drops_those_pairs_and_writes_no_nan(tmp_path, tokenizer):
    """A reference whose embedding of one token is NaN (a broken checkpoint): the pairs that
    use that token are dropped as nonfinite_logps and counted; nothing NaN is written."""
    from refdpo.precompute.inspect import validate
    from tests.conftest import build_model

    model = build_model(len(tokenizer))
    (poison,) = tokenizer("Z", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = good_rows(12)
    for i in (2, 5, 9):
        rows[i]["chosen"] += " Z"
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    args = [str(a) for a in base_args(tmp_path / "model", dataset, out)]
    result = subprocess.run([sys.executable, "-m", "refdpo.precompute.run", *args], env=ENV,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest, _ = validate(out)  # also checks every stored value is finite
    assert manifest["dropped"] == {"nonfinite_logps": 3} and manifest["rows"] == 9
    stored = pd.read_parquet(out)
    assert all(np.isfinite(np.concatenate(stored[c].to_list())).all()
               for c in ("ref_win_per_token_logp", "ref_rej_per_token_logp"))  # fmt: skip
