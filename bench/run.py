"""refdpo against TRL's DPOTrainer, side by side in one sitting: `python -m bench.run`.

For each workload: one untimed stage-one run fixes the token ids and the training order;
then every repeat runs, in an order that rotates between repeats, refdpo (stage one, then
stage two), TRL with its reference online and TRL with `precompute_ref_log_probs=True`, on
the same pairs, order, batch size, dtype, optimizer, learning rate and steps. Then a sweep of
training runs over several betas: refdpo shares one stage one, TRL precomputes per run.
Then the defaults comparison (bench/defaults.py): refdpo's two commands and TRL's
DPOTrainer each with its own defaults and tokenization, every process timed whole.
Writes results.json, results.md and bench.png to --output and prints the table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.defaults import run_defaults
from bench.report import summarize, write_reports
from bench.systems import (
    REFDPO,
    TRL_ONLINE,
    TRL_PRECOMPUTE,
    Settings,
    refdpo_stage_one,
    refdpo_train,
    trl_train,
)
from bench.workloads import instruction_pairs, multiturn_pairs, write_jsonl
from refdpo.shared.config import load_config, option, to_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "instruction-data-with-preference.json"
WORKLOADS = {
    "a": "instruction pairs (short prompts)",
    "b": "multi-turn chats (long prompts, short answers)",
}
SYSTEMS = (REFDPO, TRL_ONLINE, TRL_PRECOMPUTE)
VARIANTS = "nopack:--packing false;group:--length-grouping 8"
logger = logging.getLogger("bench")


@dataclass
class BenchConfig:
    output: str = option("out/bench", "folder for runs, results.json, results.md, bench.png")
    quick: bool = option(False, "tiny random model (SmolLM2's tokenizer), few steps: a smoke run")
    model: str | None = option(None, "model folder (default: SmolLM2-135M-Instruct, fetched once)")
    source: str = option(str(SHARED_DATA), "instruction-preference JSON both workloads draw from")
    workloads: str = option("a,b", "comma-separated: a (short prompts), b (long multi-turn)")
    dataset_a: str | None = option(None, "any preference file refdpo reads, used for workload a")
    dataset_b: str | None = option(None, "any preference file refdpo reads, used for workload b")
    batch_size: int | None = option(None, "pairs per step (default 8; quick 2)")
    steps: int | None = option(None, "optimizer steps per training run (default 6; quick 3)")
    steps_b: int | None = option(None, "steps on workload b, whose steps are long (default: half)")
    repeats: int | None = option(None, "timed repeats of each system (default 3)")
    learning_rate: float = option(5e-6, "constant learning rate, no warmup, AdamW")
    beta: float = option(0.1, "DPO beta of the timed runs")
    sweep_betas: str | None = option(
        None, "betas of the sweep (default 0.05,0.1,0.2,0.5; quick 0.1,0.2; '' skips it)"
    )
    sweep_workload: str = option("a", "workload the sweep runs on")
    dtype: str = option("auto", "auto: bf16 on GPU, fp32 on CPU", ("auto", "fp32", "bf16"))
    max_length: int = option(1536, "stage one's max tokens of prompt + one completion")
    max_prompt_length: int = option(1280, "stage one's max prompt tokens")
    threads: int = option(0, "OMP threads per run (0: all cores)")
    refdpo_variants: str | None = option(
        None,
        "extra refdpo stage-two runs 'name:flags;...', one feature at a time (default "
        "'nopack:--packing false;group:--length-grouping 8'; quick: none)",
    )
    defaults: str = option(
        "also",
        "the defaults comparison (each system with its own defaults, whole process): also "
        "(after the matched runs), only (nothing else), off",
        ("also", "only", "off"),
    )
    defaults_pairs: int | None = option(
        None, "pairs of the defaults comparison: the first rows of --source (default 64; quick 8)"
    )
    defaults_batch_size: int | None = option(
        None, "pairs per step in the defaults comparison (default 4; quick 2)"
    )
    defaults_max_length: int = option(
        256, "defaults comparison: max tokens of prompt + completion, both systems"
    )
    defaults_repeats: int | None = option(
        None, "alternating repeats of the defaults comparison (default 2; quick 1)"
    )

    def __post_init__(self) -> None:
        self.batch_size = self.batch_size or (2 if self.quick else 8)
        self.steps = self.steps or (3 if self.quick else 6)
        self.steps_b = self.steps_b or max(2, self.steps // 2)
        self.repeats = self.repeats or (1 if self.quick else 3)
        if self.sweep_betas is None:
            self.sweep_betas = "0.1,0.2" if self.quick else "0.05,0.1,0.2,0.5"
        if self.refdpo_variants is None:
            self.refdpo_variants = "" if self.quick else VARIANTS
        self.defaults_pairs = self.defaults_pairs or (8 if self.quick else 64)
        self.defaults_batch_size = self.defaults_batch_size or (2 if self.quick else 4)
        self.defaults_repeats = self.defaults_repeats or (1 if self.quick else 2)
        if self.defaults_pairs % self.defaults_batch_size:
            raise ValueError(
                "defaults_pairs must be a multiple of defaults_batch_size: refdpo leaves out a "
                "last partial batch, TRL trains it"
            )
        unknown = set(self.names) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown workload(s) {sorted(unknown)}; known: a, b")
        if min(self.steps, self.steps_b) < 2:
            raise ValueError("steps must be >= 2: the first step is a warm-up, not timed")

    @property
    def names(self) -> list[str]:
        """The matched workloads to run: none with --defaults only."""
        if self.defaults == "only":
            return []
        return [w.strip() for w in self.workloads.split(",") if w.strip()]

    def steps_for(self, workload: str) -> int:
        return self.steps if workload == "a" else self.steps_b

    @property
    def betas(self) -> list[float]:
        return [float(b) for b in self.sweep_betas.split(",") if b.strip()]

    @property
    def variants(self) -> dict[str, list[str]]:
        found = {}
        for item in filter(None, (v.strip() for v in self.refdpo_variants.split(";"))):
            name, _, flags = item.partition(":")
            found[f"refdpo-{name.strip()}"] = flags.split()
        return found


def prepare_model(cfg: BenchConfig, root: Path) -> str:
    """The model folder every system loads."""
    if cfg.model:
        return cfg.model
    from refdpo.shared.demo_model import fetch_demo_model

    smollm = fetch_demo_model()
    if not cfg.quick:
        return str(smollm)
    folder = root / "tiny-model"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def first_rows(path: Path, count: int) -> list[dict]:
    """The first `count` rows of any file refdpo reads, as plain dicts."""
    from refdpo.shared.data import load_source

    source = load_source(str(path))
    return list(source.get(0, min(count, len(source))))


def training_order(shards: Path, settings: Settings, target: Path) -> Path:
    """The pairs refdpo's stage two will train on, in its order, for TRL to train on as well."""
    from refdpo.train.data import PairStream

    manifest = json.loads((shards / "_manifest.json").read_text())
    stream = PairStream(shards, manifest, settings.batch_size, settings.seed)
    if stream.steps_per_epoch < settings.steps:
        raise ValueError(
            f"{manifest['rows']} pairs survived stage one; {settings.steps} steps of "
            f"{settings.batch_size} need more"
        )
    batches = stream.batches(0)
    rows = [row for _ in range(settings.steps) for row in next(batches)]
    keep = ("id", "prompt_ids", "chosen_ids", "rejected_ids")
    return write_jsonl([{k: row[k] for k in keep} for row in rows], target)


