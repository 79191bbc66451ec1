"""Model FLOPs of each layout, and the device's peak, for MFU (model FLOPs utilization).

Conventions (those of PaLM, Chowdhery et al. 2022, appendix B, with causal attention
counted as the pairs the mask allows):

* N: non-embedding parameters (decoder layers and final norm; not the input embedding,
  not the output layer). A matmul costs 2 FLOPs per parameter per token forward, 4 backward.
  Forward only (stage one, prefill): 2N per token. Training: 6N. LoRA training: 4N (forward
  and the activations' gradients; the frozen weights get no gradient; the adapters' own
  FLOPs, under 1% at rank 16, are left out).
* Attention: per layer, q.k and the weighted sum of v cost 4 * heads * head_dim FLOPs per
  (query, key) pair the mask allows, forward; x3 with backward. The pairs are counted from
  the actual layout (`pair_attended`): with the prompt shared, chosen and rejected each
  attend to the prompt and causally to themselves, never to each other.
* The output layer (lm_head) and the log-softmax are left out of every count, for every
  system: they run on different numbers of positions in each (refdpo and the ceilings:
  one per completion token; TRL: every position), so MFU here is about the decoder.

MFU = counted FLOPs / seconds / peak dense bf16 FLOP/s of the device.
"""

from __future__ import annotations

from collections.abc import Iterable

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s. NVIDIA's data sheets print the
# sparse figure, twice these, with a footnote: H100 and H200 SXM 1,979 (nvidia.com/en-us/
# data-center/h100/ and /h200/), H100 PCIe 1,513, H100 NVL and H200 NVL 1,671; A100 624
# (/a100/); L40S 733 (/l40s/, which also lists 362 dense); B200 4.5 PFLOP/s (HGX B200).
# Matched by substring of torch.cuda.get_device_name(), most specific first;
# --peak-tflops overrides it.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)


def peak_from_table(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a device by its name, or None when not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def causal_attended(length: int) -> int:
    """(query, key) pairs a plain causal row of `length` tokens computes."""
    return length * (length + 1) // 2


def pair_attended(prompt: int, chosen: int, rejected: int) -> int:
    """(query, key) pairs of one pair laid out [prompt, chosen, rejected], prompt shared:
    the prompt causally; each completion the whole prompt plus itself causally."""
    return (
        causal_attended(prompt)
        + chosen * prompt
        + causal_attended(chosen)
        + rejected * prompt
        + causal_attended(rejected)
    )


def separate_attended(prompt: int, chosen: int, rejected: int) -> int:
    """The same pair as two sequences [prompt, chosen] and [prompt, rejected] (TRL)."""
    return causal_attended(prompt + chosen) + causal_attended(prompt + rejected)


def model_flops(shape: dict, tokens: int, attended: int, passes: str) -> float:
    """FLOPs of `tokens` tokens and `attended` attention pairs through the decoder.

    shape: `bench.gpu_shapes.describe` of the model. passes: forward (2N per token,
    attention x1), train (6N, x3) or lora (4N, x3).
    """
    per_param, attention_factor = {"forward": (2, 1), "train": (6, 3), "lora": (4, 3)}[passes]
    attention = 4 * shape["layers"] * shape["heads"] * shape["head_dim"]
    return per_param * shape["non_embedding_params"] * tokens + (
        attention_factor * attention * attended
    )


def layout_counts(pairs: Iterable[tuple[int, int, int]], layout: str) -> tuple[int, int]:
    """(tokens, attended pairs) of pairs (prompt, chosen, rejected lengths) in a layout:
    shared (refdpo: prompt once) or separate (TRL: two sequences, prompt twice)."""
    tokens = attended = 0
    for p, c, r in pairs:
        if layout == "shared":
            tokens += p + c + r
            attended += pair_attended(p, c, r)
        else:
            tokens += 2 * p + c + r
            attended += separate_attended(p, c, r)
    return tokens, attended


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    return flops / seconds / (peak_tflops * 1e12)
