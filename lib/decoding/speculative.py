"""Speculative decoding: a small draft model proposes tokens, the target checks them in one forward.

    results, stats = speculative.generate(target, draft, prompts, cfg, draft_tokens=4,
                                          eos_ids=[2], decode_text=tokenizer.decode)
    stats.tokens_per_step   # tokens kept per target forward (1 is plain decoding)

Each round the draft model proposes k tokens one by one (its own processed distribution q),
the target scores the last kept token and the k proposals in one forward (p at k+1 positions),
and the acceptance rule of Leviathan et al. 2023 / Chen et al. 2023 keeps a prefix:
proposal d_j is accepted with probability min(1, p(d_j) / q(d_j)); at the first rejection the
next token is drawn from normalise(max(0, p - q)), and when all k are accepted a bonus token is
drawn from p at position k+1. The kept tokens are distributed exactly as sampling from the
target alone. Greedy decoding is the same rule with one-hot p and q (the argmaxes of the
processed scores): the output is plain greedy decoding of the target.

Both models see the same processor chain as `lib.decoding.generate` (repetition penalty,
min_new_tokens, the sampling warpers...), run position by position over the block.

The KV cache has one write position for all rows, so a batch keeps the same number of tokens in
every row: the fewest any unfinished row accepted, plus one. A row that accepted more keeps its
accepted proposal at that position, itself a valid draw from the target; what it accepted
beyond is proposed again next round. Rejected slots are forgotten with `DecodeModel.rewind`.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib.decoding import processors
from lib.decoding.config import GenerateConfig
from lib.decoding.generate import (OnToken, Sequence, _check_inputs, _ended, _prefill, _Row,
                                   _stream)
from lib.decoding.model import DecodeModel
from lib.decoding.stopping import DecodeText, StopStrings
from lib.errors import UserError


@dataclass
class SpeculativeStats:
    target_steps: int = 0     # target forwards after the prefill
    proposed: int = 0         # draft tokens proposed (per row)
    accepted: int = 0         # of which kept (per row)

    @property
    def tokens_per_step(self) -> float:
        """Tokens kept per target forward (plain decoding keeps 1)."""
        return (self.accepted + self.target_steps) / max(self.target_steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


def distribution(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """What `processors.select` draws from: softmax(scores), or one-hot at the argmax (greedy)."""
    if do_sample:
        return scores.softmax(dim=-1)
    return F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule over one block.

    p [rows, k+1, vocab]: the target's distributions at the k+1 positions; q [rows, k, vocab]:
    the draft's, from which `drafts` [rows, k] were drawn. Returns (accepted [rows]: how many
    leading proposals are kept, next [rows]: the token after them). Without a generator
    (greedy decoding: one-hot p and q) the rule is deterministic.
    """
    rows, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = (torch.rand(rows, k, generator=generator, device=p.device) if generator is not None
         else torch.zeros(rows, k, device=p.device))
    kept = u * q_d < p_d                                  # u < p/q: probability min(1, p/q)
    accepted = kept.to(torch.int64).cumprod(dim=1).sum(dim=1)
    at = torch.arange(rows, device=p.device)
    p_next = p[at, accepted]
    q_next = F.pad(q, (0, 0, 0, 1))[at, accepted]         # zero after the last proposal: p itself
    residual = (p_next - q_next).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p_next)
    if generator is None:
        return accepted, residual.argmax(dim=-1)
    return accepted, torch.multinomial(residual, 1, generator=generator).squeeze(1)


