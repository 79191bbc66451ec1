"""refdpo eval: how a model does on preference shards and on prompts.

Pairwise: the implicit DPO rewards beta * (log pi - log ref) of every chosen and rejected
response in a shard folder, with the stored reference values: reward accuracy (chosen above
rejected) and mean margin. Generation: greedy answers to a JSON/JSONL file of prompts (text
or chat messages, chat template applied to messages); when rows carry an `answer`, the share
whose whole answer is that text (exact match).

Vision-language models: a shard folder whose pairs name images is scored as stage two scores
it (the processor checked against stage one's, each batch's images rebuilt from the folder's
image store, the family's pair layout); prompt rows may carry an `image` or an `images` list
(paths relative to the prompts file), given to the processor with the prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from refdpo.shared.data import IMAGE_PLACEHOLDER
from refdpo.shared.dist import setup_logging
from refdpo.shared.errors import InputError, MissingPath, run_command
from refdpo.shared.images import ImageError, decode_image, image_bytes
from refdpo.shared.logprobs import Packer, packer_for, pad_multiple_for, pair_logps
from refdpo.shared.models import (
    is_vision_model,
    load_model,
    load_processor,
    load_tokenizer,
    resolve_device,
)
from refdpo.shared.shards import ShardError, read_manifest
from refdpo.shared.tokens import tokenizer_fingerprint
from refdpo.shared.vision import VisionPairScorer, family_for
from refdpo.train.data import collate, eval_batches, open_shards
from refdpo.train.vision import VisionInputs, check_processor, recorded_layout

logger = logging.getLogger("refdpo.eval")
TIE = 1e-4  # |reward margin| this small is float noise between two computations of one model


def exact_match(generation: str, answer: str) -> bool:
    """The whole generation is the answer: surrounding whitespace and a final period allowed."""
    return re.fullmatch(rf"\s*{re.escape(answer)}\.?\s*", generation) is not None


def check_pair_kind(folder: Path, manifest: dict, processor, family) -> None:
    """The folder's pairs are of the model's kind: with images for a vision-language model
    (its processor, family and image decoding those of stage one), without for a text one."""
    if processor is not None:
        check_processor(folder, manifest, processor, family)
    elif "vision" in manifest["provenance"]:
        raise ShardError(
            f"{folder}: the pairs hold images (scored by a vision-language model), but --model "
            "is a text model; evaluate the model stage one scored with, or one trained from it"
        )


def pair_scoring(
    model, folder: Path, manifest: dict, processor=None
) -> tuple[torch.nn.Module, VisionInputs | None, Packer | None]:
    """What pair_logps runs and what collate gets: (scorer, image inputs, packer). Text pairs:
    the model itself, pairs packed. Vision pairs, as stage two scores them: a VisionPairScorer
    in the layout stage one's self-test chose, one pair per row, each batch's images rebuilt
    from the image store and checked against the stored token counts (VisionInputs)."""
    family = family_for(model.config) if processor is not None else None
    check_pair_kind(folder, manifest, processor, family)
    if processor is None:
        return model, None, packer_for(model.config)
    images = VisionInputs(folder, manifest, processor, family)
    return VisionPairScorer(model, family, recorded_layout(manifest)), images, None


@torch.no_grad()
def pairwise(
    model, tokenizer, shards: str | Path, beta: float, batch_size: int = 8, processor=None
) -> dict[str, float]:
    """Reward accuracy, margin and sigmoid-DPO loss of `model` on every pair of a shard folder;
    a vision-language model comes with its `processor` (the tokenizer is the processor's)."""
    vocab_size = model.config.get_text_config().vocab_size
    manifest = open_shards(shards, tokenizer_fingerprint(tokenizer), vocab_size)
    scorer, images, packer = pair_scoring(model, Path(shards), manifest, processor)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    device = next(model.parameters()).device
    pad_multiple = pad_multiple_for(device, model.config._attn_implementation)
    margins = []
    for rows, _ in eval_batches(shards, manifest, batch_size, world=1, rank=0):
        batch = collate(rows, pad_id, packer, pad_multiple, vision=images)
        out = pair_logps(scorer, batch.packed)
        chosen = beta * (out.chosen_logps.cpu() - batch.reference_chosen_logps)
        rejected = beta * (out.rejected_logps.cpu() - batch.reference_rejected_logps)
        margins.append(chosen - rejected)
    margin = torch.cat(margins)
    # a tie (the reference itself, up to float noise) counts half, so chance level is 0.5
    ties = margin.abs() <= TIE
    return {
        "pairs": len(margin),
        "reward_accuracy": float(((margin > TIE).float() + 0.5 * ties.float()).mean()),
        "reward_margin": float(margin.mean()),
        "loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
    }


def read_prompts(path: str | Path) -> list[dict]:
    try:
        text = Path(path).read_text()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except FileNotFoundError:
        raise MissingPath(f"--prompts {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise InputError(f"--prompts {path}: not JSON or JSON Lines ({err})") from None
    return [r for r in rows if isinstance(r, dict) and "prompt" in r]


def prompt_images(row: dict, base_dir: Path | None) -> list:
    """A prompt row's images (`images`: a list, or `image`; a path is taken relative to the
    prompts file), decoded by the policy both stages decode with."""
    values = row.get("images", row.get("image"))
    values = [] if values is None else values if isinstance(values, list) else [values]
    decoded = []
    for value in values:
        try:
            decoded.append(decode_image(image_bytes(value, base_dir)[0]))
        except ImageError as err:
            raise InputError(f"--prompts: prompt {row['prompt']!r}: an image: {err}") from None
    return decoded


def vision_prompt(processor, family, prompt, images: int) -> str:
    """A prompt as the processor reads it: chat messages through its chat template (their
    {"type": "image"} parts mark the images); a string with one `<image>` per image, as stage
    one reads one (a string that names none gets one line per image in front, RLAIF-V's
    way), each written as the family's processor expects it."""
    if isinstance(prompt, list):
        return processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if images and IMAGE_PLACEHOLDER not in prompt:
        prompt = f"{IMAGE_PLACEHOLDER}\n" * images + prompt
    return prompt.replace(IMAGE_PLACEHOLDER, family.placeholder)


def encode_prompts(tokenizer, rows: list[dict], processor=None, family=None, base_dir=None):
    """A batch of prompts, left padded: by the tokenizer, or with a vision-language model's
    `processor` together with the rows' images."""
    if processor is None:
        texts = [
            tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            if isinstance(r["prompt"], list)
            else r["prompt"]
            for r in rows
        ]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    images = [prompt_images(r, base_dir) for r in rows]
    texts = [
        vision_prompt(processor, family, r["prompt"], len(i))
        for r, i in zip(rows, images, strict=True)
    ]
    try:
        return processor(
            text=texts,
            images=images if any(images) else None,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
    except ValueError as err:  # the processor's placeholder / image count checks
        raise InputError(f"--prompts: {err}") from None


@torch.no_grad()
def generate(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    processor=None,
    base_dir: Path | None = None,
) -> list[dict]:
    """Greedy generations, batched with left padding; exact-match scored where `answer` is given.
    A vision-language model comes with its `processor`; images are read from `base_dir`."""
    tokenizer.padding_side = "left"
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    family = family_for(model.config) if processor is not None else None
    results = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = encode_prompts(tokenizer, chunk, processor, family, base_dir).to(model.device)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )
        for row, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :], strict=True):
            generation = tokenizer.decode(ids, skip_special_tokens=True)
            result = {"prompt": row["prompt"], "generation": generation}
            if "answer" in row:
                result |= {
                    "answer": row["answer"],
                    "correct": exact_match(generation, str(row["answer"])),
                }
            results.append(result)
    return results


