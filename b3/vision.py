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

import json
import os

import torch
import torch.nn.functional as F

from b3.data import DataError
from b3.pooling import pool

IMAGE_PLACEHOLDER = "<|image_1|>"  # MMEB / VLM2Vec: where a row's image goes in its text
BOOKKEEPING = ("image_rows", "text_rows")  # b3's, not the model's inputs


def vision_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's processor when it takes images (its folder holds a processor with an image
    processor; transformers 5 writes processor_config.json, earlier ones
    preprocessor_config.json), else None: a text model. `min_pixels` / `max_pixels` replace the
    image processor's pixel budget (`set_pixel_limits`; DataError naming the model where it has
    none)."""
    names = ("processor_config.json", "preprocessor_config.json")
    if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, n)) for n in names):
        processor = None
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        processor = processor if getattr(processor, "image_processor", None) is not None else None
    if min_pixels is not None or max_pixels is not None:
        try:
            set_pixel_limits(processor, min_pixels, max_pixels)
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None
    return processor


def pixel_budget(processor) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) an image is resized into, for an image processor that sizes
    images by a pixel budget (Qwen2-VL and its successors: each merged patch of
    (patch_size x merge_size)^2 pixels is one image token); None for one that resizes to a fixed
    shape (CLIP) or a model without images."""
    images = getattr(processor, "image_processor", None)
    size = getattr(images, "size", None)
    if getattr(images, "merge_size", None) is None or size is None:
        return None
    low, high = size.get("shortest_edge"), size.get("longest_edge")
    return None if low is None or high is None else (int(low), int(high))


def set_pixel_limits(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Resize images into [min_pixels, max_pixels] (None keeps the processor's own bound);
    ValueError naming the reason where the model has no pixel budget or the bounds cross."""
    budget = pixel_budget(processor)
    if budget is None:
        kind = "embeds text only" if processor is None else "resizes images to a fixed shape"
        raise ValueError(f"the model {kind}: minPixels and maxPixels apply to models that size images by "
                         "a pixel budget (Qwen2-VL and its successors)")  # fmt: skip
    low = budget[0] if min_pixels is None else min_pixels
    high = budget[1] if max_pixels is None else max_pixels
    if low > high:
        raise ValueError(f"minPixels ({low}) exceeds maxPixels ({high})")
    processor.image_processor.size = processor.image_processor.size | {"shortest_edge": low, "longest_edge": high}


def image_tokens(processor) -> int:
    """The most tokens one image can take in a vision-language decoder's input: its prompt's
    markers plus one token per merged patch of the largest image the pixel budget allows (a
    dual encoder's images take none)."""
    budget = pixel_budget(processor)
    if budget is None:
        return 0
    images = processor.image_processor
    markers = len(processor.tokenizer(image_prompt(processor), add_special_tokens=False)["input_ids"]) - 1
    return markers + budget[1] // (images.patch_size * images.merge_size) ** 2


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


def chat_template(processor) -> str:
    """A Jinja chat template that renders a row's messages as `encode_rows` writes the row's
    text, so that a library building its inputs through the processor's chat template
    (sentence-transformers) gives the model what training gave it: the image prompt once per
    image, first, then every message's text joined in order (a system message holds
    sentence-transformers' prompt, which b3 prefixes to the text), the `<|image_1|>`
    placeholder dropped and the whole stripped. The processor adds its special tokens after
    rendering, as it does to `encode_rows`' texts. Text is not truncated here."""
    literal = json.dumps  # a JSON string is a Jinja string literal
    return (
        "{%- set ns = namespace(text='') -%}"
        "{%- for message in messages -%}"
        "{%- if message.content is string -%}{%- set ns.text = ns.text + message.content -%}"
        "{%- else -%}{%- for part in message.content -%}"
        f"{{%- if part.type == 'image' -%}}{{{{- {literal(image_prompt(processor))} -}}}}"
        "{%- elif part.type == 'text' -%}{%- set ns.text = ns.text + part.text -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
        f"{{{{- ns.text | replace({literal(IMAGE_PLACEHOLDER)}, '') | trim -}}}}"
    )


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