def generate(target: DecodeModel, draft: DecodeModel, prompts: Seq[Seq[int]],
             cfg: GenerateConfig, *, draft_tokens: int, eos_ids: Seq[int] = (), pad_id: int = 0,
             decode_text: DecodeText | None = None, on_token: OnToken | None = None,
             ) -> tuple[list[list[Sequence]], SpeculativeStats]:
    """`lib.decoding.generate`'s results (greedy decoding or sampling) for `prompts`, decoded
    speculatively with `draft` proposing `draft_tokens` tokens per target forward."""
    if cfg.num_beams > 1:
        raise UserError(f"speculative decoding (generate.draft) works with greedy decoding and "
                        f"sampling, not beam search (num_beams={cfg.num_beams})")
    if draft_tokens < 1:
        raise UserError(f"draft_tokens={draft_tokens} must be >= 1")
    if draft.vocab_size != target.vocab_size:
        raise UserError(f"the draft model's vocabulary ({draft.vocab_size} tokens) differs from the "
                        f"target's ({target.vocab_size}): they must share a tokenizer")
    eos = _check_inputs(target, prompts, cfg, eos_ids, pad_id, decode_text)
    stops = StopStrings(cfg.stop, decode_text) if cfg.stop else None
    copies = cfg.num_return_sequences
    logits, cache, batch = _prefill(target, prompts, copies, cfg, pad_id, eos)
    _, draft_cache, _ = _prefill(draft, prompts, copies, cfg, pad_id, eos)
    rows, length = batch.tokens.shape
    history = F.pad(batch.tokens, (0, cfg.max_new_tokens + draft_tokens), value=pad_id)
    out = [_Row() for _ in range(rows)]
    active = list(range(rows))
    eos_set = set(eos)
    stats = SpeculativeStats()

    def scores_at(raw: torch.Tensor, generated: int) -> torch.Tensor:
        return processors.process(raw, history[:, :length + generated], batch.start, generated,
                                  cfg, batch.eos)

    def keep(new: torch.Tensor, raw: torch.Tensor, generated: int) -> list[int]:
        """Record `new` [rows, n] (from target logits `raw` [rows, n, vocab]); the rows still going."""
        history[:, length + generated:length + generated + new.shape[1]] = new
        ids = new.tolist()
        logprobs = processors.token_logprobs(raw, new).tolist()
        going = []
        for r in active:
            row = out[r]
            for j in range(new.shape[1]):
                row.ids.append(ids[r][j])
                row.logprobs.append(logprobs[r][j])
                row.result = _ended(row, generated + j + 1 == cfg.max_new_tokens, cfg, eos_set,
                                    stops, decode_text)
                if row.result is not None:
                    break
            if on_token is not None:
                _stream(row, r, stops, on_token)
            if row.result is None:
                going.append(r)
        return going

    # The first token comes from the prefill, as in plain decoding.
    last = processors.select(scores_at(logits, 0), cfg.do_sample, batch.generator)
    active = keep(last[:, None], logits[:, None], 0)
    generated = 1
    while active:
        k = min(draft_tokens, cfg.max_new_tokens - generated - 1)
        if k == 0:  # room for one token only: a plain step
            logits, cache = target.forward(last[:, None], cache, last_only=True)
            last = processors.select(scores_at(logits, generated), cfg.do_sample, batch.generator)
            active = keep(last[:, None], logits[:, None], generated)
            generated += 1
            stats.target_steps += 1
            continue
        # The draft proposes k tokens; its cache then holds `last` and the first k-1 of them.
        proposals, q = [], []
        draft_logits, draft_cache = draft.forward(last[:, None], draft_cache, last_only=True)
        for j in range(k):
            q.append(distribution(scores_at(draft_logits, generated + j), cfg.do_sample))
            proposal = (torch.multinomial(q[-1], 1, generator=batch.generator).squeeze(1)
                        if cfg.do_sample else q[-1].argmax(dim=-1))
            proposals.append(proposal)
            history[:, length + generated + j] = proposal
            if j + 1 < k:
                draft_logits, draft_cache = draft.forward(proposal[:, None], draft_cache,
                                                          last_only=True)
        drafts = torch.stack(proposals, dim=1)
        # The target scores `last` and the k proposals in one forward.
        raw, cache = target.forward(torch.cat([last[:, None], drafts], dim=1), cache,
                                    last_only=False)
        p = torch.stack([distribution(scores_at(raw[:, j], generated + j), cfg.do_sample)
                         for j in range(k + 1)], dim=1)
        accepted, correction = verify(p, torch.stack(q, dim=1), drafts, batch.generator)
        m = int(accepted[active].min())
        # Rows that accepted more than m keep their proposal at position m (a draw from p too).
        nxt = correction if m == k else torch.where(accepted > m, drafts[:, m], correction)
        new = torch.cat([drafts[:, :m], nxt[:, None]], dim=1)
        stats.target_steps += 1
        stats.proposed += k
        stats.accepted += m
        active = keep(new, raw[:, :m + 1], generated)
        generated += m + 1
        last = nxt
        # Forget the rejected slots: the target wrote last + k proposals, the draft last + k-1.
        target.rewind(cache, k - m)
        if m < k:
            draft.rewind(draft_cache, k - 1 - m)
        else:  # all accepted: the draft never saw its own last proposal
            _, draft_cache = draft.forward(drafts[:, k - 1:], draft_cache, last_only=True)
    results = [[out[i * copies + j].result for j in range(copies)] for i in range(len(prompts))]
    return results, stats
