"""The SLURM scripts in jobs/, run for real against a fake SLURM (sbatch, srun, scontrol stubs
on PATH that set SLURM's variables), on CPU with the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from refdpo.precompute.inspect import validate
from refdpo.train.checkpoint import COMPLETE, REQUEUE_EXIT_CODE
from tests.conftest import REPO, SHARED_DATA, wait_for_lines, write_jsonl
from tests.test_precompute import good_rows, read_sorted

JOBS = REPO / "jobs"
FAKE = Path(__file__).parent / "fake_slurm"
SCRIPTS = sorted([*JOBS.glob("*.sh"), *JOBS.glob("*.sbatch")])
PRECOMPUTE_ARGS = ["--max-length", "128", "--max-prompt-length", "64", "--rows-per-shard", "8"]
TRAIN_ARGS = [
    "--micro-batch-size",
    "4",
    "--learning-rate",
    "1e-3",
    "--warmup-ratio",
    "0",
    "--export",
    "none",
]


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is missing; .ci/run installs it from Debian's packages")
        pytest.skip("shellcheck is not installed here (apt-get install shellcheck); CI installs it")
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


@pytest.fixture
def slurm(tmp_path):
    """Environment of a job on 2 tasks over a 2-host node list, with the fake tools first on PATH."""
    state = tmp_path / "slurm"
    state.mkdir()
    env = {
        **os.environ,
        "PATH": f"{FAKE}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(state),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "MASTER_PORT": "29701",
    }
    return env, state


def calls(state: Path) -> list[str]:
    path = state / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def bash(script: str, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(JOBS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", good_rows(40))


def test_precompute_job_on_two_tasks_then_rerun(slurm, dataset, tiny_model_dir, tmp_path):
    env, state = slurm
    out = tmp_path / "shards"
    env = {**env, "MODEL": str(tiny_model_dir), "DATASET": str(dataset), "OUTPUT": str(out)}
    result = bash("precompute.sbatch", env, *PRECOMPUTE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "srun ntasks=2 codes=[0, 0]" in calls(state)
    assert {p.name[:10] for p in out.glob("*.parquet")} == {"part-00000", "part-00001"}
    validate(out)
    # after a failure: a missing shard is redone, the others are kept as they were
    victim = out / "part-00001-00001.parquet"
    victim.unlink()
    (out / "_manifest.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert bash("precompute.sbatch", env, *PRECOMPUTE_ARGS).returncode == 0
    assert victim.exists() and all(out.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    validate(out)


@pytest.mark.multirank
def test_precompute_job_with_a_zero3_reference_over_two_tasks(
    slurm, dataset, tiny_model_dir, tmp_path
):
    """`sbatch jobs/precompute.sbatch --zero-stage 3`: the srun tasks form one process group
    (MASTER_ADDR from the node list, ranks from SLURM_PROCID) and share the reference; the
    shards equal those of the job without it."""
    env, state = slurm
    env = {**env, "MODEL": str(tiny_model_dir), "DATASET": str(dataset)}
    whole, shared = tmp_path / "whole", tmp_path / "zero3"
    assert (
        bash("precompute.sbatch", {**env, "OUTPUT": str(whole)}, *PRECOMPUTE_ARGS).returncode == 0
    )
    result = bash("precompute.sbatch", {**env, "OUTPUT": str(shared)}, *PRECOMPUTE_ARGS,
                  "--zero-stage", "3", "--dist-timeout", "120")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "partitioned over 2 rank(s) with ZeRO-3" in result.stderr
    assert "srun ntasks=2 codes=[0, 0]" in calls(state)
    pd.testing.assert_frame_equal(read_sorted(shared), read_sorted(whole), check_exact=False,
                                  atol=1e-6)  # fmt: skip
    validate(shared)


def test_precompute_as_job_array(slurm, dataset, tiny_model_dir, tmp_path):
    env, state = slurm
    out = tmp_path / "shards"
    env = {**env, "MODEL": str(tiny_model_dir), "DATASET": str(dataset), "OUTPUT": str(out)}
    script = str(JOBS / "precompute.sbatch")
    result = subprocess.run(
        [str(FAKE / "sbatch"), "--array=0-1", script, *PRECOMPUTE_ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert calls(state).count("srun ntasks=1 codes=[0]") == 2
    manifest, _ = validate(out)
    assert manifest["rows"] == 40


def train_env(env: dict, shards: Path, model: Path, output: Path) -> dict:
    return {**env, "SHARDS": str(shards), "MODEL": str(model), "OUTPUT": str(output)}


@pytest.fixture
def shards(slurm, dataset, tiny_model_dir, tmp_path) -> Path:
    env, _ = slurm
    out = tmp_path / "shards"
    env = {**env, "MODEL": str(tiny_model_dir), "DATASET": str(dataset), "OUTPUT": str(out)}
    assert (
        bash("precompute.sbatch", env, *PRECOMPUTE_ARGS, "--eval-fraction", "0.2").returncode == 0
    )
    return out


def final_loss(output: Path) -> float:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    return train[max(train)]["loss"]


def test_train_job_preempted_requeued_and_resumed(slurm, shards, tiny_model_dir, tmp_path):
    env, state = slurm
    straight = tmp_path / "straight"
    result = bash(
        "train.sbatch",
        train_env(env, shards, tiny_model_dir, straight),
        *TRAIN_ARGS,
        "--max-steps",
        "12",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (straight / "metrics.jsonl").exists() and '"split": "eval"' in (
        straight / "metrics.jsonl"
    ).read_text()

    output = tmp_path / "preempted"
    job_env = train_env({**env, "MASTER_PORT": "29702"}, shards, tiny_model_dir, output)
    proc = subprocess.Popen(
        ["bash", str(JOBS / "train.sbatch"), *TRAIN_ARGS, "--max-steps", "12"],
        env=job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_lines(output / "metrics.jsonl", 2)
    os.kill(int((state / "srun.pid").read_text()), signal.SIGUSR1)  # what SLURM's --signal does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "scontrol requeue 4242" in calls(state)
    saved = [p for p in (output / "checkpoints").glob("step-*") if (p / COMPLETE).exists()]
    assert len(saved) == 1 and json.loads((saved[0] / COMPLETE).read_text())["step"] < 12

    result = bash("train.sbatch", job_env, *TRAIN_ARGS, "--max-steps", "12")  # the requeued job
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert final_loss(output) == pytest.approx(final_loss(straight), abs=1e-6)


def test_train_job_with_deepspeed_launcher_and_hostfile(slurm, shards, tiny_model_dir, tmp_path):
    env, _ = slurm
    output = tmp_path / "run"
    job_env = train_env(
        {**env, "LAUNCHER": "deepspeed", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": "29703"},
        shards,
        tiny_model_dir,
        output,
    )
    result = bash("train.sbatch", job_env, *TRAIN_ARGS, "--max-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "hostfile-4242").read_text().strip() == "localhost slots=2"
    assert "world_size=2" in result.stderr or "x 2 ranks" in result.stderr


def test_pipeline_submits_training_after_precompute(slurm, dataset, tiny_model_dir, tmp_path):
    env, state = slurm
    env = {
        **env,
        "MODEL": str(tiny_model_dir),
        "DATASET": str(dataset),
        "WORK": str(tmp_path / "work"),
        "PRECOMPUTE_ARGS": " ".join([*PRECOMPUTE_ARGS, "--eval-fraction", "0.2"]),
        "TRAIN_ARGS": " ".join([*TRAIN_ARGS, "--max-steps", "2"]),
    }
    result = subprocess.run(
        ["bash", str(JOBS / "pipeline.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    submitted = [c for c in calls(state) if c.startswith("sbatch")]
    assert submitted[0].startswith("sbatch 1000 precompute.sbatch")
    assert submitted[1] == "sbatch 1001 train.sbatch afterok:1000"
    assert '"split": "eval"' in (tmp_path / "work" / "run" / "metrics.jsonl").read_text()


def test_local_script_runs_both_stages_on_the_shared_data(tiny_model_dir, tmp_path):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "MODEL": str(tiny_model_dir),
        "DATASET": str(SHARED_DATA),
        "WORK": str(tmp_path / "work"),
        "MASTER_PORT": "29704",
        "PRECOMPUTE_ARGS": "--config jobs/instruction-data.yaml --dataset "
        + str(SHARED_DATA)
        + " --limit 60",
        "TRAIN_ARGS": " ".join([*TRAIN_ARGS, "--max-steps", "2"]),
    }
    result = subprocess.run(
        ["bash", str(JOBS / "local.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(pd.read_parquet(tmp_path / "work" / "shards")) > 40
    assert '"split": "eval"' in (tmp_path / "work" / "run" / "metrics.jsonl").read_text()


# Stopping jobs/local.sh. On one node the bare deepspeed runner has no signal handler: killing
# it (or a local.sh that just ran it) left the ranks training with nobody waiting for them.
# local.sh now passes SIGTERM/SIGINT on to the ranks and waits for them to save and exit 75.
LOCAL_STEPS = 60


def local_env(model: Path, dataset: Path, work: Path, port: int) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "MODEL": str(model),
        "DATASET": str(dataset),
        "WORK": str(work),
        "NPROC": "2",
        "MASTER_PORT": str(port),
        "PRECOMPUTE_ARGS": " ".join(PRECOMPUTE_ARGS),
        "TRAIN_ARGS": " ".join(
            [*TRAIN_ARGS, "--micro-batch-size", "2", "--max-steps", str(LOCAL_STEPS)]
        ),
    }


def start_local(env: dict, log: Path) -> subprocess.Popen:
    """local.sh as the leader of a process group of its own, as a terminal's job or a
    scheduler's task is; output to a file (a pipe nobody reads could fill and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            ["bash", str(JOBS / "local.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )


