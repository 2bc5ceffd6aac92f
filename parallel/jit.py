"""A jit-like entry point: torch.compile a pure function as one graph for the device at hand.

    step = jit(train_step_fn, backend="inductor", cache_dir="/tmp/llamax-inductor")

- fullgraph=True: a graph break is a bug to fix, not a slowdown to discover later.
- Each rank gets its own inductor cache (cache_dir/rank<RANK>): one cache shared by several
  ranks gave wrong results on a warm rerun (DESIGN.md). The variable is read by inductor at
  compile time, so `jit` sets it before the first call compiles.
- Donation: the compiled function returns new tensors and never writes into its inputs, so a
  caller that keeps the old state keeps valid values. Memory for the old state is released as
  soon as the caller drops it (`state, m = step(state, batch)`), which is what `donate_argnums`
  buys in JAX; in-place reuse of input buffers is not attempted.
- backend: "inductor" (CPU, CUDA), a callable (torchair's NPU backend from
  `parallel.kernels.compile_backend`), or None for no compilation at all (plain eager).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib import device


def jit(fn: Callable[..., Any], backend: str | Callable | None = "inductor",
        cache_dir: str | os.PathLike | None = None) -> Callable[..., Any]:
    """`fn` compiled with fullgraph=True by `backend` (None: `fn` itself, eager)."""
    if backend is None:
        return fn
    if cache_dir is not None:
        device.set_inductor_cache_per_rank(Path(cache_dir))
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
