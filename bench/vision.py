"""Vision-language pairs: vision-tower passes per pair and pairs/s by layout, on tiny VLMs.

    python -m bench.vision [--output out/bench-vision] [--quick] [--families llava,qwen2_vl]
    make bench-vision

Per family, a tiny random VLM (tests/vlms.py's builders: this module imports `tests.vlms`,
so run it from the repository root) and the first --pairs rows of ../shared/data's
instruction-preference file (bench/workloads.py's workload a), each pair given one generated
picture of mixed size (a quarter of the pairs reuse another pair's picture). Three systems
score the same batches of --batch-size pairs:

  shared          refdpo's layout: one row [prompt, chosen, rejected] per pair, restarted
                  positions, the 4D pair mask, each image encoded once (VisionPairScorer,
                  layout "shared", through vision_pair_logps).
  two_sequences   refdpo's fallback: rows [prompt, chosen] and [prompt, rejected], made from
                  the shared layout inside the step as refdpo makes them; each image encoded
                  once, its features written into both rows (fallback_pair_logps).
  per_sequence    the model's own forward on the same two rows per pair with every image
                  given twice, in one batched call: what TRL's DataCollatorForVisionPreference
                  (`images = [...] * 2`) and RLAIF-V's trainer (`torch.cat([images, images])`)
                  feed the model. Its rows and pixels are made before timing, as a data
                  loader would.

Measured: (a) what the vision tower receives (bench/vision_passes.py's hook: images and pixel
values, not just calls) per pair, in stage one and per stage-two epoch, and TRL's DPOTrainer
itself counted the same way (reference online; TRL 1.16 refuses precompute_ref_log_probs
for vision datasets, and the refusal is reported); (b) pairs/s of stage one (inference mode)
and of a stage-two step (forward, DPO sigmoid loss on stored reference values, backward,
AdamW step; fp32 on CPU, --threads torch threads, a copy of the model per system), the
systems interleaved step by step in an order that rotates every step, medians of --repeats
rounds after --warmup rounds, reported as ratios to the shared layout. Before timing, each system's per-token log-probs on
the first batch are checked against the model's own forward of each sequence alone
(naive_pair_logps); a gap over --tolerance makes the command exit 1.

Tiny random models on CPU measure the layout's overhead, not a real VLM's speed: with a
7B VLM the ratio is set by the vision tower's share of the work and the prompt length.
Writes report.md and results.json to --output and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.vision_passes import TowerCount, per_pair, trl_counts
from bench.vision_report import markdown
from bench.workloads import instruction_pairs
from refdpo.shared.logprobs import PackedPairs, PairLogps, pack_pairs, pair_sums
from refdpo.shared.losses import LossInputs, LossParams, combined_loss
from refdpo.shared.vision import (
    SHARED,
    TWO_SEQUENCES,
    VisionPairScorer,
    encode_prompt,
    fallback_pair_logps,
    family_for,
    naive_pair_logps,
    two_sequence_layout,
    vision_pair_logps,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "instruction-data-with-preference.json"
SYSTEMS = ("shared", "two_sequences", "per_sequence")
FAMILIES = ("llava", "qwen2_vl", "idefics3", "gemma3")
SIZES = [(28, 28), (56, 28), (42, 56), (56, 56), (84, 56), (28, 84)]  # (width, height) px


@dataclass
class Pair:
    prompt: str  # the user turn's text; the image comes first in its content
    chosen: str
    rejected: str
    image: object  # PIL image
    image_index: int


@dataclass
class Batch:
    packed: PackedPairs  # shared layout, one pair per row (as both stages lay vision pairs out)
    two: PackedPairs  # the same pairs as [prompt, chosen], [prompt, rejected] rows
    once: dict  # vision tensors, each pair's image once, in pair order
    twice: dict  # each pair's image twice (one per row of `two`), as TRL's collator builds
    pixels: int  # pixel values of the pairs' images, each processed alone


def make_pairs(source: Path, count: int) -> list[Pair]:
    """The first `count` instruction pairs, each with a picture; pairs count*3/4.. reuse the
    pictures of pairs 0.. (one image in two pairs: each pair still encodes it)."""
    from tests import vlms

    distinct = max(1, math.ceil(count * 3 / 4))
    pictures = vlms.images(distinct, SIZES, seed=0)
    return [
        Pair(
            row["prompt"][0]["content"],
            row["chosen"],
            row["rejected"],
            pictures[i % distinct],
            i % distinct,
        )
        for i, row in enumerate(instruction_pairs(source, count))
    ]


def make_batch(processor, family, pairs: list[Pair]) -> Batch:
    tok = processor.tokenizer
    prompts, pixels = [], 0
    for pair in pairs:
        content = [{"type": "image"}, {"type": "text", "text": pair.prompt}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(encode_prompt(processor, family, text, [pair.image])[0])
        alone = family.process_images(processor, [pair.image])
        pixels += sum(v.numel() for v in alone.values() if v.is_floating_point())
    chosen = [[*tok.encode(p.chosen), tok.eos_token_id] for p in pairs]
    rejected = [[*tok.encode(p.rejected), tok.eos_token_id] for p in pairs]
    packed = pack_pairs(prompts, chosen, rejected, tok.pad_token_id)
    images = [p.image for p in pairs]
    return Batch(
        packed=packed,
        two=two_sequence_layout(packed),  # rows 2k, 2k+1: pair k (one pair per packed row)
        once=family.process_images(processor, images),
        twice=family.process_images(processor, [im for im in images for _ in (0, 1)]),
        pixels=pixels,
    )


def per_sequence_logps(model, family, batch: Batch) -> PairLogps:
    """The model's own forward on both rows of every pair, each image given once per row,
    one batched call (right padding, a 2D attention mask)."""
    two = batch.two
    out = model(
        input_ids=two.input_ids,
        attention_mask=(two.pair_index >= 0).long(),
        use_cache=False,
        **batch.twice,
        **family.naive_kwargs(model.config, two.input_ids),
    )
    logps = torch.log_softmax(out.logits[two.target_row, two.predictor_pos].float(), dim=-1)
    return pair_sums(logps.gather(-1, two.target_ids[:, None]).squeeze(-1), batch.packed)


@dataclass
class System:
    name: str
    model: torch.nn.Module  # the VLM
    logps: object  # Batch -> PairLogps
    optimizer: torch.optim.Optimizer | None = None


def make_system(name: str, model, family) -> System:
    """A system's log-prob function; refdpo's through its public calls, so that the
    two-sequence rows are made where refdpo makes them (inside the step)."""
    if name == "per_sequence":
        return System(name, model, lambda b: per_sequence_logps(model, family, b))
    if name == "shared":
        scorer = VisionPairScorer(model, family, SHARED)
        return System(name, model, lambda b: vision_pair_logps(scorer, family, b.packed, b.once))
    scorer = VisionPairScorer(model, family, TWO_SEQUENCES)
    return System(name, model, lambda b: fallback_pair_logps(scorer, family, b.packed, b.once))


def dpo_loss(policy: PairLogps, reference: PairLogps) -> torch.Tensor:
    x = LossInputs(
        policy_chosen_logps=policy.chosen_logps,
        policy_rejected_logps=policy.rejected_logps,
        reference_chosen_logps=reference.chosen_logps,
        reference_rejected_logps=reference.rejected_logps,
        chosen_lengths=policy.chosen_lengths,
        rejected_lengths=policy.rejected_lengths,
    )
    return combined_loss(x, "sigmoid", LossParams(beta=0.1))[0]


def score_step(system: System, batch: Batch, reference=None) -> None:
    with torch.inference_mode():
        system.logps(batch)


def train_step(system: System, batch: Batch, reference: PairLogps) -> None:
    dpo_loss(system.logps(batch), reference).backward()
    system.optimizer.step()
    system.optimizer.zero_grad(set_to_none=True)


def run_pass(step, system: System, batches: list[Batch], references: list) -> None:
    for batch, reference in zip(batches, references, strict=True):
        step(system, batch, reference)


def counted(system: System, family, run, pairs: int, pixels: int) -> dict:
    """Tower totals of one pass, per pair."""
    counter = TowerCount.attach(family, system.model)
    try:
        run()
    finally:
        totals = counter.detach()
    return per_pair(totals, pairs, pixels)


def timed(
    step, systems: dict, batches: list[Batch], references: list, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each system's pass over `batches`, per repeat. Interleaved step by step,
    the order rotating every batch and round, so that a busy spell of a shared machine
    lands on every system alike."""
    names, seconds = list(systems), {name: [] for name in systems}
    for r in range(warmup + repeats):
        total = dict.fromkeys(names, 0.0)
        for b, (batch, reference) in enumerate(zip(batches, references, strict=True)):
            k = (r + b) % len(names)
            for name in names[k:] + names[:k]:
                start = time.perf_counter()
                step(systems[name], batch, reference)
                total[name] += time.perf_counter() - start
        if r >= warmup:
            for name in names:
                seconds[name].append(total[name])
    return seconds


