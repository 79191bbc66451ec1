"""Stage two in a folder that already holds something: another run, a checkpoint to resume
with other settings, an interrupted run's metrics. Each case of docs/reliability.md's
"Reruns and output folders" rows; the stage-one cases are in tests/test_reruns.py."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refdpo.shared.losses import LOSSES
from refdpo.train import checkpoint
from refdpo.train.checkpoint import COMPLETE, REQUEUE_EXIT_CODE, LoopState
from refdpo.train.config import TrainConfig
from refdpo.train.resume import (
    APPLIED,
    DATA_AND_STEP,
    MAY_CHANGE,
    compare_settings,
    run_settings,
)
from tests.conftest import wait_for_lines
from tests.test_faults import assert_same_tensors, optimizer_state
from tests.test_train import ENV, LN2, module_state, run_train, save_model, train_args

SHORT = ["--max-steps", 2, "--export", "none"]


def records(output: Path, split: str = "train") -> list[dict]:
    """Every record of metrics.jsonl, in file order (test_train.metrics keeps the last)."""
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def steps_saved(output: Path) -> list[int]:
    return [
        int(p.name.split("-")[1]) for p in checkpoint.complete_checkpoints(output / "checkpoints")
    ]


# ---------------------------------------------------------------- another run in the folder


def test_a_new_run_into_a_folder_holding_another_run_is_refused(shards, tiny_model_dir, tmp_path):
    """Before: no refusal, the new run's checkpoint was pruned at once, metrics.jsonl mixed both
    runs and a later --resume auto picked the old run. Now: refused before the policy loads,
    unless --overwrite-output-dir (which clears the old run) or --resume."""
    run = tmp_path / "run"
    old = run_train(train_args(shards, tiny_model_dir, run, "--max-steps", 4, "--export", "none"))
    assert old.returncode == 0, old.stderr[-3000:]

    again = run_train(train_args(shards, tiny_model_dir, run, "--max-steps", 2, "--seed", 1))
    assert again.returncode == 2, again.stderr[-3000:]
    assert "holds another run (checkpoints up to step 4, metrics.jsonl)" in again.stderr
    assert "--overwrite-output-dir" in again.stderr and "Traceback" not in again.stderr
    assert "built in" not in again.stderr  # refused before the policy loaded
    assert steps_saved(run) == [4] and [r["step"] for r in records(run)] == [1, 2, 3, 4]

    args = train_args(shards, tiny_model_dir, run, "--max-steps", 2, "--seed", 1,
                      "--export", "none", "--overwrite-output-dir")  # fmt: skip
    replaced = run_train(args)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "removed the earlier run" in replaced.stderr
    assert steps_saved(run) == [2]
    assert [r["step"] for r in records(run)] == [1, 2]
    assert records(run)[0]["loss"] == pytest.approx(LN2, abs=1e-5)


def test_overwrite_and_resume_together_are_refused(shards, tiny_model_dir, tmp_path):
    args = train_args(shards, tiny_model_dir, tmp_path / "run", *SHORT, "--overwrite-output-dir",
                      "--resume-from-checkpoint", "auto")  # fmt: skip
    result = run_train(args)
    assert result.returncode == 2 and "give one of them" in result.stderr


def test_a_failed_first_attempt_does_not_lock_the_folder(
    shards, tiny_model_dir, tokenizer, tmp_path
):
    """A run that stopped before its first step (here: the step-0 check refused another
    policy) leaves only train_config.json: the corrected command runs."""
    run = tmp_path / "run"
    other = save_model(tmp_path / "other-model", len(tokenizer), tokenizer, seed=7)
    failed = run_train(train_args(shards, other, run, *SHORT))
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert (run / "train_config.json").exists()
    fixed = run_train(train_args(shards, tiny_model_dir, run, *SHORT))
    assert fixed.returncode == 0, fixed.stderr[-3000:]


@pytest.mark.parametrize("where", ["output", "parent"])
def test_a_file_as_output_dir_is_one_sentence(shards, tiny_model_dir, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = blocker if where == "output" else blocker / "run"
    result = run_train(train_args(shards, tiny_model_dir, output, *SHORT))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{blocker} is a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr


def make_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step}))
    return path


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """Pruning keeps the newest checkpoints by step; a folder holding later steps (of a run
    this one replaced by resuming from an earlier checkpoint) used to make it delete the one
    just written. Now: kept, with the newest keep - 1 before it; later steps and interrupted
    older saves go."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 5, 6):
        make_checkpoint(root, step)
    make_checkpoint(root, 3, complete=False)
    make_checkpoint(root, 4)  # just written
    checkpoint.prune(root, 4, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    checkpoint.prune(root, 4, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


# ---------------------------------------------------------------- resume with other settings


def test_every_setting_has_a_resume_rule():
    """A new option must be sorted into refused, applied or may-change: compare_settings
    refuses anything unlisted, so forgetting it fails loudly rather than silently."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    groups = [set(DATA_AND_STEP), set(APPLIED), set(MAY_CHANGE)]
    assert (
        not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    )
    derived = {"world_size", "global_batch", "shards_fingerprint"}
    unsorted = fields - set.union(*groups) - {"loss_weights", "rpo_alpha"}  # folded into loss
    assert not unsorted, f"settings without a resume rule: {sorted(unsorted)}"
    assert derived <= groups[0]


def saved_checkpoint(tmp_path: Path, settings: dict) -> Path:
    path = make_checkpoint(tmp_path / "checkpoints", 2, complete=False)
    marker = {"step": 2, "world_size": 1, "loop": dataclasses.asdict(LoopState(step=2)),
              "settings": settings}  # fmt: skip
    (path / COMPLETE).write_text(json.dumps(marker))
    return path


BASE = run_settings(
    {"seed": 0, "learning_rate": 1e-3, "logging_steps": 1, "shards": "a", "loss": "sigmoid:1"},
    world=1,
    global_batch=8,
    manifest={"shards": [{"file": "part-00000-00000.parquet", "sha256": "ab"}]},
)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "seed=0"),
        ({"global_batch": 16}, "global_batch=8"),
        ({"world_size": 2}, "world_size=1"),
        ({"loss": "ipo:1"}, "loss="),
        ({"shards_fingerprint": "other"}, "shards_fingerprint="),
        ({"a_new_option": 3}, "a setting a resume cannot change"),
    ],
)
def test_a_resume_that_changes_the_data_or_a_step_is_refused_by_name(tmp_path, change, named):
    path = saved_checkpoint(tmp_path, BASE)
    with pytest.raises(Exception, match="was saved with") as err:
        compare_settings(path, {**BASE, **change})
    assert named in str(err.value) and err.value.exit_code == 2


def test_settings_that_may_change_pass_and_applied_ones_are_listed(tmp_path):
    path = saved_checkpoint(tmp_path, BASE)
    moved = {**BASE, "shards": "b", "logging_steps": 5}  # same pairs by content
    assert compare_settings(path, moved) == []
    assert compare_settings(path, {**BASE, "learning_rate": 5e-4}) == [
        "learning_rate 0.001 -> 0.0005"
    ]


def test_resume_refuses_another_seed_before_the_policy_loads(shards, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    first = run_train(train_args(shards, tiny_model_dir, run, *SHORT))
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_train(train_args(shards, tiny_model_dir, run, "--max-steps", 4, "--seed", 3,
                                  "--resume", "auto"))  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was saved with seed=0, this run has 3: it changes the data order" in result.stderr
    assert "ZeRO" not in result.stderr  # refused before the engine was built


def test_a_changed_learning_rate_is_applied_on_resume(shards, tiny_model_dir, tmp_path):
    """Before: the checkpoint's learning rate won silently. Now: the new one is used from the
    first resumed step, and the log says so."""
    run = tmp_path / "run"
    assert run_train(train_args(shards, tiny_model_dir, run, *SHORT)).returncode == 0
    args = train_args(shards, tiny_model_dir, run, "--max-steps", 4, "--export", "none",
                      "--resume", "auto")  # fmt: skip
    args[args.index("--learning-rate") + 1] = "3e-4"
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "changed setting, applied from here on: learning_rate 0.001 -> 0.0003" in result.stderr
    rates = {r["step"]: r["learning_rate"] for r in records(run)}
    assert rates == {1: 1e-3, 2: 1e-3, 3: 3e-4, 4: 3e-4}


# ---------------------------------------------------------------- loop state


def resumed_equals_straight(shards, model, tmp_path, extra: list, ranks: int = 1) -> None:
    """4 straight steps (checkpoint at 2) against a run resumed from that step-2 checkpoint in
    another folder: the same losses and the same weights and optimizer state, bitwise."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--max-steps", 4, "--export", "none", *extra]
    first = run_train(train_args(shards, model, straight, *common, "--save-steps", 2), ranks)
    assert first.returncode == 0, first.stderr[-3000:]
    start = straight / "checkpoints" / "step-00000002"
    second = run_train(train_args(shards, model, resumed, *common, "--resume", start), ranks)
    assert second.returncode == 0, second.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in records(straight)}
    assert {r["step"]: r["loss"] for r in records(resumed)} == {3: losses[3], 4: losses[4]}
    mine, theirs = (d / "checkpoints" / "step-00000004" for d in (resumed, straight))
    assert_same_tensors(module_state(mine), module_state(theirs))
    assert_same_tensors(optimizer_state(mine), optimizer_state(theirs))


