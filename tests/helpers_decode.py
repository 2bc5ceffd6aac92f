"""A few-line greedy loop over any DecodeModel, to test models apart from lib.decoding's driver."""
from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [rows, longest] left-padded with 0, padding per row)."""
    longest = max(len(p) for p in prompts)
    pads = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for r, p in enumerate(prompts):
        tokens[r, longest - len(p):] = torch.tensor(p)
    return tokens, pads


def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's `new_tokens` argmax continuations (no eos), decoded as one left-padded batch."""
    tokens, pads = left_pad(prompts)
    cache = model.init_cache(len(prompts), tokens.shape[1] + new_tokens, pads)
    logits, cache = model.forward(tokens, cache, last_only=True)
    out = []
    for _ in range(new_tokens):
        nxt = logits.argmax(-1)
        out.append(nxt)
        logits, cache = model.forward(nxt[:, None], cache, last_only=True)
    return torch.stack(out, 1).tolist()
