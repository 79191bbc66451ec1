"""Disable each protection of docs/reliability.md in turn and check that its test fails.

    python -m tests.protections [--only NAME] [--output FILE]

Each entry replaces one snippet of the source (the protection) with a version without it,
runs the test that claims to cover it, and restores the file. The test must fail (pytest
exit 1, or the test process killed by a signal); a test that still passes would be claiming
a protection it does not check. Runs in the working tree (the package is installed
editable), so it refuses to start with uncommitted changes, and always restores what it
changed. Takes about 17 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS = "tests/test_faults.py::"
STRESS = "tests/test_stress.py::"
RESUME = "tests/test_resume.py::"
RERUNS = "tests/test_reruns.py::"
ATTENTION = "tests/test_attention.py::"
BATCHES = "tests/test_stage_one_batches.py::"
SHARDED = "tests/test_sharded_reference.py::"
VISION = "tests/test_vision_stages.py::"
VISION_RERUNS = "tests/test_vision_reruns.py::"
DAMAGED = RERUNS + "test_a_rerun_redoes_a_damaged_shard_and_equals_a_clean_run"


@dataclass(frozen=True)
class Mutation:
    name: str  # the protection
    file: str
    old: str  # the protection's code
    new: str  # the same place without it
    test: str  # pytest node id that must fail


MUTATIONS = [
    Mutation("temp file + rename for shards", "shared/shards.py",
             'tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")', "tmp = path",
             FAULTS + "test_writer_killed_mid_shard_leaves_a_temp_file_and_a_rerun_redoes_it"),
    Mutation("stale temp files removed on rerun", "precompute/folder.py",
             "        stale.unlink()", "        pass",
             FAULTS + "test_writer_killed_mid_shard_leaves_a_temp_file_and_a_rerun_redoes_it"),
    Mutation("training needs the manifest", "shared/shards.py",
             "    if not path.exists():\n        raise ShardError(",
             "    if not path.exists():\n        return {'schema_version': 1, 'rows': 0, 'shards': []}\n        raise ShardError(",
             FAULTS + "test_writer_killed_before_the_manifest_training_refuses_and_a_rerun_finishes"),
    Mutation("shard checksums verified before training", "train/data.py",
             "    if verify_checksums:", "    if False:",
             FAULTS + "test_a_flipped_byte_anywhere_in_a_shard_stops_training_naming_the_shard"),
    Mutation("schema version checked", "shared/shards.py",
             'if manifest.get("schema_version") != SCHEMA_VERSION:', "if False:",
             FAULTS + "test_unknown_schema_version_is_refused"),
    Mutation("shards of other settings refused at finalize", "precompute/finalize.py",
             "        if field:", "        if False:",
             RERUNS + "test_finalize_refuses_another_workers_shard_of_other_settings"),
    Mutation("inspect finds duplicated ids", "precompute/inspect.py",
             "            if pair_id in seen:", "            if False:",
             FAULTS + "test_duplicated_or_missing_ids_are_named_by_inspect"),
    Mutation("NaN/inf reference values dropped, never written", "precompute/score.py",
             "if not (np.isfinite(win).all() and np.isfinite(rej).all()):", "if False:",
             FAULTS + "test_a_reference_giving_nan_drops_those_pairs_and_writes_no_nan"),
    Mutation("partial temp file removed when a write fails", "shared/shards.py",
             "        tmp.unlink(missing_ok=True)", "        pass",
             STRESS + "test_file_size_limit_mid_shard_leaves_no_partial_shard"),
    Mutation("values aligned with token ids when read", "train/data.py",
             "        check_alignment(name, table)\n        self.decoded += 1",
             "        self.decoded += 1",
             FAULTS + "test_wrong_reference_values_are_refused[rows-rotated]"),
    Mutation("step-0 check", "train/run.py",
             "    if worst > tolerance:", "    if False:",
             FAULTS + "test_wrong_reference_values_are_refused[reversed-tokens]"),
    Mutation("only complete checkpoints resumed", "train/checkpoint.py",
             'if (p / COMPLETE).exists()]', "if True]",
             FAULTS + "test_killed_run_resumes_to_exactly_the_uninterrupted_run[mid-checkpoint-save]"),
    Mutation("optimizer state restored", "train/checkpoint.py",
             "load_optimizer_states=True", "load_optimizer_states=False",
             FAULTS + "test_killed_run_resumes_to_exactly_the_uninterrupted_run[mid-step]"),
    Mutation("data order resumes at the step", "train/run.py",
             "Prefetcher(stream.batches(start_step), prepare)",
             "Prefetcher(stream.batches(0), prepare)",
             FAULTS + "test_killed_run_resumes_to_exactly_the_uninterrupted_run[mid-step]"),
    Mutation("no update from NaN/inf gradients", "train/engine.py",
             "return None if self.overflow else update(closure)", "return update(closure)",
             FAULTS + "test_nonfinite_steps_are_skipped_then_abort_after_k_in_a_row"),
    Mutation("a NaN loss poisons its gradients", "train/step.py",
             "    loss.register_hook(lambda grad: torch.where(finite, grad, _nan_gradient(grad)))",
             "    pass",
             FAULTS + "test_nan_loss_on_one_rank_skips_the_step_on_every_rank"),
    Mutation("abort after K non-finite steps in a row", "train/run.py",
             "if skipped_in_a_row >= cfg.max_nonfinite_steps:", "if False:",
             FAULTS + "test_nonfinite_steps_are_skipped_then_abort_after_k_in_a_row"),
    Mutation("ranks agree on a stop signal", "train/checkpoint.py",
             "        dist.all_reduce(flag, op=dist.ReduceOp.MAX)", "        pass",
             FAULTS + "test_a_signal_to_one_rank_stops_all_at_the_same_step_and_saves_once[SIGUSR1]"),
    Mutation("--dist-timeout on DeepSpeed's groups", "train/engine.py",
             "    bound_collectives(datetime.timedelta(seconds=cfg.dist_timeout))", "",
             FAULTS + "test_a_rank_lost_mid_step_stops_the_others_in_bounded_time[hung]"),
    Mutation("training reads only the row groups a batch needs", "train/data.py",
             "        table = file.read_row_group(group, columns=self.columns, use_threads=False)",
             "        pq.read_table(self.folder, columns=self.columns)\n"
             "        table = file.read_row_group(group, columns=self.columns, use_threads=False)",
             STRESS + "test_dataset_larger_than_training_memory_trains_streaming"),
    Mutation("JSON lines too deep counted, not fatal", "shared/sources.py",
             "except (ValueError, RecursionError) as err:\n                rows.append(",
             "except ValueError as err:\n                rows.append(",
             "tests/test_fuzz_data.py::test_bad_row_catalogue"),
    Mutation("null lines kept away from pyarrow", "shared/sources.py",
             'if kind == "json" and _has_null_line(path):', "if False:",
             "tests/test_fuzz_data.py::test_bad_row_catalogue"),
    # stage one in a folder that holds something (tests/test_reruns.py)
    Mutation("rerun checks each shard's checksum against the manifest", "precompute/folder.py",
             '        if sha256_file(path) != listed[shard.file].get("sha256"):', "        if False:",
             DAMAGED + "[flipped-manifest]"),
    Mutation("a listed but missing shard is redone", "precompute/folder.py",
             '            problem = f"listed in {MANIFEST} but missing"', "            continue",
             DAMAGED + "[deleted-manifest]"),
    Mutation("stale manifest removed before redoing", "precompute/folder.py",
             "        (folder / MANIFEST).unlink(missing_ok=True)\n        logger.info(",
             "        logger.info(",
             RERUNS + "test_a_rerun_that_stops_while_redoing_leaves_no_stale_manifest"),
    Mutation("page CRCs verified on rerun", "shared/shards.py",
             "page_checksum_verification=True", "page_checksum_verification=False",
             DAMAGED + "[flipped_page-no_manifest]"),
    Mutation("page CRCs written", "shared/shards.py",
             "        write_page_checksum=True,", "        write_page_checksum=False,",
             DAMAGED + "[flipped_page-no_manifest]"),
    Mutation("metadata digest checked", "shared/shards.py",
             "    if METADATA_DIGEST in meta and meta[METADATA_DIGEST] != _metadata_digest(rest):",
             "    if False:", DAMAGED + "[metadata_rewritten-no_manifest]"),
    Mutation("footer metadata copies compared", "shared/shards.py",
             "    if copies[0] != copies[1]:", "    if False:",
             DAMAGED + "[footer_edited-no_manifest]"),
    Mutation("kept shard covers the planned rows", "precompute/folder.py",
             "    if covered != (shard.start, shard.stop):", "    if False:",
             DAMAGED + "[other_rows-no_manifest]"),
    Mutation("kept shard carries this run's provenance", "precompute/folder.py",
             '    if field:\n        return f"written with a different',
             '    if False:\n        return f"written with a different',
             DAMAGED + "[other_max_length-no_manifest]"),
    Mutation("stray shards removed", "precompute/folder.py",
             "    if rank == 0:\n        _remove_strays(", "    if False:\n        _remove_strays(",
             DAMAGED + "[stray-manifest]"),
    Mutation("each worker checks only its own shards", "precompute/folder.py",
             "    for shard in (s for s in shards if s.rank == rank):", "    for shard in shards:",
             RERUNS + "test_each_worker_checks_and_redoes_only_its_own_shards"),
    Mutation("changed dataset refused", "precompute/folder.py",
             "    if recorded is not None and recorded != identity[DATASET_KEY]:", "    if False:",
             RERUNS + "test_a_changed_dataset_is_refused_naming_the_dataset_fingerprint[edited]"),
    Mutation("dataset fingerprint of older folders from the manifest or shards",
             "precompute/folder.py",
             "    recorded = (previous or {}).get(DATASET_KEY) or _recorded_fingerprint(folder)",
             "    recorded = (previous or {}).get(DATASET_KEY)",
             RERUNS + "test_a_changed_dataset_is_refused_naming_the_dataset_fingerprint[legacy_run_file]"),
    Mutation("only shards lock a folder", "precompute/folder.py",
             '    if not any(folder.glob("part-*.parquet")):\n        return',
             "    if False:\n        return",
             RERUNS + "test_a_run_that_fails_before_scoring_creates_no_folder_and_locks_nothing"),
    Mutation("no output folder before scoring", "precompute/folder.py",
             "    if folder.is_dir():\n        try:",
             "    folder.mkdir(parents=True, exist_ok=True)\n    if folder.is_dir():\n        try:",
             RERUNS + "test_a_run_that_fails_before_scoring_creates_no_folder_and_locks_nothing"),
    Mutation("an empty split leaves no shard", "precompute/finalize.py",
             "        (folder / shard.file).unlink(missing_ok=True)", "        pass",
             RERUNS + "test_a_split_with_no_usable_row_after_scoring_keeps_no_shard"),
    Mutation("--finalize-only fails on missing shards", "precompute/run.py",
             "    if pending and cfg.finalize_only:", "    if False:",
             RERUNS + "test_finalize_only_names_a_missing_or_damaged_shard_and_fails[missing]"),
    Mutation("--finalize-only deletes nothing", "precompute/folder.py",
             "            if finalize_only:\n                raise ShardError(",
             "            if False:\n                raise ShardError(",
             RERUNS + "test_finalize_only_names_a_missing_or_damaged_shard_and_fails[damaged]"),
    Mutation("--output that is a file: one sentence", "precompute/folder.py",
             "    if folder.exists() and not folder.is_dir():", "    if False:",
             RERUNS + "test_an_output_that_is_a_file_is_one_clear_sentence[file]"),
    Mutation("--output under a file: one sentence", "precompute/folder.py",
             "    if not parent.is_dir():", "    if False:",
             RERUNS + "test_an_output_that_is_a_file_is_one_clear_sentence[under_a_file]"),
    Mutation("row groups of 64", "shared/shards.py",
             "        row_group_size=ROW_GROUP_ROWS,\n", "",
             RERUNS + "test_shards_are_written_in_small_row_groups_with_page_checksums"),
    # stage two in a folder that holds something (tests/test_resume.py)
    Mutation("a folder holding another run refused", "train/resume.py",
             "    if not cfg.overwrite_output_dir:\n        raise FolderRefused(",
             "    if False:\n        raise FolderRefused(",
             RESUME + "test_a_new_run_into_a_folder_holding_another_run_is_refused"),
    Mutation("a file as --output-dir is one sentence", "train/resume.py",
             "        if parent.exists() and not parent.is_dir():", "        if False:",
             RESUME + "test_a_file_as_output_dir_is_one_sentence[output]"),
    Mutation("pruning keeps the checkpoint just written", "train/checkpoint.py",
             'older = [p for p in complete_checkpoints(root) if int(p.name.split("-")[1]) < step]',
             "older = complete_checkpoints(root)",
             RESUME + "test_pruning_keeps_the_checkpoint_just_written"),
    Mutation("settings compared on resume", "train/resume.py",
             "        if old == new or name in MAY_CHANGE:", "        if True:",
             RESUME + "test_resume_refuses_another_seed_before_the_policy_loads"),
    Mutation("a changed learning rate applied on resume", "train/run.py",
             "        apply_optimizer_settings(engine, cfg, adamw_kwargs or {})", "        pass",
             RESUME + "test_a_changed_learning_rate_is_applied_on_resume"),
    Mutation("bco_pair baseline saved and resumed", "train/run.py",
             "    if running and state.reward_baseline:", "    if False:",
             RESUME + "test_bco_pair_baseline_is_saved_and_resumed"),
    Mutation("bco_pair baseline averaged over ranks", "train/step.py",
             "            dist.all_reduce(mean)\n            mean /= dist.get_world_size()",
             "            pass",
             RESUME + "test_bco_pair_baseline_is_the_same_on_every_rank"),
    Mutation("Ctrl-C stops like SIGTERM", "train/checkpoint.py",
             "SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)",
             "SIGNALS = (signal.SIGTERM, signal.SIGUSR1)",
             RESUME + "test_ctrl_c_saves_and_exits_for_requeue_and_metrics_hold_each_step_once"),
    Mutation("metrics.jsonl holds each step once after a resume", "train/metrics.py",
             '            keep_steps_before(output / "metrics.jsonl", start_step + 1)', "            pass",
             RESUME + "test_ctrl_c_saves_and_exits_for_requeue_and_metrics_hold_each_step_once"),
    Mutation("full fine-tuning from an adapter trains every weight", "train/engine.py",
             "        model.requires_grad_(True)", "        pass",
             RESUME + "test_full_fine_tuning_from_an_adapter_trains_every_weight"),
    Mutation("pair mask: rejected never sees chosen", "shared/attention.py",
             "first_hi=torch.where(rejected, chosen_start, zero)",
             "first_hi=torch.where(rejected, rejected_start, zero)",
             ATTENTION + "test_dense_mask_equals_the_rule_written_out"),
    Mutation("block mask: a block is full only when every key is allowed", "shared/attention.py",
             "full = (counts == block).all(dim=2)", "full = (counts > 0).all(dim=2)",
             ATTENTION + "test_block_tables_equal_torchs_own_block_mask"),
    Mutation("sdpa_pairs: each span causal", "shared/attention.py",
             "is_causal=True, scale=scaling", "is_causal=False, scale=scaling",
             ATTENTION + "test_pair_sdpa_spans_give_the_dense_values_and_gradients"),
    Mutation("flex_attention training refused off CUDA", "train/engine.py",
             'if cfg.attn_implementation == "flex_attention" and runs_on.type != "cuda":',
             "if False:",
             "tests/test_train.py::test_bad_input_fails_with_one_clear_sentence"
             "[flex_on_cpu-trains on CUDA only]"),
    Mutation("stage one: a row spoiled by a non-finite pair rescored pair by pair",
             "precompute/score.py", "redo = [i for row in spoiled for i in row]", "redo = []",
             BATCHES + "test_a_nonfinite_pair_costs_only_itself_in_a_packed_row"),
    Mutation("step-0 check: another attention kernel gets the other-layout tolerance",
             "train/run.py", "reason = SAME if scored_with == kernel else OTHER_KERNEL",
             "reason = SAME",
             BATCHES + "test_step0_on_another_attention_kernel_than_stage_ones_says_so"),
    Mutation("token budget: every rank runs as many micro-batches", "train/batches.py",
             "batches.extend([] for _ in range(most - len(batches)))", "pass",
             "tests/test_token_batches.py::"
             "test_a_split_holds_every_pair_once_within_the_budget_on_equal_counts"),
    Mutation("ZeRO-3 stage one: a rank out of work joins with dummy forwards",
             "precompute/reference.py", "            self.model.drain()", "            pass",
             SHARDED + "test_two_ranks_under_zero3_write_what_one_whole_reference_writes"),
    Mutation("ZeRO-3 stage one: ranks agree on failed checks", "precompute/run.py",
             "    if not zero3:\n        return check()", "    if True:\n        return check()",
             SHARDED + "test_a_rank_failing_its_checks_stops_the_others_with_its_exit_code"),
    Mutation("fingerprint: ZeRO-3 partitions gathered", "shared/models.py",
             'if hasattr(tensor, "ds_id"):', "if False:",
             SHARDED + "test_the_fingerprint_is_of_the_whole_weights_not_a_partition"),
    Mutation("fingerprint: offloaded modules loaded", "shared/models.py",
             'if tensor.device.type == "meta":', "if False:",
             SHARDED + "test_device_map_gives_the_values_and_fingerprint_of_the_whole_model"
             "[cpu-and-disk]"),
    Mutation("device map: the lm_head's hook run around the output layer",
             "shared/output_layer.py", "        if hook is None:", "        if True:",
             SHARDED + "test_device_map_gives_the_values_and_fingerprint_of_the_whole_model"
             "[cpu-and-disk]"),
    Mutation("ZeRO-3 vision: a micro-batch without images encodes the dummy image",
             "shared/vision/scoring.py",
             "        if dummy:\n            features = self.family.image_features(self.policy, dummy)",
             "        if False:\n            features = self.family.image_features(self.policy, dummy)",
             VISION + "test_zero3_two_ranks_with_text_only_pairs_among_image_pairs[llava]"),
    Mutation("vision rerun: each kept shard's image file checked", "precompute/folder.py",
             '    if sha256_file(found) != images["sha256"]:', "    if False:",
             VISION_RERUNS + "test_a_rerun_restores_the_image_store_and_equals_a_clean_run"
             "[flipped-image-byte]"),
    Mutation("vision tokenization: images processed once per pair, keyed on the images",
             "shared/vision_pairs.py", "            and all(a is b for a, b in zip(last[0], flat, strict=True))",
             "            and True", VISION + "test_stage_one_writes_pairs_and_images_once[qwen2_vl]"),
    Mutation("vision: stage two scores in stage one's layout", "train/vision.py",
             "    return TWO_SEQUENCES if TWO_SEQUENCES in layouts else SHARED", "    return SHARED",
             VISION_RERUNS + "test_the_self_test_falls_back_to_two_sequences_and_stage_two_follows"),
    Mutation("vision: another decoding policy refused", "train/vision.py",
             "    if difference := policy_difference(", "    if None and policy_difference(",
             VISION_RERUNS + "test_a_changed_decode_policy_is_refused_by_name"),
]  # fmt: skip


def check(m: Mutation, log: Path) -> tuple[str, float]:
    path = REPO / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return f"snippet not found once in {m.file}: update this entry", 0.0
    started = time.monotonic()
    try:
        path.write_text(original.replace(m.old, m.new))
        with open(log, "a") as fh:
            fh.write(f"\n===== {m.name}: {m.test}\n")
            fh.flush()
            code = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", m.test],
                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
            ).returncode  # fmt: skip
    finally:
        path.write_text(original)
    if code < 0:  # killed by a signal: what the protection was there to prevent (a crash)
        return (
            f"fails, as it should (the test process dies: signal {-code})",
            time.monotonic() - started,
        )
    verdict = {0: "STILL PASSES", 1: "fails, as it should"}.get(code, f"pytest exit {code}")
    return verdict, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the entries whose name contains this")
    parser.add_argument("--output", type=Path, default=REPO / "out" / "protections.md")
    args = parser.parse_args()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout  # fmt: skip
    if dirty.strip():
        print("uncommitted changes in tracked files; commit or stash them first", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    log = args.output.with_suffix(".log")
    log.write_text("")
    rows, ok = [], True
    for m in MUTATIONS:
        if args.only and args.only not in m.name:
            continue
        verdict, seconds = check(m, log)
        ok &= verdict.startswith("fails")
        rows.append(
            f"| {m.name} | `{m.file}` | `{m.test.split('::')[-1]}` | {verdict} | {seconds:.0f} s |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(["| protection disabled | file | test | result | time |",
                       "|---|---|---|---|---|", *rows])  # fmt: skip
    args.output.write_text(table + "\n")
    print(f"\n{table}\nwritten to {args.output}; pytest output in {log}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
