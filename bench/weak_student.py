"""A weak student: an embedding model with some of its top layers re-initialised, so that it
has no embedding geometry left to lean on (the students of experiment A in docs/experiments.md).

There is no base model (a transformer not yet trained as an embedder) on PyPI that runs here,
so this takes all-MiniLM-L6-v2 and draws the weights of the named layers afresh as BERT's
initialisation does: Linear weights from N(0, initializer_range), biases 0, LayerNorm 1 and 0.
(transformers' own `_init_weights` leaves loaded weights alone in 5.x, hence by hand.)

    python bench/weak_student.py runs/weak-minilm --layers 3 4 5

writes a transformers model folder (weights, config, tokenizer) that `training.student` and
`--set training.student=...` take.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from b3.model_source import resolve_model_path  # noqa: E402


def reinitialise(model: nn.Module, layers: list[int], std: float, seed: int) -> list[str]:
    """Draw the weights of `model.encoder.layer[i]` for i in `layers` afresh; the names changed."""
    generator = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for i in layers:
            for name, module in model.encoder.layer[i].named_modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                else:
                    continue
                changed.append(f"encoder.layer.{i}.{name}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the model to")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(args.model)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    depth = len(model.encoder.layer)
    if not all(0 <= i < depth for i in args.layers):
        parser.error(f"--layers: {args.model} has layers 0..{depth - 1}")
    changed = reinitialise(model, args.layers, model.config.initializer_range, args.seed)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(path).save_pretrained(args.out)
    print(f"{args.out}: {args.model} with layers {args.layers} re-initialised ({len(changed)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
