"""Where metrics go: the console (progress bar), metrics.jsonl, and TensorBoard if installed."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)


def check_reporters(report_to: str) -> None:
    """--report-to tensorboard needs the package: say so before a model loads."""
    if report_to == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError(
                "--report-to tensorboard: the tensorboard package is not installed "
                "(pip install tensorboard)"
            ) from None


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class MetricsLog:
    """Rank 0 writes; other ranks hold a disabled instance."""

    def __init__(
        self,
        output: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        report_to: str = "auto",
        run_name: str | None = None,
    ):
        self.enabled = enabled
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
        )
        self.file = open(output / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115 (kept open for the run)
        self.tensorboard = None
        if enabled and report_to != "none":
            try:
                from torch.utils.tensorboard import SummaryWriter

                folder = output / "tensorboard" / (run_name or "")
                self.tensorboard = SummaryWriter(str(folder))
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to metrics.jsonl only")

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(f"{split}/{key}", value, step)
        if split == "train":
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics['rewards/accuracies']:.2f}",
                refresh=False,
            )
        else:
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("loss", "rewards/"))
            )
            self.bar.write(f"eval @ step {step}: {shown}")

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
