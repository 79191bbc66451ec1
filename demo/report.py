"""The demo's pictures and Markdown report, from metrics.jsonl and the before/after numbers."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def _num(value: float, digits: int) -> str:
    """Fixed-point text without a "-0.00" for float noise around zero."""
    return f"{round(value, digits) + 0.0:.{digits}f}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics(path: Path) -> dict[str, list[dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {split: [r for r in records if r["split"] == split] for split in ("train", "eval")}


def plot_training(metrics: dict[str, list[dict]], out: Path) -> Path:
    """Loss, reward accuracy and reward margin over steps, train and eval."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in zip(
        axes,
        ("loss", "rewards/accuracies", "rewards/margins"),
        ("loss (all terms)", "reward accuracy", "reward margin"),
        strict=True,
    ):
        for split, style in (("train", "-"), ("eval", "o-")):
            rows = metrics[split]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=split)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out / "training.png")


def plot_before_after(rows: list[tuple[str, float, float]], out: Path) -> Path:
    """Grouped bars: each held-out metric before and after training."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.8 * len(rows), 3.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="before (reference)")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="after DPO")
    for x, (_, before, after) in zip(xs, rows, strict=True):
        ax.text(x - 0.2, before, _num(before, 2), ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, after, _num(after, 2), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r[0] for r in rows])
    ax.set_title("held-out metrics")
    ax.legend()
    return _save(fig, out / "before_after.png")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()[:80] or "(empty)"


def markdown(summary: dict, before: list[dict], after: list[dict], examples: int = 8) -> str:
    lines = [
        "# refdpo demo report",
        "",
        f"Model: `{summary['model']}`. Data: {summary['data']}. Training: {summary['training']}.",
        "",
        "| held-out metric | before (reference) | after DPO |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_num(b, 3)} | {_num(a, 3)} |" for name, b, a in summary["table"]]
    lines += [
        "",
        "The reference's implicit reward is 0 for every response, so before training the reward",
        "margin is 0 and every pair is a tie; ties count half, so the reward accuracy is 0.5.",
        "",
        f"Wall time: {summary['seconds']['total']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items() if k != "total")
        + ").",
        "",
        "![training](training.png)",
        "",
        "![before and after](before_after.png)",
    ]
    if before and after:
        lines += [
            "",
            "## Greedy answers on held-out prompts",
            "",
            "| prompt | answer | before | after |",
            "|---|---|---|---|",
        ]
        for b, a in list(zip(before, after, strict=True))[:examples]:
            prompt = b["prompt"][-1]["content"] if isinstance(b["prompt"], list) else b["prompt"]
            lines.append(
                f"| {_cell(prompt)} | {_cell(str(b.get('answer', '')))} | {_cell(b['generation'])} | {_cell(a['generation'])} |"
            )
    return "\n".join(lines) + "\n"


def summary_table(table: list[tuple[str, float, float]]) -> str:
    width = max(len(r[0]) for r in table)
    lines = [f"{'held-out metric':<{width}}  {'before':>8}  {'after':>8}"]
    lines += [f"{name:<{width}}  {_num(b, 3):>8}  {_num(a, 3):>8}" for name, b, a in table]
    return "\n".join(lines)
