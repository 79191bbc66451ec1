"""Where metrics go: the console (progress bar), metrics.jsonl, and the trackers that
--report-to names: TensorBoard, Weights & Biases, MLflow.

A tracker's package is imported only when it is asked for (or, for auto/all, looked for),
so a run without trackers neither waits for nor depends on them. Every tracker gets the
same names, `<split>/<metric>` (`train/loss`, `train/rewards/accuracies`, `eval/loss`), at
the optimizer step: all three accept `/` in a name.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from refdpo.shared.errors import UsageError
from refdpo.shared.logs import peak_memory_mb, progress_bar  # noqa: F401 (re-exported)
from refdpo.train.config import TRACKERS

logger = logging.getLogger(__name__)

# what to import to know a tracker works, and what to pip install when it does not
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
DEFAULT_PROJECT = "refdpo"  # W&B project and MLflow experiment unless the environment names one
# MLflow's store engines that go through SQLAlchemy (a local sqlite file among them)
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(MODULES[name])
    except ImportError:
        return False
    return True


def mlflow_uri(output: Path) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite file in the output folder. Not a `file:` folder:
    MLflow 3 keeps that store in maintenance mode and refuses it unless
    MLFLOW_ALLOW_FILE_STORE is set; SQLite needs no server either."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output / 'mlflow.db').resolve()}"


def _check_mlflow_store() -> None:
    """A database store needs SQLAlchemy and Alembic, which mlflow-skinny leaves out."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:"
    if uri.split(":", 1)[0].split("+", 1)[0] not in DATABASE_SCHEMES:
        return
    try:
        importlib.import_module("sqlalchemy")
        importlib.import_module("alembic")
    except ImportError:
        where = (
            "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "OUTPUT/mlflow.db"
        )
        raise UsageError(
            f"--report-to mlflow: the database store ({where}) needs sqlalchemy and alembic "
            "(pip install mlflow, or point MLFLOW_TRACKING_URI at a tracking server)"
        ) from None


def check_reporters(report_to: str) -> list[str]:
    """The trackers --report-to stands for, each one importable: a missing package is one
    sentence before a model loads. auto: tensorboard if installed; all: every one of
    tensorboard, wandb, mlflow that is installed (transformers' meaning)."""
    if report_to in ("auto", "all"):
        looked_for = ("tensorboard",) if report_to == "auto" else TRACKERS
        names = [name for name in looked_for if _importable(name)]
    else:
        names = [] if report_to == "none" else report_to.split(",")
        for name in names:
            if not _importable(name):
                raise UsageError(
                    f"--report-to {name}: the {PACKAGES[name]} package is not installed "
                    f"(pip install {PACKAGES[name]})"
                )
    if "mlflow" in names:
        _check_mlflow_store()
    return names


# --- trackers: each takes (output, run_name, config), then scalars named `<split>/<metric>`


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self, failed: bool) -> None: ...


class TensorBoard:
    """OUTPUT/tensorboard/RUN_NAME."""

    def __init__(
        self, output: Path, run_name: str | None, config: dict, start_step: int = 0
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's events replace those an interrupted run logged after
        # its checkpoint, instead of showing twice
        self.writer = SummaryWriter(
            str(output / "tensorboard" / (run_name or "")), purge_step=start_step + 1
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    """A run in project WANDB_PROJECT (default refdpo), files under OUTPUT/wandb. WANDB_MODE
    is W&B's to read: offline writes there and uploads nothing (`wandb sync` later)."""

    def __init__(
        self, output: Path, run_name: str | None, config: dict, start_step: int = 0
    ) -> None:
        import wandb

        project = os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run = wandb.init(project=project, name=run_name, dir=str(output), config=config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def flat_params(config: dict, limit: int, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings of bounded length."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, limit, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)[:limit]
    return params


class MLflow:
    """A run named RUN_NAME in experiment MLFLOW_EXPERIMENT_NAME (default refdpo) of the
    store mlflow_uri() gives; the config as params. A client, not mlflow's module-level
    active run, so nothing global is left set in the process."""

    def __init__(
        self, output: Path, run_name: str | None, config: dict, start_step: int = 0
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
        except ImportError:  # moved in some version: the limit older servers enforce
            limit = 500
        self.client = MlflowClient(mlflow_uri(output))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # in the output's own store, keep artifacts there too, not under the cwd
            local = not os.environ.get("MLFLOW_TRACKING_URI")
            artifacts = (output / "mlflow-artifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, v) for k, v in flat_params(config, limit).items()]
        for start in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for name, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


TRACKER_TYPES: dict[str, type] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def keep_steps_before(path: Path, step: int) -> None:
    """Drop the records of steps >= `step` (logged by an interrupted run after the checkpoint
    this run resumes from; all of them for a fresh start): each step is in the file once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) < step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """Rank 0 writes; other ranks hold a disabled instance. `config` (the run's settings as
    a dict) goes to W&B's config and MLflow's params."""

    def __init__(
        self,
        output: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        report_to: str = "auto",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        names = check_reporters(report_to) if enabled else []  # before anything opens
        self.bar = progress_bar(total_steps, "train", "step", enabled, initial=start_step)
        self.file = None
        if enabled:
            keep_steps_before(output / "metrics.jsonl", start_step + 1)
            self.file = open(output / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run)
        self.trackers: list[Tracker] = []
        if enabled and report_to == "auto" and not names:
            logger.info("tensorboard is not installed; metrics go to metrics.jsonl only")
        try:
            for name in names:
                self.trackers.append(
                    TRACKER_TYPES[name](output, run_name, config or {}, start_step)
                )
        except BaseException:
            self.close()  # the ones already started end as failed runs
            raise

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"{split}/{key}": value for key, value in metrics.items()}
        for tracker in self.trackers:
            tracker.log(step, scalars)
        if split == "train":
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics['rewards/accuracies']:.2f}",
                refresh=False,
            )
        else:
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("loss", "rewards/"))
            )
            self.bar.write(f"eval @ step {step}: {shown}")

    def close(self) -> None:
        """Called from a `finally`: an exception on its way out marks the runs failed."""
        failed = sys.exc_info()[0] is not None
        self.bar.close()
        if self.file:
            self.file.close()
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception as err:  # one tracker's failure must not hide the others
                logger.warning("closing %s failed: %s", type(tracker).__name__, err)
        self.trackers = []
