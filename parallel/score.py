"""Log-likelihoods of continuations, batched and compiled: the engine behind `runners.evaluate`.

    scorer = Scorer(config, mesh, rules, kernels=..., backend="inductor")
    results, truncated = scorer(params, requests)   # [(log p(continuation | context), is_greedy)]

lm-eval's HFLM runs one forward per (context, continuation) pair and a full-vocabulary
log-softmax at every position of the batch. Here:

- a request's scored positions are "entries" (position, target token); requests whose model
  input is the same token sequence share one row (multiple-choice questions whose choices are
  single tokens, MMLU's " A".." D", cost one forward of the context);
- rows that begin with the same tokens (the description and five shots of every question of an
  MMLU subject, the context of HellaSwag's four endings) form a group: the shared prefix is run
  once into a KV cache (`models.llama.hidden_states_with_cache`), copied to the group's rows,
  and only the rest of each row is run on top of it. Attention is causal, so the scores are
  those of the whole row;
- rows are sorted by length and batched, right-padded to a few length buckets (4 per octave),
  so compiled code is reused instead of recompiled per length; what is compiled is the
  transformer layer (`parallel.layerwise`), once per shape for all layers, so each new bucket
  costs one layer's compile, not the whole model's;
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
from parallel import layerwise
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


def rows_bucket(n: int) -> int:
    """`n` rows rounded up to one of four sizes per octave above 4 (5, 6, 7, 8, 10, 12, ...):
    at most 25% padding rows."""
    if n <= 4:
        return max(n, 1)
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def entries_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Batch:
    rows: list[Row]
    shape: tuple[int, int, int]  # (rows, length, entries) after padding


def make_batches(rows: Sequence[Row], tokens_per_batch: int, rows_per_batch: int | None) -> list[Batch]:
    """Consecutive rows (longest first) grouped into batches of one padded shape each.

    A batch holds `rows_per_batch` rows (every batch of a bucket one shape), or as many as fit
    in `tokens_per_batch` at its length bucket, the last batch of a bucket padded only to
    `rows_bucket` of its rows, so a bucket with few rows does not run a full batch of padding."""
    batches: list[Batch] = []
    i = 0
    while i < len(rows):
        length = bucket(len(rows[i].tokens))
        n = rows_per_batch or max(1, tokens_per_batch // length)
        chunk = list(rows[i:i + n])
        i += len(chunk)
        entries = entries_bucket(max(len(r.positions) for r in chunk))
        rows_padded = n if rows_per_batch else min(n, rows_bucket(len(chunk)))
        batches.append(Batch(chunk, (rows_padded, length, entries)))
    return batches


MIN_SHARED_PREFIX = 32  # tokens; shorter common beginnings are not worth a second pass


@dataclass
class Group:
    """Rows that start with `prefix`; none scores a position inside it."""
    prefix: tuple[int, ...]
    rows: list[Row]


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_by_prefix(rows: Sequence[Row], min_prefix: int = MIN_SHARED_PREFIX) -> tuple[list[Group], list[Row]]:
    """(groups of rows sharing at least `min_prefix` leading tokens, rows left alone).

    Rows are sorted, so rows with a common beginning are neighbours. A group takes the next row
    while that saves work: the row's n shared tokens run once instead of again, against the
    tokens the group's prefix shrinks by, which each member then runs in its own suffix. So
    MMLU questions of one subject share the description and five shots (a question shortens
    the prefix by a few tokens at most), a question of the next subject (a dozen tokens in
    common) starts a new group, and HellaSwag's endings group per context, not with another
    document that merely begins the same way. The prefix stops before the first scored position
    of any member: those hidden states come from the second pass."""
    order = sorted(rows, key=lambda r: r.tokens)
    groups, alone = [], []
    i = 0
    while i < len(order):
        shared, j = len(order[i].tokens), i + 1
        while j < len(order):
            n = _common_prefix(order[i].tokens, order[j].tokens)
            if n < min_prefix or (shared - n) * (j - i) > n:
                break
            shared, j = min(shared, n), j + 1
        members = order[i:j]
        shared = min([shared] + [min(r.positions) for r in members])
        if len(members) > 1 and shared >= min_prefix:
            groups.append(Group(members[0].tokens[:shared], members))
        else:
            alone += members
        i = j
    return groups, sorted(alone, key=lambda r: (-len(r.tokens), r.tokens))


@dataclass(frozen=True)
class PrefixBatch:
    """Rows of a few groups: the groups' prefixes are run once, the rows' suffixes on top."""
    groups: list[Group]
    rows: list[tuple[int, Row]]          # (index into groups, row)
    shape: tuple[int, int, int, int, int]  # (groups, prefix len, rows, suffix len, entries) padded


def make_prefix_batches(groups: Sequence[Group], tokens_per_batch: int) -> list[PrefixBatch]:
    """The groups' rows in batches of one padded shape each.

    Groups are ordered by prefix bucket, then by their longest suffix (longest first), rows
    within a group longest first, and a batch never spans two prefix buckets, so its first row
    fixes its shape: as many rows as fit
    `tokens_per_batch` suffix tokens, the prefix cache counted beside them, padded to
    `rows_bucket` of the rows it holds when fewer (the last batch of a bucket); its groups'
    prefixes likewise to `rows_bucket` of the groups."""
    def suffix(item: tuple[Group, Row]) -> int:
        return len(item[1].tokens) - len(item[0].prefix)

    def longest_suffix(g: Group) -> int:
        return max(len(r.tokens) for r in g.rows) - len(g.prefix)
    # A group's rows stay together, so its prefix runs in one batch (two at a boundary), not
    # once per batch that one of its rows was sorted into.
    ordered = sorted(groups, key=lambda g: (-bucket(len(g.prefix)), -longest_suffix(g)))
    items = [(g, row) for g in ordered for row in sorted(g.rows, key=lambda r: -len(r.tokens))]
    batches: list[PrefixBatch] = []
    i = 0
    while i < len(items):
        prefix_len = bucket(len(items[i][0].prefix))
        suffix_len = bucket(longest_suffix(items[i][0]))  # bounds every row after it
        n = max(1, tokens_per_batch // (suffix_len + prefix_len // 4))
        chunk = []
        while i < len(items) and len(chunk) < n and bucket(len(items[i][0].prefix)) == prefix_len:
            chunk.append(items[i])
            i += 1
        index: dict[int, int] = {}
        batch_groups: list[Group] = []
        rows = []
        for g, r in chunk:
            if id(g) not in index:
                index[id(g)] = len(batch_groups)
                batch_groups.append(g)
            rows.append((index[id(g)], r))
        entries = entries_bucket(max(len(r.positions) for _, r in rows))
        shape = (rows_bucket(len(batch_groups)), prefix_len, min(n, rows_bucket(len(rows))),
                 suffix_len, entries)
        batches.append(PrefixBatch(batch_groups, rows, shape))
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


def build_score_fn(config: llama.Config, kernels: llama.Kernels,
                   layer_hook: layerwise.LayerHook | None = None) -> Callable:
    """score(params, tokens [b, s], positions [b, e], targets [b, e]) ->
    (log p(target | tokens[:position + 1]) [b, e] fp32, target is the argmax [b, e]).
    `layer_hook` wraps the per-layer function (`layerwise.compiled_layers`)."""
    def score(params: Any, tokens: torch.Tensor, positions: torch.Tensor,
              targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            hidden = llama.hidden_states(params, tokens, config, kernels=kernels, remat=layer_hook)
            picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = llama.logits(params, picked, config).float()
            if isinstance(logits, DTensor):
                # this rank's rows with the whole vocabulary: argmax has no sharded strategy
                logits = constrain(logits, ("batch", None, None)).to_local()
                targets = targets.to_local()
            return _token_scores(logits, targets)
    return score


def _prefix_tensors(batch: PrefixBatch, pad_id: int, device) -> dict[str, torch.Tensor]:
    n_groups, prefix_len, n_rows, suffix_len, entries = batch.shape
    prefix = torch.full((n_groups, prefix_len), pad_id, dtype=torch.long)
    start = torch.full((n_groups,), prefix_len, dtype=torch.long)  # padding-only rows by default
    for g, group in enumerate(batch.groups):  # left-padded: the cache's `start` masks the pads
        start[g] = prefix_len - len(group.prefix)
        prefix[g, start[g]:] = torch.tensor(group.prefix)
    row_group = torch.zeros(n_rows, dtype=torch.long)
    suffix = torch.full((n_rows, suffix_len), pad_id, dtype=torch.long)
    positions = torch.zeros((n_rows, entries), dtype=torch.long)
    targets = torch.zeros((n_rows, entries), dtype=torch.long)
    for r, (g, row) in enumerate(batch.rows):
        shared = len(batch.groups[g].prefix)
        row_group[r] = g
        suffix[r, :len(row.tokens) - shared] = torch.tensor(row.tokens[shared:])
        positions[r, :len(row.positions)] = torch.tensor(row.positions) - shared
        targets[r, :len(row.targets)] = torch.tensor(row.targets)
    tensors = {"prefix": prefix, "start": start, "row_group": row_group, "suffix": suffix,
               "positions": positions, "targets": targets}
    return {k: v.to(device) for k, v in tensors.items()}


def _token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return logprobs, logits.argmax(-1) == targets


def build_prefix_score_fn(config: llama.Config, kernels: llama.Kernels, dtype: torch.dtype,
                          layer_hook: layerwise.LayerHook | None = None) -> Callable:
    """score(params, prefix [g, p], start [g], row_group [b], suffix [b, s], positions [b, e],
    targets [b, e]) -> as `build_score_fn`'s, positions counted from the start of the suffix."""
    def score(params: Any, prefix: torch.Tensor, start: torch.Tensor, row_group: torch.Tensor,
              suffix: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor):
        with torch.no_grad():
            cache = llama.init_cache(config, prefix.shape[0], prefix.shape[1] + suffix.shape[1],
                                     start=start, dtype=dtype, device=prefix.device)
            _, cache = llama.hidden_states_with_cache(params, prefix, cache, config, kernels=kernels,
                                                      layer_hook=layer_hook)
            rows = {"layers": [{k: t.index_select(0, row_group) for k, t in layer.items()}
                               for layer in cache["layers"]],
                    "start": cache["start"].index_select(0, row_group), "index": cache["index"]}
            hidden, _ = llama.hidden_states_with_cache(params, suffix, rows, config, kernels=kernels,
                                                       layer_hook=layer_hook)
            picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
            return _token_scores(llama.logits(params, picked, config).float(), targets)
    return score


