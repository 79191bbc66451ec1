"""The DeepSpeed JSON a user brings: settled against the options, "auto" filled by path.

Unit tests of the pure functions first (configs parsed as `refdpo train` parses them, small
JSON files), then `refdpo train` end to end with such files.
"""

from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refdpo.shared.config import GIVEN, flag_name, given_fields, load_config, to_dict
from refdpo.train.config import TrainConfig
from refdpo.train.ds_config import CONFIG_DIR, apply_user_file, deepspeed_config
from tests.test_train import LN2, metrics, run_train, train_args

REQUIRED = ["--shards", "s", "--model", "m", "--output", "o"]
WIDTH = types.SimpleNamespace(hidden_size=64)  # a model config with a hidden size


def parse(*flags) -> TrainConfig:
    return load_config(TrainConfig, [*REQUIRED, *map(str, flags)], "refdpo train", "")


def with_file(tmp_path: Path, content: dict, *flags) -> TrainConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return parse("--deepspeed-config", path, *flags)


# --- which options the user gave


def test_given_fields_are_the_yaml_keys_and_the_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("beta: 0.2\nmicro-batch-size: 8\n")
    cfg = parse("--config", tmp_path / "c.yaml", "--zero-stage", 3)
    assert given_fields(cfg) == {
        "shards",
        "model",
        "output",
        "beta",
        "micro_batch_size",
        "zero_stage",
    }
    assert GIVEN not in to_dict(cfg)  # not saved with the config
    built = TrainConfig(shards="s", model="m", output="o", zero_stage=3)
    assert given_fields(built) == frozenset()


# --- every setting both sides control

# dotted path, its explicit value, the rest of the file, flags that contradict it, the
# TrainConfig field, the file's value in refdpo's terms
SHARED = {
    "micro": ("train_micro_batch_size_per_gpu", 2, {}, ["--micro-batch-size", 4], "micro_batch_size", 2),
    "accumulation": ("gradient_accumulation_steps", 4, {}, ["--gradient-accumulation-steps", 2], "gradient_accumulation_steps", 4),
    "clipping": ("gradient_clipping", 0.5, {}, ["--max-grad-norm", 1.0], "max_grad_norm", 0.5),
    "stage": ("zero_optimization.stage", 3, {}, ["--zero-stage", 1], "zero_stage", 3),
    "offload": ("zero_optimization.offload_optimizer.device", "nvme", {"zero_optimization": {"stage": 3}}, ["--offload", "false"], "offload", True),
    "no-offload": ("zero_optimization.offload_param.device", "none", {"zero_optimization": {"stage": 3}}, ["--zero-stage", 3, "--offload"], "offload", False),
    "bf16": ("bf16.enabled", True, {}, ["--dtype", "fp32"], "dtype", "bf16"),
    "fp32": ("bf16.enabled", False, {}, ["--dtype", "bf16"], "dtype", "fp32"),
    "lr": ("optimizer.params.lr", 1e-5, {"optimizer": {"type": "AdamW"}}, ["--learning-rate", 1e-3], "learning_rate", 1e-5),
    "weight_decay": ("optimizer.params.weight_decay", 0.1, {}, ["--weight-decay", 0.0], "weight_decay", 0.1),
}  # fmt: skip


def file_with(case: str, value) -> dict:
    """The case's file with `value` at its path (None: the path left out)."""
    path, _, rest, *_ = SHARED[case]
    content = json.loads(json.dumps(rest))
    if value is not None:
        *parents, leaf = path.split(".")
        node = content
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return content


@pytest.mark.parametrize("case", SHARED)
def test_an_explicit_value_that_contradicts_a_given_option_is_an_error(tmp_path, case):
    path, value, _, flags, field, _ = SHARED[case]
    cfg = with_file(tmp_path, file_with(case, value), *flags)
    with pytest.raises(ValueError, match="drop one of them") as err:
        apply_user_file(cfg, 1)
    message = str(err.value)
    flag = flag_name(TrainConfig, field)  # the canonical name: --per-device-train-batch-size
    assert message.startswith(flag) and f'contradicts "{path}": {json.dumps(value)} in ' in message
    assert "ds.json" in message


@pytest.mark.parametrize("case", SHARED)
def test_an_explicit_value_wins_over_an_option_left_at_its_default(tmp_path, case, caplog):
    _, value, _, _, field, wanted = SHARED[case]
    cfg = with_file(tmp_path, file_with(case, value))
    default = getattr(cfg, field)
    caplog.set_level(logging.INFO, logger="refdpo.train")
    apply_user_file(cfg, 1)
    assert getattr(cfg, field) == wanted
    if default != wanted:  # the change is logged
        flag = flag_name(TrainConfig, field)
        assert any(f"ds.json sets {flag}" in r.message for r in caplog.records)


