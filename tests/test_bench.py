"""The benchmark's own logic (medians, agreement, targets) and one tiny end-to-end run.

No timing is asserted: speed belongs in the benchmark's report, not in a test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.report import agreement, run_figures, summarize, target
from tests.conftest import REPO, SHARED_DATA

LN2 = math.log(2.0)


def fake_run(system: str, losses: list[float], seconds: list[float], memory: float = 100.0):
    return {"system": system, "repeat": 0, "losses": losses, "step_seconds": seconds,
            "peak_memory_mb": memory}  # fmt: skip


def test_run_figures_skip_the_warm_up_step():
    run = fake_run("x", [LN2, 0.6, 0.5], [100.0, 2.0, 2.0])
    figures = run_figures(run, step_tokens=[999, 40, 60], batch_size=4)
    assert figures["train_pairs_per_s"] == pytest.approx(8 / 4.0)
    assert figures["train_tokens_per_s"] == pytest.approx(100 / 4.0)
    assert figures["final_loss"] == 0.5


def test_agreement_flags_a_diverging_run_and_a_wrong_start():
    workload = {"name": "a", "runs": [
        fake_run("refdpo", [LN2, 0.60, 0.50], [1, 1, 1]),
        fake_run("trl-online", [LN2, 0.60, 0.5001], [1, 1, 1]),
        fake_run("trl-precompute", [LN2, 0.60, 0.52], [1, 1, 1]),
        fake_run("refdpo-nopack", [0.70, 0.60, 0.50], [1, 1, 1]),
    ]}  # fmt: skip
    ok = {c["system"]: c["ok"] for c in agreement(workload, "fp32")}
    assert ok == {"refdpo": True, "trl-online": True, "trl-precompute": False,
                  "refdpo-nopack": False}  # fmt: skip


def test_targets_compare_in_the_stated_direction():
    assert target("speed", 1.6, 1.5, ">=")["met"] and not target("speed", 1.4, 1.5, ">=")["met"]
    assert target("memory", 0.5, 0.6, "<=")["met"] and not target("memory", 0.7, 0.6, "<=")["met"]


def test_summary_ratios_use_medians_over_repeats():
    runs = []
    for repeat, (ours, theirs) in enumerate([(1.0, 4.0), (3.0, 4.0), (9.0, 4.0)]):
        runs.append({**fake_run("refdpo", [LN2, 0.6], [1.0, ours], 50.0), "repeat": repeat,
                     "stage_one": {"pairs": 10, "scoring_seconds": 1.0, "wall_seconds": 5.0}})  # fmt: skip
        runs.append({**fake_run("trl-online", [LN2, 0.6], [1.0, theirs], 200.0), "repeat": repeat})
    results = {
        "settings": {"dtype": "fp32", "batch_size": 4},
        "workloads": [{"name": "b", "description": "", "runs": runs, "step_tokens": [1, 1]}],
    }
    summary = summarize(results)
    speed = next(t for t in summary["targets"] if "pairs/s" in t["target"])
    # medians of pairs/s: ours 4/3 (steps of 1, 3, 9 s), TRL's 4/4; workload (b) asks for 2x
    assert speed["measured"] == pytest.approx(4.0 / 3.0)
    assert not speed["met"]
    memory = next(t for t in summary["targets"] if "memory" in t["target"])
    assert memory["measured"] == pytest.approx(0.25) and memory["met"]


@pytest.mark.slow
def test_quick_bench_runs_end_to_end(tmp_path):
    """refdpo and both TRL set-ups on the same pairs: same first loss, same losses after."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not here")
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--output", str(tmp_path),
           "--workloads", "a", "--steps", "2", "--batch-size", "2", "--sweep-betas", "0.1,0.2",
           "--refdpo-variants", "nopack:--packing false"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    systems = {r["system"] for r in results["workloads"][0]["runs"]}
    assert systems == {"refdpo", "trl-online", "trl-precompute", "refdpo-nopack"}
    for check in results["summary"]["agreement"]:
        assert check["first_loss_minus_ln2"] < 1e-4
        assert check["max_loss_difference_vs_refdpo"] < 2e-3
    assert len(results["sweep"]["refdpo_seconds"]) == 3  # stage one + 2 trainings
    assert "| target | measured | goal | met |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_a_reordering_variant_is_held_to_its_first_loss_only():
    workload = {"name": "a", "runs": [
        fake_run("refdpo", [LN2, 0.60, 0.50], [1, 1, 1]),
        {**fake_run("refdpo-group", [LN2, 0.40, 0.30], [1, 1, 1]), "same_order": False},
    ]}  # fmt: skip
    checks = agreement(workload, "fp32")
    assert checks[1]["ok"] and checks[1]["max_loss_difference_vs_refdpo"] is None
