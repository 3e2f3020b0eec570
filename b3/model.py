"""The student: a Hugging Face encoder, with LoRA adapters (peft) or all of its weights
trained, that embeds texts, or, for a model that takes images (its folder holds a processor
with an image processor: Qwen2-VL and its successors, CLIP-style dual encoders), rows of text,
image or both (`b3.vision`).

`build_student` loads any `AutoModel`, wraps it with LoRA when given a LoraSpec (target modules
from peft's per-family table unless the spec names them; every other weight frozen) or leaves
every weight trainable when not, and returns an `EmbeddingModel` whose forward maps tokenised
inputs to L2-normalised embeddings. `export_sentence_transformer` merges an adapter into the
weights and writes a folder that both `transformers` and `sentence-transformers` load.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer

from b3.data import DataError
from b3.model_source import resolve_model_path
from b3.pooling import ST_POOLING_KEYS, pool
from b3.spec import LoraSpec
from b3.vision import (
    chat_template,
    embed_rows,
    embedding_dim,
    encode_rows,
    image_tokens,
    is_dual_encoder,
    vision_processor,
)


class EmbeddingModel(nn.Module):
    """Tokenizer (or a vision-language processor) + (LoRA-wrapped) backbone + pooling + L2
    normalisation."""

    def __init__(self, backbone: nn.Module, tokenizer, pooling: str, max_length: int, processor=None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.processor = processor  # None: a text model
        self.pooling = pooling
        self.max_length = max_length
        self.autocast_dtype: torch.dtype | None = None  # bf16 on GPUs: fp32 weights, bf16 matmuls

    def tokenize(self, texts: list[str], images: list | None = None) -> dict[str, torch.Tensor]:
        """The model input of rows: texts, and with a processor each row's image (a PIL image
        or None) too."""
        if self.processor is not None:
            return encode_rows(self.processor, texts, images or [None] * len(texts), self.max_length)
        if images is not None and any(image is not None for image in images):
            raise ValueError("this student embeds text only: its folder has no image processor")
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        on = self.autocast_dtype is not None
        device = inputs["input_ids"].device.type
        with torch.autocast(device, dtype=self.autocast_dtype or torch.float32, enabled=on):
            if self.processor is not None:  # images too (b3.vision)
                return embed_rows(self.backbone, inputs, self.pooling)  # (b, d)
            out = self.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            pooled = pool(out.last_hidden_state, inputs["attention_mask"], self.pooling)  # (b, d)
        return nn.functional.normalize(pooled.float(), dim=-1)  # (b, d)


def build_student(
    model: str,
    pooling: str,
    max_length: int,
    lora: LoraSpec | None,
    gradient_checkpointing: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> EmbeddingModel:
    """Load the student; with `lora`, add LoRA adapters (all other weights frozen), without it
    every weight trains (full fine-tuning). `min_pixels` / `max_pixels`: the pixel budget of
    each image (a vision-language decoder's; None: its processor's own)."""
    path = resolve_model_path(model)
    processor = vision_processor(path, min_pixels, max_pixels)
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        backbone.enable_input_require_grads()
    if lora is not None:
        config = LoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,  # None: peft's table for this model family
        )
        try:
            backbone = get_peft_model(backbone, config)
        except ValueError as err:
            raise DataError(
                f"training.lora.targetModules: peft has no default for {backbone.config.model_type!r} "
                f"models ({err}); name the modules, e.g. [q_proj, v_proj]"
            ) from None
    return EmbeddingModel(backbone, tokenizer, pooling, max_length, processor)


def export_sentence_transformer(student: EmbeddingModel, folder: str, prompts: dict[str, str] | None = None) -> None:
    """Write a merged model folder: transformers weights + tokenizer (or processor) +
    sentence-transformers modules (Transformer -> Pooling -> Normalize), so
    `SentenceTransformer(folder)` embeds exactly like the trained student; with the training
    `prompts` (sentence-transformers names: `query`, `document`, ...), which `encode_query` /
    `encode_document` apply.

    A vision-language decoder's folder also holds the chat template that renders a row as
    training wrote it (`b3.vision.chat_template`), and its Transformer module takes text, images
    and messages of both (sentence-transformers with `modality_config`, 6.x): a row's image
    prompt, its prompt and its text reach the model as in training. sentence-transformers cuts a
    row at `max_seq_length` tokens in all (set so that an image's tokens are never cut), b3 cut
    the text at maxLength: rows whose text was longer embed differently. A CLIP-style folder
    needs no modules: sentence-transformers reads it as it is."""
    backbone = student.backbone
    if hasattr(backbone, "merge_and_unload"):
        backbone = copy.deepcopy(backbone).merge_and_unload()
    backbone.save_pretrained(folder)
    processor = student.processor  # carries the tokenizer, the image processor and its pixel budget
    if processor is not None and is_dual_encoder(processor):
        processor.save_pretrained(folder)
        return
    transformer = {"max_seq_length": student.max_length, "do_lower_case": False}
    if processor is not None:
        processor = copy.copy(processor)  # the student's own stays as it was
        processor.chat_template = chat_template(processor)
        special = len(processor.tokenizer("", add_special_tokens=True)["input_ids"])
        modality = {"method": "forward", "method_output_name": "last_hidden_state"}
        transformer = {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": modality, "image": modality, "message": {**modality, "format": "structured"}},
            "module_output_name": "token_embeddings",
            "max_seq_length": student.max_length + special + image_tokens(processor),
        }
    (processor or student.tokenizer).save_pretrained(folder)
    dim = embedding_dim(backbone.config, student.processor)
    pooling = {key: False for key in ST_POOLING_KEYS.values()}
    pooling[ST_POOLING_KEYS[student.pooling]] = True
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
        "sentence_bert_config.json": transformer,
        "1_Pooling/config.json": {"word_embedding_dimension": dim, **pooling},
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer", "prompts": dict(prompts or {}),
            "default_prompt_name": None, "similarity_fn_name": "cosine",
        },  # fmt: skip
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
