"""What decoding needs from a model: a KV cache and a forward over it, nothing else.

The decoding strategies in `lib.decoding` drive any object with this shape, so they know
nothing about LLaMA, devices, meshes or compilation. `parallel.decode` implements it over
`models.llama.hidden_states_with_cache` (compiled: prefill per length bucket, one decode step
for every token); tests may implement it eagerly in a few lines.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

Cache = Any  # a pytree of tensors owned by the model (see models.llama.init_cache)


class DecodeModel(Protocol):
    vocab_size: int
    max_len: int  # the most slots (prompt + generated tokens) one cache row may hold

    def init_cache(self, batch: int, max_len: int, start: torch.Tensor) -> Cache:
        """An empty cache for `batch` rows of up to `max_len` slots; `start` [batch] is each row's
        left padding (its first real token's slot)."""
        ...

    def forward(self, tokens: torch.Tensor, cache: Cache, *,
                last_only: bool) -> tuple[torch.Tensor, Cache]:
        """Logits of `tokens` [batch, q] written at the cache's next q slots: [batch, vocab] for
        the last position when `last_only`, else [batch, q, vocab] (fp32). The cache argument is
        consumed (updated in place) and returned."""
        ...

    def reorder(self, cache: Cache, rows: torch.Tensor) -> Cache:
        """Row i becomes old row `rows[i]` (beam search)."""
        ...

    def rewind(self, cache: Cache, n: int) -> Cache:
        """Forget the last `n` written slots (speculative decoding's rejected tokens)."""
        ...
