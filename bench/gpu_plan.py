"""What bench.gpu runs, in order: model builds, then per group (model x workload) its parts.

    qwen-a, qwen-b: stage one, stage two, ceilings (prefill, SFT step), TRL online, TRL
                    precompute; Qwen2.5-0.5B shape, full fine-tuning.
    llama-b:        stage one, ceilings (prefill, LoRA SFT step), stage two with LoRA;
                    Llama-3-8B shape (full fine-tuning with Adam does not fit one GPU: bf16
                    weights and gradients, fp32 master weights and two moments are 16 bytes
                    per parameter, 128 GB). No TRL: its worker has no LoRA.

The most useful first, since a budget cuts the last parts (TIERS): qwen-a whole; qwen-b's
stage one, stage two and TRL online (the long-chat target); llama-b; then the rest of
qwen-b; last, in the groups of --sharded-groups (default qwen-a), stage one again with a
sharded reference on the one GPU: --zero-stage 3 --offload (ZeRO-3 inference with the
parameters in CPU memory, the set-up for a reference bigger than the GPU; one rank, which
refdpo starts as a one-rank process group itself) and --device-map auto (accelerate's
placement), each measured as the whole reference's stage one is. Each part's `run(timeout)`
returns what it read back (`raw` in results.json) or raises gpu_runs.PartFailed.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import gpu_runs
from bench.gpu_report import DEVICE_MAP, ZERO3_OFFLOAD
from bench.gpu_shapes import MARKER, build, describe
from bench.gpu_workloads import WORKLOADS

MODELS = {"qwen": ("qwen2.5-0.5b", "qwen2-tiny"), "llama": ("llama3-8b", "llama3-tiny")}
# stage one with a sharded reference: part kind -> refdpo precompute's placement flags
PLACEMENTS = {
    ZERO3_OFFLOAD: ("--zero-stage", "3", "--offload"),
    DEVICE_MAP: ("--device-map", "auto"),
}
ORDER = ("build", "stage-one", "stage-two", "trl-online", "ceilings", "trl-precompute",
         *PLACEMENTS)  # fmt: skip
KINDS = ORDER  # what --parts may name
LATE = {"qwen-b": ("ceilings", "trl-precompute")}  # run after llama-b


def tier(group: str, kind: str) -> int:
    if kind in PLACEMENTS:  # after everything else: the budget cuts these first
        return 4
    rank = {"qwen-a": 0, "qwen-b": 1, "llama-b": 2}.get(group, 1)
    return 3 if kind in LATE.get(group, ()) else rank


@dataclass
class Group:
    name: str
    model: str  # key of MODELS
    workload: str
    batch: int
    steps: int
    stage_one_batch: int | None  # stage one's --batch-size; None: refdpo's default
    warmup: int
    lora: bool
    folder: Path
    model_dir: Path
    order: list[list[tuple[int, int, int]]] | None = None  # per step: its pairs' lengths

    def describe(self, dataset: Path) -> dict:
        rows = sum(1 for _ in dataset.open())
        return {"model": self.model, "workload": self.workload, "lora": self.lora,
                "description": WORKLOADS[self.workload], "batch": self.batch,
                "steps": self.steps, "stage_one_batch": self.stage_one_batch,
                "warmup": self.warmup, "dataset": str(dataset),
                "pairs": f"{rows} pairs scored"}  # fmt: skip


@dataclass
class Part:
    id: str
    group: str
    kind: str
    run: Callable[[float], dict]
    needs: list[str] = field(default_factory=list)
    modules: tuple[str, ...] = ()  # importable modules it needs
    tier: int = 0


def make_groups(cfg, root: Path) -> list[Group]:
    groups = []
    for name in cfg.names:
        model, workload = name.split("-")
        lora = model == "llama"
        batch = cfg.batch_lora if lora else (cfg.batch_a if workload == "a" else cfg.batch_b)
        steps = cfg.steps_lora if lora else (cfg.steps_a if workload == "a" else cfg.steps_b)
        shape = MODELS[model][1 if cfg.tiny else 0]
        groups.append(Group(
            name=name, model=model, workload=workload, batch=batch, steps=steps,
            stage_one_batch=cfg.stage_one_batch_size,
            warmup=cfg.warmup, lora=lora, folder=root / name, model_dir=root / "models" / shape,
        ))  # fmt: skip
    return groups


def pad_up(n: float, multiple: int) -> int:
    return int(-(-math.ceil(n) // multiple) * multiple)


def ceiling_spec(g: Group, stage_one: dict, cuda: bool) -> dict:
    """Rows of about one pair each (the median pair's length, padded like refdpo's rows on a
    GPU), as many per step as make the tokens of a stage-one batch (prefill) or a stage-two
    step (SFT); logits on as many positions as those pairs have completion tokens."""
    lengths = stage_one["lengths"]
    row_len = max(
        pad_up(statistics.median(p + c + r for p, c, r in lengths), 128 if cuda else 1), 2
    )
    share = sum(c + r for _, c, r in lengths) / sum(p + c + r for p, c, r in lengths)
    batches = stage_one.get("batches") or []
    one = (statistics.mean(b["tokens"] for b in batches) if batches
           else min(16384, sum(p + c + r for p, c, r in lengths)))  # refdpo's token budget  # fmt: skip
    two = statistics.mean(sum(p + c + r for p, c, r in step) for step in g.order)
    two_completion = statistics.mean(sum(c + r for _, c, r in step) for step in g.order)

    def part(name: str, kind: str, tokens: float, completion: float, steps: int) -> dict:
        rows = max(1, round(tokens / row_len))
        return {"name": name, "kind": kind, "rows": rows, "row_len": row_len,
                "logit_positions": math.ceil(completion / rows), "steps": steps,
                "warmup": g.warmup}  # fmt: skip

    timed_one = max(3, len(batches) - g.warmup)
    return {"model": str(g.model_dir), "dtype": "bf16" if cuda else "fp32", "lora": g.lora,
            "parts": [part("prefill", "prefill", one, one * share, timed_one),
                      part("sft", "sft", two, two_completion, g.steps - g.warmup)]}  # fmt: skip


def make_parts(cfg, bench, groups: list[Group], files: dict, tokenizer: str) -> list[Part]:
    env, cuda, extra = bench.env, bench.cuda, bench.extra
    dtype = "bf16" if cuda else "fp32"
    parts: list[Part] = []
    built: set[str] = set()

    def build_part(g: Group) -> Part:
        shape = g.model_dir.name

        def run(timeout: float) -> dict:
            reused = (g.model_dir / MARKER).exists()
            if not reused and cfg.tiny:
                build(shape, tokenizer, g.model_dir)
            elif not reused:
                gpu_runs.build_model(shape, tokenizer, g.model_dir, "cuda" if cuda else "cpu",
                                     env, bench.root / "logs", timeout)  # fmt: skip
            bench.results["models"][g.model] = {"shape": shape, "folder": str(g.model_dir),
                                                **describe(g.model_dir)}  # fmt: skip
            return {"folder": str(g.model_dir), "reused": reused}

        return Part(f"build/{g.model}", "models", "build", run, tier=tier(g.name, "build"))

    for g in groups:
        logs, shards = g.folder / "logs", g.folder / "shards"
        if g.model not in built:
            built.add(g.model)
            parts.append(build_part(g))
        lengths = (["--max-length", str(cfg.max_length_b), "--max-prompt-length",
                    str(cfg.max_prompt_length_b)] if g.workload == "b" else [])  # fmt: skip

        def stage_one(timeout: float, g=g, logs=logs, shards=shards, lengths=lengths) -> dict:
            raw = gpu_runs.stage_one(str(g.model_dir), files[g.workload], shards,
                                     g.stage_one_batch, lengths, extra, env, logs, timeout)  # fmt: skip
            g.order = training_order(shards, g)
            return raw

        def stage_two(timeout: float, g=g, logs=logs, shards=shards) -> dict:
            output = g.folder / "train"
            shutil.rmtree(output, ignore_errors=True)
            flags = [*extra, *(["--use-peft"] if g.lora else [])]
            try:
                raw = gpu_runs.stage_two(str(g.model_dir), shards, output, g.batch, g.steps, flags,
                                         env, logs, timeout, cfg.skip_final_save)  # fmt: skip
            finally:
                shutil.rmtree(output, ignore_errors=True)  # checkpoints: GBs
            return {**raw, "step_lengths": g.order}

        def trl(timeout: float, mode: str, g=g, logs=logs) -> dict:
            raw = gpu_runs.trl(str(g.model_dir), g.folder / "train-order.jsonl", mode, g.batch,
                               g.steps, dtype, cfg.trl_gradient_checkpointing, env, logs, timeout)  # fmt: skip
            return {**raw, "step_lengths": g.order}

        def ceilings(timeout: float, g=g, logs=logs) -> dict:
            spec = ceiling_spec(g, bench.raw(f"{g.name}/stage-one"), cuda)
            return {**gpu_runs.ceilings(spec, env, logs, timeout), "spec": spec}

        def sharded(timeout: float, kind: str, g=g, logs=logs, lengths=lengths) -> dict:
            out = g.folder / f"shards-{kind}"
            try:
                return gpu_runs.stage_one(str(g.model_dir), files[g.workload], out,
                                          g.stage_one_batch, lengths, extra, env, logs, timeout,
                                          name=kind, placement=PLACEMENTS[kind])  # fmt: skip
            finally:
                shutil.rmtree(out, ignore_errors=True)  # nothing reads these shards

        one = f"{g.name}/stage-one"
        found = [
            Part(one, g.name, "stage-one", stage_one, [f"build/{g.model}"], ("datasets",)),
            Part(f"{g.name}/stage-two", g.name, "stage-two", stage_two, [one], ("deepspeed",)),
            Part(f"{g.name}/ceilings", g.name, "ceilings", ceilings, [one]),
        ]
        if g.lora:  # the ceiling before the (longer) LoRA run: the budget cuts the last
            found[1], found[2] = found[2], found[1]
        else:
            for mode in ("online", "precompute"):
                found.append(Part(f"{g.name}/trl-{mode}", g.name, f"trl-{mode}",
                                  lambda t, mode=mode, trl=trl: trl(t, mode), [one],
                                  ("trl", "datasets")))  # fmt: skip
            found.sort(key=lambda p: ORDER.index(p.kind))
        if g.name in cfg.sharded_names:
            for kind in PLACEMENTS:
                modules = ("datasets", "deepspeed") if kind == ZERO3_OFFLOAD else ("datasets",)
                found.append(Part(f"{g.name}/{kind}", g.name, kind,
                                  lambda t, kind=kind, run=sharded: run(t, kind),
                                  [f"build/{g.model}"], modules))  # fmt: skip
        for p in found:
            p.tier = tier(g.name, p.kind)
        parts += found
    if cfg.part_kinds:  # --parts: only those kinds, and the model builds they need
        kept = {p.id for p in parts if p.kind in cfg.part_kinds}
        needed = {n for p in parts if p.id in kept for n in p.needs}
        parts = [p for p in parts if p.id in kept or (p.kind == "build" and p.id in needed)]
    return sorted(parts, key=lambda p: p.tier)  # stable: within a tier, as listed


def training_order(shards: Path, g: Group) -> list[list[tuple[int, int, int]]]:
    """The pairs refdpo's stage two trains on, step by step (bench.run's order file, which
    TRL is given too), as (prompt, chosen, rejected) lengths."""
    from bench.run import training_order as write_order
    from bench.systems import Settings

    settings = Settings(model="", batch_size=g.batch, steps=g.steps, learning_rate=0.0, dtype="",
                        max_length=0, max_prompt_length=0, threads=1)  # fmt: skip
    path = write_order(shards, settings, g.folder / "train-order.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    return [lengths[i : i + g.batch] for i in range(0, len(lengths), g.batch)]
