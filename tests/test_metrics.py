"""--report-to: each tracker holds what MetricsLog wrote (names, steps, values), read back
from what the tracker stored on disk; W&B offline and MLflow on a SQLite file, no network.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from refdpo.shared.config import load_config
from refdpo.train.config import TRACKERS, TrainConfig
from refdpo.train.metrics import MetricsLog, check_reporters, mlflow_uri

# values a float32 holds exactly, so that TensorBoard's copy compares with ==
TRAIN = {
    1: {"loss": 0.6875, "rewards/accuracies": 0.5, "loss/sigmoid": 0.6875, "grad_norm": 1.25},
    2: {"loss": 0.625, "rewards/accuracies": 0.75, "loss/sigmoid": 0.625, "grad_norm": 0.5},
}
EVAL = {2: {"loss": 0.65625, "rewards/accuracies": 0.625}}
CONFIG = {"beta": 0.1, "loss": "sigmoid", "run_name": "run-a", "eval_steps": None}


def expected() -> dict[tuple[str, int], float]:
    return {
        (f"{split}/{name}", step): value
        for split, records in (("train", TRAIN), ("eval", EVAL))
        for step, metrics in records.items()
        for name, value in metrics.items()
    }


@pytest.fixture
def output(tmp_path, monkeypatch) -> Path:
    """An output folder; W&B offline and quiet with its caches in tmp_path, MLflow on its
    default store (OUTPUT/mlflow.db), and a working directory that must stay empty."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    folder = tmp_path / "out"
    folder.mkdir()
    yield folder
    assert not list((tmp_path / "cwd").iterdir()), "a tracker wrote to the working directory"


def write_run(output: Path, report_to: str) -> None:
    log = MetricsLog(output, 2, 0, True, report_to, "run-a", CONFIG)
    try:
        for step in (1, 2):
            log.advance()
            log.write("train", step, TRAIN[step])
            if step in EVAL:
                log.write("eval", step, EVAL[step])
    finally:
        log.close()


# --- reading back what each tracker stored


def tensorboard_scalars(output: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard" / "run-a"))
    events.Reload()
    return {
        (tag, event.step): event.value
        for tag in events.Tags()["scalars"]
        for event in events.Scalars(tag)
    }


def wandb_records(output: Path) -> list:
    """The records of the one offline run under OUTPUT/wandb. The `.wandb` file is the log
    `wandb sync` uploads, and an offline run's only full copy (no summary or history files
    are written offline): LevelDB's log format (32 KiB blocks of chunks with a 7-byte
    header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after W&B's own 7-byte
    header, each record a protobuf `Record`. Both formats have stayed the same across
    versions; only the proto gains fields."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (output / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(output: Path, wait_s: float = 60) -> dict:
    """What the offline run's log holds. W&B's service process writes it: under load the
    exit record can land a moment after finish() returned, so wait for it a while."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        found = _wandb_read(output)
        if "exit_code" in found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _wandb_read(output: Path) -> dict:
    scalars, found = {}, {}
    for record in wandb_records(output):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                if not name.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    scalars[name, record.history.step.num] = json.loads(item.value_json)
        elif kind == "run":
            found["project"], found["name"] = record.run.project, record.run.display_name
            found["config"] = {
                u.key: json.loads(u.value_json)
                for u in record.run.config.update
                if not u.key.startswith("_")
            }
        elif kind == "exit":
            found["exit_code"] = record.exit.exit_code
    return {**found, "scalars": scalars}


def mlflow_run(output: Path, experiment: str = "refdpo") -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri(output))
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    scalars = {
        (name, metric.step): metric.value
        for name in run.data.metrics
        for metric in client.get_metric_history(run.info.run_id, name)
    }
    return {
        "name": run.info.run_name,
        "status": run.info.status,
        "params": run.data.params,
        "scalars": scalars,
    }