@pytest.mark.parametrize("case", SHARED)
@pytest.mark.parametrize("value", ["auto", None], ids=["auto", "absent"])
def test_auto_or_absent_leaves_the_option(tmp_path, case, value):
    *_, flags, field, _ = SHARED[case]
    cfg = with_file(tmp_path, file_with(case, value), *flags)
    wanted = getattr(cfg, field)
    apply_user_file(cfg, 1)
    assert getattr(cfg, field) == wanted


def test_the_same_value_on_both_sides_is_fine(tmp_path):
    content = {"gradient_accumulation_steps": 2, "gradient_clipping": 1, "bf16": {"enabled": True}}
    cfg = with_file(tmp_path, content, "--gradient-accumulation-steps", 2, "--max-grad-norm", 1.0,
                    "--dtype", "bf16")  # fmt: skip
    apply_user_file(cfg, 1)
    assert (cfg.gradient_accumulation_steps, cfg.max_grad_norm, cfg.dtype) == (2, 1.0, "bf16")


def test_a_dtype_still_auto_is_not_a_choice(tmp_path):
    """A dtype of "auto" (follow the shards) is set by an explicit file, given or not."""
    cfg = with_file(tmp_path, {"bf16": {"enabled": True}})
    cfg.dtype = "auto"
    object.__setattr__(cfg, GIVEN, given_fields(cfg) | {"dtype"})
    apply_user_file(cfg, 1)
    assert cfg.dtype == "bf16"
    cfg = with_file(tmp_path, {"bf16": {"enabled": "auto"}})
    cfg.dtype = "auto"
    apply_user_file(cfg, 1)
    assert cfg.dtype == "auto"  # left for later


def test_fp16_is_refused(tmp_path):
    with pytest.raises(ValueError, match="refdpo trains in fp32 or bf16"):
        apply_user_file(with_file(tmp_path, {"fp16": {"enabled": True}}), 1)
    apply_user_file(with_file(tmp_path, {"fp16": {"enabled": False}}), 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"gradient_accumulation_steps": "4"}, "expected int"),
        ({"zero_optimization": {"stage": 5}}, "must be 0, 1, 2 or 3"),
        ({"train_micro_batch_size_per_gpu": 0}, "must be >= 1"),
        ({"zero_force_ds_cpu_optimizer": True}, "refdpo passes its own AdamW"),
    ],
)
def test_unusable_values_name_their_path(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        apply_user_file(with_file(tmp_path, content), 1)


def test_no_file_changes_nothing():
    cfg = parse("--micro-batch-size", 3)
    assert apply_user_file(cfg, 4) == {} and cfg.micro_batch_size == 3


# --- train_batch_size


def test_train_batch_size_gives_the_accumulation_when_nobody_chose_it(tmp_path):
    cfg = with_file(tmp_path, {"train_batch_size": 32}, "--micro-batch-size", 4)
    apply_user_file(cfg, 2)
    assert cfg.gradient_accumulation_steps == 4
    built = deepspeed_config(cfg, 2, WIDTH)
    assert (built["train_batch_size"], built["gradient_accumulation_steps"]) == (32, 4)


def test_train_batch_size_must_be_the_product(tmp_path):
    content = {"train_batch_size": 32, "gradient_accumulation_steps": 2}
    apply_user_file(with_file(tmp_path, content, "--micro-batch-size", 8), 2)  # 8 x 2 x 2
    cfg = with_file(tmp_path, content, "--micro-batch-size", 4)
    with pytest.raises(ValueError, match=r"micro batch 4 x accumulation 2 x 2 ranks = 16"):
        apply_user_file(cfg, 2)
    cfg = with_file(tmp_path, {"train_batch_size": 32}, "--gradient-accumulation-steps", 2)
    with pytest.raises(ValueError, match=r"micro batch 4 x accumulation 2 x 1 ranks = 8"):
        apply_user_file(cfg, 1)
    for total in (10, 0):  # not a multiple of micro x ranks
        cfg = with_file(tmp_path, {"train_batch_size": total}, "--micro-batch-size", 4)
        with pytest.raises(ValueError, match=rf'"train_batch_size": {total} in .*= 4'):
            apply_user_file(cfg, 1)


# --- the optimizer and scheduler sections


def test_optimizer_section_gives_betas_and_eps_and_is_removed(tmp_path):
    content = {"optimizer": {"type": "adam", "params": {"lr": "auto", "betas": [0.9, 0.95],
               "eps": 1e-6, "weight_decay": "auto", "adam_w_mode": True}}}  # fmt: skip
    cfg = with_file(tmp_path, content)
    assert apply_user_file(cfg, 1) == {"betas": (0.9, 0.95), "eps": 1e-6}
    assert "optimizer" not in deepspeed_config(cfg, 1, WIDTH)
    cfg = with_file(tmp_path, {"optimizer": {"type": "AdamW", "params": {"betas": "auto"}}})
    assert apply_user_file(cfg, 1) == {}


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        ({"type": "SGD", "params": {"lr": "auto"}}, "refdpo always trains with AdamW"),
        ({"type": "AdamW", "params": {"amsgrad": True}}, r"\['amsgrad'\]"),
        ({"type": "AdamW", "params": {"betas": 0.9}}, "expected"),
    ],
)
def test_optimizers_refdpo_cannot_run_are_refused(tmp_path, optimizer, message):
    with pytest.raises(ValueError, match=message):
        apply_user_file(with_file(tmp_path, {"optimizer": optimizer}), 1)


