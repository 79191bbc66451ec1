"""Train with TRL's DPOTrainer on pre-tokenized pairs and write what it cost, as JSON.

The benchmark runs this worker and refdpo side by side on the same token ids, in the same
order, with the same hyper-parameters, and compares losses, step times and memory. Two TRL
set-ups are measured (`--mode`):

* `online`: TRL loads its own copy of the reference model and runs it on every step;
* `precompute`: `precompute_ref_log_probs=True`, TRL scores the whole training set with the
  reference before training (inside `DPOTrainer.__init__` in TRL 1.16) and keeps no reference
  model during training, which is the closest TRL analogue of refdpo's two stages.

Why the overrides exist (without them the two systems would not see the same data):

* `_prepare_dataset` returns the dataset untouched. TRL would otherwise re-tokenize text,
  append an EOS and drop over-long rows; here the ids arrive already tokenized by the
  benchmark and must be scored exactly as given (with `max_length=None`, nothing is cut).
* `_get_train_sampler` returns a SequentialSampler: the pairs file is already in training
  order (pairs 0..B-1 are step 1, ...), and Trainer would shuffle it.
* `compute_loss` records the full-precision loss of every step; Trainer's log rounds it to
  4 digits, too coarse to compare two implementations.
* `_precompute_ref_logps` is wrapped to time TRL's reference pass.

Run from the repository root:

    python -m bench.trl_worker --model DIR --pairs pairs.jsonl --mode precompute \
        --batch-size 8 --steps 20 --out result.json
"""

from __future__ import annotations

import os

# Nothing may be fetched from a hub, and TRL's trainers send a telemetry ping from
# `__init__` (which would also land inside `init_seconds`). Set before importing HF libraries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# TRL's precompute loop reads this variable rather than `disable_tqdm`.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import json
import math
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import torch
import transformers
import trl
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as trl_dpo_module

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.trl_worker",
        description="Train with TRL DPOTrainer on pre-tokenized pairs; write timings and losses as JSON.",
    )
    p.add_argument(
        "--model", required=True, help="local Hugging Face model folder (with tokenizer)"
    )
    p.add_argument(
        "--pairs",
        required=True,
        help="JSONL: id, prompt_ids, chosen_ids, rejected_ids, in training order",
    )
    p.add_argument("--mode", required=True, choices=["online", "precompute"])
    p.add_argument("--batch-size", type=int, required=True, help="pairs per optimizer step")
    p.add_argument("--precompute-batch-size", type=int, default=None, help="default: --batch-size")
    p.add_argument(
        "--steps",
        type=int,
        required=True,
        help="optimizer steps; trains the first steps*batch pairs",
    )
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="TRL's DPOConfig turns it on by default; it stays off here unless asked, like refdpo's default",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON result file (written atomically)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        p.error("--batch-size and --steps must be at least 1")
    if args.precompute_batch_size is None:
        args.precompute_batch_size = args.batch_size
    return args


def read_pairs(path: str, count: int) -> list[dict]:
    """The first `count` rows of the pairs file, only the three id columns, in file order."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            rows.append({c: [int(t) for t in row[c]] for c in COLUMNS})
            if len(rows) == count:
                break
    if len(rows) < count:
        sys.exit(
            f"trl_worker: {path} has {len(rows)} pairs, but --steps x --batch-size needs {count}"
        )
    return rows


def count_tokens(rows: list[dict]) -> int:
    """Tokens of the two sequences TRL scores per pair (prompt+chosen, prompt+rejected), padding excluded."""
    return sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )


def rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step: forward, backward, clipping, optimizer step.

    Trainer fetches and collates the batch before `on_step_begin` and logs after
    `on_step_end`, so neither is inside the measured time.
    """

    def __init__(self, device: str):
        self.device = device
        self.seconds: list[float] = []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.seconds.append(time.perf_counter() - self._start)


class BenchDPOTrainer(DPOTrainer):
    """DPOTrainer that takes the ids as given, keeps file order and records exact losses."""

    def __init__(self, *args, **kwargs):
        # Set before DPOTrainer.__init__, which is where TRL 1.16 runs the precompute pass.
        self.step_losses: list[float] = []
        self.precompute_seconds: float | None = None
        self.precompute_pairs: int | None = None
        self.precompute_hash_seconds: float | None = None
        with self._timed_hash_module():
            super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def _timed_hash_module(self):
        """Time TRL's hash of the reference weights.

        With precompute on, `DPOTrainer.__init__` hashes the whole state dict (its cache key)
        before the reference pass; that cost belongs to TRL's precompute but sits outside
        `_precompute_ref_logps`, so it is measured on its own. Only the module attribute is
        swapped, for the duration of `__init__`; the hash itself is TRL's.
        """
        original = trl_dpo_module.hash_module

        def timed(module):
            started = time.perf_counter()
            try:
                return original(module)
            finally:
                spent = time.perf_counter() - started
                self.precompute_hash_seconds = (self.precompute_hash_seconds or 0.0) + spent

        trl_dpo_module.hash_module = timed
        try:
            yield
        finally:
            trl_dpo_module.hash_module = original

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # The ids are the benchmark's, already tokenized: no re-tokenizing, no EOS, no filtering.
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        # The pairs file is already in step order; Trainer's default would shuffle it.
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return SequentialSampler(dataset)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        sync(self.args.device.type)
        started = time.perf_counter()
        result = super()._precompute_ref_logps(dataset, name, batch_size)
        sync(self.args.device.type)
        self.precompute_seconds = (self.precompute_seconds or 0.0) + time.perf_counter() - started
        self.precompute_pairs = (self.precompute_pairs or 0) + len(dataset)
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:  # one call per optimizer step, since gradient accumulation is 1
            loss = result[0] if return_outputs else result
            self.step_losses.append(loss.detach().float().item())
        return result


