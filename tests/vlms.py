"""Tiny random vision-language models saved like hub checkpoints, built here (no downloads).

`build_<family>(tmp_dir)` writes a folder that loads back with
`AutoProcessor.from_pretrained(folder)` and `AutoModelForImageTextToText.from_pretrained(folder)`,
as stage one and stage two load a real checkpoint: an fp32 random model (2 text layers of
hidden size 64, 1-2 vision layers, images of 28-56 px, a few image tokens per image), a
byte-level BPE tokenizer trained on a tiny corpus with the family's special image tokens, the
PIL-backend image processor (torchvision does not import against the CPU torch wheel here) and
a chat template that renders content lists the way the family's own template does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.conftest import CORPUS

# The family's own chat templates, cut down to what tests render: a content list of
# {"type": "image"} and {"type": "text"} items per message.
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{% if m['role'] == 'assistant' %}model{% else %}{{ m['role'] }}{% endif %}{{ '\\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% else %}{{ c['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# PaliGemma has no chat template (its processor writes the prefix: images, BOS, text, "\n");
# this one renders a user turn as that prefix and an assistant turn as the suffix.
PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{{ '\n' }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}"
)


def build_tokenizer(
    specials: list[str], named: dict[str, str] | None = None, bos: str | None = None
):
    """A byte-level BPE trained on the test corpus, with `specials` as special tokens;
    `named` gives them attribute names (Gemma3's processor reads `tokenizer.boi_token`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=base + specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=bos,
        extra_special_tokens=named or {},
    )


def _text_config(vocab_size: int, **extra) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **extra,
    )


