"""The inputs of a vision-language model: rows of text, image or both as one model input, the
slices of rows that GradCache embeds at a time, and the embedding of those rows (teacher and
student alike).

Two kinds of model take images:

- a vision-language decoder (Qwen2-VL and its successors; its processor has an image token):
  a row's image enters its text as the backbone's image prompt, first (where VLM2Vec's texts
  put their `<|image_1|>` placeholder; the placeholder itself is dropped). The processor expands
  it into one token per merged patch and returns, beside the token tensors, the patches of all
  the batch's images concatenated (`pixel_values`, one row per patch) and each image's patch
  grid (`image_grid_thw`, one row per image: t, h, w). The embedding is the pooled last hidden
  state (the paper's last-token pooling);
- a dual encoder (CLIP, SigLIP; no image token): texts and images go through their own towers
  (`pixel_values`: one entry per image), each projected and L2-normalised; a row with both is
  their sum, normalised again (late fusion, as UniIR's CLIP-SF).

Patches and images are not rows of the batch, so slicing every tensor by row (as for text)
would pair chunks with the wrong pixels: `slice_rows` cuts tokens by row, and images and
patches by the rows that own them (`image_rows`, kept beside the processor's outputs).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from b3.pooling import pool

IMAGE_PLACEHOLDER = "<|image_1|>"  # MMEB / VLM2Vec: where a row's image goes in its text
BOOKKEEPING = ("image_rows", "text_rows")  # b3's, not the model's inputs


def vision_processor(path: str):
    """The model's processor when it takes images (its folder holds a processor with an image
    processor; transformers 5 writes processor_config.json, earlier ones
    preprocessor_config.json), else None: a text model."""
    names = ("processor_config.json", "preprocessor_config.json")
    if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    return processor if getattr(processor, "image_processor", None) is not None else None


def is_dual_encoder(processor) -> bool:
    """Whether images have towers of their own (no image token to put them into the text)."""
    return getattr(processor, "image_token", None) is None


def image_prompt(processor) -> str:
    """The text that stands for one image: Qwen2-VL wraps its image token in vision start/end
    markers; others use the processor's image token alone."""
    vocab = processor.tokenizer.get_vocab()
    if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
        return f"<|vision_start|>{processor.image_token}<|vision_end|>"
    return processor.image_token


def truncate(tokenizer, text: str, max_length: int) -> str:
    """`text` cut after its first `max_length` tokens, at a character boundary of the original
    (a processor cannot truncate: cutting into an image's tokens breaks the image)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= max_length else text[: offsets[max_length - 1][1]]


def encode_rows(processor, texts: list[str], images: list, max_length: int) -> dict[str, torch.Tensor]:
    """One model input for rows of (text, image or None): the processor's tensors, plus
    `image_rows` (the row of each image, in the order of the processor's images) and, for a
    dual encoder, `text_rows` (whether each row has a text). `max_length` bounds each row's
    text tokens; an image's tokens are never cut."""
    dual = is_dual_encoder(processor)
    prompt = None if dual else image_prompt(processor)
    prompts, row_images, image_rows = [], [], []
    for row, (text, image) in enumerate(zip(texts, images, strict=True)):
        text = truncate(processor.tokenizer, text.replace(IMAGE_PLACEHOLDER, "").strip(), max_length)
        if image is not None:
            text = text if dual else prompt + text
            row_images.append(image)
            image_rows.append(row)
        prompts.append(text)
    out = dict(processor(text=prompts, images=row_images or None, padding=True, return_tensors="pt"))
    out.pop("token_type_ids", None)  # a text tokenizer's, meaningless to these models
    if not row_images:
        out.pop("pixel_values", None)
    out["image_rows"] = torch.tensor(image_rows, dtype=torch.int64)
    if dual:
        out["text_rows"] = torch.tensor([bool(p) for p in prompts])
    return out


def slice_rows(inputs: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a model input: tokens by row; with images, the images those rows own
    and exactly their pixels (images of consecutive rows are consecutive, so are their patches)."""
    if "image_rows" not in inputs:
        return {k: v[start:stop] for k, v in inputs.items()}
    image_rows = inputs["image_rows"]
    out = {k: v[start:stop] for k, v in inputs.items() if k not in ("image_rows", "pixel_values", "image_grid_thw")}
    owned = torch.nonzero((image_rows >= start) & (image_rows < stop)).flatten()
    out["image_rows"] = image_rows[owned] - start
    if len(owned):
        lo, hi = int(owned[0]), int(owned[-1]) + 1
        if "image_grid_thw" in inputs:  # patches of all images in one tensor: cut at the images' patch offsets
            grid = inputs["image_grid_thw"]
            first_patch = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)])  # (images + 1,)
            out["image_grid_thw"] = grid[lo:hi]
            out["pixel_values"] = inputs["pixel_values"][int(first_patch[lo]) : int(first_patch[hi])]
        else:  # one entry per image
            out["pixel_values"] = inputs["pixel_values"][lo:hi]
    return out


def rows_of(inputs: dict[str, torch.Tensor]) -> int:
    """How many rows a model input holds."""
    return inputs["input_ids"].shape[0]


def embed_rows(model, inputs: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """(rows, d) float32 L2-normalised embeddings of a model input from `encode_rows`."""
    if "text_rows" in inputs:  # a dual encoder: each tower, then late fusion
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        emb = F.normalize(text.pooler_output.float(), dim=-1) * inputs["text_rows"].unsqueeze(1)  # (b, d)
        if "pixel_values" in inputs:
            image = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.float(), dim=-1)
            emb = emb.index_add(0, inputs["image_rows"], image)  # (b, d)
        return F.normalize(emb, dim=-1)
    out = model(**{k: v for k, v in inputs.items() if k not in BOOKKEEPING})
    return F.normalize(pool(out.last_hidden_state, inputs["attention_mask"], pooling).float(), dim=-1)


def embedding_dim(config, processor) -> int:
    """The width of a model's embeddings: a dual encoder's projection, else its (text) hidden
    size (a vision-language config keeps it in text_config)."""
    if processor is not None and is_dual_encoder(processor):
        return config.projection_dim
    return config.get_text_config().hidden_size
