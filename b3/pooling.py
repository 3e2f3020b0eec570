"""Token states to one vector per row: the pooling of the teacher and the student alike."""

from __future__ import annotations

import torch

# our pooling names -> the flags of a sentence-transformers 1_Pooling/config.json
ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last_token": "pooling_mode_lasttoken",
}


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text from token states.

    hidden: (b, t, d); mask: (b, t) with 1 on real tokens. `last_token` takes the last real
    token whichever side the tokenizer pads on.
    """
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (b, d)
    if pooling == "cls":
        return hidden[:, 0]  # (b, d)
    if pooling == "last_token":
        t = mask.shape[1]
        # index of the last 1 in each row: works for left and right padding alike
        last = t - 1 - mask.flip(1).to(torch.int64).argmax(1)  # (b,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (b, d)
    raise ValueError(f"unknown pooling {pooling!r}; use mean, cls or last_token")
