"""Attention kernels with one signature, so a device can swap in its fused kernel.

    attention(q, k, v, segment_ids=None, mask=None) -> out
    q: [batch, q_len, heads, head_dim]    k, v: [batch, kv_len, kv_heads, head_dim]    out: like q

Grouped-query attention is implied by `heads > kv_heads`. Without `mask` attention is causal over
equal-length q and k; `segment_ids` ([batch, seq] ints) keeps packed documents apart: a token
attends to earlier tokens of its own segment only. `mask` (bool [batch or 1, 1, q_len, kv_len],
True = may attend) replaces both: decoding against a KV cache builds it from positions, because
a causal mask aligned top-left (SDPA's `is_causal=True`) is wrong when the query is shorter than
the keys.

`reference` is plain torch (it also runs under DTensor); `sdpa` is PyTorch's fused kernel.
Device kernels (Ascend's `npu_fusion_attention`) live in `parallel/kernels.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def causal_mask(seq_len: int, segment_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean [batch or 1, 1, seq, seq] mask, True where attention is allowed."""
    idx = torch.arange(seq_len, device=device)
    mask = (idx[:, None] >= idx[None, :])[None, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              segment_ids: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # [b, s, kv, g, d] -> scores per (kv head, group): avoids materialising repeated k/v.
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k).float() / math.sqrt(head_dim)
    if mask is None:
        mask = causal_mask(q_len, segment_ids, q.device)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # [b|1, 1, 1, q, k]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         segment_ids: torch.Tensor | None = None,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [b, h, s, d]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and segment_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        if mask is None:
            mask = causal_mask(q.shape[2], segment_ids, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


KERNELS: dict[str, AttentionFn] = {"reference": reference, "sdpa": sdpa}