def figures(seconds: dict[str, list[float]], pairs: int) -> dict:
    medians = {name: pairs / statistics.median(s) for name, s in seconds.items()}
    return {
        "seconds": seconds,
        "pairs_per_s": medians,
        "ratio_to_shared": {name: v / medians["shared"] for name, v in medians.items()},
    }


def agreement(model, family, batch: Batch) -> dict:
    """Max |per-token log-prob - the model's own forward of each sequence alone|."""
    with torch.inference_mode():
        naive = naive_pair_logps(model, family, batch.packed, batch.once)
        return {
            name: (make_system(name, model, family).logps(batch).token_logps - naive.token_logps)
            .abs()
            .max()
            .item()
            for name in SYSTEMS
        }


def layout_tokens(batches: list[Batch]) -> dict:
    """Tokens through the decoder per pair, padding left out and in, by layout."""
    pairs = sum(b.packed.num_pairs for b in batches)
    out = {}
    for name, get in (("shared", lambda b: b.packed), ("two_rows", lambda b: b.two)):
        real = sum(int((get(b).pair_index >= 0).sum()) for b in batches)
        padded = sum(get(b).input_ids.numel() for b in batches)
        out[name] = {"tokens_per_pair": real / pairs, "padded_per_pair": padded / pairs}
    return out


