"""Loading the reference or policy model and tokenizer, and fingerprinting them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from refdpo.shared.attention import PAIR_SDPA, flex_available, register_pair_sdpa
from refdpo.shared.errors import MissingPath, UsageError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# auto: flex_attention (block-sparse pair mask) on CUDA where the model supports it, else
# sdpa_pairs (refdpo's: SDPA with the dense mask on short rows, per-pair causal calls on long
# ones; shared/attention.py); sdpa and eager: the dense 4D mask always. Flash kernels take no
# mask and cannot express the pair layout.
ATTENTION = ("auto", "sdpa", "eager", "flex_attention", PAIR_SDPA)


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


def is_vision_model(path: str) -> bool:
    """Whether the model folder holds a vision-language model (its config has a vision
    tower's config), read from config.json alone, before anything loads."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config.get("vision_config"), dict)


def load_processor(path: str):
    """A vision-language model's processor (image processor, tokenizer, chat template)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(
            f"{path}: a vision-language model, but its processor does not load ({err}); save "
            "the processor beside the weights (processor.save_pretrained(folder))"
        ) from None


def load_model(
    path: str,
    adapter: str | None,
    dtype: str,
    attn_implementation: str,
    device: torch.device | None,
    runs_on: torch.device | None = None,
    vision: bool = False,
    **placement,
) -> torch.nn.Module:
    """A causal LM from a folder, with an optional PEFT adapter merged into it, its attention
    kernel resolved for the device it will run on, `runs_on` (default `device`; stage two
    loads on CPU for DeepSpeed to move): `resolve_attention`, logged, read back from
    model.config._attn_implementation.

    device None: the model stays where loading put it, as `placement` (from_pretrained's
    device_map, max_memory, offload_folder) or a ZeRO-3 partition does.

    vision: an image-text-to-text model, whose pair layout needs the family's own masks
    (shared/vision): `auto` is transformers' default there, sdpa where a sub-model supports
    it, else eager (sdpa_pairs and FlexAttention take refdpo's text mask only)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if vision and attn_implementation in ("flex_attention", PAIR_SDPA):
        raise UsageError(
            f"--attn-implementation {attn_implementation} is for text models; a "
            "vision-language model runs sdpa or eager with its family's pair mask"
        )

    if attn_implementation == "flex_attention" and not flex_available():
        raise UsageError(
            f"--attn-implementation flex_attention needs torch >= 2.5 (this is {torch.__version__})"
        )
    load_as = "sdpa" if attn_implementation in ("auto", PAIR_SDPA) else attn_implementation
    if vision and attn_implementation == "auto":
        # transformers' own choice per sub-model: sdpa where the class supports it, else
        # eager (PaliGemma 2's Gemma2 text model refuses sdpa)
        load_as = None
    auto_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto_class.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=load_as, **placement
    )
    if attn_implementation == "auto" and not vision:
        resolve_attention(model, runs_on or device or torch.device("cpu"))
    elif attn_implementation == PAIR_SDPA:
        use_pair_sdpa(model)
    if adapter:
        from peft import PeftModel

        # merged: the forward is then the plain model's, and stage two can start from the
        # same merged weights so that the step-0 identity holds
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model if device is None else model.to(device)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch for `model` goes: its first weight's device, or for a model placed by
    accelerate (--device-map) the device of its first placed module (an offloaded weight
    sits on the meta device until its hook loads it)."""
    placed = getattr(getattr(model, "policy", model), "hf_device_map", None)
    if placed:
        first = next(iter(placed.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device("cpu" if first == "disk" else first)
    return next(model.parameters()).device


def use_pair_sdpa(model: torch.nn.Module) -> bool:
    """Set the model to refdpo's per-pair SDPA kernel; False where its attention code does not
    dispatch through transformers' attention functions (it keeps plain sdpa then)."""
    register_pair_sdpa()
    try:
        model.set_attn_implementation(PAIR_SDPA)
    except (ValueError, NotImplementedError):
        return False
    return True


KERNEL_NOTES = {
    "flex_attention": "block-sparse pair mask",
    PAIR_SDPA: "dense pair mask on rows under 2048 tokens, per-pair causal calls above",
}


def resolve_attention(model: torch.nn.Module, device: torch.device) -> str:
    """`--attn-implementation auto`: FlexAttention with the block-sparse pair mask on CUDA when
    the model class supports it and torch has it; elsewhere sdpa_pairs (on CPU FlexAttention
    has no backward, and compiling its forward costs more than it saves on short rows), or
    plain sdpa for models that sdpa_pairs cannot drive. Sets the model's kernel, returns it."""
    supported = getattr(model, "_supports_flex_attn", False)
    if device.type == "cuda" and supported and flex_available():
        model.set_attn_implementation("flex_attention")
        why = "CUDA, and the model supports it"
    else:
        why = "not on CUDA" if device.type != "cuda" else "the model or torch lacks FlexAttention"
        if not use_pair_sdpa(model):
            why += "; the model's attention code takes no custom kernel"
    kernel = model.config._attn_implementation
    logger.info(
        "attention: %s, %s (auto: %s)", kernel, KERNEL_NOTES.get(kernel, "dense pair mask"), why
    )
    return kernel


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, the whole tensor) for every state_dict entry, in sorted order, whatever the
    placement: a ZeRO-3 partition is gathered (a collective: every rank must iterate), an
    accelerate-offloaded weight is loaded from its offload store, one module at a time."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors |= dict(model.named_buffers(remove_duplicate=False))
    with contextlib.ExitStack() as onloaded:
        holder = None
        for name in sorted(model.state_dict().keys()):
            tensor = tensors[name]
            if hasattr(tensor, "ds_id"):  # a ZeRO-3 partition
                import deepspeed

                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    yield name, tensor.detach()
                continue
            if tensor.device.type == "meta":  # offloaded by accelerate: load its module
                owner = _offloaded_owner(model, name)
                if owner is not holder:
                    from accelerate.utils import align_module_device

                    onloaded.close()
                    onloaded.enter_context(align_module_device(owner, torch.device("cpu")))
                    holder = owner
                tensor = dict(owner.named_parameters(remove_duplicate=False)) | dict(
                    owner.named_buffers(remove_duplicate=False)
                )
                tensor = tensor[name.removeprefix(_module_name(model, owner))]
            yield name, tensor.detach()


def _offloaded_owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The innermost module above the weight `name` whose accelerate hook offloads it."""
    from accelerate.utils import has_offloaded_params

    parts = name.split(".")[:-1]
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end]))
        if has_offloaded_params(module):
            return module
    raise RuntimeError(f"{name} is on the meta device but no accelerate hook offloads it")


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """'layers.0.' for a submodule, '' for the model itself."""
    for name, found in model.named_modules():
        if found is module:
            return f"{name}." if name else ""
    raise RuntimeError("module not found in the model")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and every weight's name, dtype, shape and bytes: the whole
    weights whether the model is partitioned (ZeRO-3), placed over devices or offloaded, so
    a sharded run records the same fingerprint as an unsharded one."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in full_weights(model):
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
