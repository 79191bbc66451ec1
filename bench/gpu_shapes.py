"""Random-weight models of realistic shape, built from a config (nothing is downloaded).

SHAPES holds the published shapes (Qwen2.5-0.5B's and Llama-3-8B's config.json values that
decide cost and memory) and the tiny shapes of the same families the CPU mode uses. Each
model is saved as a Hugging Face folder in bf16 (fp32 for the tiny ones) with SmolLM2's
tokenizer, whose 49,152 ids are fewer than either vocabulary: every id it gives is valid.

    python -m bench.gpu_shapes --shape llama3-8b --tokenizer DIR --output DIR [--device cuda]

builds one in its own process (the 8B model is initialised on the GPU: on the CPU its fp32
random init alone takes minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# family: the transformers config class; the rest are that config's fields
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": {
        "family": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
        "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    },
    "llama3-8b": {
        "family": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
        "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500_000.0,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    },
    # the CPU mode's: same families (Qwen2's q/k/v biases and tied head; Llama's untied
    # head), the tokenizer's vocabulary
    "qwen2-tiny": {
        "family": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": None,
        "tie_word_embeddings": True, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    },
    "llama3-tiny": {
        "family": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 192, "vocab_size": None,
        "tie_word_embeddings": False, "rope_theta": 500_000.0,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    },
}  # fmt: skip
MARKER = ".bench-shape.json"


def make_config(shape: str, tokenizer, dtype: str):
    """The transformers config of `shape`, with the tokenizer's special ids."""
    from transformers import LlamaConfig, Qwen2Config

    fields = dict(SHAPES[shape])
    family = fields.pop("family")
    fields["vocab_size"] = fields["vocab_size"] or len(tokenizer)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"{shape}: vocabulary {fields['vocab_size']} < tokenizer's {len(tokenizer)}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cls = Qwen2Config if family == "qwen2" else LlamaConfig
    return cls(
        **fields, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dtype=dtype, use_cache=False,
    )  # fmt: skip


def build(shape: str, tokenizer_dir: str, output: Path, device: str = "cpu") -> Path:
    """Save a random-weight `shape` model with the tokenizer to `output` (kept when a
    complete one of the same shape is there already)."""
    marker = output / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("shape") == shape:
        return output
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny = shape.endswith("-tiny")
    dtype = torch.float32 if tiny else torch.bfloat16
    config = make_config(shape, tokenizer, "float32" if tiny else "bfloat16")
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # initialised in the saved dtype: half the memory and time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    marker.write_text(json.dumps({"shape": shape, "seconds": time.perf_counter() - started}))
    return output


def describe(model_dir: str | Path) -> dict:
    """describe_config of a saved model's config."""
    from transformers import AutoConfig

    return describe_config(AutoConfig.from_pretrained(model_dir))


def describe_config(config) -> dict:
    """Parameter counts and attention shape, counted on the meta device (nothing is
    allocated). `non_embedding_params` (N in the FLOP counts): every parameter but the input
    embedding and the output layer (lm_head), i.e. the decoder layers and the final norm."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    outer = embed.numel() + (0 if head is embed else head.numel())
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "total_params": total,
        "non_embedding_params": total - outer,
        "embedding_params": outer,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "tied_embeddings": bool(config.tie_word_embeddings),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_shapes", description=__doc__.split("\n")[0]
    )
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--tokenizer", required=True, help="folder with the tokenizer files")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--device", default="cpu", help="where to initialise the weights")
    args = p.parse_args(argv)
    build(args.shape, args.tokenizer, args.output, args.device)
    print(json.dumps(describe(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
