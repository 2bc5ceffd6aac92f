"""Log-likelihoods of continuations, batched and compiled: the engine behind `runners.evaluate`.

    scorer = Scorer(params, config, mesh, rules, kernels=..., backend="inductor")
    results = scorer(requests)    # [(sum of log p(continuation | context), is_greedy), ...]

lm-eval's HFLM runs one forward per (context, continuation) pair and a full-vocabulary
log-softmax at every position of the batch. Here:

- a request's scored positions are "entries" (position, target token); requests whose model
  input is the same token sequence share one row (multiple-choice questions whose choices are
  single tokens, MMLU's " A".." D", cost one forward of the context);
- rows are sorted by length and batched, right-padded to a few length buckets (4 per octave),
  so the compiled scoring function is reused instead of recompiled per length;
- the lm_head and log-softmax run only at the entries' positions;
- under torchrun, batches are dealt to the data-parallel shards (ranks of one tensor-parallel
  group score the same rows), and the results are gathered in request order.

Inputs longer than the model's context are truncated from the left exactly as HFLM does:
`(context + continuation)[-(max_len + 1):][:-1]`.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from lib.constraints import constrain, use_constraint
from lib.evals.tokens import Request
from models import llama
from parallel import jit as jit_lib
from parallel import sharding
from parallel.mesh import Mesh


@dataclass
class Row:
    """One model input and the (position, target token, request) entries scored on it."""
    tokens: tuple[int, ...]
    positions: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)


def plan_rows(requests: Sequence[Request], max_len: int) -> tuple[list[Row], set[int]]:
    """Rows sorted longest first (ties by content, for a stable order), and the indices of the
    requests whose input was truncated on the left."""
    rows: dict[tuple[int, ...], Row] = {}
    truncated = set()
    for i, req in enumerate(requests):
        if not req.continuation:
            raise ValueError(f"request {i} has an empty continuation")
        whole = req.context + req.continuation
        if len(req.continuation) > max_len:
            raise ValueError(f"request {i}: a continuation of {len(req.continuation)} tokens does "
                             f"not fit the model's context of {max_len}")
        if len(whole) > max_len + 1:
            truncated.add(i)
        inputs = whole[-(max_len + 1):][:-1]
        row = rows.setdefault(inputs, Row(inputs))
        first = len(inputs) - len(req.continuation)
        for offset, target in enumerate(req.continuation):
            row.positions.append(first + offset)
            row.targets.append(target)
            row.requests.append(i)
    return sorted(rows.values(), key=lambda r: (-len(r.tokens), r.tokens)), truncated


def bucket(n: int, minimum: int = 16) -> int:
    """`n` rounded up to one of four sizes per octave (16, 20, 24, 28, 32, 40, ...): at most 25%
    padding, and few distinct shapes to compile."""
    if n <= minimum:
        return minimum
    step = max(1, 1 << (max(n - 1, 1).bit_length() - 3))
    return -(-n // step) * step


def entries_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Batch:
    rows: list[Row]
    shape: tuple[int, int, int]  # (rows, length, entries) after padding


def make_batches(rows: Sequence[Row], tokens_per_batch: int, rows_per_batch: int | None) -> list[Batch]:
    """Consecutive rows (longest first) grouped into batches of one padded shape each.

    The number of rows of a batch depends only on its length bucket (`rows_per_batch`, or as
    many as fit in `tokens_per_batch`), so every batch of a bucket has the same shape."""
    batches: list[Batch] = []
    i = 0
    while i < len(rows):
        length = bucket(len(rows[i].tokens))
        n = rows_per_batch or max(1, tokens_per_batch // length)
        chunk = list(rows[i:i + n])
        i += len(chunk)
        entries = entries_bucket(max(len(r.positions) for r in chunk))
        batches.append(Batch(chunk, (n, length, entries)))
    return batches


def _tensors(batch: Batch, pad_id: int, device) -> dict[str, torch.Tensor]:
    n, length, entries = batch.shape
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    positions = torch.zeros((n, entries), dtype=torch.long)
    targets = torch.zeros((n, entries), dtype=torch.long)
    for r, row in enumerate(batch.rows):
        tokens[r, :len(row.tokens)] = torch.tensor(row.tokens)
        positions[r, :len(row.positions)] = torch.tensor(row.positions)
        targets[r, :len(row.targets)] = torch.tensor(row.targets)
    return {k: v.to(device) for k, v in
            {"tokens": tokens, "positions": positions, "targets": targets}.items()}


def build_score_fn(config: llama.Config, kernels: llama.Kernels) -> Callable:
    """score(params, tokens [b, s], positions [b, e], targets [b, e]) ->
    (log p(target | tokens[:position + 1]) [b, e] fp32, target is the argmax [b, e])."""
    def score(params: Any, tokens: torch.Tensor, positions: torch.Tensor,
              targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            hidden = llama.hidden_states(params, tokens, config, kernels=kernels)
            picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = llama.logits(params, picked, config).float()
            if isinstance(logits, DTensor):
                # this rank's rows with the whole vocabulary: argmax has no sharded strategy
                logits = constrain(logits, ("batch", None, None)).to_local()
                targets = targets.to_local()
            logprobs = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
            return logprobs, logits.argmax(-1) == targets
    return score


class Scorer:
    """Scores requests with `params` on this process's mesh (see the module docstring).

    tokens_per_batch: padded tokens per forward when `rows_per_batch` is not fixed.
    """

    def __init__(self, params: Any, config: llama.Config, mesh: Mesh, rules: sharding.Rules, *,
                 kernels: llama.Kernels = llama.Kernels(), backend: str | Callable | None = None,
                 cache_dir: str | None = None, tokens_per_batch: int = 4096,
                 rows_per_batch: int | None = None, pad_id: int = 0,
                 device: torch.device | str = "cpu"):
        self.params, self.config, self.mesh, self.rules = params, config, mesh, rules
        self.tokens_per_batch, self.rows_per_batch = tokens_per_batch, rows_per_batch
        self.pad_id, self.device = pad_id, torch.device(device)
        # torch.compile specialises on shapes: one graph per (rows, length, entries) bucket.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._score = jit_lib.jit(build_score_fn(config, kernels), backend, cache_dir=cache_dir)
        self._constraint = sharding.activation_constraint(rules, mesh)

    def __call__(self, requests: Sequence[Request],
                 progress: Callable[[int], None] | None = None) -> tuple[list[tuple[float, bool]], set[int]]:
        """[(log-likelihood, is_greedy)] per request, in order, and the truncated requests.

        `progress(k)` is called as the requests of k more rows are done (on every rank)."""
        rows, truncated = plan_rows(requests, self.config.max_seq_len)
        batches = make_batches(rows, self.tokens_per_batch, self.rows_per_batch)
        index, count = sharding.batch_shards(self.rules, self.mesh)
        logprob = [0.0] * len(requests)
        greedy = [True] * len(requests)
        done: list[tuple[int, int, float, bool]] = []  # (request, position, log p, greedy)
        for step in _lockstep(batches, count):
            mine = step[index]
            lp, gr = self._run(mine)
            for r, row in enumerate(mine.rows):
                for e, req in enumerate(row.requests):
                    done.append((req, row.positions[e], float(lp[r, e]), bool(gr[r, e])))
            if progress is not None:
                progress(sum(len(set(row.requests)) for b in step for row in b.rows))
        for req, _, lp, gr in _gather(done):
            logprob[req] += lp
            greedy[req] = greedy[req] and gr
        return list(zip(logprob, greedy)), truncated

    def _run(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        t = sharding.shard_batch(_tensors(batch, self.pad_id, self.device), self.rules, self.mesh)
        with implicit_replication(), use_constraint(self._constraint):
            lp, gr = self._score(self.params, t["tokens"], t["positions"], t["targets"])
        return lp.cpu(), gr.cpu()


def _lockstep(batches: list[Batch], shards: int) -> list[list[Batch]]:
    """Steps of `shards` batches of one shape each (data-parallel ranks run one graph together,
    DTensor wants equal local shapes); a shard with nothing left gets an empty batch."""
    if shards == 1:
        return [[b] for b in batches]
    by_shape: dict[tuple, list[Batch]] = defaultdict(list)
    for b in batches:
        by_shape[b.shape].append(b)
    steps = []
    for shape, group in by_shape.items():
        group = group + [Batch([], shape)] * (-len(group) % shards)
        steps += [group[i:i + shards] for i in range(0, len(group), shards)]
    return steps


def _gather(done: list[tuple[int, int, float, bool]]) -> list[tuple[int, int, float, bool]]:
    """Every rank's entries on every rank; tensor-parallel peers score the same rows, so an entry
    (request, position) seen twice is kept once."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return done
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, done)
    seen, out = set(), []
    for part in parts:
        for item in part:
            key = item[:2]
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out