def preflight(model: str, shards: str, tokenizer, processor) -> None:
    """Before the model loads, as stage two does: the folder's manifest, tokenizer and
    vocabulary fit, and for a vision-language model its processor is stage one's."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    vocab_size = config.get_text_config().vocab_size
    # the shards' checksums are read once, by pairwise
    manifest = open_shards(
        shards, tokenizer_fingerprint(tokenizer), vocab_size, verify_checksums=False
    )
    family = family_for(config) if processor is not None else None
    check_pair_kind(Path(shards), manifest, processor, family)


def evaluate_model(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    # a vision-language model, as stage two loads one: its processor holds the tokenizer
    vision = is_vision_model(args.model)
    processor = load_processor(args.model) if vision else None
    tokenizer = processor.tokenizer if vision else load_tokenizer(args.model)
    if args.shards:
        preflight(args.model, args.shards, tokenizer, processor)
    dtype = args.dtype
    if dtype == "auto":  # as stage two does: the reference's own dtype makes ties exact
        stored = read_manifest(Path(args.shards))["provenance"]["dtype"] if args.shards else None
        dtype = stored if stored in ("fp32", "bf16") else "fp32"
    model = load_model(args.model, args.adapter, dtype, "auto", device, vision=vision).eval()
    summary: dict = {"model": args.model, "adapter": args.adapter}
    if args.shards:
        summary["pairwise"] = pairwise(
            model, tokenizer, args.shards, args.beta, args.batch_size, processor
        )
    if args.prompts:
        rows = read_prompts(args.prompts)[: args.limit]
        generations = generate(
            model, tokenizer, rows, args.max_new_tokens, args.batch_size, processor,
            Path(args.prompts).parent,
        )  # fmt: skip
        scored = [g["correct"] for g in generations if "correct" in g]
        summary["generation"] = {
            "prompts": len(generations),
            "exact_match": sum(scored) / len(scored) if scored else None,
        }
        if args.output:
            with open(Path(args.output) / "generations.jsonl", "w") as fh:
                fh.writelines(json.dumps(g) + "\n" for g in generations)
        summary["examples"] = generations[:5]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="refdpo eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a model folder (e.g. a run's final/)")
    parser.add_argument("--adapter", help="a PEFT adapter folder applied to --model")
    parser.add_argument("--shards", help="a shard folder: pairwise reward accuracy and margins")
    parser.add_argument(
        "--prompts",
        help="JSON/JSONL rows with `prompt` (and `answer`; for a vision-language model `image` "
        "or `images`, paths relative to the file): greedy generations",
    )
    parser.add_argument("--output", help="folder for summary.json and generations.jsonl")
    parser.add_argument(
        "--beta", type=float, default=0.1, help="beta of the implicit reward (default 0.1)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="model dtype; auto: the dtype --shards were scored in (fp32 without --shards)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--verbose", action="store_true", help="also other libraries' info lines and progress bars"
    )
    args = parser.parse_args(argv)
    if not args.shards and not args.prompts:
        parser.error("give --shards, --prompts or both")
    setup_logging(0, 1, verbose=args.verbose)
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    return run_command(lambda: report(args), logger)


def report(args: argparse.Namespace) -> int:
    summary = evaluate_model(args)
    text = json.dumps(summary, indent=2)
    if args.output:
        (Path(args.output) / "summary.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