def processes_of(work: Path, kill: bool = False) -> list[str]:
    """Live processes (runner, launch.py, ranks, torchrun) whose command line names `work`;
    `kill`: SIGKILL them (clean-up after a failure: they are not in local.sh's group)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(work) in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.pid} {cmdline[:200]}")
            if kill:
                p.kill()
    return found


def stop_local_mid_training(proc: subprocess.Popen, work: Path, log: Path, send) -> float:
    """Signal local.sh (via `send`) once training logs its first step; assert that it exits
    75 within a bound, leaving no process behind and a complete checkpoint short of the
    end. Returns the seconds from the signal to the exit."""
    try:
        wait_for_lines(work / "run" / "metrics.jsonl", 1, timeout=400)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert (work / "run" / "metrics.jsonl").exists(), log.read_text()[-3000:]
        sent = time.monotonic()
        send()
        code = proc.wait(timeout=180)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        left = processes_of(work, kill=True)
    assert code == REQUEUE_EXIT_CODE, log.read_text()[-3000:]
    assert left == []
    saved = [p for p in (work / "run" / "checkpoints").glob("step-*") if (p / COMPLETE).exists()]
    assert len(saved) == 1, log.read_text()[-3000:]
    assert json.loads((saved[0] / COMPLETE).read_text())["step"] < LOCAL_STEPS
    print(f"local.sh exited {code} {took:.1f} s after the signal")
    return took


@pytest.mark.slow
def test_local_script_stopped_by_sigterm_saves_exits_75_and_resumes(
    dataset, tiny_model_dir, tmp_path
):
    work = tmp_path / "work"
    env = local_env(tiny_model_dir, dataset, work, 29705)
    proc = start_local(env, tmp_path / "local.log")
    stop_local_mid_training(
        proc, work, tmp_path / "local.log", lambda: proc.send_signal(signal.SIGTERM)
    )

    rerun = subprocess.run(
        ["bash", str(JOBS / "local.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr + rerun.stdout
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r["split"] == "train") == LOCAL_STEPS
    assert processes_of(work) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "scheduler-sigterm"]
)
def test_local_script_stopped_by_a_signal_to_its_process_group(
    sig, dataset, tiny_model_dir, tmp_path
):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group, a scheduler
    (or kill -TERM -PGID) SIGTERM: either way the ranks save once and local.sh exits 75."""
    work = tmp_path / "work"
    port = 29706 if sig == signal.SIGINT else 29707
    proc = start_local(local_env(tiny_model_dir, dataset, work, port), tmp_path / "local.log")
    stop_local_mid_training(proc, work, tmp_path / "local.log", lambda: os.killpg(proc.pid, sig))
