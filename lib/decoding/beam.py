"""Beam search (and beam sampling) with Hugging Face's semantics, vectorised over prompts.

The algorithm of transformers 5.x `_beam_search`, one step at a time over a state of tensors:

- every step keeps K = max(2, 1 + len(eos_ids)) x num_beams candidates per prompt (the top K
  of running score + next-token log-prob over all beams x vocab, or K drawn without replacement
  from their softmax when sampling, then sorted), so at least num_beams of them can go on;
- a candidate that ends (eos, a stop string, or max_new_tokens) becomes a finished hypothesis
  scored sum(log-probs) / length ** length_penalty (length counts the generated tokens, eos
  included) if it ranks among the first num_beams candidates; the best num_beams hypotheses
  are kept;
- the best num_beams candidates that did not end are the next running beams;
- a prompt is done when no running beam can beat its worst kept hypothesis (the heuristic of
  `early_stopping=False`; with "never" and length_penalty > 0 the best running score is
  divided by the longest possible length instead) or, with `early_stopping=True`, as soon as
  num_beams hypotheses are finished.

The first step sees one beam per prompt (the others start at -inf), so beams never duplicate.
Empty slots and banned candidates are -inf here where HF uses -1e9; the two differ only when
fewer candidates than needed have a finite score.

Beam sampling (num_beams > 1 with do_sample) is HF's: the warpers run on log-softmaxed logits
(temperature divides log-probabilities), and candidates are drawn from softmax(running score +
log-prob) over all beams. ModelLink's differs in three ways: it divides the logits by the
temperature before the log-softmax, applies top-k/top-p only when both are set, and keeps the
drawn candidates in draw order instead of sorting them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lib.decoding.config import GenerateConfig
from lib.errors import UserError

NEG_INF = float("-inf")
# (candidate tokens [prompts, K, steps so far]) -> [prompts, K] True where a stop string appeared
StopCheck = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Beams:
    """Running beams and finished hypotheses of `prompts` prompts, best first along dim 1."""
    tokens: torch.Tensor         # [prompts, beams, max_new] generated tokens of the running beams
    scores: torch.Tensor         # [prompts, beams] their summed (processed) log-probs
    logprobs: torch.Tensor       # [prompts, beams, max_new] raw log-prob of each generated token
    done_tokens: torch.Tensor    # [prompts, beams, max_new] finished hypotheses
    done_scores: torch.Tensor    # [prompts, beams] length-penalised scores (-inf: empty slot)
    done_logprobs: torch.Tensor  # [prompts, beams, max_new]
    done_lengths: torch.Tensor   # [prompts, beams] generated tokens of each hypothesis
    finished: torch.Tensor       # [prompts, beams] the slot holds a hypothesis
    improvable: torch.Tensor     # [prompts] a running beam may still beat a kept hypothesis


def init_beams(prompts: int, num_beams: int, max_new: int, device: torch.device) -> Beams:
    tokens = torch.zeros(prompts, num_beams, max_new, dtype=torch.int64, device=device)
    logprobs = torch.zeros(prompts, num_beams, max_new, device=device)
    scores = torch.full((prompts, num_beams), NEG_INF, device=device)
    scores[:, 0] = 0.0  # only the first beam is live at the first step
    return Beams(tokens=tokens, scores=scores, logprobs=logprobs, done_tokens=tokens.clone(),
                 done_scores=torch.full_like(scores, NEG_INF), done_logprobs=logprobs.clone(),
                 done_lengths=torch.zeros_like(tokens[..., 0]),
                 finished=torch.zeros_like(scores, dtype=torch.bool),
                 improvable=torch.ones(prompts, dtype=torch.bool, device=device))


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of dim 1 of `t` [prompts, n, ...] picked by `index` [prompts, m]."""
    return torch.take_along_dim(t, index.view(*index.shape, *[1] * (t.dim() - 2)), dim=1)


