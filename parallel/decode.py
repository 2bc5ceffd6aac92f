"""Compiled decoding: `lib.decoding.model.DecodeModel` over `models.llama`'s cached forward.

    decoder = Decoder(params, config, mesh=mesh, rules=rules, backend="inductor")
    cache = decoder.init_cache(batch, max_len, start)
    logits, cache = decoder.forward(prompt_tokens, cache, last_only=True)   # prefill
    logits, cache = decoder.forward(next_tokens[:, None], cache, last_only=True)  # one step

The model's cached layer is compiled once per shape and run for every layer
(`parallel.layerwise`: compile time does not grow with depth); embedding, masks and the lm head
run eagerly around it. Two kinds of shapes, the way gpt-fast has them:

- the decode step (one token per row): the slot it writes is `cache["index"]`, a tensor, so one
  graph serves every token at every position. The cache is written in place (`index_copy_`,
  which inductor turns into a store of the new slot only; no copy of the cache per step).
- prefill (a prompt, a new chat turn, a speculative block): compiled once per length bucket,
  powers of two from 8. Tokens are padded on the right up to the bucket; the padding's keys
  land beyond the cache's index, where no query looks and the next write overwrites them, and
  the index then advances by the real length, a tensor too. A block that does not fit its
  bucket in the cache is split into power-of-two chunks (chunked prefill is exact).

Graphs depend on (batch, cache length), so a cache's length (prompt + new tokens + `HEADROOM`
slots for a bucket's padding) is rounded up to a few sizes (2^k and 1.5 * 2^k, from 128):
another `max_new_tokens` reuses the graphs of the size it falls in. `compile=False` (backend None) runs
the same functions eagerly.

Under a mesh the parameters and the cache are DTensors placed by the rule table (the cache by
`llama.cache_axes`: kv heads over `tensor`, rows over the batch axes); attention runs per shard
through `local_map`, so any kernel (SDPA, a fused NPU kernel) works on its heads; logits come out
whole on every rank, so every rank runs the same decoding and picks the same tokens. Rows are
padded to a multiple of the batch shards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import zeros as dtensor_zeros
from torch.distributed.tensor.experimental import implicit_replication

from lib.constraints import use_constraint
from lib.errors import UserError
from models import llama
from parallel import kernels as kernels_lib
from parallel import layerwise
from parallel import sharding
from parallel.mesh import Mesh

Cache = dict[str, Any]

MIN_BUCKET = 8           # shortest prefill graph (a speculative block of up to 7 drafts fits)
HEADROOM = 16            # cache slots beyond what is asked: room for a short block's padding
MIN_CACHE = 128


def prefill_bucket(n: int) -> int:
    """The padded length a prefill of `n` tokens compiles for: the next power of two >= 8."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def cache_length(needed: int, limit: int) -> int:
    """Slots to allocate for `needed` (prompt + new tokens): `needed + HEADROOM` rounded up to
    2^k or 1.5 * 2^k (at least MIN_CACHE), at most the model's context `limit` + HEADROOM (the
    headroom holds only a bucket's padding, never a position past the context)."""
    want = needed + HEADROOM
    size = MIN_CACHE
    while size < want:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3  # 128, 192, 256, 384, 512...
    return min(size, limit + HEADROOM)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


