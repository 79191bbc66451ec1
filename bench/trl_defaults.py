"""TRL's DPOTrainer as its users run it; what it did and when, as JSON.

The defaults comparison (bench/defaults.py) runs this once per repeat, as a fresh process
timed from outside. Nothing is tuned: the model is given as a path, so DPOTrainer loads the
policy and its online reference itself; the dataset is the prompt/chosen/rejected file read
with `datasets.load_dataset`, tokenized by TRL; `DPOConfig` gets only output_dir,
per_device_train_batch_size, num_train_epochs (or max_steps) and max_length. Everything else
is TRL 1.16's default: bf16, gradient checkpointing, online reference, learning rate 1e-6,
logging every 10 steps, save_strategy "steps" (a checkpoint at the end of training).

Observation only: a callback notes the wall-clock time (time.time(), so the parent can line
it up with its own launch time) when training starts, at each step's start and end and after
each save; a one-shot forward hook on the first linear layer records the dtype the step
computes in, autocast included. Neither changes what is computed.

    python -m bench.trl_defaults --model DIR --dataset pairs.jsonl --output DIR \
        --batch-size 4 --epochs 1 --max-length 256 --report result.json
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402 (after STARTED: the imports below are part of what is timed)
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Nothing may be fetched from a hub, and TRL's trainers send a telemetry ping from `__init__`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

IMPORTED = time.time()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.trl_defaults", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--dataset", required=True, help="JSON Lines: prompt, chosen, rejected")
    p.add_argument("--output", required=True, help="DPOConfig.output_dir")
    p.add_argument("--batch-size", type=int, required=True, help="per_device_train_batch_size")
    p.add_argument("--epochs", type=float, default=1.0, help="num_train_epochs")
    p.add_argument("--max-steps", type=int, default=None, help="max_steps (overrides --epochs)")
    p.add_argument("--max-length", type=int, required=True, help="max_length")
    p.add_argument("--report", required=True, help="JSON file this worker writes")
    return p.parse_args(argv)


class Timeline(TrainerCallback):
    """Wall-clock times of the training loop's events; on GPU the last step waits for its
    kernels, so that the steps and the save are told apart correctly."""

    def __init__(self):
        self.train_begin = None
        self.step_begin: list[float] = []
        self.step_end: list[float] = []
        self.saves: list[float] = []
        self.train_end = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.time()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begin.append(time.time())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_end.append(time.time())

    def on_save(self, args, state, control, **kwargs):
        self.saves.append(time.time())

    def on_train_end(self, args, state, control, **kwargs):
        self.train_end = time.time()


def watch_compute_dtype(model: torch.nn.Module) -> dict:
    """Fill the returned dict on the first forward of the first linear layer: its weight's
    dtype, its output's dtype and whether autocast was on."""
    seen: dict = {}
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(module, inputs, output):
        kind = output.device.type
        seen.update(
            weight_dtype=str(module.weight.dtype).removeprefix("torch."),
            output_dtype=str(output.dtype).removeprefix("torch."),
            autocast=torch.is_autocast_enabled(kind),
            autocast_dtype=str(torch.get_autocast_dtype(kind)).removeprefix("torch."),
        )
        handle.remove()

    handle = layer.register_forward_hook(hook)
    return seen


def plain(value):
    """An enum's value (TrainingArguments keeps several settings as enums)."""
    return getattr(value, "value", value)


def saved_files(output: Path) -> dict[str, int]:
    """Every file TRL left in output_dir, with its size in bytes."""
    return {
        str(p.relative_to(output)): p.stat().st_size
        for p in sorted(output.rglob("*"))
        if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset = datasets.load_dataset("json", data_files=args.dataset, split="train")
    loaded = time.time()
    length = {"max_steps": args.max_steps} if args.max_steps else {"num_train_epochs": args.epochs}
    # Without a GPU, DPOConfig's default bf16 stops with "Your setup doesn't support bf16/gpu.
    # You need to assign use_cpu if you want to train the model on CPU": the one setting a CPU
    # user has to add, as that message says.
    on_cpu = {} if torch.cuda.is_available() else {"use_cpu": True}
    config = DPOConfig(
        output_dir=args.output,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        **length,
        **on_cpu,
    )
    timeline = Timeline()
    trainer = DPOTrainer(model=args.model, args=config, train_dataset=dataset, callbacks=[timeline])
    built = time.time()
    compute = watch_compute_dtype(trainer.model)
    trainer.train()
    trained = time.time()

    model, ref = trainer.model, trainer.ref_model
    history = trainer.state.log_history
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    cuda = torch.cuda.is_available()
    result = {
        "times": {
            "process_start": STARTED,
            "imported": IMPORTED,
            "dataset_loaded": loaded,
            "trainer_built": built,
            "train_begin": timeline.train_begin,
            "step_begin": timeline.step_begin,
            "step_end": timeline.step_end,
            "saves": timeline.saves,
            "train_end": timeline.train_end,
            "train_returned": trained,
        },
        "pairs_in_file": len(dataset),
        "pairs": len(trainer.train_dataset),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "logged_losses": losses,
        "train_loss": next((e["train_loss"] for e in history if "train_loss" in e), None),
        "used": {
            "use_cpu": config.use_cpu,
            "bf16": config.bf16,
            "mixed_precision": plain(trainer.accelerator.mixed_precision),
            "policy_dtype": str(model.dtype).removeprefix("torch."),
            "compute": compute,
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "reference": "online" if ref is not None else "none",
            "reference_dtype": str(ref.dtype).removeprefix("torch.") if ref is not None else None,
            "precompute_ref_log_probs": config.precompute_ref_log_probs,
            "learning_rate": config.learning_rate,
            "lr_scheduler_type": plain(config.lr_scheduler_type),
            "warmup_steps": config.warmup_steps,
            "optim": plain(config.optim),
            "logging_steps": config.logging_steps,
            "save_strategy": plain(config.save_strategy),
            "save_steps": config.save_steps,
            "loss_type": config.loss_type,
            "beta": config.beta,
        },
        "saved": saved_files(Path(args.output)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "datasets": datasets.__version__,
        },
    }
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
