"""The decoding loop: prompts in, generated sequences out, for any `DecodeModel`.

    results = generate(model, prompts, cfg, eos_ids=[tok.eos_id], pad_id=tok.pad_id,
                       decode_text=tok.decode)
    results[i][j].output_ids   # prompt i, sequence j (num_return_sequences per prompt)

Prompts are left-padded into one batch (the cache masks the padding, so every row gets what it
would get alone), prefilled in one forward, then decoded one token per forward until every row
has ended. Shapes stay static for the compiled step: a row that ended keeps its place in the
batch (it is not worth a recompile), but it no longer costs host work (stop-string decoding,
streaming), and the loop ends as soon as every row has.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from lib.decoding import beam as beam_lib
from lib.decoding import processors
from lib.decoding.config import GenerateConfig
from lib.decoding.model import Cache, DecodeModel
from lib.decoding.stopping import DecodeText, StopStrings
from lib.errors import UserError

FinishReason = Literal["eos", "length", "stop"]
OnToken = Callable[[int, int], None]


@dataclass(frozen=True)
class Sequence:
    """One generated sequence.

    output_ids:    the new tokens only: the eos token included when generation ended on one,
                   never padding, nothing of a stop string.
    finish_reason: "eos" | "length" (max_new_tokens) | "stop" (a stop string).
    score:         beam search: HF's sequence score (sum of processed log-probs / length **
                   length_penalty); otherwise the sum of `logprobs`.
    logprobs:      when `return_logprobs`: log_softmax of the raw logits at each output token
                   (the model's own probability, before penalties and warpers), else None.
    text:          with `decode_text`: the text of output_ids without a final eos token (cut
                   exactly before a stop string), else None.
    """
    output_ids: list[int]
    finish_reason: FinishReason
    score: float
    logprobs: list[float] | None = None
    text: str | None = None


def generate(model: DecodeModel, prompts: Seq[Seq[int]], cfg: GenerateConfig, *,
             eos_ids: Seq[int] = (), pad_id: int = 0, decode_text: DecodeText | None = None,
             on_token: OnToken | None = None) -> list[list[Sequence]]:
    """Generate `cfg.num_return_sequences` sequences for each prompt (token ids, no padding).

    eos_ids:     the tokenizer's end-of-sequence id(s), used when `cfg.eos_token_id` is None.
    pad_id:      the id written in padding slots (masked, so any valid id works).
    decode_text: token ids -> text; needed for `cfg.stop`, and fills `Sequence.text`.
    on_token:    streaming: `on_token(row, token_id)` as tokens become final, where row =
                 prompt index * num_return_sequences + sequence index; each row receives
                 exactly its `output_ids`, in order (tokens that may start a stop string are
                 held back until they cannot). Beam search hands on its sequences at the
                 end: its beams change until then.

    The model gets prompt tokens and `start` as CPU tensors at prefill; everything after lives
    on the device of the logits it returns.
    """
    eos = _check_inputs(model, prompts, cfg, eos_ids, pad_id, decode_text)
    stops = StopStrings(cfg.stop, decode_text) if cfg.stop else None
    if cfg.num_beams == 1:
        return _sample(model, prompts, cfg, eos, pad_id, stops, decode_text, on_token)
    results = _beam_search(model, prompts, cfg, eos, pad_id, stops, decode_text)
    if on_token is not None:
        for row, seq in enumerate(s for sequences in results for s in sequences):
            for token in seq.output_ids:
                on_token(row, token)
    return results


def _check_inputs(model: DecodeModel, prompts: Seq[Seq[int]], cfg: GenerateConfig,
                  eos_ids: Seq[int], pad_id: int, decode_text: DecodeText | None) -> list[int]:
    vocab = model.vocab_size
    if not prompts:
        raise UserError("generate: no prompts")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty")
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise UserError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})")
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    need = len(prompts[longest]) + cfg.max_new_tokens
    if need > model.max_len:
        raise UserError(
            f"prompt {longest} has {len(prompts[longest])} tokens: with max_new_tokens="
            f"{cfg.max_new_tokens} it needs {need} positions, {need - model.max_len} more than the "
            f"model's {model.max_len}")
    eos = list(cfg.eos_ids if cfg.eos_ids is not None else eos_ids)
    bad = [i for i in eos if not 0 <= i < vocab]
    if bad:
        raise UserError(f"eos token id(s) {bad} outside the vocabulary [0, {vocab})")
    if not 0 <= pad_id < vocab:
        raise UserError(f"pad id {pad_id} is outside the vocabulary [0, {vocab})")
    if cfg.stop and decode_text is None:
        raise UserError(f"stop strings {list(cfg.stop)} need a tokenizer to decode the output "
                         f"(decode_text)")
    return eos


@dataclass(frozen=True)
class _Batch:
    """The prefilled batch, on the device of the model's logits."""
    tokens: torch.Tensor                # [rows, length] left-padded prompts, each `copies` times
    start: torch.Tensor                 # [rows] first real slot of each row
    eos: torch.Tensor                   # [n] eos ids
    generator: torch.Generator | None   # sampling's, seeded from cfg.seed


def _prefill(model: DecodeModel, prompts: Seq[Seq[int]], copies: int, cfg: GenerateConfig,
             pad_id: int, eos: list[int]) -> tuple[torch.Tensor, Cache, _Batch]:
    """Left-pad each prompt `copies` times into one batch and run it through the model:
    (last-position logits, cache, batch)."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts) * copies, longest), pad_id, dtype=torch.int64)
    start = torch.empty(len(prompts) * copies, dtype=torch.int64)
    for i, prompt in enumerate(prompts):
        rows = slice(i * copies, (i + 1) * copies)
        tokens[rows, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
        start[rows] = longest - len(prompt)
    cache = model.init_cache(tokens.shape[0], longest + cfg.max_new_tokens, start)
    logits, cache = model.forward(tokens, cache, last_only=True)
    device = logits.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.do_sample else None
    return logits, cache, _Batch(tokens.to(device), start.to(device),
                                 torch.tensor(eos, dtype=torch.int64, device=device), generator)


def _text(decode_text: DecodeText | None, ids: list[int], eos: set[int]) -> str | None:
    if decode_text is None:
        return None
    return decode_text(ids[:-1] if ids and ids[-1] in eos else ids)


@dataclass
class _Row:
    """A row being generated (host side)."""
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    streamed: int = 0
    result: Sequence | None = None


def _sample(model: DecodeModel, prompts: Seq[Seq[int]], cfg: GenerateConfig, eos: list[int],
            pad_id: int, stops: StopStrings | None, decode_text: DecodeText | None,
            on_token: OnToken | None) -> list[list[Sequence]]:
    """Greedy decoding and sampling; num_return_sequences copies of each prompt."""
    n = cfg.num_return_sequences
    logits, cache, batch = _prefill(model, prompts, n, cfg, pad_id, eos)
    rows, length = batch.tokens.shape
    eos_set = set(eos)
    history = F.pad(batch.tokens, (0, cfg.max_new_tokens), value=pad_id)
    out = [_Row() for _ in range(rows)]
    active = list(range(rows))

    for step in range(cfg.max_new_tokens):
        scores = processors.process(logits, history[:, :length + step], batch.start, step, cfg,
                                    batch.eos)
        chosen = processors.select(scores, cfg.do_sample, batch.generator)
        history[:, length + step] = chosen
        ids = chosen.tolist()
        logprobs = processors.token_logprobs(logits, chosen).tolist()
        last = step + 1 == cfg.max_new_tokens
        for r in active:
            row = out[r]
            row.ids.append(ids[r])
            row.logprobs.append(logprobs[r])
            row.result = _ended(row, last, cfg, eos_set, stops, decode_text)
            if on_token is not None:
                _stream(row, r, stops, on_token)
        active = [r for r in active if out[r].result is None]
        if not active:
            break
        logits, cache = model.forward(chosen[:, None], cache, last_only=True)
    return [[out[i * n + j].result for j in range(n)] for i in range(len(prompts))]


def _ended(row: _Row, last: bool, cfg: GenerateConfig, eos: set[int], stops: StopStrings | None,
           decode_text: DecodeText | None) -> Sequence | None:
    """The row's result if its newest token ended it, else None."""
    if row.ids[-1] in eos:
        return _finish(row.ids, row.logprobs, "eos", cfg, decode_text, eos)
    hit = stops.find(row.ids) if stops is not None else None
    if hit is not None:
        return _finish(row.ids[:hit.keep], row.logprobs[:hit.keep], "stop", cfg, None, eos,
                       text=hit.text)
    if last:
        return _finish(row.ids, row.logprobs, "length", cfg, decode_text, eos)
    return None


def _stream(row: _Row, r: int, stops: StopStrings | None, on_token: OnToken) -> None:
    """Hand on the row's tokens that are final: all of them once it ended, else those that
    cannot turn out to be part of a stop string."""
    final = row.result.output_ids if row.result is not None else row.ids
    ready = len(final) if row.result is not None or stops is None else stops.safe(row.ids)
    for token in final[row.streamed:ready]:
        on_token(r, token)
    row.streamed = max(row.streamed, ready)


def _finish(ids: list[int], logprobs: list[float], reason: FinishReason, cfg: GenerateConfig,
            decode_text: DecodeText | None, eos: set[int], *, text: str | None = None,
            score: float | None = None) -> Sequence:
    return Sequence(
        output_ids=list(ids), finish_reason=reason,
        score=float(sum(logprobs)) if score is None else score,
        logprobs=list(logprobs) if cfg.return_logprobs else None,
        text=text if text is not None else _text(decode_text, ids, eos))


def _beam_stop_check(stops: StopStrings | None, device: torch.device) -> beam_lib.StopCheck | None:
    if stops is None:
        return None

    def check(candidates: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[stops.find(ids) is not None for ids in prompt]
                             for prompt in candidates.tolist()], device=device)
    return check