class Decoder:
    """A LLaMA as a `DecodeModel`: compiled prefill and decode step over an in-place KV cache.

    params:  the parameter tree (plain tensors; under a mesh they are placed here by the rules,
             on one CPU process the projections are prepacked for oneDNN), in the dtype to
             decode in; the cache takes that dtype. (Merge LoRA adapters first: `lora.merge`;
             decoding then costs what the base model costs.)
    backend: a torch.compile backend (`parallel.kernels.compile_backend`, a callable such as
             dynamo's CompileCounter in tests), or None to run eagerly.
    kernels: the model's kernels (`parallel.kernels.kernels_for`); attention is run per shard
             under a mesh.
    """

    def __init__(self, params: llama.Params, config: llama.Config, *,
                 kernels: llama.Kernels | None = None, backend: str | Callable | None = "inductor",
                 cache_dir: str | None = None, mesh: Mesh | None = None,
                 rules: sharding.Rules | None = None):
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_len = config.max_seq_len
        self.mesh = mesh if mesh is not None and mesh.device_mesh is not None else None
        kernels = kernels or llama.Kernels()
        if self.mesh is not None:
            if rules is None:
                raise ValueError("a mesh needs its logical_axis_rules")
            self.rules = rules
            params = sharding.shard_params(params, llama.param_axes(config), rules, self.mesh)
            kernels = dataclasses.replace(
                kernels, attention=kernels_lib.per_shard_attention(kernels.attention, rules, self.mesh))
            (split,) = sharding.mesh_axes_for(("batch",), rules, self.mesh)
            self._row_multiple = math.prod(self.mesh.size(a) for a in split)
            self._constraint = sharding.activation_constraint(rules, self.mesh)
        else:
            self._row_multiple = 1
            if kernels_lib.can_prepack(params):  # CPU: oneDNN's packed matmul (parallel/kernels.py)
                params = kernels_lib.prepack_projections(params)
        self.params = params
        self.dtype = params["embed"].dtype
        self.device = _local(params["embed"]).device
        layer = layerwise.compiled_layers(None, backend, cache_dir)

        def step(params: llama.Params, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
            hidden, _ = llama.hidden_states_with_cache(params, tokens, cache, config, kernels=kernels,
                                                       layer_hook=layer)
            return _plain(llama.logits(params, hidden[:, -1], config).float())

        def prefill(params: llama.Params, tokens: torch.Tensor, length: torch.Tensor,
                    cache: Cache, last_only: bool) -> torch.Tensor:
            """`tokens` [b, bucket], of which the first `length` are real."""
            hidden, _ = llama.hidden_states_with_cache(params, tokens, cache, config, kernels=kernels,
                                                       layer_hook=layer)
            cache["index"].sub_(tokens.shape[1] - length)  # the padding's slots stay free
            if last_only:
                hidden = hidden.index_select(1, (length - 1).reshape(1)).squeeze(1)
            return _plain(llama.logits(params, hidden, config).float())

        self._step, self._prefill = step, prefill

    # -- DecodeModel ----------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, start: torch.Tensor) -> Cache:
        """An empty cache for `batch` rows of `max_len` slots, allocated at `cache_length(max_len)`."""
        if max_len > self.max_len:
            raise UserError(f"{max_len} slots (prompt + new tokens) exceed the model's context "
                            f"max_seq_len={self.max_len} by {max_len - self.max_len}")
        rows = -(-batch // self._row_multiple) * self._row_multiple
        start = torch.as_tensor(start, dtype=torch.int64).reshape(batch)
        start = torch.cat([start, start.new_zeros(rows - batch)])
        length = cache_length(max_len, self.max_len)
        if self.mesh is None:
            return llama.init_cache(self.config, rows, length, start=start, dtype=self.dtype,
                                    device=self.device)
        return self._sharded_cache(rows, length, start)

    def forward(self, tokens: torch.Tensor, cache: Cache, *,
                last_only: bool) -> tuple[torch.Tensor, Cache]:
        batch, q = tokens.shape
        rows = cache["start"].shape[0]
        tokens = tokens.to(self.device)
        if rows != batch:  # pad rows up to a multiple of the batch shards
            tokens = torch.cat([tokens, tokens.new_zeros(rows - batch, q)])
        with self._sharding():
            if q == 1:
                logits = self._step(self.params, tokens, cache)[:batch]
                return (logits if last_only else logits[:, None]), cache
            pieces = []
            for chunk in self._chunks(q, self.written(cache), self.capacity(cache)):
                part = tokens[:, chunk.start:chunk.stop]
                n = part.shape[1]
                bucket = self._bucket_for(n, self.written(cache), self.capacity(cache))
                length = torch.tensor(n, device=self.device)
                out = self._prefill(self.params, F.pad(part, (0, bucket - n)), length, cache,
                                    last_only)
                pieces.append(out if last_only else out[:, :n])
        logits = pieces[-1] if last_only else torch.cat(pieces, dim=1)
        return logits[:batch], cache

    def reorder(self, cache: Cache, rows: torch.Tensor) -> Cache:
        """Beam search's row shuffle, copying only the slots written so far."""
        n_rows = cache["start"].shape[0]
        rows = rows.to(device=_local(cache["start"]).device, dtype=torch.int64)
        if rows.shape[0] != n_rows:  # padding rows stay where they are
            rows = torch.cat([rows, torch.arange(rows.shape[0], n_rows, device=rows.device)])
        n = self.written(cache)
        filled = {"layers": [{k: t[:, :n] for k, t in layer.items()} for layer in cache["layers"]],
                  "start": cache["start"], "index": cache["index"]}
        with self._sharding():
            llama.reorder_cache(filled, rows)
        return cache

    def rewind(self, cache: Cache, n: int) -> Cache:
        if n > self.written(cache):
            raise ValueError(f"cannot rewind {n} slots: only {self.written(cache)} are written")
        cache["index"].sub_(n)
        return cache

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def written(cache: Cache) -> int:
        """Slots written so far (a host sync: prefill and beam reorders only, never per step)."""
        return int(_local(cache["index"]))

    @staticmethod
    def capacity(cache: Cache) -> int:
        return cache["layers"][0]["k"].shape[1]

    @staticmethod
    def _bucket_for(n: int, written: int, capacity: int) -> int:
        bucket = prefill_bucket(n)
        return bucket if written + bucket <= capacity else n  # the cache's very end: exact size

    @staticmethod
    def _chunks(q: int, written: int, capacity: int) -> list[slice]:
        """Pieces of a q-token block: whole when its bucket fits the free slots, else the largest
        power of two that fits first (a power of two is its own bucket)."""
        if written + q > capacity:
            raise ValueError(f"{q} tokens do not fit the cache: {written} of {capacity} slots used")
        pieces, at = [], 0
        while at < q:
            n = q - at
            if written + at + prefill_bucket(n) > capacity and n > MIN_BUCKET:
                n = 1 << (n.bit_length() - 1)
            pieces.append(slice(at, at + n))
            at += n
        return pieces

    def _sharding(self):
        """Plain tensors made in the model (rope tables, masks, tokens) meet DTensors as
        replicated values; activations follow the rule table."""
        if self.mesh is None:
            return torch.no_grad()
        stack = contextlib.ExitStack()
        for ctx in (torch.no_grad(), implicit_replication(), use_constraint(self._constraint),
                    warnings.catch_warnings()):
            stack.enter_context(ctx)
        # One-element index tensors (the slot of a decode step) are meant as replicated values;
        # DTensor would say so at every call.
        warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
        return stack

    def _sharded_cache(self, rows: int, length: int, start: torch.Tensor) -> Cache:
        """The cache as DTensors; each rank allocates only its own shard of k and v."""
        axes = llama.cache_axes(self.config)
        shapes = llama.cache_shapes(self.config, rows, length)
        mesh, rules = self.mesh, self.rules

        def placements(leaf_axes) -> tuple:
            for size, split, name in zip(shapes["layers"][0]["k"], sharding.mesh_axes_for(
                    leaf_axes, rules, mesh), leaf_axes):
                parts = math.prod(mesh.size(a) for a in split)
                if size % parts:
                    raise UserError(f"KV cache dim {name!r} of size {size} is not divisible by "
                                    f"mesh axes {list(split)} (total {parts})")
            return sharding.spec_for(leaf_axes, rules, mesh)

        kv = placements(axes["layers"][0]["k"])
        zeros = lambda: dtensor_zeros(shapes["layers"][0]["k"], dtype=self.dtype,
                                      device_mesh=mesh.device_mesh, placements=kv)
        # start and index are tiny: every rank holds the full value and keeps its part.
        place = lambda t, a: distribute_tensor(t.to(self.device), mesh.device_mesh,
                                               sharding.spec_for(a, rules, mesh), src_data_rank=None)
        return {"layers": [{"k": zeros(), "v": zeros()} for _ in range(self.config.n_layers)],
                "start": place(start, axes["start"]),
                "index": place(torch.zeros((), dtype=torch.int64), axes["index"])}