def jsonl(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# --- the trackers hold what was written


def test_tensorboard_and_wandb_at_once(output, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    write_run(output, "tensorboard,wandb")
    assert tensorboard_scalars(output) == expected()
    run = wandb_run(output)
    assert run["scalars"] == expected()
    assert (run["project"], run["name"], run["exit_code"]) == ("from-env", "run-a", 0)
    assert run["config"] == CONFIG
    assert len(jsonl(output)) == 3


def test_mlflow_in_the_output_folder(output):
    write_run(output, "mlflow")
    assert (output / "mlflow.db").exists()
    run = mlflow_run(output)
    assert run["scalars"] == expected()  # names keep their slashes: MLflow allows them
    assert (run["name"], run["status"]) == ("run-a", "FINISHED")
    assert run["params"] == {"beta": "0.1", "loss": "sigmoid", "run_name": "run-a", "eval_steps": "None"}  # fmt: skip
    assert not (output / "tensorboard").exists() and not (output / "wandb").exists()


def test_mlflow_experiment_and_store_from_the_environment(output, tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exp-x")
    write_run(output, "mlflow")
    assert not (output / "mlflow.db").exists()
    assert mlflow_run(output, "exp-x")["scalars"] == expected()  # mlflow_uri reads the env too


def test_an_error_on_the_way_out_marks_the_runs_failed(output):
    log = MetricsLog(output, 2, 0, True, "wandb,mlflow", "run-a", CONFIG)
    log.write("train", 1, TRAIN[1])
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("step 2 failed")
        finally:
            log.close()
    assert mlflow_run(output)["status"] == "FAILED"
    run = wandb_run(output)
    assert run["exit_code"] == 1 and run["project"] == "refdpo"
    assert run["scalars"] == {(f"train/{k}", 1): v for k, v in TRAIN[1].items()}


def test_a_tracker_that_cannot_start_ends_the_ones_before_it(output, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://tracking")
    with pytest.raises(Exception, match="nosuchscheme"):
        MetricsLog(output, 2, 0, True, "wandb,mlflow", "run-a", CONFIG)
    assert wandb_run(output)["exit_code"] == 1


def test_none_writes_metrics_jsonl_only(output):
    write_run(output, "none")
    assert sorted(p.name for p in output.iterdir()) == ["metrics.jsonl"]
    assert [(r["split"], r["step"], r["loss"]) for r in jsonl(output)] == [
        ("train", 1, 0.6875),
        ("train", 2, 0.625),
        ("eval", 2, 0.65625),
    ]


def test_a_disabled_log_starts_no_tracker(output):
    MetricsLog(output, 2, 0, False, "tensorboard,wandb,mlflow", "run-a", CONFIG).close()
    assert not list(output.iterdir())


# --- which trackers a value stands for, and the sentences


def test_auto_and_all_take_what_is_installed(monkeypatch):
    assert check_reporters("auto") == ["tensorboard"]
    assert check_reporters("all") == list(TRACKERS)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert check_reporters("all") == ["tensorboard", "mlflow"]
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    assert check_reporters("auto") == []
    assert check_reporters("none") == []


def test_auto_without_tensorboard_writes_metrics_jsonl_only(output, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    write_run(output, "auto")
    assert sorted(p.name for p in output.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("tracker", TRACKERS)
def test_a_missing_package_is_one_sentence(tracker, monkeypatch):
    blocked = ("tensorboard", "torch.utils.tensorboard") if tracker == "tensorboard" else (tracker,)
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError) as refused:
        check_reporters(tracker)
    assert str(refused.value) == (
        f"--report-to {tracker}: the {tracker} package is not installed (pip install {tracker})"
    )
    with pytest.raises(ValueError, match=f"--report-to {tracker}: the {tracker} package"):
        check_reporters(",".join(TRACKERS))


def test_mlflow_skinny_needs_sqlalchemy_only_for_a_database_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ValueError, match=r"mlflow: the database store \(OUTPUT/mlflow.db\) needs"):
        check_reporters("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert check_reporters("mlflow") == ["mlflow"]


REQUIRED = ["--shards", "s", "--model", "m", "--output", "o"]


def parsed(*flags: str, yaml_file: Path | None = None) -> str:
    config = [] if yaml_file is None else ["--config", str(yaml_file)]
    return load_config(TrainConfig, [*config, *REQUIRED, *flags], "refdpo train", "").report_to


def test_report_to_spellings(tmp_path):
    assert parsed() == "auto"
    assert parsed("--report-to", "tensorboard,wandb") == "tensorboard,wandb"
    assert parsed("--report-to", "wandb", "mlflow") == "wandb,mlflow"  # transformers' nargs
    assert parsed("--report_to", " MLflow , wandb,mlflow") == "mlflow,wandb"
    assert parsed("--report-to", "all") == "all"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("report_to:\n  - tensorboard\n  - mlflow\n")
    assert parsed(yaml_file=yaml_file) == "tensorboard,mlflow"
    yaml_file.write_text("report_to: none\n")
    assert parsed(yaml_file=yaml_file) == "none"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorbord", "--report-to tensorbord: unknown name; give tensorboard, wandb, mlflow"),
        ("wandb,", None),  # a trailing comma is nothing
        ("comet_ml,wandb", "--report-to comet_ml is not supported yet; give tensorboard"),
        ("all,wandb", "--report-to all,wandb: all goes alone"),
        ("wandb,none", "--report-to wandb,none: none goes alone"),
        (",", "--report-to '': unknown name"),
    ],
)
def test_report_to_refusals(value, message):
    if message is None:
        assert TrainConfig(shards="s", model="m", output="o", report_to=value).report_to == "wandb"
        return
    with pytest.raises(ValueError) as refused:
        TrainConfig(shards="s", model="m", output="o", report_to=value)
    assert str(refused.value).startswith(message)
    assert str(refused.value).endswith("give tensorboard, wandb, mlflow, a comma list of them, all or none")  # fmt: skip


# --- a real run


def test_refdpo_train_reports_to_wandb_and_mlflow(output, shards, tiny_model_dir):
    from tests.test_train import metrics, train_args, train_command

    args = train_args(shards, tiny_model_dir, output, "--max-steps", 2, "--logging-steps", 1)
    command = train_command([*args, "--report-to", "wandb,mlflow", "--run-name", "tiny"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}  # W&B offline here
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loss = metrics(output)[1]["loss"]
    assert math.isfinite(loss)
    in_wandb, in_mlflow = wandb_run(output), mlflow_run(output)
    assert in_wandb["scalars"]["train/loss", 1] == in_mlflow["scalars"]["train/loss", 1] == loss
    assert in_wandb["config"]["report_to"] == "wandb,mlflow"
    assert in_mlflow["params"]["beta"] == "0.1" and in_mlflow["name"] == "tiny"
