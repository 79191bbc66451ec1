"""Long pairs on CPU: peak memory and wall time of both stages by pair length, the pair mask
before the block-sparse change against today's: `python -m bench.long_pairs` (`make bench-long`).

A tiny model (2-layer, 64-wide random Llama with SmolLM2's tokenizer, max_position_embeddings
65536), so that the pair mask and attention, not the weights, decide memory. For each length
in --lengths (tokens per pair: prompt + chosen + rejected as stage one tokenizes them, chat
template included, each about a third) a JSONL file of --pairs synthetic pairs is written and
each mode runs in its own process, the real CLI:

  before  the mask as it was before the change (`old_attention_bias` below, monkeypatched into
          refdpo.shared.logprobs in the child) and stage one's old batching: batches of 4
          pairs, one pair per row (--batch-size 4 --packing false, no token budget), SDPA;
  dense   --attn-implementation sdpa: today's dense [rows, 1, L, L] mask, built in place
          without [L, L] temporaries, stage one batched by its token budget;
  auto    today's defaults, no flag: `auto` resolves to sdpa_pairs on CPU (the dense mask on
          rows under 2048 tokens, per-pair causal SDPA calls on longer ones);
  flex    stage one with --attn-implementation flex_attention (block-sparse BlockMask).
          Stage two cannot run it on CPU (FlexAttention has no CPU backward): "n/a on CPU".

Stage one is `refdpo precompute --model M --dataset D --output S --max-length L
--max-prompt-length L-1` (+ the mode's flags); stage two is `refdpo train --model M --shards S
--output R --micro-batch-size B --max-steps N` on the same mode's shards (another mode's when
that stage one did not run). Every child is timed from launch to exit and its peak resident
set read from os.wait4 (ru_maxrss of that child alone). A run whose predicted peak (quadratic
in the length, from the same stage and mode at smaller lengths) exceeds --max-gb is skipped,
and a child whose resident set reaches --max-gb is killed (both recorded), so the machine
never swaps; a child killed by the kernel (OOM) is recorded too.

Writes results.json, results.md and, when matplotlib is installed, long_pairs.png to --output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bench.systems import SCORING_LINE, environment

LENGTHS = (2048, 4096, 8192, 16384, 32768)
MODES = ("before", "dense", "auto", "flex")
SHARDS_FROM = ("dense", "auto", "before", "flex")  # stage two without its own stage one
STAGES = ("one", "two")
STAGE_NAMES = {"one": "one (precompute)", "two": "two (train)"}
GB = 2**30  # "GB" in this report: 2^30 bytes
BEFORE_BATCH = 4  # the old stage-one batching: pairs per forward, one pair per row
REFDPO_CLI = [sys.executable, "-m", "refdpo.shared.cli"]  # what the `refdpo` command runs
# the `before` child: the same CLI with the old mask patched in first
BEFORE_CLI = [sys.executable, "-c", "from bench.long_pairs import as_before; as_before()"]
OLD_MASK_LINE = "bench.long_pairs: the pre-change pair mask is in use"
# what each child's log says it did: kept in results.json beside the figures
TOLD = ("attention: ", "loading reference", "scoring in ", "step-0 check", "training ")
OK, SKIPPED, STOPPED, KILLED, FAILED, NOT_APPLICABLE = (
    "ok", "skipped", "stopped", "killed", "failed", "n/a",
)  # fmt: skip


# --- the mask before the change


def old_attention_bias(pair: torch.Tensor, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The pre-change dense pair mask (`git show 9b3359a:shared/logprobs.py`, attention_bias),
    kept here only for this comparison: several [rows, L, L] boolean temporaries, then the
    additive [rows, 1, L, L] result. Not used by refdpo itself."""
    from refdpo.shared.attention import CHOSEN, REJECTED

    length = pair.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=pair.device).tril()
    same_pair = (pair[:, :, None] == pair[:, None, :]) & (pair[:, :, None] >= 0)
    rejected_sees_chosen = (part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN)
    allowed = same_pair & causal & ~rejected_sees_chosen
    allowed |= torch.eye(length, dtype=torch.bool, device=pair.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=pair.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None, :, :]


