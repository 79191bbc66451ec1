"""Medians, ratios, agreement checks and targets of a benchmark run; Markdown, JSON and PNG."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from bench.systems import REFDPO, TRL_ONLINE, TRL_PRECOMPUTE

LN2 = math.log(2.0)
# defaults comparison, refdpo's two stages against TRL's one process, each with its defaults
DEFAULTS_SPEED_GOAL, DEFAULTS_MEMORY_GOAL = 1.5, 0.8
PHASES = ("start_up", "steps", "saving", "rest")
DEFAULTS_ROWS = ("refdpo, both stages", "refdpo precompute", "refdpo train", "trl")
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
    if results.get("defaults"):
        summary["defaults"] = defaults_summary(results["defaults"])
        summary["targets"] += summary["defaults"]["targets"]
    return summary


def part_figures(part: dict, pairs: int, cuda: bool) -> dict:
    """One process of the defaults comparison: wall, phases, pairs/s over its whole life."""
    figures = {"wall_seconds": part["wall_seconds"], "pairs": pairs,
               "pairs_per_s": pairs / part["wall_seconds"], "peak_rss_mb": part["peak_rss_mb"],
               "peak_memory_mb": part.get("cuda_max_memory_mb") if cuda else part["peak_rss_mb"],
               **part["phases"]}  # fmt: skip
    return figures


def both_stages(one: dict, two: dict) -> dict:
    """refdpo's default path as a user waits for it: stage one, then stage two."""
    both = {k: _sum(one[k], two[k]) for k in ("wall_seconds", *PHASES)}
    both.update(
        pairs=two["pairs"],
        pairs_per_s=two["pairs"] / both["wall_seconds"],
        peak_rss_mb=max(one["peak_rss_mb"], two["peak_rss_mb"]),
        peak_memory_mb=max(
            v for v in (one["peak_memory_mb"], two["peak_memory_mb"]) if v is not None
        ),
    )
    return both


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def median_or_none(runs: list[dict]) -> dict:
    """Medians of each figure over the repeats; None where a figure was never measured."""
    keys = sorted({k for r in runs for k in r})
    found = {}
    for k in keys:
        values = [r[k] for r in runs if r.get(k) is not None]
        found[k] = statistics.median(values) if values else None
    return found