def _beam_search(model: DecodeModel, prompts: Seq[Seq[int]], cfg: GenerateConfig,
                 eos: list[int], pad_id: int, stops: StopStrings | None,
                 decode_text: DecodeText | None) -> list[list[Sequence]]:
    nb = cfg.num_beams
    logits, cache, batch = _prefill(model, prompts, nb, cfg, pad_id, eos)
    rows = batch.tokens.shape[0]
    device = logits.device
    eos_set = set(eos)
    beams = beam_lib.init_beams(len(prompts), nb, cfg.max_new_tokens, device)
    needs_history = cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0
    first_row = torch.arange(len(prompts), device=device)[:, None] * nb
    identity = torch.arange(rows, device=device)
    stop_check = _beam_stop_check(stops, device)

    for step in range(cfg.max_new_tokens):
        logprobs = logits.float().log_softmax(dim=-1)
        history = torch.cat([batch.tokens, beams.tokens.view(rows, -1)[:, :step]], dim=1) \
            if needs_history else batch.tokens
        scores = processors.process(logprobs, history, batch.start, step, cfg, batch.eos)
        beams, source, last = beam_lib.beam_step(
            beams, scores, logprobs, step, cfg, batch.eos, generator=batch.generator,
            stop_check=stop_check)
        if step + 1 == cfg.max_new_tokens or bool(beam_lib.is_done(beams, cfg).all()):
            break
        source_rows = (first_row + source).view(-1)
        if not torch.equal(source_rows, identity):
            cache = model.reorder(cache, source_rows)
        logits, cache = model.forward(last.view(rows, 1), cache, last_only=True)

    return [[_hypothesis(beams, i, j, cfg, eos_set, stops, decode_text)
             for j in range(cfg.num_return_sequences)] for i in range(len(prompts))]


def _hypothesis(beams: beam_lib.Beams, i: int, j: int, cfg: GenerateConfig, eos: set[int],
                stops: StopStrings | None, decode_text: DecodeText | None) -> Sequence:
    """Prompt i's j-th best finished hypothesis."""
    size = int(beams.done_lengths[i, j])
    ids = beams.done_tokens[i, j, :size].tolist()
    logprobs = beams.done_logprobs[i, j, :size].tolist()
    score = float(beams.done_scores[i, j])
    if ids and ids[-1] in eos:
        return _finish(ids, logprobs, "eos", cfg, decode_text, eos, score=score)
    hit = stops.find(ids) if stops is not None else None
    if hit is not None:
        return _finish(ids[:hit.keep], logprobs[:hit.keep], "stop", cfg, None, eos,
                       text=hit.text, score=score)
    return _finish(ids, logprobs, "length", cfg, decode_text, eos, score=score)