def beam_step(beams: Beams, scores: torch.Tensor, logprobs: torch.Tensor, step: int,
              cfg: GenerateConfig, eos_ids: torch.Tensor, *,
              generator: torch.Generator | None = None,
              stop_check: StopCheck | None = None) -> tuple[Beams, torch.Tensor, torch.Tensor]:
    """One step of beam search.

    scores: [prompts * beams, vocab] processed next-token log-probs of the running beams (the
    output of `processors.process` on log-softmaxed logits); logprobs: the raw log-softmax, for
    the per-token log-probabilities; step: tokens generated before this one.

    Returns the new state, and for the next forward the source beam of each new running beam
    [prompts, beams] (the cache rows to reorder) and its last token [prompts, beams].
    """
    prompts, num_beams = beams.scores.shape
    vocab = scores.shape[-1]
    total = (scores.view(prompts, num_beams, vocab) + beams.scores[..., None]).view(prompts, -1)
    k = max(2, 1 + eos_ids.numel()) * num_beams
    if cfg.do_sample:
        probs = total.softmax(dim=-1)
        if int((probs > 0).sum(dim=-1).min()) < k:
            raise UserError(
                f"beam sampling draws {k} candidates per step without replacement, but fewer "
                f"tokens than that have a nonzero probability: raise top_k/top_p or lower min_p")
        index = torch.multinomial(probs, k, generator=generator)
        cand_scores, order = total.gather(1, index).sort(dim=-1, descending=True)
        index = index.gather(1, order)
    else:
        cand_scores, index = total.topk(k, dim=-1)
    source, token = index // vocab, index % vocab                          # [prompts, k]

    cand_tokens = _take(beams.tokens, source)
    cand_tokens[:, :, step] = token
    cand_logprobs = _take(beams.logprobs, source)
    cand_logprobs[:, :, step] = logprobs.view(prompts, -1).gather(1, index)
    ends = torch.isin(token, eos_ids)
    if step + 1 >= cfg.max_new_tokens:
        ends = torch.ones_like(ends)
    elif stop_check is not None:
        ends |= stop_check(cand_tokens[:, :, :step + 1])

    # The best candidates that go on are the next running beams.
    live = torch.where(ends, NEG_INF, cand_scores)
    running = live.topk(num_beams, dim=-1).indices
    new_scores = _take(live, running)

    # Candidates that ended among the first num_beams become hypotheses, unless the prompt is
    # already decided; the best num_beams of old and new hypotheses are kept.
    full = beams.finished.all(dim=-1) & (cfg.early_stopping is True)
    accept = ends & (torch.arange(k, device=ends.device) < num_beams) \
        & (beams.improvable & ~full)[:, None]
    penalised = torch.where(accept, cand_scores / (step + 1) ** cfg.length_penalty, NEG_INF)
    keep = torch.cat([beams.done_scores, penalised], dim=1).topk(num_beams, dim=-1).indices
    merge = lambda old, new: _take(torch.cat([old, new], dim=1), keep)
    done_scores = merge(beams.done_scores, penalised)
    finished = merge(beams.finished, accept)
    beams = replace(
        beams,
        tokens=_take(cand_tokens, running), scores=new_scores,
        logprobs=_take(cand_logprobs, running),
        done_tokens=merge(beams.done_tokens, cand_tokens), done_scores=done_scores,
        done_logprobs=merge(beams.done_logprobs, cand_logprobs),
        done_lengths=merge(beams.done_lengths, torch.full_like(token, step + 1)),
        finished=finished,
        improvable=beams.improvable & _may_improve(new_scores, done_scores, finished, step + 1, cfg))
    return beams, _take(source, running), _take(token, running)


def _may_improve(running: torch.Tensor, done_scores: torch.Tensor, finished: torch.Tensor,
                 generated: int, cfg: GenerateConfig) -> torch.Tensor:
    """HF's early-stop heuristic: can the best running beam still beat the worst hypothesis?"""
    if cfg.early_stopping == "never" and cfg.length_penalty > 0:
        length = cfg.max_new_tokens  # the score may grow with length: assume the longest
    else:
        length = generated
    best = running[:, 0] / length ** cfg.length_penalty
    return ~finished.all(dim=-1) | (best > done_scores.min(dim=-1).values)


def is_done(beams: Beams, cfg: GenerateConfig) -> torch.Tensor:
    """[prompts] True where the finished hypotheses can no longer change."""
    return ~beams.improvable | (beams.finished.all(dim=-1) & (cfg.early_stopping is True))