def measure(step, systems: dict, family, batches: list[Batch], references: list, args) -> dict:
    """One stage's figures: tower totals of one untimed pass per system, then timed passes."""
    pairs = sum(b.packed.num_pairs for b in batches)
    pixels = sum(b.pixels for b in batches)
    passes = {
        name: counted(
            t, family, lambda t_=t: run_pass(step, t_, batches, references), pairs, pixels
        )
        for name, t in systems.items()
    }
    seconds = timed(step, systems, batches, references, args.warmup, args.repeats)
    return {"passes": passes, **figures(seconds, pairs)}


def run_family(name: str, root: Path, pairs: list[Pair], args) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests import vlms

    folder = getattr(vlms, f"build_{name}")(root)
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    family = family_for(base)
    size = args.batch_size
    batches = [
        make_batch(processor, family, pairs[i : i + size]) for i in range(0, len(pairs), size)
    ]
    record = {
        "family": name,
        "model_type": base.config.model_type,
        "pairs": len(pairs),
        "distinct_images": len({p.image_index for p in pairs}),
        "tokens": layout_tokens(batches),
        "agreement": agreement(base, family, batches[0]),
    }
    scorers = {s: make_system(s, base, family) for s in SYSTEMS}
    record["stage_one"] = measure(score_step, scorers, family, batches, [None] * len(batches), args)
    with torch.inference_mode():  # the stored reference values, as stage one writes them
        references = [scorers["shared"].logps(b) for b in batches]
    trainers = {}
    for s in SYSTEMS:  # a copy of the model and an optimizer each
        model = copy.deepcopy(base).train()
        trainers[s] = make_system(s, model, family)
        trainers[s].optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    record["stage_two"] = measure(train_step, trainers, family, batches, references, args)
    if args.trl:
        pixels = sum(b.pixels for b in batches)
        record["trl"] = trl_counts(folder, family, pairs, size, pixels)
    return record


def quiet_transformers() -> None:
    """No progress bars or advice from transformers: the tables are the output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "refdpo"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vision", description=__doc__.split("\n")[0])
    p.add_argument(
        "--output", default="out/bench-vision", help="folder for report.md, results.json"
    )
    p.add_argument(
        "--quick", action="store_true", help="LLaVA and Qwen2-VL, 8 pairs, 1 repeat: a smoke run"
    )
    p.add_argument("--families", help=f"comma-separated, of {','.join(FAMILIES)} (default: all)")
    p.add_argument("--pairs", type=int, help="pairs per family (default 96; quick 8)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per batch and step (quick 4)")
    p.add_argument("--repeats", type=int, help="timed rounds per stage (default 5; quick 1)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1; quick 0)")
    p.add_argument("--source", default=str(SHARED_DATA), help="instruction-preference JSON")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="max per-token log-prob gap")
    p.add_argument("--no-trl", dest="trl", action="store_false", help="skip TRL's DPOTrainer")
    args = p.parse_args(argv)
    quick = args.quick
    args.families = (args.families or ("llava,qwen2_vl" if quick else ",".join(FAMILIES))).split(
        ","
    )
    if unknown := set(args.families) - set(FAMILIES):
        p.error(f"unknown families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    args.pairs = args.pairs or (8 if quick else 96)
    args.batch_size = 4 if quick and args.batch_size == 8 else args.batch_size
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.source).exists():
        raise SystemExit(f"no {args.source}: give --source FILE")
    pairs = make_pairs(Path(args.source), args.pairs)
    shown = argv if argv is not None else sys.argv[1:]
    results = {
        "command": " ".join(["python -m bench.vision", *shown]),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()})",
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "families": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            record = run_family(name, Path(tmp), pairs, args)
            results["families"].append(record)
            print(f"{time.strftime('%H:%M:%S')} {name}: done", flush=True)
    worst = max(g for r in results["families"] for g in r["agreement"].values())
    results["agreement_ok"] = worst <= args.tolerance
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "report.md").write_text(table)
    print(table)
    return 0 if results["agreement_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
