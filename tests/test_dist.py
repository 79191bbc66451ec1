"""Which worker am I: the launcher environments stage one understands."""

from __future__ import annotations

import pytest

from refdpo.shared.dist import rank_and_world

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),  # torchrun, deepspeed launcher
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (5, 8)),  # srun
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1)),  # sbatch without srun tasks
        (
            {
                "SLURM_ARRAY_TASK_ID": "12",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            (2, 4),
        ),
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}, (1, 2)),
    ],
)
def test_rank_from_environment(monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert rank_and_world() == expected


def test_explicit_values_win(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world(rank=3, world_size=5) == (3, 5)


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="outside world size"):
        rank_and_world(rank=2, world_size=2)