def test_bco_pair_baseline_is_saved_and_resumed(shards, tiny_model_dir, tmp_path):
    """BCO-pair's running reward baseline is loop state: before, it restarted at 0 on resume
    (the issue measured 5 steps: 0.6046, 3 + resume + 2: 0.5568)."""
    resumed_equals_straight(shards, tiny_model_dir, tmp_path, ["--loss-type", "bco_pair"])
    marker = json.loads((tmp_path / "straight" / "checkpoints" / "step-00000002" / COMPLETE)
                        .read_text())  # fmt: skip
    assert marker["loop"]["reward_baseline"]["count"] == 2


@pytest.mark.slow  # about 40 s: 2 ranks, 2 runs
def test_bco_pair_baseline_is_the_same_on_every_rank(shards, tiny_model_dir, tmp_path):
    """Averaged over ranks before it is updated: rank 0's saved baseline is every rank's, so a
    2-rank resume equals the straight run (with per-rank baselines rank 1 resumed rank 0's)."""
    resumed_equals_straight(
        shards, tiny_model_dir, tmp_path, ["--loss-type", "bco_pair", "--micro-batch-size", 2], 2
    )


def test_every_loss_at_once_resumes_bitwise(shards, tiny_model_dir, tmp_path):
    spec = ",".join(f"{name}:0.1" for name in LOSSES)
    resumed_equals_straight(shards, tiny_model_dir, tmp_path, ["--loss-type", spec])


