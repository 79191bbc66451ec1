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


@pytest.mark.slow
def test_long_pairs_bench_runs_every_mode_at_a_tiny_length(tmp_path):
    """bench.long_pairs at 256 tokens per pair: a row for every stage and mode, with finite
    positive figures (flex's stage two n/a on CPU), and the report written. Its skip rule
    and growth check on made-up records."""
    from bench.long_pairs import linearity, predict_gb

    cmd = [sys.executable, "-m", "bench.long_pairs", "--lengths", "256", "--output", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["stage"], r["mode"]) for r in runs) == sorted(
        (stage, mode) for stage in ("one", "two") for mode in ("before", "dense", "auto", "flex")
    )
    for r in runs:
        if (r["stage"], r["mode"]) == ("two", "flex"):
            assert r["status"] == "n/a"
            continue
        assert r["status"] == "ok", r
        for key in ("peak_rss_gb", "wall_seconds", "work_seconds", "work_tokens"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["stage"], r["mode"], key)
        assert r["measured_tokens_per_pair"] == [256] * 4
    table = (tmp_path / "results.md").read_text()
    assert "| tokens per pair | stage | mode | peak RSS GB | seconds | tokens/s |" in table
    assert table.count("| 256 |") == 8 and "n/a on CPU" in table

    def run(tokens: int, gb: float) -> dict:
        return {"stage": "one", "mode": "m", "status": "ok", "tokens_per_pair": tokens,
                "peak_rss_gb": gb}  # fmt: skip

    quadratic = [run(1000, 1.0), run(2000, 1.3)]  # growth 0.3 GB from 1k to 2k tokens
    assert predict_gb(quadratic, 4000) == pytest.approx(1.0 + 0.3 * 15 / 3)
    assert predict_gb(quadratic[:1], 2000) == pytest.approx(4.0) and predict_gb([], 9) is None
    grows = [run(2048, 1.0), run(8192, 1.5), run(32768, 3.5)]  # 5x the growth, as linear gives
    assert linearity(grows, "one", "m")["verdict"] == "linear"
    grows[-1]["peak_rss_gb"] = 1.0 + 0.5 * 17  # quadratic
    assert linearity(grows, "one", "m")["verdict"] == "quadratic"


# --- bench/gpu.py: the GPU benchmark (its tiny mode runs here, on the CPU)


