"""Medians, ratios, agreement checks and targets of a benchmark run; Markdown, JSON and PNG."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from bench.systems import REFDPO, TRL_ONLINE, TRL_PRECOMPUTE

LN2 = math.log(2.0)
# loss agreement with refdpo at every step, same pairs/order/optimizer: float noise only
LOSS_TOLERANCE = {"fp32": 2e-3, "bf16": 5e-2}
FIRST_LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def run_figures(run: dict, step_tokens: list[int], batch_size: int) -> dict:
    """Throughput of one run over steps 2.. (step 1 is warm-up: first allocations, and
    refdpo's step-0 check)."""
    timed = run["step_seconds"][1:]
    figures = {
        "train_pairs_per_s": batch_size * len(timed) / sum(timed),
        "train_tokens_per_s": sum(step_tokens[1 : len(timed) + 1]) / sum(timed),
        "peak_memory_mb": run["peak_memory_mb"],
        "first_loss": run["losses"][0],
        "final_loss": run["losses"][-1],
    }
    if "stage_one" in run:
        one = run["stage_one"]
        figures["stage_one_pairs_per_s"] = one["pairs"] / one["scoring_seconds"]
        figures["stage_one_wall_pairs_per_s"] = one["pairs"] / one["wall_seconds"]
    if run.get("precompute_seconds"):
        figures["stage_one_pairs_per_s"] = run["precompute_pairs"] / run["precompute_seconds"]
    return figures


def median_figures(runs: list[dict]) -> dict:
    keys = sorted({k for r in runs for k in r})
    return {k: statistics.median(r[k] for r in runs if k in r) for k in keys}


def summarize(results: dict) -> dict:
    dtype = results["settings"]["dtype"]
    batch = results["settings"]["batch_size"]
    summary: dict = {"workloads": {}, "targets": [], "agreement": [], "agreement_ok": True}
    for w in results["workloads"]:
        per_system: dict[str, list[dict]] = {}
        for run in w["runs"]:
            per_system.setdefault(run["system"], []).append(
                run_figures(run, w["step_tokens"], batch)
            )
        medians = {s: median_figures(r) for s, r in per_system.items()}
        summary["workloads"][w["name"]] = {"description": w["description"], "medians": medians}
        summary["agreement"] += agreement(w, dtype)
        ours, online = medians.get(REFDPO), medians.get(TRL_ONLINE)
        pre = medians.get(TRL_PRECOMPUTE)
        if ours and online:
            need = 1.5 if w["name"] == "a" else 2.0
            summary["targets"].append(target(
                f"({w['name']}) stage-two pairs/s vs TRL online", ours["train_pairs_per_s"] / online["train_pairs_per_s"], need, ">="))  # fmt: skip
            summary["targets"].append(target(
                f"({w['name']}) peak memory vs TRL online", ours["peak_memory_mb"] / online["peak_memory_mb"], 0.6, "<="))  # fmt: skip
        if ours and pre:
            summary["targets"].append(target(
                f"({w['name']}) stage-one pairs/s vs TRL precompute pass", ours["stage_one_pairs_per_s"] / pre["stage_one_pairs_per_s"], 1.5, ">="))  # fmt: skip
    if results.get("sweep"):
        s = results["sweep"]
        ratio = sum(s["trl_precompute_seconds"]) / sum(s["refdpo_seconds"])
        summary["targets"].append(target(
            f"({s['workload']}) sweep of {len(s['betas'])} runs, speed-up vs TRL precompute", ratio, 1.75, ">="))  # fmt: skip
    summary["agreement_ok"] = all(a["ok"] for a in summary["agreement"])
    return summary


def target(name: str, value: float, goal: float, sense: str) -> dict:
    met = value >= goal if sense == ">=" else value <= goal
    return {"target": name, "measured": value, "goal": f"{sense} {goal}", "met": met}


def agreement(workload: dict, dtype: str) -> list[dict]:
    """Every run starts at ln 2 and follows refdpo's first run step by step."""
    runs = workload["runs"]
    base = next((r for r in runs if r["system"] == REFDPO), runs[0])
    checks = []
    for run in runs:
        first = abs(run["losses"][0] - LN2)
        worst = None
        if run.get("same_order", True):
            worst = max(abs(a - b) for a, b in zip(run["losses"], base["losses"], strict=True))
        checks.append({
            "workload": workload["name"], "system": run["system"], "repeat": run["repeat"],
            "first_loss_minus_ln2": first, "max_loss_difference_vs_refdpo": worst,
            "ok": first <= FIRST_LOSS_TOLERANCE[dtype] and (worst or 0.0) <= LOSS_TOLERANCE[dtype],
        })  # fmt: skip
    return checks


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    s = results["summary"]
    steps = ", ".join(f"({w['name']}) {w['steps']}" for w in results["workloads"])
    lines = [
        f"# refdpo vs TRL DPOTrainer ({results['device']})",
        "",
        f"`{results['command']}`  ",
        f"{results['settings']['dtype']}, batch {results['settings']['batch_size']} pairs, "
        f"steps per run: {steps}; "
        f"first step untimed; medians of {results['config']['repeats']} "
        f"alternating repeat(s); versions {results['versions']}; {results['seconds'] / 60:.1f} min.",
        "",
    ]
    for name, w in s["workloads"].items():
        m = w["medians"]
        online = m.get(TRL_ONLINE, {})
        lines += [
            f"## Workload ({name}): {w['description']}",
            "",
            "| system | train pairs/s | train tokens/s | × TRL online | peak memory MB | × TRL online | stage-one pairs/s | first loss | final loss |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for system, f in m.items():
            speed = f["train_pairs_per_s"] / online["train_pairs_per_s"] if online else None
            memory = f["peak_memory_mb"] / online["peak_memory_mb"] if online else None
            lines.append(
                f"| {system} | {fmt(f['train_pairs_per_s'])} | {fmt(f['train_tokens_per_s'], 0)} | "
                f"{fmt(speed)} | {fmt(f['peak_memory_mb'], 0)} | {fmt(memory)} | "
                f"{fmt(f.get('stage_one_pairs_per_s'))} | {f['first_loss']:.6f} | {f['final_loss']:.6f} |"
            )
        lines.append("")
    if results.get("sweep"):
        sw = results["sweep"]
        lines += [
            f"## Sweep: {len(sw['betas'])} training runs (beta {', '.join(map(str, sw['betas']))}) on workload ({sw['workload']})",
            "",
            f"refdpo (one stage one + {len(sw['betas'])} trainings): {sum(sw['refdpo_seconds']):.1f} s; "
            f"TRL with precompute_ref_log_probs=True: {sum(sw['trl_precompute_seconds']):.1f} s.",
            "",
        ]
    lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in s["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']:.2f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
        )
    worst = max((a["max_loss_difference_vs_refdpo"] or 0.0 for a in s["agreement"]), default=0.0)
    lines += [
        "",
        f"Agreement: every run's first loss within {FIRST_LOSS_TOLERANCE[results['settings']['dtype']]} "
        f"of ln 2, and every step's loss within {LOSS_TOLERANCE[results['settings']['dtype']]} of refdpo's "
        "(runs on the same batches): "
        f"{'yes' if s['agreement_ok'] else 'NO'} (largest difference {worst:.2e}).",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["summary"]["workloads"]
    panels = [
        ("train_pairs_per_s", "stage-two pairs/s (higher is better)"),
        ("peak_memory_mb", "peak memory MB (lower is better)"),
        ("stage_one_pairs_per_s", "reference pass pairs/s (higher is better)"),
    ]
    sweep = results.get("sweep")
    fig, axes = plt.subplots(
        1, len(panels) + bool(sweep), figsize=(4.2 * (len(panels) + bool(sweep)), 3.6)
    )
    colors = {REFDPO: "tab:green", TRL_ONLINE: "tab:red", TRL_PRECOMPUTE: "tab:orange"}
    spare = iter(["tab:olive", "tab:cyan", "tab:gray", "tab:purple", "tab:brown"])
    for system in sorted({s for w in workloads.values() for s in w["medians"]}):
        colors.setdefault(system, next(spare, "tab:gray"))
    for ax, (key, title) in zip(axes, panels, strict=False):
        systems = sorted({s for w in workloads.values() for s in w["medians"]})
        width = 0.8 / len(systems)
        for k, system in enumerate(systems):
            values = [w["medians"].get(system, {}).get(key, 0.0) for w in workloads.values()]
            ax.bar([i + k * width for i in range(len(workloads))], values, width, label=system,
                   color=colors.get(system, "tab:gray"))  # fmt: skip
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))])
        ax.set_xticklabels([f"workload {n}" for n in workloads])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    if sweep:
        ax = axes[-1]
        ax.bar(["refdpo", "TRL precompute"], [sum(sweep["refdpo_seconds"]), sum(sweep["trl_precompute_seconds"])],
               color=[colors[REFDPO], colors[TRL_PRECOMPUTE]])  # fmt: skip
        ax.set_title(f"sweep of {len(sweep['betas'])} runs, wall s (lower is better)", fontsize=9)
    fig.suptitle(
        f"refdpo vs TRL DPOTrainer, {results['device']}, {results['settings']['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results: dict, folder: Path) -> str:
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (folder / "results.md").write_text(table)
    plot(results, folder / "bench.png")
    return table