class Scorer:
    """Scores requests with a model's params on this process's mesh (see the module docstring).
    The compiled functions are kept across calls: params change (training), graphs do not.

    tokens_per_batch: padded tokens per forward when `rows_per_batch` is not fixed.
    share_prefixes: run the common beginning of rows once (single process, batches by tokens).
    """

    def __init__(self, config: llama.Config, mesh: Mesh, rules: sharding.Rules, *,
                 kernels: llama.Kernels = llama.Kernels(), dtype: torch.dtype = torch.float32,
                 backend: str | Callable | None = None,
                 cache_dir: str | None = None, tokens_per_batch: int = 4096,
                 rows_per_batch: int | None = None, share_prefixes: bool = True, pad_id: int = 0,
                 device: torch.device | str = "cpu"):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.tokens_per_batch, self.rows_per_batch = tokens_per_batch, rows_per_batch
        self.pad_id, self.device = pad_id, torch.device(device)
        # torch.compile specialises on shapes: the layer is compiled once per (rows, length)
        # bucket; embedding, the picked positions' lm_head and log-softmax run eagerly.
        layer = layerwise.compiled_layers(None, backend, cache_dir)
        self._score = build_score_fn(config, kernels, layer)
        # Shared prefixes go through the KV cache, which runs on plain tensors only: under a
        # mesh every row is scored whole. A fixed `rows_per_batch` also scores rows whole.
        self._share_prefixes = share_prefixes and mesh.device_mesh is None and rows_per_batch is None
        self._score_prefixed = build_prefix_score_fn(config, kernels, dtype, layer)
        self._constraint = sharding.activation_constraint(rules, mesh)

    def __call__(self, params: Any, requests: Sequence[Request],
                 progress: Callable[[int], None] | None = None) -> tuple[list[tuple[float, bool]], set[int]]:
        """[(log-likelihood, is_greedy)] per request, in order, and the truncated requests.

        `progress(k)` is called as the requests of k more rows are done (on every rank)."""
        rows, truncated = plan_rows(requests, self.config.max_seq_len)
        groups: list[Group] = []
        if self._share_prefixes:
            groups, rows = group_by_prefix(rows)
        index, count = sharding.batch_shards(self.rules, self.mesh)
        done: list[tuple[int, int, float, bool]] = []  # (request, position, log p, greedy)

        def collect(rows: Sequence[Row], lp: torch.Tensor, gr: torch.Tensor) -> None:
            for r, row in enumerate(rows):
                for e, req in enumerate(row.requests):
                    done.append((req, row.positions[e], float(lp[r, e]), bool(gr[r, e])))
            if progress is not None:
                progress(sum(len(set(row.requests)) for row in rows))

        for batch in make_prefix_batches(groups, self.tokens_per_batch):
            collect([row for _, row in batch.rows], *self._run_prefixed(params, batch))
        for step in _lockstep(make_batches(rows, self.tokens_per_batch, self.rows_per_batch), count):
            lp, gr = self._run(params, step[index])
            collect(step[index].rows, lp, gr)
        logprob = [0.0] * len(requests)
        greedy = [True] * len(requests)
        for req, _, lp, gr in _gather(done):
            logprob[req] += lp
            greedy[req] = greedy[req] and gr
        return list(zip(logprob, greedy)), truncated

    def _run(self, params: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        t = sharding.shard_batch(_tensors(batch, self.pad_id, self.device), self.rules, self.mesh)
        with implicit_replication(), use_constraint(self._constraint):
            lp, gr = self._score(params, t["tokens"], t["positions"], t["targets"])
        return lp.cpu(), gr.cpu()

    def _run_prefixed(self, params: Any, batch: PrefixBatch) -> tuple[torch.Tensor, torch.Tensor]:
        t = _prefix_tensors(batch, self.pad_id, self.device)
        lp, gr = self._score_prefixed(params, t["prefix"], t["start"], t["row_group"], t["suffix"],
                                      t["positions"], t["targets"])
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
