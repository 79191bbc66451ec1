"""Loading the reference or policy model and tokenizer, and fingerprinting them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from refdpo.shared.errors import MissingPath, UsageError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION = ("sdpa", "eager")  # both accept the 4D prefix-sharing mask; flash kernels do not


def check_model_dir(path: str, what: str = "model") -> None:
    """Fail fast, before anything loads: the folder exists and looks like a HF model."""
    folder = Path(path)
    if not folder.is_dir():
        raise MissingPath(
            f"{what} folder {path!r} does not exist (a hub name is not accepted: download it first)"
        )
    if what == "adapter":
        if not (folder / "adapter_config.json").exists():
            raise MissingPath(f"{path}: no adapter_config.json; is it a PEFT adapter folder?")
    elif not (folder / "config.json").exists():
        raise MissingPath(f"{path}: no config.json; is it a Hugging Face model folder?")


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here")
        return chosen
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' is bf16 on a GPU that has it, fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(
    path: str,
    adapter: str | None,
    dtype: str,
    attn_implementation: str,
    device: torch.device,
) -> torch.nn.Module:
    """A causal LM from a folder, with an optional PEFT adapter merged into it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
    if adapter:
        from peft import PeftModel

        # merged: the forward is then the plain model's, and stage two can start from the
        # same merged weights so that the step-0 identity holds
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and every weight's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
