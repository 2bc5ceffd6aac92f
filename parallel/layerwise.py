"""Compile time flat in depth: compile one layer, run it for every layer.

A step traced as one graph unrolls the model's layers and the optimizer's per-parameter
updates, and the compiler works through every copy, so compile time grows with depth. JAX code
avoids this with `scan`. On torch 2.13 the working equivalent is regional compilation
(DESIGN.md, "Found while building it", says why `nested_compile_region` is not):

- `compiled_layers`: the model's per-layer hook (`forward(..., remat=hook)`) that compiles the
  function the model loops over (with its recompute and weight gathering) once; every layer
  then calls the same compiled code, because identical layers pass its guards (shapes, dtypes,
  placements).
- `layer_groups` + `map_groups`: the optimizer update runs layer by layer on local shards; the
  step compiles it once for a layer (and once for the parameters outside the layers).
- `grad_and_value`: gradients by torch.autograd. torch.func.grad cannot differentiate compiled
  code from eager code (pytorch#128711), and a graph that contains torch.func.grad cannot
  contain a reusable region.

What lies between (embedding, lm head and loss, gradient accumulation and reduction, global
norm, schedule) runs eagerly: a fixed number of operations plus a few calls per layer.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lib import pytree
from parallel import jit as jit_lib

LayerHook = Callable[[Callable], Callable]
RECOMPILE_LIMIT = 64     # shapes one layer function may be compiled for


def compiled_layers(hook: LayerHook | None, backend: str | Callable | None,
                    cache_dir: str | os.PathLike | None = None) -> LayerHook | None:
    """The model's per-layer hook `hook` (recompute, weight gathering; None: none), with what it
    returns compiled by `backend` (None: `hook` itself, eager).

    Each distinct layer function (the training layer, a cached decode layer, ...) is compiled
    on first use and the compiled function is reused for every layer and every later call.
    """
    if backend is None:
        return hook
    # One layer code object serves every shape its callers run (training, each eval, prefill
    # and scoring bucket): each shape is a recompile, and past dynamo's default of 8 it would
    # silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled: dict[Callable, Callable] = {}

    def compiling_hook(layer_fn: Callable) -> Callable:
        if layer_fn not in compiled:
            fn = hook(layer_fn) if hook is not None else layer_fn
            compiled[layer_fn] = jit_lib.jit(fn, backend, cache_dir)
        return compiled[layer_fn]
    return compiling_hook


def layer_groups(tree: Any) -> list[list[int]]:
    """Positions of `tree`'s leaves (in flattening order) grouped by layer: the leaves under entry
    i of a list (`layers.3.wq`, `layers.3.w_up`, ...) form group i; the leaves under no list
    (`embed`, `final_norm`, ...) form one more group. Identical layers give groups of identical
    shapes, so a function compiled for one group serves all of them."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, path in enumerate(pytree.flatten_by_path(tree)):
        groups.setdefault(tuple(part for part in path.split(".") if part.isdigit()), []).append(i)
    return list(groups.values())


def map_groups(fn: Callable, groups: Sequence[Sequence[int]],
               leaves: Sequence[Sequence[torch.Tensor | None]], *args: Any) -> list[list[Any]]:
    """`fn(*[the group's local shards of each leaf list], *args)` for each group; `fn` returns a
    tuple of lists (one entry per leaf of the group), gathered back into leaf lists.

    The leaves of one position in the lists must share shape and placements (a parameter, its
    gradient, its moments); None stays None (an absent master weight). Working on local shards
    keeps DTensor dispatch out of the optimizer: each call is one compiled elementwise graph.
    """
    first = leaves[0]
    for xs in leaves[1:]:
        for i, x in enumerate(xs):
            if x is not None and _layout(x) != _layout(first[i]):
                raise ValueError(f"leaf {i}: {_layout(x)} does not match {_layout(first[i])}; the "
                                 "local shards of one position must line up element by element")
    outputs: list[list[Any]] = []
    for group in groups:
        local = [[_local(xs[i]) for i in group] for xs in leaves]
        result = fn(*local, *args)
        if not outputs:
            outputs = [[None] * len(first) for _ in result]
        for out, ys in zip(outputs, result, strict=True):
            for i, y in zip(group, ys, strict=True):
                out[i] = _like(y, first[i])
    return outputs


def _layout(x: torch.Tensor) -> tuple:
    return tuple(x.shape), tuple(x.placements) if isinstance(x, DTensor) else None


def _local(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.to_local() if isinstance(x, DTensor) else x


def _like(local: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """`local` placed as a DTensor like `ref` when `ref` is one."""
    if local is None or not isinstance(ref, DTensor):
        return local
    return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def grad_and_value(fn: Callable[..., torch.Tensor]) -> Callable[..., tuple[Any, torch.Tensor]]:
    """`grads, value = grad_and_value(fn)(params, *args)`, as torch.func.grad_and_value, by
    torch.autograd, so `fn` may call compiled code (`compiled_layers`). `value` is a 0-dim tensor,
    `grads` a tree like `params` (zeros for leaves the value does not depend on).

    Saved-tensor hooks and autograd Functions work here (unlike under torch.func.grad).
    """
    def call(params: Any, *args: Any) -> tuple[Any, torch.Tensor]:
        inputs = pytree.tree_map(lambda p: p.detach().requires_grad_(), params)
        with torch.enable_grad():
            value = fn(inputs, *args)
        flat, spec = pytree.flatten(inputs)
        grads = torch.autograd.grad(value, flat, materialize_grads=True)
        return pytree.unflatten(spec, list(grads)), value.detach()
    return call