def load_model(path: str, dtype: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
        attn_implementation="sdpa",
    )
    return model, tokenizer


def build_config(args: argparse.Namespace, output_dir: str, on_cuda: bool) -> DPOConfig:
    """Every setting that could differ from refdpo's run is spelled out, not left to a default."""
    return DPOConfig(
        output_dir=output_dir,
        # data: ids as given, nothing truncated, one pass in file order
        max_length=None,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        num_train_epochs=1,
        dataloader_num_workers=0,
        remove_unused_columns=True,  # TRL's signature columns keep the ids and the ref log-probs
        # loss
        loss_type=["sigmoid"],
        beta=args.beta,
        precompute_ref_log_probs=args.mode == "precompute",
        precompute_ref_batch_size=args.precompute_batch_size,
        # optimizer and schedule
        optim="adamw_torch",
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=args.max_grad_norm,
        # precision and memory: DPOConfig defaults bf16 and gradient checkpointing to True
        bf16=args.dtype == "bf16",
        fp16=False,
        # transformers 5.23 renamed it; passing the new name keeps TRL's default (True) out
        activation_checkpointing=args.gradient_checkpointing,
        use_cpu=not on_cuda,
        seed=args.seed,
        data_seed=args.seed,
        # no eval, no checkpoints, no trackers, quiet console
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        log_level="warning",
    )


def write_json_atomic(path: str, obj: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quiet_logs() -> None:
    # TRL 1.16 and Trainer still call the `gradient_checkpointing*` names that transformers 5.23
    # deprecated for `activation_checkpointing*` (one warning per call site); nothing to act on here.
    warnings.filterwarnings(
        "ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning
    )
    transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_warning()
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    on_cuda = torch.cuda.is_available()
    device = "cuda" if on_cuda else "cpu"
    n_pairs = args.steps * args.batch_size

    rows = read_pairs(args.pairs, n_pairs)
    # In memory, so the dataset has no cache files: TRL's precompute cache then goes to a
    # temporary folder that dies with the process, and every run recomputes the reference pass.
    dataset = datasets.Dataset.from_list(rows)

    transformers.set_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype)
    load_seconds = time.perf_counter() - started
    rss_after_load_mb = rss_mb()

    timer = StepTimer(device)
    with tempfile.TemporaryDirectory(prefix="trl_worker_") as output_dir:
        config = build_config(args, output_dir, on_cuda)
        sync(device)
        started = time.perf_counter()
        trainer = BenchDPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        # With disable_tqdm, Trainer prints every log dict to stdout instead; the numbers are in the JSON.
        trainer.remove_callback(PrinterCallback)
        sync(device)
        init_seconds = time.perf_counter() - started

        started = time.perf_counter()
        trainer.train()
        sync(device)
        train_seconds = time.perf_counter() - started

    losses = trainer.step_losses
    if len(losses) != args.steps or len(timer.seconds) != args.steps:
        sys.exit(
            f"trl_worker: expected {args.steps} steps, recorded {len(losses)} losses and {len(timer.seconds)} times"
        )
    log = [entry for entry in trainer.state.log_history if "loss" in entry]

    result = {
        "system": f"trl-{args.mode}",
        "args": vars(args),
        "pairs": n_pairs,
        "tokens": count_tokens(rows),
        "losses": losses,
        "first_loss_minus_ln2": losses[0] - math.log(2),
        "grad_norms": [entry.get("grad_norm") for entry in log],
        "step_seconds": timer.seconds,
        "load_seconds": load_seconds,
        "init_seconds": init_seconds,
        "precompute_seconds": trainer.precompute_seconds,
        "precompute_pairs": trainer.precompute_pairs,
        "precompute_hash_seconds": trainer.precompute_hash_seconds,
        "train_seconds": train_seconds,
        "rss_after_load_mb": rss_after_load_mb,
        "peak_rss_mb": rss_mb(),
        "cuda_max_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if on_cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "datasets_version": datasets.__version__,
    }
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