def test_an_all_auto_scheduler_is_dropped_and_an_explicit_one_refused(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="refdpo.train")
    auto = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_num_steps": "auto"}}
    cfg = with_file(tmp_path, {"scheduler": auto})
    apply_user_file(cfg, 1)
    assert any("--lr-scheduler-type" in r.message for r in caplog.records)
    assert "scheduler" not in deepspeed_config(cfg, 1, WIDTH)
    apply_user_file(with_file(tmp_path, {"scheduler": {"type": "WarmupLR"}}), 1)
    explicit = {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": "auto"}}
    with pytest.raises(
        ValueError, match=r"\['warmup_num_steps'\].*--lr-scheduler-type and --warmup-ratio"
    ):
        apply_user_file(with_file(tmp_path, {"scheduler": explicit}), 1)


# --- what DeepSpeed gets


def test_auto_is_filled_by_path_not_by_key(tmp_path):
    """fp16.enabled and bf16.enabled are both "enabled": only bf16 follows --dtype bf16."""
    content = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
    cfg = with_file(tmp_path, content, "--dtype", "bf16")
    apply_user_file(cfg, 1)
    built = deepspeed_config(cfg, 1, WIDTH)
    assert built["fp16"]["enabled"] is False and built["bf16"]["enabled"] is True


def test_an_auto_refdpo_cannot_fill_names_its_path(tmp_path):
    content = {"flops_profiler": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    cfg = with_file(tmp_path, content)
    apply_user_file(cfg, 1)
    with pytest.raises(ValueError, match=r"\['flops_profiler.enabled'\]"):
        deepspeed_config(cfg, 1, WIDTH)
    cfg = with_file(tmp_path, {"zero_optimization": {"reduce_bucket_size": "auto"}})
    with pytest.raises(ValueError, match=r"\['zero_optimization.reduce_bucket_size'\]"):
        deepspeed_config(cfg, 1, None)  # no model config: no hidden size


def test_buckets_are_sized_by_the_model(monkeypatch):
    width = types.SimpleNamespace(hidden_size=576)
    zero2 = deepspeed_config(parse("--zero-stage", 2), 1, width)["zero_optimization"]
    assert zero2["reduce_bucket_size"] == 576**2 and zero2["overlap_comm"] is False
    zero3 = deepspeed_config(parse("--zero-stage", 3), 2, width)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == 576**2
    assert zero3["stage3_prefetch_bucket_size"] == int(0.9 * 576**2)
    assert zero3["stage3_param_persistence_threshold"] == 5760
    assert zero3["overlap_comm"] is False  # CPU: nothing to overlap
    nested = types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_sizes=[8, 16]))
    nested_zero2 = deepspeed_config(parse("--zero-stage", 2), 1, nested)["zero_optimization"]
    assert nested_zero2["reduce_bucket_size"] == 256
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert deepspeed_config(parse(), 2, width)["zero_optimization"]["overlap_comm"] is True
    one_rank = deepspeed_config(parse("--zero-stage", 2), 1, width)["zero_optimization"]
    assert one_rank["overlap_comm"] is False


@pytest.mark.parametrize("flags", [[], ["--zero-stage", 0], ["--zero-stage", 1],
                                   ["--zero-stage", 3], ["--zero-stage", 3, "--offload"]])  # fmt: skip
def test_every_built_in_file_is_complete(flags):
    cfg = parse(*flags, "--gradient-accumulation-steps", 2, "--micro-batch-size", 3)
    built = deepspeed_config(cfg, 2, WIDTH)
    assert built["zero_optimization"]["stage"] == cfg.zero_stage
    assert (built["train_batch_size"], built["gradient_clipping"]) == (12, 1.0)
    assert built["bf16"]["enabled"] is False
    assert sorted(CONFIG_DIR.glob("*.json"))  # the folder engine.py re-exports