def test_gpu_flops_count_the_pair_layout_by_hand():
    from bench.gpu_flops import layout_counts, model_flops, pair_attended, peak_from_table

    # prompt 3, chosen 2, rejected 1: prompt 1+2+3; chosen 2*3 + 1+2; rejected 1*3 + 1
    assert pair_attended(3, 2, 1) == 6 + 9 + 4
    assert layout_counts([(3, 2, 1)], "shared") == (6, 19)
    # TRL: [p, c] and [p, r] causally: 15 + 10
    assert layout_counts([(3, 2, 1)], "separate") == (9, 25)
    shape = {"non_embedding_params": 10, "layers": 2, "heads": 3, "head_dim": 4}
    # 6N per token, attention 3 x 4 * layers * heads * head_dim per attended pair
    assert model_flops(shape, 5, 7, "train") == 6 * 10 * 5 + 3 * 4 * 2 * 3 * 4 * 7
    assert model_flops(shape, 5, 7, "forward") == 2 * 10 * 5 + 4 * 2 * 3 * 4 * 7
    assert peak_from_table("NVIDIA H200") == peak_from_table("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_from_table("NVIDIA H100 PCIe") == 756.0
    assert peak_from_table("NVIDIA H200 NVL") == 835.0 and peak_from_table("Tesla T4") is None


def test_gpu_shapes_have_the_published_parameter_counts():
    from bench.gpu_shapes import describe_config, make_config

    class Tokenizer:
        pad_token_id, bos_token_id, eos_token_id = 2, 1, 2

        def __len__(self):
            return 49152

    qwen = describe_config(make_config("qwen2.5-0.5b", Tokenizer(), "bfloat16"))
    llama = describe_config(make_config("llama3-8b", Tokenizer(), "bfloat16"))
    assert qwen["total_params"] == 494_032_768 and qwen["tied_embeddings"]
    assert qwen["non_embedding_params"] == 494_032_768 - 151936 * 896  # 0.36B
    assert llama["total_params"] == 8_030_261_248 and not llama["tied_embeddings"]
    assert llama["non_embedding_params"] == 8_030_261_248 - 2 * 128256 * 4096  # 6.98B


def test_gpu_bootstrap_runs_refdpo_from_the_checkout(tmp_path):
    """The shim makes `refdpo.*` this checkout's folders, as pyproject's package-dir maps
    them, without an install; wheels are installed by distribution name, only if missing."""
    import zipfile

    from bench.gpu_bootstrap import distribution_of, unpack, write_shim

    shim = write_shim(tmp_path / "path")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import refdpo, refdpo.train.config as c;"
            "print(refdpo.__file__); print(c.__file__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(shim)], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout.split()  # fmt: skip
    assert out == [str(shim / "refdpo" / "__init__.py"), str(REPO / "train" / "config.py")]
    assert distribution_of(tmp_path / "py_cpuinfo-9.0.0-py3-none-any.whl") == "py-cpuinfo"
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo_pkg/__init__.py", "X = 1\n")
        zf.writestr("demo_pkg-1.0.data/purelib/demo_extra.py", "Y = 2\n")
        zf.writestr("demo_pkg-1.0.data/scripts/tool", "#!/bin/sh\n")
    unpack(wheel, tmp_path / "site")
    assert (tmp_path / "site" / "demo_pkg" / "__init__.py").exists()
    assert (tmp_path / "site" / "demo_extra.py").exists()
    assert not (tmp_path / "site" / "tool").exists()


GPU_ROWS = {  # the tiny mode's groups: every kind of part and row (qwen-b repeats qwen-a's)
    "qwen-a": {"refdpo stage one", "prefill ceiling", "TRL reference pass", "refdpo stage two",
               "SFT step ceiling", "TRL online", "TRL precompute"},
    "llama-b": {"refdpo stage one", "prefill ceiling", "refdpo stage two", "SFT step ceiling"},
}  # fmt: skip


def test_gpu_ratios_are_quotients_of_rows_with_the_workloads_targets():
    from bench.gpu_report import ratios

    def row(system, pairs, tokens, mfu, memory):
        return {"system": system, "pairs_per_s": pairs, "tokens_per_s": tokens, "mfu": mfu,
                "peak_memory_mb": memory}  # fmt: skip

    rows = [row("refdpo stage one", 40.0, 4000.0, 0.5, 10.0),
            row("prefill ceiling", None, 5000.0, 0.6, 9.0),
            row("refdpo stage two", 9.0, 900.0, 0.3, 30.0),
            row("SFT step ceiling", None, 1000.0, 0.4, 25.0),
            row("TRL online", 4.0, 700.0, 0.2, 60.0)]  # fmt: skip
    results = {"groups": {"qwen-b": {"workload": "b"}}}
    found = {t["target"]: t for t in ratios(results, "qwen-b", rows)}
    assert set(found) == {
        "stage two tokens/s vs SFT step ceiling",
        "stage two MFU",
        "stage one tokens/s vs prefill ceiling",
        "stage two pairs/s vs TRL online",
        "peak memory stage two vs TRL online",
    }  # fmt: skip  (no TRL precompute row: its ratios are left out)
    online = found["stage two pairs/s vs TRL online"]
    assert online["measured"] == pytest.approx(2.25) and online["goal"] == ">= 2.0"
    assert online["met"]
    assert found["stage two tokens/s vs SFT step ceiling"]["measured"] == pytest.approx(0.9)
    assert found["stage one tokens/s vs prefill ceiling"]["met"] is False  # 0.8 < 0.9
    assert found["peak memory stage two vs TRL online"]["measured"] == pytest.approx(0.5)
    assert found["stage two MFU"]["measured"] == 0.3 and not found["stage two MFU"]["met"]


@pytest.mark.slow
def test_gpu_bench_tiny_mode_runs_end_to_end(tmp_path):
    """`python -m bench.gpu --tiny` on the CPU: every part runs, every row has finite
    positive figures, and every ratio is the quotient of the two rows it names."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not here")
    cmd = [sys.executable, "-m", "bench.gpu", "--tiny", "--output", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {p["status"] for p in results["parts"]} == {"ok"}, results["parts"]
    assert {p["id"] for p in results["parts"]} == {"build/qwen", "build/llama"} | {
        f"{g}/{k}" for g in GPU_ROWS for k in ("stage-one", "stage-two", "ceilings")
    } | {f"qwen-a/trl-{m}" for m in ("online", "precompute")}
    assert set(results["rows"]) == set(GPU_ROWS)
    for group, systems in GPU_ROWS.items():
        rows = {r["system"]: r for r in results["rows"][group]}
        assert set(rows) == systems, group
        for system, r in rows.items():
            for key in ("tokens_per_s", "tflops_per_s", "mfu", "peak_memory_mb", "pairs_per_s"):
                if key == "pairs_per_s" and "ceiling" in system:
                    continue  # the ceilings run rows of tokens, not pairs
                assert math.isfinite(r[key]) and r[key] > 0, (group, system, key, r[key])
        ratios = [t for t in results["ratios"] if t["group"] == group]
        assert len(ratios) == (7 if group.startswith("qwen") else 3), ratios
        for t in ratios:
            top, bottom, figure = t["of"]
            expected = rows[top][figure] / (rows[bottom][figure] if bottom else 1.0)
            assert t["measured"] == pytest.approx(expected), t
            if t["goal"]:
                sense, goal = t["goal"].split()
                assert t["met"] == (t["measured"] >= float(goal) if sense == ">="
                                    else t["measured"] <= float(goal))  # fmt: skip
        # the stage-two row is the timed steps of refdpo train's own metrics.jsonl
        part = next(p for p in results["parts"] if p["id"] == f"{group}/stage-two")
        timed = part["raw"]["steps"][results["groups"][group]["warmup"] :]
        tokens = sum(round(s["tokens_per_s"] * s["step_seconds"]) for s in timed)
        seconds = sum(s["step_seconds"] for s in timed)
        assert rows["refdpo stage two"]["tokens_per_s"] == pytest.approx(tokens / seconds)
        assert abs(part["raw"]["steps"][0]["loss"] - LN2) < 1e-4  # step 0: policy == reference
    goals = {(t["group"], t["target"]): t["goal"] for t in results["ratios"]}
    assert goals["qwen-a", "stage two pairs/s vs TRL online"] == ">= 1.5"
    assert goals["llama-b", "stage two tokens/s vs SFT step ceiling"] == ">= 0.9"
    table = (tmp_path / "results.md").read_text()
    assert "## Ratios and the issue's targets" in table and "## llama-b" in table


def test_gpu_bench_plans_the_sharded_stage_one_cases_last_and_their_commands(tmp_path, monkeypatch):
    """The full run's plan (as on a GPU): stage one with --zero-stage 3 --offload and with
    --device-map auto on qwen-a, after every other part, each the whole reference's command
    plus its placement flags; the tiny run's plan is unchanged; --parts keeps only the
    kinds named (and the model builds)."""
    from types import SimpleNamespace

    from bench import gpu_runs
    from bench.gpu import GPUBenchConfig
    from bench.gpu_plan import make_groups, make_parts

    def plan(cfg: GPUBenchConfig) -> list:
        bench = SimpleNamespace(env={}, cuda=True, extra=[], root=tmp_path, results={})
        files = {w: tmp_path / f"workload-{w}.jsonl" for w in ("a", "b")}
        return make_parts(cfg, bench, make_groups(cfg, tmp_path), files, "tokenizer")

    full = plan(GPUBenchConfig())
    sharded = ["qwen-a/stage-one-zero3-offload", "qwen-a/stage-one-device-map"]
    assert [p.id for p in full[-2:]] == sharded
    assert all(p.tier < full[-2].tier for p in full[:-2])
    assert all(p.needs == ["build/qwen"] for p in full[-2:])
    tiny_ids = {p.id for p in plan(GPUBenchConfig(tiny=True))}
    assert tiny_ids == {"build/qwen", "build/llama"} | {
        f"{g}/{k}" for g in GPU_ROWS for k in ("stage-one", "stage-two", "ceilings")
    } | {f"qwen-a/trl-{m}" for m in ("online", "precompute")}
    only = plan(GPUBenchConfig(parts="stage-one-zero3-offload,stage-one-device-map"))
    assert [p.id for p in only] == ["build/qwen", *sharded]
    with pytest.raises(ValueError, match="not among --groups"):
        GPUBenchConfig(groups="qwen-a", sharded_groups="llama-b")

    commands = []

    def dry_run(cmd, *args, **kwargs):  # the command line, not the run
        commands.append(cmd)
        raise gpu_runs.PartFailed("failed", "dry run")

    monkeypatch.setattr(gpu_runs, "run_process", dry_run)
    for part in full[-2:]:
        with pytest.raises(gpu_runs.PartFailed):
            part.run(60.0)
    zero3, device_map = commands
    assert zero3[:3] == [sys.executable, "-m", "bench.gpu_stage_one"] and zero3[4] == "--"
    assert zero3[-3:] == ["--zero-stage", "3", "--offload"]
    assert device_map[-2:] == ["--device-map", "auto"]

    def common(options: list[str]) -> list[str]:  # without its own output folder
        at = options.index("--output")
        return options[:at] + options[at + 2 :]

    assert common(zero3[5:-3]) == common(device_map[5:-2])  # otherwise the same command
    assert "--dataset" in zero3 and str(tmp_path / "workload-a.jsonl") in zero3


@pytest.mark.slow
def test_gpu_bench_tiny_mode_runs_the_sharded_stage_one_cases(tmp_path):
    """On the CPU: ZeRO-3 with offload (a one-rank gloo group, DS_ACCELERATOR=cpu) and the
    device map, each with finite positive rows, their placement as the shards record it,
    and ratios against the whole reference's stage one."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not here")
    cmd = [sys.executable, "-m", "bench.gpu", "--tiny", "--groups", "qwen-a", "--sharded-groups",
           "qwen-a", "--parts", "stage-one,stage-one-zero3-offload,stage-one-device-map",
           "--output", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    parts = {p["id"]: p for p in results["parts"]}
    assert set(parts) == {"build/qwen", "qwen-a/stage-one", "qwen-a/stage-one-zero3-offload",
                          "qwen-a/stage-one-device-map"}  # fmt: skip
    assert {p["status"] for p in parts.values()} == {"ok"}, parts
    placement = {k: parts[f"qwen-a/{k}"]["raw"]["placement"]
                 for k in ("stage-one", "stage-one-zero3-offload", "stage-one-device-map")}  # fmt: skip
    assert placement["stage-one"] == {"placement": "whole"}
    assert placement["stage-one-zero3-offload"] == {"placement": "zero3", "ranks": 1,
                                                    "offload": True}  # fmt: skip
    assert placement["stage-one-device-map"]["placement"] == "device_map"
    rows = {r["system"]: r for r in results["rows"]["qwen-a"]}
    assert set(rows) == {"refdpo stage one", "refdpo stage one, ZeRO-3 offload",
                         "refdpo stage one, device map auto"}  # fmt: skip
    for system, r in rows.items():
        for key in ("pairs_per_s", "tokens_per_s", "peak_memory_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (system, key, r[key])
    ratios = [t for t in results["ratios"] if t["group"] == "qwen-a"]
    assert len(ratios) == 4, ratios
    for t in ratios:
        top, bottom, figure = t["of"]
        assert bottom == "refdpo stage one" and t["goal"] is None
        assert t["measured"] == pytest.approx(rows[top][figure] / rows[bottom][figure])


# --- bench/sharded_reference.py: stage one with a sharded reference on CPU


def test_sharded_bench_reads_every_ranks_summary_line():
    from bench.sharded_reference import rank_lines

    log = "\n".join([
        "12:33:26 [rank 1/2] INFO refdpo.precompute: train split: wrote 5 shard(s), 15 pairs, 2 "
        "dropped, in 0.4 s (37.28 pairs/s, 1757 tokens/s); peak memory 812 MiB (resident set)",
        "12:33:27 [rank 0/2] INFO refdpo.precompute: eval split: wrote 1 shard(s), 3 pairs, 0 "
        "dropped, in 0.1 s (30.00 pairs/s, 900 tokens/s); peak memory 790 MiB (resident set)",
        "12:33:27 [rank 0/2] INFO refdpo.precompute: train split: wrote 5 shard(s), 16 pairs, 0 "
        "dropped, in 0.5 s (32.00 pairs/s, 1600 tokens/s); peak memory 800 MiB (resident set)",
    ])  # fmt: skip
    ranks = rank_lines(log)
    assert sorted(ranks) == [0, 1]
    assert ranks[1]["pairs"] == 15 and ranks[1]["dropped"] == 2
    assert ranks[1]["seconds"] == pytest.approx(15 / 37.28)  # from the rate: more digits
    assert ranks[0]["peak_memory_mib"] == 800.0 and ranks[0]["memory_kind"] == "resident set"
    one = rank_lines(log.replace("[rank 1/2] ", "").split("\n")[0])  # one worker: no tag
    assert list(one) == [0] and one[0]["pairs_per_s"] == 37.28


def test_sharded_bench_comparison_catches_other_log_probs_and_other_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.sharded_reference import compare

    def shards(name: str, logp: float, chosen: list[int]):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(pa.table({
            "id": ["a", "b"], "prompt_ids": [[1, 2], [3]], "chosen_ids": [chosen, [5]],
            "rejected_ids": [[6], [7]], "ref_win_per_token_logp": [[-1.0, logp], [-2.0]],
            "ref_rej_per_token_logp": [[-3.0], [-4.0]], "ref_win_logp": [-1.0 + logp, -2.0],
            "ref_rej_logp": [-3.0, -4.0],
        }), folder / "part-00000-00000.parquet")  # fmt: skip
        return folder

    want = shards("want", -0.5, [4, 4])
    same = compare(shards("same", -0.5, [4, 4]), want, 1e-4)
    assert same["ok"] and same["max_abs_token_logp_difference"] == 0.0
    assert same["tokens_compared"] == 5
    close = compare(shards("close", -0.50005, [4, 4]), want, 1e-4)
    assert close["ok"] and close["max_abs_token_logp_difference"] == pytest.approx(5e-5)
    off = compare(shards("off", -0.6, [4, 4]), want, 1e-4)
    assert not off["ok"] and off["max_abs_token_logp_difference"] == pytest.approx(0.1)
    assert not compare(shards("tokens", -0.5, [4, 9]), want, 1e-4)["ok"]


@pytest.mark.slow
@pytest.mark.multirank
def test_sharded_bench_tiny_mode_runs_every_mode_on_two_ranks(tmp_path, tiny_model_dir):
    """`python -m bench.sharded_reference --tiny` on the suite's tiny model: the four modes
    (whole and ZeRO-3, one and two ranks) each ran as asked, with positive figures for every
    rank, and every mode's shards equal the 1-worker ones token by token."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from refdpo.shared.shards import METADATA_KEY

    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not here")
    cmd = [sys.executable, "-m", "bench.sharded_reference", "--tiny", "--model",
           str(tiny_model_dir), "--output", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["whole-1", "whole-2", "zero3-1", "zero3-2"]
    for name, r in runs.items():
        assert r["status"] == "ok", r
        assert r["pairs"] > 0 and r["pairs"] + r["dropped"] == 8, name
        for key in ("wall_seconds", "slowest_rank_seconds", "pairs_per_s_scoring",
                    "pairs_per_s_wall", "peak_memory_mib_max", "peak_memory_vs_whole_1",
                    "peak_private_mib_max", "job_memory_mib"):  # fmt: skip
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert len(r["peak_memory_mib_each"]) == r["ranks"], name
        assert all(m > 0 for m in r["peak_memory_mib_each"] + r["peak_private_mib_each"])
        assert [x["rank"] for x in r["ranks_reported"]] == list(range(r["ranks"]))
        first = sorted(Path(r["shards"]).glob("part-*.parquet"))[0]
        placed = json.loads(pq.read_schema(first).metadata[METADATA_KEY])["scoring"]["placement"]
        if r["zero3"]:
            assert placed == {"placement": "zero3", "ranks": r["ranks"], "offload": False}
        else:
            assert placed == {"placement": "whole"}
    assert set(results["checks"]) == {"whole-2", "zero3-1", "zero3-2"}
    for name, check in results["checks"].items():
        assert check["ok"] and check["same_ids"] and check["tokens_compared"] > 0, (name, check)
        assert check["max_abs_token_logp_difference"] <= 1e-4, name
    table = (tmp_path / "results.md").read_text()
    assert "| pairs/s (all ranks' pairs / slowest rank's scoring s) |" in table
    assert table.count("| zero3-2 |") == 1 and "max abs per-token log-prob diff" in table


def test_vision_bench_quick_counts_each_pairs_image_once_against_twice(tmp_path):
    """bench.vision --quick (LLaVA and Qwen2-VL, 8 pairs): the vision tower gets each pair's
    image once in refdpo's shared and two-sequence layouts, twice in the per-sequence rows
    and in TRL's DPOTrainer (policy and online reference each); the layouts agree with the
    model's own forward; the report is written. No timing is asserted."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not here")
    cmd = [sys.executable, "-m", "bench.vision", "--quick", "--output", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "report.md").read_text().startswith("# Vision-language pairs")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["agreement_ok"]
    assert [f["family"] for f in results["families"]] == ["llava", "qwen2_vl"]
    for f in results["families"]:
        pairs = f["pairs"]  # one image each
        for stage in ("stage_one", "stage_two"):
            passes = f[stage]["passes"]
            for system, times in (("shared", 1), ("two_sequences", 1), ("per_sequence", 2)):
                assert passes[system]["images"] == times * pairs, (f["family"], stage, system)
                assert passes[system]["encodings"] == pytest.approx(times), (stage, system)
            assert set(f[stage]["ratio_to_shared"]) == {"shared", "two_sequences", "per_sequence"}
        trl = f["trl"]["online"]
        for model in ("policy", "reference"):
            assert trl[model]["images"] == 2 * pairs
            assert trl[model]["encodings"] == pytest.approx(2.0)