@pytest.mark.slow  # about 15 s per loss name
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_resumes_bitwise(shards, tiny_model_dir, tmp_path, name):
    resumed_equals_straight(shards, tiny_model_dir, tmp_path, ["--loss-type", name])


# ---------------------------------------------------------------- stops and metrics


def test_ctrl_c_saves_and_exits_for_requeue_and_metrics_hold_each_step_once(
    shards, tiny_model_dir, tmp_path
):
    """SIGINT (Ctrl-C) was a KeyboardInterrupt traceback from inside autograd and no
    checkpoint; now it is a stop request like SIGTERM. The resumed run rewrites the steps the
    interrupted one logged after its checkpoint: each step once in metrics.jsonl."""
    run = tmp_path / "run"
    args = train_args(shards, tiny_model_dir, run, "--max-steps", 500, "--export", "none",
                      "--resume", "auto", "--save-steps", 3)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "refdpo.train.run", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_lines(run / "metrics.jsonl", 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    stopped = steps_saved(run)[-1]
    assert stopped >= 4 and max(r["step"] for r in records(run)) == stopped

    # an interrupted run's records after its last checkpoint: as a kill would leave them
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"split": "train", "step": stopped + 1, "loss": 9.0}) + "\n")
        fh.write('{"split": "train", "st')  # a line cut short by the kill
    args[args.index("--max-steps") + 1] = str(stopped + 3)  # applied on resume
    assert run_train(args).returncode == 0
    assert [r["step"] for r in records(run)] == list(range(1, stopped + 4))


# ---------------------------------------------------------------- full fine-tuning from an adapter


def test_full_fine_tuning_from_an_adapter_trains_every_weight(tiny_model_dir, tmp_path):
    """The README's flow: stage one with --adapter A, then `refdpo train --model M --adapter A`
    without --use-peft trains the merged model in full. Before: `optimizer got an empty
    parameter list` (PEFT leaves merged weights frozen)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.conftest import write_jsonl
    from tests.test_precompute import base_args, good_rows

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))  # fmt: skip
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(24))
    shards = tmp_path / "shards"
    args = [str(a) for a in base_args(tiny_model_dir, dataset, shards / "train")]
    scored = subprocess.run([sys.executable, "-m", "refdpo.precompute.run", *args,
                             "--adapter", str(adapter)], env=ENV, capture_output=True, text=True)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]

    run = tmp_path / "run"
    result = run_train(
        train_args(shards, tiny_model_dir, run, "--max-steps", 2, "--adapter", adapter)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(run)[0]["loss"] == pytest.approx(LN2, abs=1e-5)  # the merged reference
    trained = load_file(run / "final" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in original.items():
        assert not torch.equal(trained[name], tensor), f"{name} did not train"
