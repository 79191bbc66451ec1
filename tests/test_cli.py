"""The command line and YAML configs: TRL's and transformers' option names, refdpo's aliases,
dash and underscore spellings, launch lines of TRL's docs and alignment-handbook recipes
translated to `refdpo train`, typed YAML values, YAML-relative paths, and the errors (one
sentence each, before any model loads)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import subprocess
import sys

import pytest

from refdpo.precompute.config import PrecomputeConfig
from refdpo.shared import cli
from refdpo.shared.config import _help_text, config_notes, given_fields, load_config, to_dict
from refdpo.shared.options import names_of
from refdpo.shared.shards import MANIFEST
from refdpo.train.config import FOREIGN, OFFLINE, TrainConfig
from refdpo.train.engine import lr_lambda
from tests.conftest import REPO, SHARED_DATA

TRAIN = ["--shards", "s", "--model", "m", "--output", "o"]
PRECOMPUTE = ["--model", "m", "--dataset", "d.jsonl", "--output", "o"]


def train(*flags, required=TRAIN) -> TrainConfig:
    return load_config(TrainConfig, [*required, *map(str, flags)], "refdpo train", "")


def precompute(*flags, required=PRECOMPUTE) -> PrecomputeConfig:
    argv = [*required, *map(str, flags)]
    return load_config(PrecomputeConfig, argv, "refdpo precompute", "")


def without(required: list[str], field: str) -> list[str]:
    """The required flags but the field's own (the test gives it under another name)."""
    flag = "--" + field.replace("_", "-")
    return [a for i, a in enumerate(required) if flag not in (a, required[i - 1] if i else "")]


def refused(capsys, parse, *flags) -> str:
    """The one-line error of a command line refused before anything loads."""
    with pytest.raises(SystemExit) as exit_:
        parse(*flags)
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "usage:" not in message, message
    return message


# --- names: every spelling of an option is the same option

# a value other than the default for every option that has more than one name
TRAIN_VALUES = {
    "model": "m2", "output": "o2", "eval_strategy": "no", "loss": "ipo", "lora": "true",
    "dtype": "bf16", "deepspeed_config": "ds.json", "micro_batch_size": 3,
    "eval_micro_batch_size": 5, "lr_scheduler": "linear", "epochs": 2, "resume": "auto",
    "packing": "false", "dist_timeout": 60, "freeze_vision_tower": "false",
    "freeze_multi_modal_projector": "false",
}  # fmt: skip
PRECOMPUTE_VALUES = {"model": "m2", "dataset": "d2.jsonl", "output": "o2", "split": "test", "batch_size": 3,
                     "packing": "false", "dist_timeout": 60,
                     "dtype": "bf16"}  # fmt: skip


@pytest.mark.parametrize(
    "cls, values, parse, required",
    [(TrainConfig, TRAIN_VALUES, train, TRAIN),
     (PrecomputeConfig, PRECOMPUTE_VALUES, precompute, PRECOMPUTE)],
    ids=["train", "precompute"],
)  # fmt: skip
def test_every_name_and_spelling_of_an_option_gives_the_same_config(cls, values, parse, required):
    aliased = {f.name for f in dataclasses.fields(cls) if len(names_of(f)) > 1}
    assert set(values) == aliased  # every aliased option is covered
    for field, value in values.items():
        rest = without(required, field)
        wanted = to_dict(parse("--" + field.replace("_", "-"), value, required=rest))
        for name in names_of(next(f for f in dataclasses.fields(cls) if f.name == field)):
            for spelled in ("--" + name.replace("_", "-"), "--" + name, f"--{name}={value}"):
                extra = [spelled] if "=" in spelled else [spelled, value]
                cfg = parse(*extra, required=rest)
                assert to_dict(cfg) == wanted, (field, spelled)
                assert field in given_fields(cfg)  # the DeepSpeed-file rules see the field