def step_tokens(pairs_file: Path, batch_size: int) -> list[int]:
    """Tokens per step as TRL lays a pair out (prompt twice), padding excluded; the same count
    is used for every system, so tokens/s compare like for like."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    per_pair = [
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    ]
    return [sum(per_pair[i : i + batch_size]) for i in range(0, len(per_pair), batch_size)]


def run_workload(cfg: BenchConfig, settings: Settings, name: str, root: Path) -> dict:
    settings = replace(settings, steps=cfg.steps_for(name))
    folder = root / f"workload-{name}"
    count = settings.batch_size * settings.steps + 16  # a few spare: stage one may drop some
    given = cfg.dataset_a if name == "a" else cfg.dataset_b
    if given:  # stage one reads the file itself and keeps its first `count` rows
        dataset = write_jsonl(first_rows(Path(given), count), folder / "pairs.jsonl")
    else:
        make = instruction_pairs if name == "a" else multiturn_pairs
        dataset = write_jsonl(make(Path(cfg.source), count), folder / "pairs.jsonl")
    logger.info("workload %s: %s, %d pairs", name, WORKLOADS[name], count)

    # Repeat 0 starts with refdpo; its shards fix the ids and order every other run trains on.
    shards, order = folder / f"{REFDPO}-r0", folder / "train-order.jsonl"
    logs = folder / "logs"
    runs: list[dict] = []
    systems = [*SYSTEMS, *cfg.variants]
    for repeat in range(cfg.repeats):
        rotation = systems[repeat % len(systems) :] + systems[: repeat % len(systems)]
        for system in rotation:
            tag = f"{system}-r{repeat}"
            flags = cfg.variants.get(system, [])
            # a variant that reorders the data trains on other batches: compare its start only
            record = {
                "system": system,
                "repeat": repeat,
                "same_order": "--length-grouping" not in flags,
            }
            if system == REFDPO:
                record["stage_one"] = refdpo_stage_one(
                    settings, dataset, folder / tag, logs / f"{tag}-precompute.log"
                )
                if repeat == 0:
                    training_order(shards, settings, order)
                train_dir = folder / f"{tag}-train"
                record.update(
                    refdpo_train(settings, folder / tag, train_dir, cfg.beta, logs / f"{tag}.log")
                )
            elif system in cfg.variants:
                train_dir = folder / tag
                record.update(
                    refdpo_train(settings, shards, train_dir, cfg.beta, logs / f"{tag}.log", flags)
                )
            else:
                train_dir = folder / tag
                mode = "online" if system == TRL_ONLINE else "precompute"
                record.update(
                    trl_train(settings, mode, order, train_dir, cfg.beta, logs / f"{tag}.log")
                )
            logger.info(
                "  %-16s repeat %d: %.1f s wall, first loss %.6f",
                system,
                repeat,
                record["wall_seconds"],
                record["losses"][0],
            )
            runs.append(record)
            shutil.rmtree(train_dir, ignore_errors=True)  # checkpoints: GBs
    return {
        "name": name,
        "description": WORKLOADS[name],
        "steps": settings.steps,
        "runs": runs,
        "step_tokens": step_tokens(order, settings.batch_size),
    }


def run_sweep(cfg: BenchConfig, settings: Settings, root: Path) -> dict:
    """Wall time of len(betas) training runs: refdpo's one stage one + its trainings, against
    TRL precomputing inside every run. Everything a user waits for is counted, process start
    and model loading included; refdpo's runs also write a final checkpoint, TRL's do not."""
    name = cfg.sweep_workload
    settings = replace(settings, steps=cfg.steps_for(name))
    folder = root / f"workload-{name}"
    dataset, order = folder / "pairs.jsonl", folder / "train-order.jsonl"
    logs = folder / "logs"
    stage_one = refdpo_stage_one(
        settings, dataset, folder / "sweep-shards", logs / "sweep-precompute.log"
    )
    refdpo_parts = [stage_one["wall_seconds"]]
    for beta in cfg.betas:
        out = folder / f"sweep-refdpo-{beta}"
        refdpo_parts.append(
            refdpo_train(
                settings, folder / "sweep-shards", out, beta, logs / f"sweep-refdpo-{beta}.log"
            )["wall_seconds"]
        )
        shutil.rmtree(out, ignore_errors=True)
    trl_parts = []
    for beta in cfg.betas:
        out = folder / f"sweep-trl-{beta}"
        trl_parts.append(
            trl_train(settings, "precompute", order, out, beta, logs / f"sweep-trl-{beta}.log")[
                "wall_seconds"
            ]
        )
    logger.info(
        "sweep of %d runs: refdpo %.1f s, TRL precompute %.1f s",
        len(cfg.betas),
        sum(refdpo_parts),
        sum(trl_parts),
    )
    return {
        "workload": cfg.sweep_workload,
        "betas": cfg.betas,
        "refdpo_seconds": refdpo_parts,
        "trl_precompute_seconds": trl_parts,
    }


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(BenchConfig, argv, "python -m bench.run", __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    settings = Settings(
        model=prepare_model(cfg, root), batch_size=cfg.batch_size, steps=cfg.steps,
        learning_rate=cfg.learning_rate, dtype=cfg.dtype if cfg.dtype != "auto" else ("bf16" if cuda else "fp32"),
        max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        threads=cfg.threads or os.cpu_count() or 1,
    )  # fmt: skip
    started = time.perf_counter()
    workloads = [run_workload(cfg, settings, name, root) for name in cfg.names]
    sweep = (
        run_sweep(cfg, settings, root) if cfg.betas and cfg.sweep_workload in cfg.names else None
    )
    defaults = None
    if cfg.defaults != "off":
        defaults = run_defaults(
            settings.model, Path(cfg.source), cfg.defaults_pairs, cfg.defaults_batch_size,
            cfg.defaults_max_length, cfg.defaults_repeats, settings.threads, root,
        )  # fmt: skip
    results = {
        "config": to_dict(cfg),
        "settings": vars(settings),
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores",
        "versions": versions(),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": time.perf_counter() - started,
        "workloads": workloads,
        "sweep": sweep,
        "defaults": defaults,
    }
    results["summary"] = summarize(results)
    table = write_reports(results, root)
    print(table)
    same_pairs = results["summary"].get("defaults", {}).get("same_pairs", True)
    return 0 if results["summary"]["agreement_ok"] and same_pairs else 1


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "deepspeed", "refdpo"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


if __name__ == "__main__":
    sys.exit(main())