def _save(folder: Path, model, processor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _llava_processor(tok) -> dict:
    """LLaVA's processor settings beside its image processor: 14 px patches, CLS dropped."""
    return dict(
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )


def _llava_config(tok) -> dict:
    """LLaVA's and LLaVA-NeXT's shared config: a 2-layer CLIP tower on 28 px crops of 14 px
    patches, the last layer's features less CLS, a Llama decoder."""
    return dict(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=dict(model_type="llama", **_text_config(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )


def build_llava(tmp_dir: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 layout: CLIP tower on 28 px crops of 14 px patches, CLS dropped: 4 tokens."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        **_llava_processor(tok),
    )
    config = LlavaConfig(**_llava_config(tok))
    torch.manual_seed(seed)
    return _save(Path(tmp_dir) / "llava", LlavaForConditionalGeneration(config), processor)


def build_llava_next(tmp_dir: Path, seed: int = 0) -> Path:
    """LLaVA-NeXT (anyres): CLIP on 28 px crops of 14 px patches (4 tokens a crop, CLS
    dropped), grid pinpoints up to 56 x 56: each image is its base crop plus 2 or 4 crops
    (3 or 5 rows of pixel_values), unpadded to its aspect ratio with a newline token per row:
    10 to 24 tokens for the test images."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = build_tokenizer(["<image>"])
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            image_grid_pinpoints=pinpoints,
        ),
        **_llava_processor(tok),
    )
    config = LlavaNextConfig(**_llava_config(tok), image_grid_pinpoints=pinpoints)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    return _save(Path(tmp_dir) / "llava_next", model, processor)


def build_qwen2_vl(tmp_dir: Path, seed: int = 0, model_type: str = "qwen2_vl") -> Path:
    """Qwen2-VL: 14 px patches merged 2 x 2, images resized to multiples of 28 px between
    28 x 28 and 84 x 84: grids of (1, 2..6, 2..6) patches, 1 to 9 tokens per image."""
    from transformers import (
        PaddleOCRVLProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(specials, named={"image_token": "<|image_pad|>"})
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    # Qwen2VLProcessor cannot be built or loaded without torchvision here: its video_processor
    # attribute is checked against VideoProcessorMixin, which transformers exports only with
    # torchvision, and AutoVideoProcessor has no PIL backend for Qwen2-VL. PaddleOCRVLProcessor
    # is the same processor minus video (image_processor + tokenizer; each <|image_pad|> expanded
    # to t*h*w / merge_size^2 ids, mm_token_type_ids returned), so the folder holds that.
    processor = PaddleOCRVLProcessor(
        image_processor=Qwen2VLImageProcessorPil(
            min_pixels=28 * 28, max_pixels=84 * 84, patch_size=14, merge_size=2
        ),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )
    if model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])  # fmt: skip
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(
        text_config=_text_config(
            len(tok),
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return _save(Path(tmp_dir) / model_type, model_class(config), processor)


def build_qwen2_5_vl(tmp_dir: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: the Qwen2-VL set-up with its windowed vision tower (2 blocks)."""
    return build_qwen2_vl(tmp_dir, seed, model_type="qwen2_5_vl")


def build_qwen3_vl(tmp_dir: Path, seed: int = 0) -> Path:
    """Qwen3-VL: 16 px patches merged 2 x 2, images resized to multiples of 32 px between
    32 x 32 and 96 x 96 (1 to 4 tokens for the test images); a 2-block vision tower whose
    first block also feeds DeepStack features to the decoder; interleaved M-RoPE. The folder
    holds PaddleOCRVLProcessor for the reason build_qwen2_vl gives (Qwen3VLProcessor needs a
    video processor, hence torchvision; its image expansion is the same)."""
    from transformers import (
        PaddleOCRVLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(specials, named={"image_token": "<|image_pad|>"})
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    processor = PaddleOCRVLProcessor(
        image_processor=Qwen2VLImageProcessorPil(
            min_pixels=32 * 32, max_pixels=96 * 96, patch_size=16, merge_size=2
        ),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )
    config = Qwen3VLConfig(
        text_config=_text_config(
            len(tok),
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return _save(Path(tmp_dir) / "qwen3_vl", Qwen3VLForConditionalGeneration(config), processor)


IDEFICS3_SPECIALS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]


def build_idefics3(tmp_dir: Path, seed: int = 0, model_type: str = "idefics3") -> Path:
    """Idefics3 (model_type "smolvlm" for SmolVLM, same adapter): images resized to a longest
    edge of 112 px and split into 56 px crops plus a global image; a crop is 4 x 4 patches
    of 14 px, pixel-shuffled by 2 into 4 image tokens; 1 x 1 to 2 x 2 crops per image."""
    import transformers

    prefix = "SmolVLM" if model_type == "smolvlm" else "Idefics3"
    tok = build_tokenizer(IDEFICS3_SPECIALS)
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True
    )
    # SmolVLMProcessor has a video processor, which needs torchvision (see build_qwen2_vl):
    # SmolVLM's folder holds Idefics3Processor, whose image expansion is the same
    processor = transformers.Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=4,
        chat_template=IDEFICS3_TEMPLATE,
    )
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        text_config=dict(model_type="llama", **_text_config(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")
    torch.manual_seed(seed)
    return _save(Path(tmp_dir) / model_type, model(config), processor)


def build_smolvlm(tmp_dir: Path, seed: int = 0) -> Path:
    return build_idefics3(tmp_dir, seed, model_type="smolvlm")


def build_gemma3(tmp_dir: Path, seed: int = 0, sliding_window: int = 8) -> Path:
    """Gemma3: SigLIP on 56 px images (4 x 4 patches of 14 px) pooled to 4 tokens per image,
    one sliding-attention and one full-attention layer, a window of 8 tokens (the test
    pairs exceed it), final logit softcapping on."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tok = build_tokenizer(
        [*named.values(), "<start_of_turn>", "<end_of_turn>"], named=named, bos="<s>"
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=GEMMA3_TEMPLATE,
    )
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in named.items()}
    text = _text_config(
        len(tok),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    text.pop("max_position_embeddings")
    config = Gemma3Config(
        text_config=text,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros, which would make every image the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return _save(Path(tmp_dir) / "gemma3", model, processor)


def build_paligemma(tmp_dir: Path, seed: int = 0, version: int = 1) -> Path:
    """PaliGemma: SigLIP on 28 px images (2 x 2 patches of 14 px, 4 tokens per image), a
    Gemma text model; version 2 a Gemma2 one (a sliding layer of window 8 the test pairs
    exceed, a full one, attention and final-logit softcapping), as PaliGemma 2."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tok = build_tokenizer(["<image>"], named={"image_token": "<image>"}, bos="<s>")
    processor = PaliGemmaProcessor(  # adds PaliGemma's <locNNNN> and <segNNN> tokens
        image_processor=SiglipImageProcessorPil(
            size={"height": 28, "width": 28}, image_seq_length=4
        ),
        tokenizer=tok,
        chat_template=PALIGEMMA_TEMPLATE,
    )
    text = _text_config(
        len(tok),
        head_dim=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if version == 2:
        text.update(
            model_type="gemma2",
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=1.0,  # 30 in the real ones; a random model's logits are small
            attn_logit_softcapping=50.0,
        )
    else:
        text.update(model_type="gemma")
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        hidden_size=64,
    )
    torch.manual_seed(seed)
    name = "paligemma" if version == 1 else "paligemma2"
    return _save(Path(tmp_dir) / name, PaliGemmaForConditionalGeneration(config), processor)


def build_paligemma2(tmp_dir: Path, seed: int = 0) -> Path:
    return build_paligemma(tmp_dir, seed, version=2)


def images(n: int, sizes: list[tuple[int, int]] | None = None, seed: int = 0) -> list:
    """`n` RGB PIL images of seeded random content; sizes (width, height) cycle through
    `sizes` (default a mix of 28-56 px)."""
    from PIL import Image

    sizes = sizes or [(28, 28), (56, 28), (42, 56), (56, 56)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
    return out