def test_help_shows_each_option_once_under_its_canonical_name():
    for cls, prog in ((TrainConfig, "train"), (PrecomputeConfig, "precompute")):
        result = subprocess.run(
            [sys.executable, "-m", f"refdpo.{prog}.run", "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0
        shown = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  -")]
        assert len(shown) == len(set(shown))
        for f in dataclasses.fields(cls):
            canonical, *others = names_of(f)
            assert "--" + canonical.replace("_", "-") in shown
            assert not {"--" + o.replace("_", "-") for o in others} & set(shown)
            text = _help_text(f)
            assert text.count("(default:") + text.count("(required)") <= 1, text


# --- TRL's docs and alignment-handbook's recipes, translated to `refdpo train`

# trl/scripts/dpo.py (TRL 1.16), its LoRA line; gradient checkpointing from the DPO docs
TRL_LINE = (
    "--dataset_name trl-lib/ultrafeedback_binarized --model_name_or_path MODEL "
    "--learning_rate 5.0e-7 --num_train_epochs 1 --per_device_train_batch_size 2 "
    "--max_steps 1000 --gradient_accumulation_steps 8 --gradient_checkpointing "
    "--eval_strategy steps --eval_steps 50 --output_dir Qwen2-0.5B-DPO "
    "--no_remove_unused_columns --use_peft --lora_r 32 --lora_alpha 16"
)
# refdpo field -> (which of TRL's three argument classes, its attribute)
SAME_MEANING = {
    "learning_rate": (1, "learning_rate"), "epochs": (1, "num_train_epochs"),
    "micro_batch_size": (1, "per_device_train_batch_size"), "max_steps": (1, "max_steps"),
    "gradient_accumulation_steps": (1, "gradient_accumulation_steps"),
    "gradient_checkpointing": (1, "gradient_checkpointing"), "eval_steps": (1, "eval_steps"),
    "eval_strategy": (1, "eval_strategy"), "output": (1, "output_dir"), "lora": (2, "use_peft"),
    "lora_r": (2, "lora_r"), "lora_alpha": (2, "lora_alpha"), "model": (2, "model_name_or_path"),
}  # fmt: skip


def test_trl_docs_launch_line_means_what_it_means_in_trl(tmp_path):
    """The same line parsed by TRL's own parser and by refdpo's: every option it gives has
    the same value in both (TRL's --use_cpu only keeps its bf16 default off a GPU)."""
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    argv = TRL_LINE.replace("MODEL", str(tmp_path)).split()
    theirs = TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(
        [*argv, "--use_cpu"]
    )
    ours = train("--shards", "s", *argv, required=[])
    for field, (which, attr) in SAME_MEANING.items():
        value = getattr(theirs[which], attr)
        value = getattr(value, "value", value)  # transformers' enums
        assert getattr(ours, field) == value, field
    assert ours.loss == "sigmoid" and theirs[1].loss_type == ["sigmoid"]
    assert config_notes(ours) == ("--dataset-name is ignored: " + FOREIGN["dataset_name"].reason,)


ZEPHYR_DPO = """\
# alignment-handbook recipes/zephyr-7b-beta/dpo/config_full.yaml, plus report_to
model_name_or_path: alignment-handbook/zephyr-7b-sft-full
torch_dtype: null
dataset_mixture:
  datasets:
    - id: HuggingFaceH4/ultrafeedback_binarized
      config: default
      split: train_prefs
      columns: [chosen, rejected]
      weight: 1.0
  test_split_size: 2000
  seed: 0
dataset_num_proc: 12
bf16: true
beta: 0.01
do_eval: true
eval_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: False
hub_model_id: zephyr-7b-dpo-full
learning_rate: 5.0e-7
log_level: info
logging_steps: 10
lr_scheduler_type: cosine
max_length: 1024
max_prompt_length: 512
num_train_epochs: 1
optim: adamw_torch
output_dir: data/zephyr-7b-dpo-full
per_device_train_batch_size: 8
per_device_eval_batch_size: 8
push_to_hub: true
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
report_to: none
"""


def test_alignment_handbook_recipe_parses_and_means_what_it_means_there(tmp_path):
    recipe = tmp_path / "recipes" / "config_full.yaml"
    recipe.parent.mkdir()
    recipe.write_text(ZEPHYR_DPO)
    cfg = train("--config", recipe, "--shards", "s", "--model", "m", required=[])
    assert (cfg.dtype, cfg.beta, cfg.eval_strategy, cfg.eval_steps) == ("bf16", 0.01, "steps", 100)
    assert (cfg.gradient_accumulation_steps, cfg.gradient_checkpointing) == (2, True)
    assert (cfg.learning_rate, cfg.logging_steps, cfg.lr_scheduler) == (5e-7, 10, "cosine")
    assert (cfg.max_length, cfg.max_prompt_length, cfg.epochs) == (1024, 512, 1.0)
    assert cfg.output == str(tmp_path / "recipes" / "data" / "zephyr-7b-dpo-full")
    assert (cfg.micro_batch_size, cfg.eval_micro_batch_size) == (8, 8)
    assert (cfg.save_steps, cfg.save_total_limit, cfg.seed, cfg.warmup_ratio) == (100, 1, 42, 0.1)
    assert (cfg.report_to, cfg.model) == ("none", "m")  # --model wins over model_name_or_path
    ignored = sorted(note.split(": ")[1].split()[0] for note in config_notes(cfg))
    assert ignored == ["dataset_mixture", "hub_model_id", "push_to_hub"]


def test_recipe_options_refdpo_cannot_honour_are_refused_by_name(tmp_path, capsys):
    for line, name in [("load_in_4bit: true", "load_in_4bit"),
                       ("optim: paged_adamw_32bit", "optim"),
                       ("precompute_ref_log_probs: true", "precompute_ref_log_probs")]:  # fmt: skip
        (tmp_path / "c.yaml").write_text(f"beta: 0.1\n{line}\n")
        message = refused(capsys, train, "--config", tmp_path / "c.yaml")
        assert f"c.yaml, line 2: {name}: " in message


@pytest.mark.parametrize("name", sorted(n for n, r in FOREIGN.items() if r.reason == OFFLINE))
def test_reference_model_options_are_one_sentence_saying_why(name, capsys):
    message = refused(capsys, train, "--" + name.replace("_", "-"), "true")
    assert "stage one's shards" in message


def test_trl_loss_forms_become_refdpo_specs(tmp_path):
    spec = train("--loss", "sigmoid:1,sft:0.2").loss
    assert train("--loss-type", "sigmoid", "sft", "--loss-weights", 1, 0.2).loss == spec
    assert train("--loss_type", "sigmoid,sft", "--loss_weights", "1,0.2").loss == spec
    (tmp_path / "c.yaml").write_text("loss_type: [sigmoid, sft]\nloss_weights: [1, 0.2]\n")
    assert train("--config", tmp_path / "c.yaml").loss == spec
    assert train("--rpo-alpha", 0.2).loss == "sigmoid,sft:0.2"
    assert train("--loss-type", "sigmoid", "--ld-alpha", 0.5).loss == "ld_dpo"
    assert train("--ld-alpha", 1.0).loss == "sigmoid"  # TRL: 1.0 weighs nothing
    assert train("--loss-type", "sigmoid_norm").loss == "sigmoid_avg"


def test_values_translated_from_transformers(caplog):
    assert (train("--bf16").dtype, train("--bf16", "false").dtype) == ("bf16", "fp32")
    assert train("--no-bf16").dtype == "fp32" and train("--torch-dtype", "bfloat16").dtype == "bf16"
    assert train("--resume-from-checkpoint", "true").resume == "auto"
    assert train("--resume-from-checkpoint", "ck").resume == "ck"
    assert train("--max-steps", -1).max_steps is None and train("--use-cpu").device == "cpu"
    assert train("--do-eval", "false").eval_strategy == "no"
    assert lr_lambda(0, 10, 0, "constant") == 1.0 and lr_lambda(0, 10, 2, "constant") == 1.0
    assert lr_lambda(0, 10, 2, "constant_with_warmup") == 0.5
    assert train("--warmup-steps", 3).warmup_for(100) == 3
    assert train("--warmup-steps", 0.2).warmup_for(100) == 20
    assert train("--warmup-ratio", 0.1).warmup_for(100) == 10
    with caplog.at_level(logging.WARNING, logger="refdpo.train"):
        assert train("--lr-scheduler-type", "constant").warmup_for(100) == 0
    assert "constant_with_warmup" in caplog.text


def test_bad_values_are_one_sentence_naming_the_option(capsys):
    cases = [
        (["--per-device-train-batch-size", "2.5"], "--per-device-train-batch-size: expected an integer"),
        (["--lr-scheduler-type", "polynomial"], "'polynomial' is not one of cosine"),
        (["--report-to", "comet_ml"], "--report-to comet_ml is not supported yet"),
        (["--loss-type", "sigmoid", "sft", "--loss-weights", "1"], "1 weights for 2 losses"),
        (["--loss", "ipo", "--loss-type", "hinge"], "set loss differently"),
        (["--bf16", "--dtype", "fp32"], "set dtype differently"),
        (["--optim", "adafactor"], "--optim: refdpo trains with torch's AdamW"),
        (["stray"], "unexpected argument 'stray'"),
    ]  # fmt: skip
    for flags, message in cases:
        assert message in refused(capsys, train, *flags), flags


def test_unknown_options_name_the_closest_known_one(capsys):
    assert "unknown option --lr; did you mean --learning-rate" in refused(capsys, train, "--lr", 1)
    # no abbreviations: --lr-sched is not --lr-scheduler-type
    message = refused(capsys, train, "--lr-sched", "cosine")
    assert "did you mean --lr-scheduler-type?" in message
    assert "did you mean --beta?" in refused(capsys, train, "--betta", 0.1)
    assert "did you mean --max-prompt-length" in refused(capsys, precompute, "--max-promt-length")


def test_refdpo_command_line(capsys):
    assert cli.main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bogus'" in err and "precompute, train" in err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"refdpo {importlib.metadata.version('refdpo')}"


# --- stage one's names and length limits


def test_precompute_takes_trl_names():
    cfg = precompute("--per-device-batch-size", 3, "--torch_dtype", "bfloat16")
    assert (cfg.batch_size, cfg.dtype) == (3, "bf16")
    assert precompute("--precompute-ref-batch-size", 5).batch_size == 5
    assert precompute("--bf16", "false").dtype == "fp32"


def test_max_length_alone_sets_the_prompt_limit_as_trl_does():
    """TRL 1.x has only max_length: it keeps any prompt shorter than that, and drops a row
    whose prompt fills it. Without either limit refdpo's defaults stay."""
    assert precompute().truncation.max_prompt_length == 512
    assert precompute().truncation.max_length == 1024
    assert precompute("--max-length", 256).truncation.max_prompt_length == 255
    assert precompute("--max-length", 256, "--max-prompt-length", 64).max_prompt_length == 64
    assert precompute("--max-prompt-length", 64).max_length == 1024


# --- YAML as users write it


def test_yaml_values_are_converted_to_the_option_type(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "learning_rate: 5e-6\nweight_decay: 1e-2\nper-device-train-batch-size: '2'\n"
        "gradient_checkpointing: 'yes'\nlora_target_modules: [q_proj, v_proj]\nmax_steps: 1e3\n"
        "eval_shards: null\nseed: 2.0\n"
    )
    cfg = train("--config", tmp_path / "c.yaml")
    assert (cfg.learning_rate, cfg.weight_decay, cfg.micro_batch_size) == (5e-6, 0.01, 2)
    assert (cfg.gradient_checkpointing, cfg.lora_target_modules) == (True, "q_proj,v_proj")
    assert (cfg.max_steps, cfg.eval_shards, cfg.seed) == (1000, None, 2)
    assert train("--config", tmp_path / "c.yaml", "--learning-rate", 1e-4).learning_rate == 1e-4


def test_yaml_errors_are_one_sentence_with_the_line(tmp_path, capsys):
    cases = {
        "micro_batch_size: 2.5\n": "c.yaml, line 1: micro_batch_size: expected an integer, got 2.5",
        "beta: 0.1\nweight_decay: -1e-2\n": "weight_decay and max_grad_norm must be >= 0",
        "beta: 0.1\n  bad: [\n": "c.yaml, line 2: not valid YAML",
        "beta: [0.1\n": "c.yaml, line 2: not valid YAML",
        "- beta\n": "c.yaml: expected a mapping of option: value",
        "beta: 0.1\nlr: 1\n": "c.yaml, line 2: unknown option lr; did you mean learning_rate",
        "bf16: true\ndtype: fp32\n": "c.yaml, line 1: bf16 and dtype (line 2) set dtype differently",
    }  # fmt: skip
    for text, message in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        assert message in refused(capsys, train, "--config", tmp_path / "c.yaml"), text
    missing = refused(capsys, train, "--config", tmp_path / "nope.yaml")
    assert "--config " in missing and "nope.yaml: no such file" in missing


def test_paths_in_yaml_are_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "org" / "local").mkdir(parents=True)
    (folder / "c.yaml").write_text(
        "shards: ../shards\nmodel: org/local\noutput: runs/one\ndeepspeed: ds.json\n"
        "resume_from_checkpoint: true\neval_shards: auto\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = train("--config", folder / "c.yaml", required=[])
    assert cfg.shards == str(tmp_path / "shards") and cfg.model == str(folder / "org" / "local")
    assert cfg.output == str(folder / "runs" / "one")
    assert cfg.deepspeed_config == str(folder / "ds.json")
    assert (cfg.resume, cfg.eval_shards) == ("auto", "auto")
    # flags are relative to the working directory, as always
    assert train("--config", folder / "c.yaml", "--output", "here", required=[]).output == "here"
    # a hub name stays one unless that folder exists beside the file
    (folder / "p.yaml").write_text("dataset: org/name\neval_dataset: org/local\n")
    cfg = load_config(
        PrecomputeConfig, ["--config", str(folder / "p.yaml"), "--model", "m", "--output", "o"],
        "refdpo precompute", "",
    )  # fmt: skip
    assert (cfg.dataset, cfg.eval_dataset) == ("org/name", str(folder / "org" / "local"))


def test_the_shipped_job_config_finds_the_shared_data_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        PrecomputeConfig,
        ["--config", str(REPO / "jobs" / "instruction-data.yaml"), "--model", "m", "--output", "o"],
        "refdpo precompute", "",
    )  # fmt: skip
    assert cfg.dataset == str(SHARED_DATA)


# --- eval as TRL users expect


def resolved(shards, *flags) -> TrainConfig:
    cfg = train("--shards", shards, *flags, required=["--model", "m", "--output", "o"])
    cfg.resolve_eval()
    return cfg


def test_eval_shards_default_to_the_folder_beside_the_shards(tmp_path, caplog):
    shards = tmp_path / "shards"
    (tmp_path / "shards-eval").mkdir()
    assert resolved(shards).eval_shards is None  # no manifest: not an eval folder
    (tmp_path / "shards-eval" / MANIFEST).write_text("{}")
    with caplog.at_level(logging.INFO, logger="refdpo.train"):
        assert resolved(shards).eval_shards == str(tmp_path / "shards-eval")
    assert "evaluating on" in caplog.text  # logged
    assert resolved(shards, "--eval-strategy", "no").eval_shards is None
    cfg = resolved(shards, "--eval-strategy", "steps", "--logging-steps", 7)
    assert cfg.eval_steps == 7 and cfg.eval_due(14, 100) and not cfg.eval_due(15, 100)
    cfg = resolved(shards, "--eval-strategy", "epoch")
    assert cfg.eval_due(30, 10) and not cfg.eval_due(31, 10)


@pytest.mark.parametrize("flags", [["--eval-strategy", "steps"], ["--eval-steps", "5"]])
def test_asking_for_eval_without_eval_shards_is_one_sentence(tmp_path, flags):
    with pytest.raises(ValueError, match="needs eval shards: give --eval-shards DIR"):
        resolved(tmp_path / "shards", *flags)


def test_eval_error_comes_before_any_model_loads(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "refdpo.train.run", "--shards", str(tmp_path / "s"),
         "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"),
         "--eval-strategy", "steps"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "--eval-strategy steps needs eval shards" in result.stderr
    assert "no-model" not in result.stderr  # the model folder was never looked at


def test_stage_one_limits_given_to_stage_two_must_match_the_shards():
    manifest = {"provenance": {"truncation": {"max_length": 1024, "max_prompt_length": 512}}}
    train("--max-length", 1024, "--max-prompt-length", 512).check_truncation(manifest)
    with pytest.raises(ValueError, match="stage one cut the pairs in s at max_length=1024"):
        train("--max-length", 2048).check_truncation(manifest)
