"""bench/vision.py's results as markdown: tower passes, pairs/s by layout, the checks."""

from __future__ import annotations

LABELS = {
    "shared": "refdpo, shared layout",
    "two_sequences": "refdpo, two-sequence layout",
    "per_sequence": "per-sequence rows, model's own forward (TRL / RLAIF-V style)",
}
TRL_ROWS = (
    ("online", "policy", "TRL DPOTrainer, reference online", "policy, per epoch"),
    ("online", "reference", "TRL DPOTrainer, reference online", "reference, per epoch"),
    ("precompute", "precompute", "TRL DPOTrainer, precompute_ref_log_probs", "precompute pass"),
    ("precompute", "policy", "TRL DPOTrainer, precompute_ref_log_probs", "policy, per epoch"),
)


def _trl_refusals(results: dict) -> list[str]:
    """TRL's own words where it refused a mode (1.16: no precompute for vision datasets)."""
    said = {}
    for f in results["families"]:
        for mode, record in f.get("trl", {}).items():
            if "refused" in record:
                said.setdefault((mode, record["refused"]), []).append(f["family"])
    return [
        f'TRL refused `{mode}` ({", ".join(names)}): "{why}"' for (mode, why), names in said.items()
    ]


def _passes(results: dict) -> list[str]:
    fams = results["families"]
    lines = [
        "| system | pass | " + " | ".join(f["family"] for f in fams) + " |",
        "|---|---|" + "---:|" * len(fams),
    ]

    def cell(p: dict | None) -> str:
        return "-" if p is None else f"{p['encodings']:.2f} ({p['calls']} calls)"

    for system, label in LABELS.items():
        for stage, what in (
            ("stage_one", "stage one (reference)"),
            ("stage_two", "stage two, per epoch"),
        ):
            cells = [cell(f[stage]["passes"][system]) for f in fams]
            lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    if any("trl" in f for f in fams):
        for mode, role, label, what in TRL_ROWS:
            cells = [cell(f.get("trl", {}).get(mode, {}).get(role)) for f in fams]
            if any(c != "-" for c in cells):
                lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
        refusals = _trl_refusals(results)
        lines += ["", *refusals] if refusals else []
    return lines


def _speed(results: dict) -> list[str]:
    lines = [
        "| family | stage | shared pairs/s | two-sequence pairs/s (x shared) | "
        "per-sequence pairs/s (x shared) |",
        "|---|---|---:|---:|---:|",
    ]
    for f in results["families"]:
        for stage, what in (
            ("stage_one", "stage one (scoring)"),
            ("stage_two", "stage two (step)"),
        ):
            rate, ratio = f[stage]["pairs_per_s"], f[stage]["ratio_to_shared"]
            lines.append(
                f"| {f['family']} | {what} | {rate['shared']:.1f} | "
                f"{rate['two_sequences']:.1f} ({ratio['two_sequences']:.2f}x) | "
                f"{rate['per_sequence']:.1f} ({ratio['per_sequence']:.2f}x) |"
            )
    return lines


def _checks(results: dict) -> list[str]:
    lines = [
        "| family | max gap shared | two-sequence | per-sequence | tokens/pair shared "
        "(padded) | tokens/pair two rows (padded) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in results["families"]:
        gap, tok = f["agreement"], f["tokens"]
        lines.append(
            f"| {f['family']} | {gap['shared']:.1e} | {gap['two_sequences']:.1e} | "
            f"{gap['per_sequence']:.1e} | {tok['shared']['tokens_per_pair']:.0f} "
            f"({tok['shared']['padded_per_pair']:.0f}) | {tok['two_rows']['tokens_per_pair']:.0f} "
            f"({tok['two_rows']['padded_per_pair']:.0f}) |"
        )
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    fams = results["families"]
    head = [
        "# Vision-language pairs: tower passes and pairs/s by layout (tiny random VLMs, CPU)",
        "",
        f"`{results['command']}`: {results['device']}; versions {results['versions']}; "
        f"{fams[0]['pairs'] if fams else 0} pairs per family ({fams[0]['distinct_images'] if fams else 0} "
        f"distinct images), batches of {s['batch_size']}, fp32, medians of {s['repeats']} "
        f"repeats after {s['warmup']} warm-up rounds; {results['seconds']:.0f} s in all.",
        "",
        "## Vision-tower encodings per pair",
        "",
        "Pixel values the tower received over the pixel values of the pairs' images, each "
        "encoded once: 1.00 = every pair's image went through the tower once (calls: tower "
        "calls in the whole pass).",
        "",
    ]
    speed = [
        "",
        "## Pairs/s by layout (ratios to the shared layout)",
        "",
        "Stage one: scoring in inference mode. Stage two: forward, DPO loss on stored "
        "reference values, backward and an AdamW step. Same pairs, batches and order for "
        "every layout; tiny models measure the layout's overhead, not a real VLM's speed.",
        "",
    ]
    checks = [
        "",
        "## Checks",
        "",
        "Max |per-token log-prob - the model's own forward of each sequence alone| on the "
        f"first batch (tolerance {s['tolerance']:.0e}: {'ok' if results['agreement_ok'] else 'FAILED'}); "
        "decoder tokens per pair (the two-row layouts hold the prompt twice).",
        "",
    ]
    return (
        "\n".join(head + _passes(results) + speed + _speed(results) + checks + _checks(results))
        + "\n"
    )
