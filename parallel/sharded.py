"""Parameters created, loaded and saved shard by shard: no rank ever holds the whole model.

    abstract = llama.init(config, device="meta")                    # shapes and dtypes, no memory
    params = sharded.init(config, seed, rules, mesh)                 # random init, own shards only
    target = sharded.empty(abstract, axes, rules, mesh)              # restore target (orbax reads into it)
    config, params = sharded.load_hf(path, rules, mesh)              # reads only this rank's slices
    sharded.save_hf(path, config, params)                            # gathered tensor by tensor

Every function checks that the mesh divides every dimension before allocating anything. Each
rank materialises only the block of every tensor it owns (`sharding.local_region`) and wraps
it as a DTensor without communication; with one process the blocks are whole tensors. The
values never depend on the mesh: `init` draws each block from `models.llama.init_param`, whose
tiles are seeded per (seed, parameter, tile) (`lib.rng`), so the same seed gives the same full
model on 1 rank or 64; `load_hf` reads exactly the bytes of its block from each safetensors
file (`models.hf.load`). Optimizer moments and master weights are made from these params by
`train_step.init_state`, shard by shard as well.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lib import pytree, rng
from models import hf, llama
from parallel import sharding
from parallel.mesh import Mesh

# make_local(path, global shape, region, dtype) -> this rank's block of that tensor
MakeLocal = Callable[[str, tuple[int, ...], rng.Region, torch.dtype], torch.Tensor]


def build(abstract: Any, axes: Any, rules: sharding.Rules, mesh: Mesh, make_local: MakeLocal) -> Any:
    """A tree like `abstract` (meta tensors) whose leaves are DTensors built from the blocks
    `make_local` returns for this rank (plain tensors without a mesh)."""
    sharding.check_shardable(abstract, axes, rules, mesh)

    def make(path: str, leaf: torch.Tensor, leaf_axes: tuple) -> torch.Tensor:
        shape = tuple(leaf.shape)
        region = sharding.local_region(shape, leaf_axes, rules, mesh)
        local = make_local(path, shape, region, leaf.dtype)
        expected = tuple(s.stop - s.start for s in region)
        if tuple(local.shape) != expected:
            raise AssertionError(f"{path}: block of shape {tuple(local.shape)}, expected {expected}")
        return sharding.from_local(local, shape, leaf_axes, rules, mesh)

    return pytree.map_with_path(make, abstract, axes)


def init(config: llama.Config, seed: int, rules: sharding.Rules, mesh: Mesh,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         select: Callable[[Any], Any] | None = None) -> llama.Params:
    """`llama.init(config, seed)`, each rank creating only its blocks (equal values, bit for bit).

    `select` picks the part of the model this rank holds (a pipeline stage's:
    `lambda tree: pipeline.select(tree, layout, stages)`); parameters keep their paths, and so
    their values."""
    def make_local(path, shape, region, _):
        return llama.init_param(path, shape, seed, region, dtype=dtype, device=device)
    select = select or (lambda tree: tree)
    return build(select(llama.init(config, dtype=dtype, device="meta")), select(llama.param_axes(config)),
                 rules, mesh, make_local)


def empty(abstract: Any, axes: Any, rules: sharding.Rules, mesh: Mesh,
          device: torch.device | str = "cpu") -> Any:
    """Uninitialised tensors placed like `abstract` and `axes`: a target to restore a checkpoint
    into (`lib.checkpoint` reads each rank's blocks straight into them)."""
    def make_local(path, shape, region, dtype):
        return torch.empty(tuple(s.stop - s.start for s in region), dtype=dtype, device=device)
    return build(abstract, axes, rules, mesh, make_local)


def load_hf(path: str | Path, rules: sharding.Rules, mesh: Mesh, dtype: torch.dtype | None = None,
            device: torch.device | str = "cpu", select: Callable[[Any], Any] | None = None,
            ) -> tuple[llama.Config, llama.Params]:
    """(config, params) of an HF directory, each rank reading only its blocks (and, with
    `select`, only the tensors of its part of the model: a pipeline stage's).

    Before reading any weight: the config, the mesh against every dimension, and every tensor's
    name and shape in the safetensors headers are checked (first mismatch named).
    """
    config = hf.load_config(path)
    select = select or (lambda tree: tree)
    axes = select(llama.param_axes(config))
    shapes = pytree.flatten_by_path(select(llama.param_shapes(config)), is_leaf=sharding.is_shape)
    sharding.check_shardable(select(llama.param_shapes(config)), axes, rules, mesh)
    flat_axes = pytree.flatten_by_path(axes, is_leaf=pytree.is_axes)

    def region(p: str, shape: tuple[int, ...]):
        return sharding.local_region(shape, flat_axes[p], rules, mesh) if p in shapes else None

    _, blocks = hf.load(path, dtype=dtype, device=device, region=region)
    params = pytree.map_with_path(
        lambda p, block, leaf_axes: sharding.from_local(block, shapes[p], leaf_axes, rules, mesh),
        select(blocks), axes)
    return config, params


def save_hf(path: str | Path, config: llama.Config, params: llama.Params,
            dtype: torch.dtype | None = None, **save_kw) -> None:
    """`hf.save` of a sharded tree, called by every rank: tensors are gathered one at a time
    (every rank takes part; rank 0 writes each into its safetensors file as it arrives), so no
    rank holds more than one whole tensor beside its shards."""
    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors = hf.hf_tensors(config, params, dtype, whole=whole)
    if rank == 0:
        hf.save_tensors(path, config, tensors, dtype or params["embed"].dtype, **save_kw)
    else:
        for _ in tensors:  # the gathers are collectives: every rank runs them, in the same order
            pass
    if dist.is_initialized():
        dist.barrier()  # nobody reads the directory before rank 0 has renamed it into place
