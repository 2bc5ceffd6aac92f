"""A jit-like entry point: torch.compile a pure function as one graph for the device at hand.

    step = jit(train_step_fn, backend="inductor", cache_dir="/tmp/llamax-inductor", mesh=mesh, rules=rules)

- fullgraph=True: a graph break is a bug to fix, not a slowdown to discover later.
- Every call runs under the mesh's contexts, installed here so no caller can forget them:
  `implicit_replication` (plain tensors made inside the model, RoPE tables and masks, meet
  DTensor params as replicated; it must cover the backward, which runs inside
  `grad_and_value`) and the activation sharding constraint (`lib.constraints`).
- Each rank gets its own inductor cache (cache_dir/rank<RANK>): one cache shared by several
  ranks gave wrong results on a warm rerun (DESIGN.md). The variable is read by inductor at
  compile time, so `jit` sets it before the first call compiles.
- No donation: the compiled function returns new tensors and never writes into its inputs, so a
  caller that keeps the old state keeps valid values. The old state's memory is released when
  the caller drops it (`state, m = step(state, batch)`); reusing input buffers in place, as
  `jax.jit(donate_argnums=...)` does, is not attempted.
- No input/output sharding specs either: inputs arrive already placed (`parallel.sharding`),
  and outputs keep the placements the graph gives them (the step redistributes gradients to
  their parameters' placements itself).
- backend: "inductor" (CPU, CUDA), a callable (torchair's NPU backend from
  `parallel.kernels.compile_backend`), or None for no compilation at all (plain eager).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor.experimental import implicit_replication

from lib import device
from lib.constraints import use_constraint
from parallel import sharding
from parallel.mesh import Mesh


def jit(fn: Callable[..., Any], backend: str | Callable | None = "inductor",
        cache_dir: str | os.PathLike | None = None, *, mesh: Mesh | None = None,
        rules: sharding.Rules | None = None) -> Callable[..., Any]:
    """`fn` compiled with fullgraph=True by `backend` (None: `fn` itself, eager), called under
    `mesh`'s implicit replication and activation constraints (none without a device mesh)."""
    compiled = fn
    if backend is not None:
        if cache_dir is not None:
            device.set_inductor_cache_per_rank(Path(cache_dir))
        compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    if mesh is None or mesh.device_mesh is None:
        return compiled
    constraint = sharding.activation_constraint(rules or {}, mesh)

    def call(*args: Any, **kwargs: Any) -> Any:
        with implicit_replication(), use_constraint(constraint):
            return compiled(*args, **kwargs)
    return call