def test_settings_the_file_leaves_out_come_from_the_options(tmp_path):
    """DeepSpeed's own defaults (ZeRO-0, no clipping) would disagree with refdpo's."""
    cfg = with_file(tmp_path, {"steps_per_print": 10}, "--zero-stage", 3, "--offload")
    apply_user_file(cfg, 1)
    built = deepspeed_config(cfg, 1, WIDTH)
    assert built["zero_optimization"]["stage"] == 3 and built["gradient_clipping"] == 1.0
    assert built["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert built["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert built["zero_force_ds_cpu_optimizer"] is False
    assert (built["train_micro_batch_size_per_gpu"], built["gradient_accumulation_steps"]) == (4, 1)


def test_a_file_not_settled_first_is_refused(tmp_path):
    cfg = with_file(tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="disagrees with --zero-stage 2"):
        deepspeed_config(cfg, 2, WIDTH)  # 2 ranks: the default stage is 2


def test_the_older_bfloat16_section_counts_as_bf16(tmp_path):
    cfg = with_file(tmp_path, {"bfloat16": {"enabled": True}})
    apply_user_file(cfg, 1)
    assert cfg.dtype == "bf16" and deepspeed_config(cfg, 1, WIDTH)["bf16"]["enabled"] is True


# --- end to end: `refdpo train` with a user file


def write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_a_contradiction_stops_before_training(shards, tiny_model_dir, tmp_path):
    ds = write_json(tmp_path / "ds.json", {"gradient_accumulation_steps": 4})
    output = tmp_path / "out"
    args = train_args(shards, tiny_model_dir, output, "--max-steps", 1,
                      "--deepspeed-config", ds, "--gradient-accumulation-steps", 2)  # fmt: skip
    result = run_train(args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--gradient-accumulation-steps 2 contradicts" in result.stderr
    assert '"gradient_accumulation_steps": 4' in result.stderr
    assert not (output / "metrics.jsonl").exists()


def test_the_files_accumulation_is_used(shards, tiny_model_dir, tmp_path):
    ds = write_json(tmp_path / "ds.json", {"gradient_accumulation_steps": 4})
    args = train_args(shards, tiny_model_dir, tmp_path / "out", "--max-steps", 2,
                      "--deepspeed-config", ds, "--export", "none")  # fmt: skip
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 16 (4 x 4 accumulation x 1 ranks)" in result.stderr
    logged = metrics(tmp_path / "out")
    assert logged[1]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert logged[2]["loss"] != pytest.approx(LN2, abs=1e-4)
    assert all(math.isfinite(logged[s]["grad_norm"]) for s in (1, 2))


def check_export(folder: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    original = load_file(tiny_model_dir / "model.safetensors")
    assert {k: t.shape for k, t in exported.items()} == {k: t.shape for k, t in original.items()}
    assert any(not torch.equal(original[k].to(t.dtype), t) for k, t in exported.items())


def test_the_files_zero3_is_the_stage_everywhere(shards, tiny_model_dir, tmp_path):
    """The file's stage reaches checkpointing and export, not only the engine."""
    ds = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 3}})
    args = train_args(shards, tiny_model_dir, tmp_path, "--max-steps", 2, "--deepspeed-config", ds)
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(tmp_path)[1]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert json.loads((tmp_path / "train_config.json").read_text())["zero_stage"] == 3
    check_export(tmp_path / "final", tiny_model_dir)


# the zero3 example of https://huggingface.co/docs/transformers/deepspeed (ZeRO-3 with CPU
# offload), as users bring it to a Hugging Face Trainer
HF_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto",
                                                 "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}  # fmt: skip


def test_a_hugging_face_zero3_file_trains_in_bf16(shards, tiny_model_dir, tmp_path):
    ds = write_json(tmp_path / "ds.json", HF_ZERO3)
    args = train_args(shards, tiny_model_dir, tmp_path, "--max-steps", 2,
                      "--deepspeed-config", ds, "--dtype", "bf16")  # fmt: skip
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(tmp_path)[1]["loss"] == pytest.approx(LN2, abs=1e-2)
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert (saved["zero_stage"], saved["offload"], saved["dtype"]) == (3, True, "bf16")
    check_export(tmp_path / "final", tiny_model_dir)


@pytest.mark.parametrize(
    ("flags", "world", "stage"),
    [([], 1, 0), ([], 2, 2), (["--offload"], 4, 3), (["--zero-stage", 1], 1, 1)],
)
def test_the_default_stage_depends_on_the_ranks(flags, world, stage):
    """No --zero-stage and no file: ZeRO-0 on one rank (nothing to partition), 2 on several."""
    cfg = parse(*flags)
    cfg.resolve_zero_stage(world)
    assert cfg.zero_stage == stage
    assert deepspeed_config(cfg, world, WIDTH)["zero_optimization"]["stage"] == stage


def test_the_files_stage_wins_over_the_default(tmp_path):
    cfg = with_file(tmp_path, {"zero_optimization": {"stage": 1}})
    apply_user_file(cfg, 1)
    cfg.resolve_zero_stage(1)
    assert cfg.zero_stage == 1
