"""The benchmark's own logic (medians, agreement, targets) and one tiny end-to-end run.

No timing is asserted: speed belongs in the benchmark's report, not in a test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from bench.defaults import TRAIN_EVENTS, Timed, log_events
from bench.report import agreement, defaults_summary, run_figures, summarize, target
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


def test_log_events_are_found_after_a_progress_bar_and_across_midnight():
    launched = time.mktime((2026, 12, 1, 23, 59, 59, 0, 0, -1)) + 0.5  # local 23:59:59.5
    lines = [
        (2.0, "00:00:01 INFO refdpo.train: training 4 steps: 8 pairs, global batch 2 (2 x 1 ...)"),
        (3.0, "00:00:02 INFO refdpo.train: step-0 check (stage one's layout, ...): max 0"),
        (9.1, "train: 100%|#####| 4/4 [00:06<00:00]00:00:08 INFO refdpo.train.checkpoint: "
              "saved checkpoint out/checkpoints/step-00000004"),
        (9.4, "00:00:08 INFO other.logger: exported the trained model to elsewhere"),
    ]  # fmt: skip
    events = log_events(Timed(10.0, launched, 100.0, lines), TRAIN_EVENTS)
    assert set(events) == {"start", "step0", "checkpoint"}  # only refdpo's loggers count
    assert events["start"]["groups"] == ["4", "8", "2"]
    assert events["start"]["logged"] == pytest.approx(1.5)  # 00:00:01 is 1.5 s after launch
    assert events["checkpoint"]["seen"] == 9.1


def fake_process(wall: float, pairs: int, rss: float, phases: tuple) -> dict:
    keys = ("start_up", "steps", "saving", "rest")
    return {"wall_seconds": wall, "pairs": pairs, "peak_rss_mb": rss,
            "phases": dict(zip(keys, phases, strict=True))}  # fmt: skip


def test_defaults_summary_adds_refdpo_stages_and_compares_with_trl():
    d = {"cuda": False, "runs": [
        {"system": "refdpo", "repeat": 0, "stage_one": fake_process(10.0, 64, 900.0, (6, 3, 0, 1)),
         "stage_two": fake_process(30.0, 64, 2000.0, (10, 15, 4, 1))},
        {"system": "trl", "repeat": 0, "process": fake_process(80.0, 64, 4000.0, (20, 55, 3, 2))},
    ]}  # fmt: skip
    s = defaults_summary(d)
    both = s["medians"]["refdpo, both stages"]
    assert both["wall_seconds"] == 40.0 and both["steps"] == 18.0
    assert both["peak_memory_mb"] == 2000.0  # the larger of the two processes
    speed, memory = s["targets"]
    assert speed["target"] == "default path: refdpo / TRL pairs/s (whole process)"
    assert speed["measured"] == pytest.approx(2.0) and speed["met"]
    assert memory["measured"] == pytest.approx(0.5) and memory["met"]
    assert s["same_pairs"]
    d["runs"][1]["process"]["pairs"] = 63
    assert not defaults_summary(d)["same_pairs"]


@pytest.mark.slow
def test_quick_defaults_comparison_runs_end_to_end(tmp_path):
    """refdpo's two commands and TRL's DPOTrainer, each with its defaults, on the same pairs."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not here")
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--defaults", "only",
           "--output", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["workloads"] == [] and results["sweep"] is None
    runs = results["defaults"]["runs"]
    assert sorted(r["system"] for r in runs) == ["refdpo", "trl"]
    refdpo = next(r for r in runs if r["system"] == "refdpo")
    for part in (refdpo["stage_one"], refdpo["stage_two"]):  # no tuning flag
        assert not {"--zero-stage", "--export", "--dtype"} & set(part["command"])
    for event in refdpo["stage_two"]["events"].values():  # the log's whole-second stamps
        assert -0.1 < event["seen"] - event["logged"] < 3.0
    trl = next(r for r in runs if r["system"] == "trl")["process"]
    assert trl["used"]["bf16"] and trl["used"]["gradient_checkpointing"]
    assert trl["used"]["reference"] == "online"
    summary = results["summary"]["defaults"]
    assert summary["same_pairs"] and summary["pairs"] == {"refdpo": [8], "trl": [8]}
    for row, figures in summary["medians"].items():
        assert figures["wall_seconds"] > 0 and figures["peak_memory_mb"] > 0, row
        phases = [figures[k] for k in ("start_up", "steps", "saving", "rest")]
        assert min(phases) > -0.1, (row, phases)
        assert sum(phases) == pytest.approx(figures["wall_seconds"]), row
    targets = {t["target"] for t in results["summary"]["targets"]}
    assert targets == {"default path: refdpo / TRL pairs/s (whole process)",
                       "default path: peak memory refdpo / TRL"}  # fmt: skip
    table = (tmp_path / "results.md").read_text()
    assert "## Defaults: each system with its own defaults, whole process" in table
    assert (tmp_path / "bench.png").stat().st_size > 10_000
