"""Logits processing and token selection: pure functions of (scores, previous tokens, settings).

    scores = process(logits, tokens, start, generated, cfg, eos_ids)   # HF's processor chain
    next   = select(scores, cfg.do_sample, generator)                   # argmax or multinomial

The chain and each step follow Hugging Face `generate` (transformers 5.x `_get_logits_processor`):
repetition penalty, no-repeat-ngram, min_new_tokens (eos suppressed), then, only when sampling,
temperature, top-k, top-p, min-p. Beam search runs the same chain on log-softmaxed logits, as HF
does, and keeps max(2, len(eos_ids) + 1) tokens through the warpers so a beam can always go on.

Previous tokens are `tokens` [rows, T] (prompt and generated so far, left-padded) with `start`
[rows], the first real slot of each row, the layout of the KV cache: padding never counts as a
previous token, so every row is processed as it would be alone. (HF agrees for the repetition
penalty, which skips left padding; its no-repeat-ngram reads padding as tokens.)

Each function works on any leading rows, so speculative decoding can run the chain position by
position over a verified block: position j of a block sees `tokens[:, :T + j]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.decoding.config import GenerateConfig

NEG_INF = float("-inf")


def _padding(tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """True at the left-padding slots of `tokens` [rows, T]."""
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] < start[:, None]


def repetition_penalty(scores: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor,
                       penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already present: negative scores are multiplied by
    `penalty`, positive ones divided, once per token however often it occurred."""
    vocab = scores.shape[-1]
    # Padding (and ids past the lm_head, as HF allows) go to a spare column that is dropped.
    ids = tokens.masked_fill(_padding(tokens, start), vocab).clamp(max=vocab)
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab]


def no_repeat_ngram(scores: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor,
                    n: int) -> torch.Tensor:
    """Ban every token that would complete an n-gram already present in the row."""
    length = tokens.shape[1]
    if length < n:
        return scores
    # The next token completes an n-gram whose first n-1 tokens are the row's last n-1; any
    # earlier window with that prefix bans its own last token. Windows must start at a real token.
    windows = tokens.unfold(1, n, 1)                                      # [rows, W, n]
    prefix = tokens[:, length - n + 1:]                                   # [rows, n-1]
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)           # [rows, W]
    matches &= torch.arange(windows.shape[1], device=tokens.device)[None, :] >= start[:, None]
    vocab = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], NEG_INF)


def suppress_eos(scores: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """min_new_tokens: eos cannot be chosen while fewer tokens than that were generated."""
    eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos_ids)
    return scores.masked_fill(eos, NEG_INF)


def temperature(scores: torch.Tensor, value: float) -> torch.Tensor:
    return scores / value


def top_k(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th included), at least `keep`."""
    k = min(max(k, keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the most likely tokens whose probabilities add up to at least p."""
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p      # the tail whose mass stays within 1 - p
    drop[..., -keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def min_p(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below p times the most likely token's."""
    probs = scores.softmax(dim=-1)
    drop = probs < p * probs.amax(dim=-1, keepdim=True)
    best = torch.topk(probs, min(keep, probs.shape[-1]), dim=-1).indices
    drop.scatter_(-1, best, False)
    return scores.masked_fill(drop, NEG_INF)


def process(scores: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor, generated: int,
            cfg: GenerateConfig, eos_ids: torch.Tensor) -> torch.Tensor:
    """HF's logits processor chain for `cfg` on next-token `scores` [rows, vocab].

    tokens, start: the rows' previous tokens (see the module docstring); generated: how many
    tokens each row has generated so far; eos_ids: 1-D tensor (may be empty). Greedy decoding
    and sampling pass raw logits, beam search log-softmaxed ones.
    """
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, tokens, start, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram(scores, tokens, start, cfg.no_repeat_ngram_size)
    if generated < cfg.min_new_tokens and eos_ids.numel():
        scores = suppress_eos(scores, eos_ids)
    if cfg.do_sample:
        # a beam must always be able to continue with something other than eos
        scores = warp(scores, cfg, keep=max(2, eos_ids.numel() + 1) if cfg.num_beams > 1 else 1)
    return scores


def warp(scores: torch.Tensor, cfg: GenerateConfig, keep: int = 1) -> torch.Tensor:
    """The sampling-only part of the chain (HF's former "logits warpers")."""
    if cfg.temperature != 1.0:
        scores = temperature(scores, cfg.temperature)
    nucleus = cfg.top_p < 1.0 or cfg.min_p > 0.0
    if cfg.top_k == 0:
        return _nucleus(scores, cfg, keep) if nucleus else scores
    k = min(max(cfg.top_k, keep), scores.shape[-1])
    values, index = torch.topk(scores, k)
    scores = scores.masked_fill(scores < values[..., -1:], NEG_INF)  # top_k(), sharing the topk
    if not nucleus:
        return scores
    # Top-k left k finite scores: top-p and min-p give the same result on those k alone and
    # then sort k values instead of the vocabulary. More than k survive only on a tie at the
    # k-th score, where the k values would not hold them all.
    if int((scores > NEG_INF).sum(dim=-1).max()) > k:
        return _nucleus(scores, cfg, keep)
    return torch.full_like(scores, NEG_INF).scatter(-1, index, _nucleus(values, cfg, keep))


def _nucleus(scores: torch.Tensor, cfg: GenerateConfig, keep: int) -> torch.Tensor:
    if cfg.top_p < 1.0:
        scores = top_p(scores, cfg.top_p, keep)
    if cfg.min_p > 0.0:
        scores = min_p(scores, cfg.min_p, keep)
    return scores


def select(scores: torch.Tensor, do_sample: bool,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row [rows]: the argmax, or a draw from softmax(scores) with `generator`."""
    if not do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[tokens] per row: the model's own log-probability of each chosen token,
    before any processing (ModelLink's `return_output_log_probs`)."""
    # log_softmax is one fused pass; logsumexp takes several (measured 3x slower on CPU)
    return logits.float().log_softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