def as_before() -> None:
    """Entry point of a `before` child: `refdpo <command> ...` (sys.argv[1:]) with PairScorer's
    dense mask replaced by the old one; says so in its log at the first call."""
    import refdpo.shared.attention as attention
    import refdpo.shared.logprobs as logprobs
    from refdpo.shared.cli import main

    def old_mask(pair, part, dtype):
        if not calls:
            print(
                f"{OLD_MASK_LINE} ({pair.shape[0]} x {pair.shape[1]})", file=sys.stderr, flush=True
            )
        calls.append(pair.shape)
        return old_attention_bias(pair, part, dtype)

    calls: list = []
    logprobs.attention_bias = old_mask  # what PairScorer.forward calls
    attention.attention_bias = old_mask
    sys.exit(main(sys.argv[1:]))


# --- model and data


def build_model(folder: Path) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer, positions up to 65536."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from refdpo.shared.demo_model import fetch_demo_model

    tokenizer = AutoTokenizer.from_pretrained(fetch_demo_model())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def word_pool(tokenizer, size: int = 2000) -> list[str]:
    """Lower-case words that are one token each after a space (" word"), drawn from the whole
    vocabulary (seed 0)."""
    found = []
    for token in sorted(tokenizer.get_vocab()):
        text = tokenizer.convert_tokens_to_string([token])
        if text.startswith(" ") and len(text) > 3 and text[1:].isalpha() and text[1:].islower():
            found.append(text)
    picked = random.Random(0).sample(found, min(len(found), 2 * size))
    single = [w for w in picked if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    return [w[1:] for w in single[:size]]


def measure(tokenizer, row: dict) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) tokens of a row as stage one tokenizes it, untruncated."""
    from refdpo.shared.data import RowFormat, normalize_row
    from refdpo.shared.tokens import Truncation, tokenize_pair

    big = 1 << 30
    pair = tokenize_pair(normalize_row(row, RowFormat()), tokenizer, Truncation(big, big - 1))
    return len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)


def synthetic_pair(tokenizer, words: list[str], tokens: int, seed: int) -> tuple[dict, list[int]]:
    """A conversational pair of `tokens` tokens (prompt, chosen, rejected about a third each,
    the chat template's tokens included), random words; its measured part lengths."""
    rng = random.Random(seed)
    third = tokens // 3
    targets = [tokens - 2 * third, third, third]
    counts = list(targets)  # words per part; each word is about one token
    texts = [[rng.choice(words) for _ in range(4 * tokens // 3 + 64)] for _ in range(3)]

    def row() -> dict:
        prompt, chosen, rejected = (" ".join(t[:n]) for t, n in zip(texts, counts, strict=True))
        return {
            "id": f"long-{tokens}-{seed}",
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    for _ in range(20):  # the template's own tokens, then exact
        got = list(measure(tokenizer, row()))
        if got == targets:
            break
        counts = [
            max(1, n + want - have) for n, want, have in zip(counts, targets, got, strict=True)
        ]
    return row(), list(measure(tokenizer, row()))


def write_dataset(tokenizer, words, tokens: int, pairs: int, path: Path) -> list[list[int]]:
    rows, parts = [], []
    for k in range(pairs):
        row, measured = synthetic_pair(tokenizer, words, tokens, seed=tokens * 1000 + k)
        rows.append(row)
        parts.append(measured)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return parts


# --- running one child


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_child(cmd: list[str], env: dict, log: Path, limit_bytes: float) -> dict:
    """Run to completion: status, exit code, wall seconds, peak RSS (ru_maxrss from os.wait4)
    and the output. The resident set is sampled meanwhile; reaching `limit_bytes` kills it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("wb") as out:
        out.write((" ".join(cmd) + "\n\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()
        watch = {"sampled": 0, "over": False}

        def watchdog() -> None:
            while not stop.wait(0.2):
                rss = _rss_bytes(proc.pid)
                watch["sampled"] = max(watch["sampled"], rss)
                if rss >= limit_bytes:
                    watch["over"] = True
                    proc.send_signal(signal.SIGKILL)
                    return

        thread = threading.Thread(target=watchdog, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        thread.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    output = log.read_text(errors="replace")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    rc = proc.returncode
    if watch["over"]:
        state = STOPPED
    elif rc == -signal.SIGKILL:
        state = KILLED  # the kernel's OOM killer, most likely
    else:
        state = OK if rc == 0 else FAILED
    return {
        "status": state, "exit_code": rc, "wall_seconds": wall, "peak_rss_gb": rss / GB,
        "sampled_peak_rss_gb": watch["sampled"] / GB, "command": cmd, "log": str(log),
        "output_tail": output[-2000:] if state != OK else "",
    }  # fmt: skip


def precompute_fields() -> set[str]:
    """Stage one's options as this checkout has them (the token budget is recent)."""
    from refdpo.precompute.config import PrecomputeConfig

    return {f.name for f in dataclasses.fields(PrecomputeConfig)}


def stage_one_command(
    mode: str, model: Path, dataset: Path, shards: Path, tokens: int
) -> list[str]:
    cli = BEFORE_CLI if mode == "before" else REFDPO_CLI
    cmd = [
        *cli, "precompute", "--model", str(model), "--dataset", str(dataset),
        "--output", str(shards), "--max-length", str(tokens), "--max-prompt-length", str(tokens - 1),
    ]  # fmt: skip
    if mode == "before":
        fields = precompute_fields()
        cmd += ["--batch-size", str(BEFORE_BATCH), "--attn-implementation", "sdpa"]
        if "packing" in fields:
            cmd += ["--packing", "false"]
        if "max_tokens_per_batch" in fields:  # no budget: the pair count alone decides
            cmd += ["--max-tokens-per-batch", str(1 << 40)]
    elif mode == "dense":
        cmd += ["--attn-implementation", "sdpa"]
    elif mode == "flex":
        cmd += ["--attn-implementation", "flex_attention"]
    return cmd


def stage_two_command(
    mode: str, model: Path, shards: Path, output: Path, batch: int, steps: int
) -> list[str]:
    cli = BEFORE_CLI if mode == "before" else REFDPO_CLI
    cmd = [
        *cli, "train", "--model", str(model), "--shards", str(shards), "--output", str(output),
        "--micro-batch-size", str(batch), "--max-steps", str(steps),
    ]  # fmt: skip
    if mode in ("before", "dense"):
        cmd += ["--attn-implementation", "sdpa"]
    return cmd


def stage_one_work(record: dict) -> None:
    """The scoring pass (seconds and tokens) from the summary line of the log."""
    found = SCORING_LINE.search(Path(record["log"]).read_text(errors="replace"))
    if found:
        record["pairs"] = int(found[1])
        record["work_seconds"] = float(found[2])
        record["work_tokens"] = sum(record["measured_tokens_per_pair"][: record["pairs"]])
        record["work"] = "scoring pass (its summary line)"


def stage_two_work(record: dict, output: Path, batch: int) -> None:
    """Steps 2..N from metrics.jsonl (step 1 holds the step-0 check and first allocations)."""
    path = output / "metrics.jsonl"
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in records if r.get("split") == "train"}
    steps = sorted(train)
    if not steps:
        return
    record["step_seconds"] = [train[k]["step_seconds"] for k in steps]
    record["losses"] = [train[k]["loss"] for k in steps]
    timed = steps[1:] or steps
    record["work_seconds"] = sum(train[k]["step_seconds"] for k in timed)
    record["work_tokens"] = record["tokens_per_pair_mean"] * batch * len(timed)
    record["work"] = f"steps {timed[0]}..{timed[-1]} (metrics.jsonl)"


# --- predicting and checking memory


def ran(runs: list[dict], stage: str, mode: str) -> list[dict]:
    """Finished runs of one stage and mode, by length."""
    found = [r for r in runs if r["stage"] == stage and r["mode"] == mode and r["status"] == OK]
    return sorted(found, key=lambda r: r["tokens_per_pair"])


def predict_gb(previous: list[dict], tokens: int) -> float | None:
    """Peak RSS at `tokens` per pair, quadratic in the length: the smallest run's peak plus its
    growth to the largest run scaled by (L^2 - L0^2) / (Lp^2 - L0^2); from one run alone, its
    peak times (L / Lp)^2 (an overestimate). None without a smaller run."""
    smaller = [r for r in previous if r["tokens_per_pair"] < tokens]
    if not smaller:
        return None
    last = smaller[-1]
    if len(smaller) == 1:
        return last["peak_rss_gb"] * (tokens / last["tokens_per_pair"]) ** 2
    first = smaller[0]
    l0, lp = first["tokens_per_pair"], last["tokens_per_pair"]
    growth = max(0.0, last["peak_rss_gb"] - first["peak_rss_gb"])
    return first["peak_rss_gb"] + growth * (tokens**2 - l0**2) / (lp**2 - l0**2)


NOISE_GB = 0.05  # peak RSS differences below this are run-to-run noise


def linearity(runs: list[dict], stage: str, mode: str, middle: int = 8192) -> dict:
    """Is memory growth linear in the pair length? baseline: the same stage and mode at the
    smallest length that ran (the process's fixed part: interpreter, libraries, model,
    optimizer, output-layer chunks, and that length's small share). From the length nearest
    `middle` to the largest that ran, the growth above the baseline, (M_hi - M_0) / (M_mid -
    M_0), against the ratio linear memory gives, (L_hi - L_0) / (L_mid - L_0), and quadratic,
    (L_hi^2 - L_0^2) / (L_mid^2 - L_0^2). Verdict: linear up to 1.25x the linear ratio,
    quadratic from the geometric mean of the two, superlinear between; flat when the growth to
    the largest is under NOISE_GB; when only the growth to the middle is, the ratio is not
    judged (unless even NOISE_GB there would make it quadratic)."""
    done = ran(runs, stage, mode)
    out: dict = {"stage": stage, "mode": mode}
    if len(done) < 3:
        return out | {
            "verdict": "not measured",
            "why": f"needs 3 lengths that ran, has {len(done)}",
        }
    base, top = done[0], done[-1]
    mid = min(done[1:-1], key=lambda r: abs(math.log(r["tokens_per_pair"] / middle)))
    l0, lm, lh = (r["tokens_per_pair"] for r in (base, mid, top))
    m0, mm, mh = (r["peak_rss_gb"] for r in (base, mid, top))
    lin = (lh - l0) / (lm - l0)
    quad = (lh**2 - l0**2) / (lm**2 - l0**2)
    out.update(
        baseline_tokens=l0, baseline_gb=m0, middle_tokens=lm, middle_gb=mm, top_tokens=lh,
        top_gb=mh, linear_ratio=lin, quadratic_ratio=quad, measured_ratio=None,
    )  # fmt: skip
    if mh - m0 < NOISE_GB:
        return out | {"verdict": "flat", "why": f"growth to {lh} tokens under {NOISE_GB} GB"}
    if mm - m0 < NOISE_GB:
        at_least = (mh - m0) / NOISE_GB
        if at_least >= math.sqrt(lin * quad):
            why = f"growth to {lm} tokens under {NOISE_GB} GB: ratio over {at_least:.1f}"
            return out | {"verdict": "quadratic", "why": why}
        why = f"growth to {lm} tokens under {NOISE_GB} GB: the ratio is noise"
        return out | {"verdict": "not judged", "why": why}
    ratio = (mh - m0) / (mm - m0)
    out["measured_ratio"] = ratio
    if ratio <= 1.25 * lin:
        out["verdict"] = "linear"
    elif ratio >= math.sqrt(lin * quad):
        out["verdict"] = "quadratic"
    else:
        out["verdict"] = "superlinear"
    return out


# --- report


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def row_cells(r: dict) -> tuple[str, str, str]:
    """(peak RSS GB, seconds, tokens/s) as shown: figures for a finished run, else what
    happened in the first cell."""
    state = r["status"]
    if state == OK:
        speed = r["work_tokens"] / r["work_seconds"] if r.get("work_seconds") else None
        return fmt(r["peak_rss_gb"]), fmt(r["wall_seconds"], 1), fmt(speed, 0)
    if state == NOT_APPLICABLE:
        return "n/a on CPU", "–", "–"
    if state == SKIPPED:
        return f"skipped: predicted {r['predicted_gb']:.1f} > --max-gb {r['max_gb']:g}", "–", "–"
    if state == STOPPED:
        return f"stopped at --max-gb {r['max_gb']:g}", fmt(r["wall_seconds"], 1), "–"
    if state == KILLED:
        return f"killed (SIGKILL: out of memory?) at {r['peak_rss_gb']:.2f}", "–", "–"
    return f"failed (exit {r.get('exit_code')}{r.get('why', '')})", "–", "–"


def resolved_kernel(runs: list[dict], mode: str) -> str | None:
    """The kernel `auto` resolved to, as the child's log says ("attention: sdpa_pairs, ...")."""
    for r in runs:
        for line in r.get("told", []) if r["mode"] == mode else ():
            found = re.search(r"attention: ([\w-]+)", line)
            if found:
                return found[1]
    return None


def mode_notes(results: dict) -> list[str]:
    c = results["config"]
    auto = resolved_kernel(results["runs"], "auto") or "not logged"
    notes = {
        "before": f"before: the pre-change mask (several [rows, L, L] boolean temporaries, then "
        f"the additive [rows, 1, L, L] mask), monkeypatched in; stage one in batches of "
        f"{BEFORE_BATCH} pairs, one pair per row; SDPA.",
        "dense": "dense: `--attn-implementation sdpa`: today's dense [rows, 1, L, L] mask, "
        "built in place; stage one batched by its token budget (default).",
        "auto": f"auto: no attention flag, today's defaults (resolved to `{auto}` here).",
        "flex": "flex: `--attn-implementation flex_attention` (block-sparse BlockMask); stage "
        "two: n/a on CPU (FlexAttention has no CPU backward).",
    }
    return [f"- {notes[m]}" for m in c["modes"]]


def markdown(results: dict) -> str:
    c = results["config"]
    lines = [
        f"# Long pairs: peak memory and time by pair length ({results['device']})",
        "",
        f"`{results['command']}`  ",
        f"Model: 2-layer, 64-wide random Llama, SmolLM2's tokenizer (vocabulary "
        f"{results['vocab_size']}), fp32; {c['pairs']} synthetic pairs per run, prompt / chosen "
        f"/ rejected about a third each; stage two: micro-batch {c['train_batch_size']} pair(s), "
        f"{c['steps']} steps. {results['cores']} cores, versions {results['versions']}; "
        f"{results['seconds'] / 60:.1f} min.",
        "",
        "| tokens per pair | stage | mode | peak RSS GB | seconds | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        measured = r["measured_tokens_per_pair"]
        length = f"{r['tokens_per_pair']}"
        if set(measured) != {r["tokens_per_pair"]}:  # the text could not be made exact
            length += f" (measured {min(measured)}-{max(measured)})"
        lines.append(
            f"| {length} | {STAGE_NAMES[r['stage']]} | {r['mode']} | "
            + " | ".join(row_cells(r))
            + " |"
        )
    lines += [
        "",
        "Peak RSS: the child process's ru_maxrss (os.wait4), GB = 2^30 bytes. Seconds: the "
        "process from launch to exit. Tokens/s: prompt + chosen + rejected tokens over stage "
        "one's scoring pass, or over stage two's steps after the first (step 1 holds the "
        "step-0 check). flex's stage one includes compiling its kernel (once per row shape).",
        "",
        *mode_notes(results),
        "",
        "Memory growth, baseline = the same stage and mode at the smallest length that ran:",
        "",
    ]
    for check in results["checks"]:
        name = f"stage {STAGE_NAMES[check['stage']]}, {check['mode']}"
        if "linear_ratio" not in check:
            lines.append(f"- {name}: {check['verdict']} ({check['why']}).")
            continue
        measured = f"{check['measured_ratio']:.2f}" if check["measured_ratio"] is not None else "–"
        lines.append(
            f"- {name}: **{check['verdict']}**: (M({check['top_tokens']}) - M({check['baseline_tokens']})) / "
            f"(M({check['middle_tokens']}) - M({check['baseline_tokens']})) = "
            f"({check['top_gb']:.2f} - {check['baseline_gb']:.2f}) / ({check['middle_gb']:.2f} - "
            f"{check['baseline_gb']:.2f}) = {measured}; linear memory gives "
            f"{check['linear_ratio']:.2f}, quadratic {check['quadratic_ratio']:.2f}"
            + (f" ({check['why']})" if check.get("why") else "")
            + "."
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Peak RSS against tokens per pair, one line per mode, one panel per stage (log-log);
    nothing when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    stages = [s for s in STAGES if any(r["stage"] == s for r in results["runs"])]
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.6), squeeze=False)
    colors = {"before": "tab:red", "dense": "tab:blue", "auto": "tab:purple", "flex": "tab:green"}
    for ax, stage in zip(axes[0], stages, strict=True):
        for mode in MODES:
            done = ran(results["runs"], stage, mode)
            if done:
                ax.plot([r["tokens_per_pair"] for r in done], [r["peak_rss_gb"] for r in done],
                        marker="o", label=mode, color=colors[mode])  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per pair")
        ax.set_ylabel("peak RSS GB")
        ax.set_title(f"stage {STAGE_NAMES[stage]}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"refdpo long pairs, {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.long_pairs", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--output", default="out/bench-long", help="folder for runs and the report")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS),
                   help="tokens per pair (prompt + chosen + rejected)")  # fmt: skip
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--steps", type=int, default=2, help="stage two's optimizer steps")
    p.add_argument("--pairs", type=int, default=4, help="pairs in each run's dataset")
    p.add_argument("--train-batch-size", type=int, default=1, help="stage two's pairs per step")
    p.add_argument("--max-gb", type=float, default=20.0,
                   help="skip a run predicted to peak above this, kill one that reaches it")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: all cores)")
    args = p.parse_args(argv)
    if min(args.lengths) < 16:
        p.error("--lengths must be >= 16 tokens per pair")
    if args.steps < 1 or args.train_batch_size < 1 or args.pairs < 1:
        p.error("--steps, --train-batch-size and --pairs must be >= 1")
    if "two" in args.stages and args.steps * args.train_batch_size > args.pairs:
        p.error("--steps x --train-batch-size must not exceed --pairs (one epoch)")
    args.lengths = sorted(set(args.lengths))
    args.modes = [m for m in MODES if m in args.modes]
    args.stages = [s for s in STAGES if s in args.stages]
    return args


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed", "refdpo"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_one(runs: list[dict], record: dict, cmd: list[str], env: dict, log: Path, args) -> dict:
    """Skip when predicted above --max-gb, else run; the record is appended to `runs`."""
    record["max_gb"] = args.max_gb
    previous = ran(runs, record["stage"], record["mode"])
    record["predicted_gb"] = predict_gb(previous, record["tokens_per_pair"])
    if record["predicted_gb"] is not None and record["predicted_gb"] > args.max_gb:
        record.update(status=SKIPPED, command=cmd)
    else:
        record.update(run_child(cmd, env, log, args.max_gb * GB))
        text = log.read_text(errors="replace")
        record["told"] = [line for line in text.splitlines() if any(t in line for t in TOLD)]
        if record["status"] == OK and record["mode"] == "before" and OLD_MASK_LINE not in text:
            record.update(status=FAILED, why=": the pre-change mask was never called")
    runs.append(record)
    return record


def report_line(record: dict) -> None:
    peak, seconds, speed = row_cells(record)
    shown = f"peak {peak} GB, {seconds} s, {speed} tokens/s" if record["status"] == OK else peak
    print(
        f"{time.strftime('%H:%M:%S')} {record['tokens_per_pair']:>6} tokens per pair, stage "
        f"{record['stage']}, {record['mode']:<6}: {shown}",
        flush=True,
    )


def stage_one(runs, args, env, model, dataset, folder, base, mode) -> Path | None:
    """One stage-one run; its shard folder when it wrote one."""
    out = folder / f"shards-{mode}"
    cmd = stage_one_command(mode, model, dataset, out, max(base["measured_tokens_per_pair"]))
    record = run_one(runs, {**base, "stage": "one", "mode": mode}, cmd, env,
                     folder / "logs" / f"one-{mode}.log", args)  # fmt: skip
    if record["status"] == OK:
        stage_one_work(record)
        if not (out / "_manifest.json").exists() or not record.get("work_seconds"):
            record.update(status=FAILED, why=": no manifest or no scoring summary line")
    report_line(record)
    return out if record["status"] == OK else None


def stage_two(runs, args, env, model, dataset, folder, base, mode, shards: dict) -> None:
    """One stage-two run on the mode's own shards (another mode's when it has none; an untimed
    stage one when no mode has any)."""
    record = {**base, "stage": "two", "mode": mode}
    if mode == "flex":
        runs.append({**record, "status": NOT_APPLICABLE,
                     "why": "FlexAttention has no CPU backward"})  # fmt: skip
        report_line(runs[-1])
        return
    source = shards.get(mode) or next((shards[m] for m in SHARDS_FROM if m in shards), None)
    if source is None:
        source = folder / "shards-untimed"
        cmd = stage_one_command(
            "auto", model, dataset, source, max(base["measured_tokens_per_pair"])
        )
        prep = run_child(cmd, env, folder / "logs" / "one-untimed.log", args.max_gb * GB)
        if prep["status"] != OK:
            runs.append({**record, "status": FAILED, "why": ": stage one for its shards failed",
                         "exit_code": prep["exit_code"]})  # fmt: skip
            report_line(runs[-1])
            return
        shards["untimed"] = source
    record["shards"] = str(source)
    out = folder / f"train-{mode}"
    cmd = stage_two_command(mode, model, source, out, args.train_batch_size, args.steps)
    record = run_one(runs, record, cmd, env, folder / "logs" / f"two-{mode}.log", args)
    if record["status"] == OK:
        stage_two_work(record, out, args.train_batch_size)
        if not record.get("work_seconds"):
            record.update(status=FAILED, why=": no steps in metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)  # checkpoint and export
    report_line(record)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    root = Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    model = build_model(root / "tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    words = word_pool(tokenizer)
    env = environment(args.threads or os.cpu_count() or 1)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    runs: list[dict] = []
    datasets = {}
    for tokens in args.lengths:
        folder = root / f"len-{tokens}"
        shutil.rmtree(folder, ignore_errors=True)
        dataset = folder / "pairs.jsonl"
        parts = write_dataset(tokenizer, words, tokens, args.pairs, dataset)
        per_pair = [sum(p) for p in parts]
        datasets[tokens] = {"path": str(dataset), "prompt_chosen_rejected": parts}
        base = {"tokens_per_pair": tokens, "measured_tokens_per_pair": per_pair,
                "tokens_per_pair_mean": sum(per_pair) / len(per_pair)}  # fmt: skip
        shards: dict[str, Path] = {}
        for mode in args.modes if "one" in args.stages else ():
            found = stage_one(runs, args, env, model, dataset, folder, base, mode)
            if found:
                shards[mode] = found
        for mode in args.modes if "two" in args.stages else ():
            stage_two(runs, args, env, model, dataset, folder, base, mode, shards)
        for path in shards.values():
            shutil.rmtree(path, ignore_errors=True)
    checks = [linearity(runs, s, m) for s in args.stages for m in args.modes
              if not (s == "two" and m == "flex")]  # fmt: skip
    shown = argv if argv is not None else sys.argv[1:]
    results = {
        "command": " ".join(["python -m bench.long_pairs", *shown]),
        "device": f"CPU ({platform.machine()})",
        "cores": os.cpu_count(),
        "versions": versions(),
        "vocab_size": len(tokenizer),
        "config": vars(args),
        "datasets": datasets,
        "runs": runs,
        "checks": checks,
        "seconds": time.perf_counter() - started,
    }
    (root / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (root / "results.md").write_text(table)
    plot(results, root / "long_pairs.png")
    print(table)
    return 1 if any(r["status"] == FAILED for r in runs) else 0


REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main())