def defaults_summary(d: dict) -> dict:
    cuda = d.get("cuda", False)
    per_row: dict[str, list[dict]] = {row: [] for row in DEFAULTS_ROWS}
    pairs: dict[str, list[int]] = {"refdpo": [], "trl": []}
    for run in d["runs"]:
        if run["system"] == "refdpo":
            one, two = run["stage_one"], run["stage_two"]
            figures_one = part_figures(one, one["pairs"], cuda)
            figures_two = part_figures(two, two["pairs"], cuda)
            per_row["refdpo precompute"].append(figures_one)
            per_row["refdpo train"].append(figures_two)
            per_row["refdpo, both stages"].append(both_stages(figures_one, figures_two))
            pairs["refdpo"].append(two["pairs"])
        else:
            per_row["trl"].append(part_figures(run["process"], run["process"]["pairs"], cuda))
            pairs["trl"].append(run["process"]["pairs"])
    medians = {row: median_or_none(runs) for row, runs in per_row.items() if runs}
    summary = {"medians": medians, "pairs": pairs, "targets": [],
               "same_pairs": len({*pairs["refdpo"], *pairs["trl"]}) == 1}  # fmt: skip
    ours, theirs = medians.get("refdpo, both stages"), medians.get("trl")
    if ours and theirs:
        summary["targets"] = [
            target("default path: refdpo / TRL pairs/s (whole process)",
                   ours["pairs_per_s"] / theirs["pairs_per_s"], DEFAULTS_SPEED_GOAL, ">="),
            target("default path: peak memory refdpo / TRL",
                   ours["peak_memory_mb"] / theirs["peak_memory_mb"], DEFAULTS_MEMORY_GOAL, "<="),
        ]  # fmt: skip
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
    matched = (
        f"matched runs: {results['settings']['dtype']}, batch {results['settings']['batch_size']} "
        f"pairs, steps per run: {steps}; first step untimed; medians of "
        f"{results['config']['repeats']} alternating repeat(s); "
        if results["workloads"]
        else ""
    )
    lines = [
        f"# refdpo vs TRL DPOTrainer ({results['device']})",
        "",
        f"`{results['command']}`  ",
        f"{matched}versions {results['versions']}; {results['seconds'] / 60:.1f} min.",
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
    if results.get("defaults"):
        lines += defaults_markdown(results["defaults"], s["defaults"])
    lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in s["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']:.2f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
        )
    if s["agreement"]:
        worst = max(a["max_loss_difference_vs_refdpo"] or 0.0 for a in s["agreement"])
        lines += [
            "",
            f"Agreement: every run's first loss within {FIRST_LOSS_TOLERANCE[results['settings']['dtype']]} "
            f"of ln 2, and every step's loss within {LOSS_TOLERANCE[results['settings']['dtype']]} of refdpo's "
            "(runs on the same batches): "
            f"{'yes' if s['agreement_ok'] else 'NO'} (largest difference {worst:.2e}).",
        ]
    if s.get("defaults"):
        p = s["defaults"]["pairs"]
        lines += [
            "",
            f"Defaults comparison, same pairs: {'yes' if s['defaults']['same_pairs'] else 'NO'} "
            f"(refdpo trained {p['refdpo']}, TRL {p['trl']}).",
        ]
    return "\n".join(lines) + "\n"


def shown_command(cmd: list[str]) -> str:
    """A refdpo command as a user types it (`refdpo train ...`), paths kept."""
    text = " ".join(cmd)
    return re.sub(r"^\S+ -m refdpo\.shared\.cli", "refdpo", text)


def defaults_markdown(d: dict, s: dict) -> list[str]:
    m = s["medians"]
    memory = "CUDA max allocated" if d.get("cuda") else "peak RSS"
    trl = m.get("trl", {})
    lines = [
        "## Defaults: each system with its own defaults, whole process",
        "",
        f"{d['pairs_in_file']} pairs of workload (a) as prompt/chosen/rejected messages, "
        f"batch {d['batch_size']}, max length {d['max_length']}, {d['epochs']} epoch; "
        f"each process timed from launch to exit; medians of {d['repeats']} alternating "
        f"repeat(s). Memory: {memory} of each process (refdpo: the larger of its two).",
        "",
        "| run | wall s | start-up s | steps s | saving s | rest s | pairs | pairs/s | × TRL | peak memory MB | × TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"refdpo, both stages": "refdpo (precompute + train)", "refdpo precompute": "· refdpo precompute",
             "refdpo train": "· refdpo train", "trl": "TRL DPOTrainer"}  # fmt: skip
    for row in DEFAULTS_ROWS:
        f = m.get(row)
        if not f:
            continue
        speed = f["pairs_per_s"] / trl["pairs_per_s"] if trl else None
        mem = f["peak_memory_mb"] / trl["peak_memory_mb"] if trl and f["peak_memory_mb"] else None
        lines.append(
            f"| {names[row]} | {fmt(f['wall_seconds'], 1)} | "
            + " | ".join(fmt(f.get(k), 1) for k in PHASES)
            + f" | {f['pairs']:.0f} | {fmt(f['pairs_per_s'])} | {fmt(speed)} | "
            f"{fmt(f['peak_memory_mb'], 0)} | {fmt(mem)} |"
        )
    lines += ["", *defaults_notes(d)]
    return [*lines, ""]


def defaults_notes(d: dict) -> list[str]:
    """What each system ran and what its defaults turned out to be."""
    first = {r["system"]: r for r in reversed(d["runs"])}
    lines = []
    if "refdpo" in first:
        one, two = first["refdpo"]["stage_one"], first["refdpo"]["stage_two"]
        u = two["used"]
        lines += [
            f"- refdpo ran `{shown_command(one['command'])}` then `{shown_command(two['command'])}`.",
            f"  Its defaults: stage one {one['dtype']}; stage two dtype {u['dtype']} "
            f"(exported weights: {two.get('exported_dtype') or '–'}), ZeRO-{u['zero_stage']}, "
            f"packing {u['packing']}, gradient checkpointing {u['gradient_checkpointing']}, "
            f"learning rate {u['learning_rate']} {u['lr_scheduler']} (warmup {u['warmup_ratio']}), "
            f"export {u['export']}; saved "
            + ", ".join(f"{k}/ {v:.0f} MB" for k, v in two["saved_mb"].items())
            + (
                " (" + ", ".join(f"{k} {v:.1f} s" for k, v in two["saving_parts"].items()) + ")"
                if two.get("saving_parts")
                else ""
            )
            + ". Stage two's steps hold the step-0 check"
            + (
                f" ({two['step0_check_done']:.1f} s into them)."
                if two.get("step0_check_done")
                else "."
            ),
        ]
        for note in two.get("missing", []):
            lines.append(f"  Not measured: {note}.")
    if "trl" in first:
        t = first["trl"]["process"]
        u = t["used"]
        c = u.get("compute") or {}
        extra = ", use_cpu=True" if u.get("use_cpu") else ""
        lines += [
            "- TRL ran `DPOTrainer(model=M, args=DPOConfig(output_dir, per_device_train_batch_size="
            f"{d['batch_size']}, num_train_epochs={d['epochs']}, max_length={d['max_length']}{extra}), "
            "train_dataset=load_dataset('json', data_files=D, split='train')).train()`"
            " (bench/trl_defaults.py).",
            f"  What it used: bf16={u['bf16']} (mixed precision {u['mixed_precision']}): weights "
            f"{c.get('weight_dtype', '?')}, matmuls in {c.get('output_dtype', '?')}"
            f"{' under autocast' if c.get('autocast') else ''}; gradient checkpointing "
            f"{u['gradient_checkpointing']}; reference {u['reference']} ({u['reference_dtype']}); "
            f"learning rate {u['learning_rate']} {u['lr_scheduler_type']}, optimizer {u['optim']}; "
            f"save_strategy {u['save_strategy']!r}: saved "
            + (
                ", ".join(f"{k}/ {v:.0f} MB" for k, v in t["saved_mb"].items() if k != ".")
                or "nothing"
            )
            + ".",
        ]
    return lines


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
    if not workloads:
        panels = []
    sweep, defaults = results.get("sweep"), results["summary"].get("defaults")
    count = len(panels) + bool(sweep) + bool(defaults)
    if not count:
        return
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.6), squeeze=False)
    axes = list(axes[0])
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
    if panels:
        axes[0].legend(fontsize=7)
    if sweep:
        ax = axes[len(panels)]
        ax.bar(["refdpo", "TRL precompute"], [sum(sweep["refdpo_seconds"]), sum(sweep["trl_precompute_seconds"])],
               color=[colors[REFDPO], colors[TRL_PRECOMPUTE]])  # fmt: skip
        ax.set_title(f"sweep of {len(sweep['betas'])} runs, wall s (lower is better)", fontsize=9)
    if defaults:
        plot_defaults(axes[-1], defaults["medians"])
    dtype = f", matched {results['settings']['dtype']}" if workloads else ""
    fig.suptitle(f"refdpo vs TRL DPOTrainer, {results['device']}{dtype}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_defaults(ax, medians: dict) -> None:
    """Wall time of each system's default path, stacked by phase (refdpo: stage one, whole,
    then stage two's phases)."""
    shades = {"start_up": "tab:gray", "steps": "tab:blue", "saving": "tab:purple", "rest": "silver"}
    stacks = {
        "refdpo": [("precompute", medians.get("refdpo precompute", {}), "wall_seconds")]
        + [(k, medians.get("refdpo train", {}), k) for k in PHASES],
        "TRL": [(k, medians.get("trl", {}), k) for k in PHASES],
    }
    for x, (system, parts) in enumerate(stacks.items()):
        bottom = 0.0
        for name, figures, key in parts:
            value = figures.get(key) or 0.0
            color = "tab:olive" if name == "precompute" else shades[name]
            label = "refdpo precompute" if name == "precompute" else name.replace("_", "-")
            label = label if x == 0 else None
            ax.bar(system, value, bottom=bottom, color=color, label=label)
            bottom += value
    ax.legend(fontsize=7)
    ax.set_title("defaults, whole process: wall s (lower is better)", fontsize=9)


def write_reports(results: dict, folder: Path) -> str:
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (folder / "results.md").write_text(table)
    plot(results, folder / "bench.png")
    return table
