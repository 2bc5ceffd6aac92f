"""Sharding as data: logical axis names -> mesh axes through a rule table from config.

Models name the axes of every parameter and activation ("embed", "heads", "batch", ...). A rule
table, MaxText's `logical_axis_rules`, says which mesh axes each name is split over::

    logical_axis_rules:
      - [batch, [data, fsdp]]     # a list: split over several mesh axes, outermost first
      - [vocab, tensor]
      - [norm, null]              # null: never split

Resolving a tensor's axes walks its dims in order; a mesh axis already used by an earlier dim
is skipped (an activation ("batch", "seq", "embed") is split over fsdp by batch, so "embed ->
fsdp" does not apply to it, while the weight ("vocab", "embed") is split over fsdp by embed).
Size-1 mesh axes are skipped too. Changing TP from 8 to 4 is an edit of the mesh config only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from lib import config as config_lib
from lib import pytree
from lib.errors import UserError
from parallel.mesh import PIPE, Mesh

# As written in YAML: (logical name, mesh axis | [mesh axes] | null).
RuleSpec = Sequence[tuple[str, str | Sequence[str] | None]]
Rules = dict[str, tuple[str, ...]]

RULES_FILE = Path(__file__).resolve().parent.parent / "configs" / "rules.yaml"


def logical_axis_rules(spec: RuleSpec | Mapping[str, Any], mesh: Mesh | None = None) -> Rules:
    """Normalise a rule list into {logical name: (mesh axes...)}, checking names against `mesh`."""
    items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    rules: Rules = {}
    for item in items:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)):
            raise UserError(f"logical_axis_rules: each rule is [logical_name, mesh_axes], got {item!r}")
        name, target = item
        if name in rules:
            raise UserError(f"logical_axis_rules: logical axis {name!r} has two rules")
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if PIPE in axes:
            raise UserError(f"logical_axis_rules: rule {name!r} -> {PIPE!r}: the pipe axis holds whole "
                            "layers (pipeline stages) and cannot split a tensor dimension")
        if mesh is not None:
            for axis in axes:
                if axis not in mesh.sizes:
                    raise UserError(f"logical_axis_rules: rule {name!r} -> {axis!r} names an unknown "
                                    f"mesh axis; mesh axes are {list(mesh.sizes)}")
        rules[name] = axes
    return rules


def rule_spec(path: str | Path = RULES_FILE) -> tuple[tuple[str, Any], ...]:
    """The `logical_axis_rules` list of a YAML file (by default configs/rules.yaml), as config
    data: the default of every runner's `logical_axis_rules` field."""
    raw = config_lib.read_yaml(path)
    if "logical_axis_rules" not in raw:
        raise UserError(f"config file {str(path)!r} has no 'logical_axis_rules' key")
    return tuple((item[0], tuple(item[1]) if isinstance(item[1], list) else item[1])
                 if isinstance(item, list) and len(item) == 2 else item
                 for item in raw["logical_axis_rules"])


def load_rules(path: str | Path = RULES_FILE, mesh: Mesh | None = None) -> Rules:
    """The rules of a YAML file, checked against `mesh`."""
    return logical_axis_rules(rule_spec(path), mesh)


def mesh_axes_for(axes: Sequence[str | None], rules: Rules, mesh: Mesh) -> list[tuple[str, ...]]:
    """For each tensor dim, the mesh axes (of size > 1) it is split over."""
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(())
            continue
        if name not in rules:
            raise UserError(f"logical axis {name!r} has no rule in logical_axis_rules "
                            f"(rules cover {sorted(rules)})")
        split = []
        for axis in rules[name]:
            if mesh.size(axis) > 1 and axis not in used:
                split.append(axis)
                used.add(axis)
        out.append(tuple(split))
    return out


def spec_for(axes: Sequence[str | None], rules: Rules, mesh: Mesh) -> tuple[Placement, ...]:
    """DTensor placements (one per device-mesh dim) for a tensor with logical `axes`."""
    if mesh.device_mesh is None:
        return ()
    placements: list[Placement] = [Replicate()] * mesh.device_mesh.ndim
    for dim, split in enumerate(mesh_axes_for(axes, rules, mesh)):
        for axis in split:
            placements[mesh.dim(axis)] = Shard(dim)
    return tuple(placements)


def _check_divisible(path: str, shape: Sequence[int], axes: Sequence[str | None], rules: Rules,
                     mesh: Mesh) -> None:
    if len(axes) != len(shape):
        raise UserError(f"{path}: {len(shape)}-dim parameter has {len(axes)} logical axes {tuple(axes)}")
    for dim, (size, split) in enumerate(zip(shape, mesh_axes_for(axes, rules, mesh))):
        parts = math.prod(mesh.size(a) for a in split)
        if size % parts:
            raise UserError(f"{path}: dim {dim} ({axes[dim]!r}) of size {size} is not divisible by "
                            f"mesh axes {list(split)} (total {parts})")


def check_shardable(tree: Any, axes_tree: Any, rules: Rules, mesh: Mesh) -> None:
    """Raise UserError for the first leaf of `tree` (tensors, meta tensors or shapes) that has no
    logical axes, or a dim the mesh does not divide: parameter, dim, size and mesh axes named.

    Needs only shapes, so callers run it before allocating anything."""
    flat = pytree.flatten_by_path(tree, is_leaf=is_shape)
    flat_axes = pytree.flatten_by_path(axes_tree, is_leaf=pytree.is_axes)
    missing = sorted(flat.keys() - flat_axes.keys())
    if missing:
        raise UserError(f"parameter {missing[0]!r} has no logical axes in the axes tree")
    for path, leaf in flat.items():
        _check_divisible(path, tuple(leaf) if is_shape(leaf) else tuple(leaf.shape), flat_axes[path],
                         rules, mesh)


def is_shape(x: Any) -> bool:
    """Leaves of a shape tree (`models.llama.param_shapes`) are tuples of ints."""
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def local_region(shape: Sequence[int], axes: Sequence[str | None], rules: Rules,
                 mesh: Mesh) -> tuple[slice, ...]:
    """The block of a tensor of global `shape` (with logical `axes`) that this rank holds."""
    if mesh.device_mesh is None:
        return tuple(slice(0, n) for n in shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local, offset = compute_local_shape_and_global_offset(tuple(shape), mesh.device_mesh,
                                                          spec_for(axes, rules, mesh))
    return tuple(slice(o, o + n) for o, n in zip(offset, local))


def from_local(local: torch.Tensor, shape: Sequence[int], axes: Sequence[str | None], rules: Rules,
               mesh: Mesh) -> torch.Tensor:
    """This rank's block (`local_region`) of a tensor of global `shape`, as a DTensor (no copy,
    no communication); the tensor itself when there is no mesh."""
    if mesh.device_mesh is None:
        return local
    shape = torch.Size(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, mesh.device_mesh, spec_for(axes, rules, mesh), run_check=False,
                              shape=shape, stride=stride)


def shard_params(params: Any, axes_tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """Place every leaf as a DTensor split by its logical axes (plain tensors without a mesh).

    Every rank must pass the same full values; each keeps its shard. For models too large to
    hold whole on every rank, `parallel.sharded` creates and loads the shards directly. Raises
    UserError naming the parameter for a missing axis rule or an indivisible dim.
    """
    check_shardable(params, axes_tree, rules, mesh)

    def place(p: torch.Tensor, axes: tuple) -> torch.Tensor:
        if mesh.device_mesh is None:
            return p
        return distribute_tensor(p, mesh.device_mesh, spec_for(axes, rules, mesh))

    return pytree.tree_map(place, params, axes_tree)


def batch_axes(rules: Rules, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the batch is split over: the data-parallel axes."""
    (split,) = mesh_axes_for(("batch",), rules, mesh)
    return split


def compute_placements(x: DTensor, rules: Rules, mesh: Mesh) -> tuple[Placement, ...]:
    """`x`'s placements with every split over a data-parallel axis (FSDP's `embed -> fsdp`)
    replaced by Replicate: the layout a weight is used in, whole along those axes, while its
    tensor-parallel splits stay."""
    gathered = {mesh.dim(a) for a in batch_axes(rules, mesh)}
    return tuple(Replicate() if i in gathered and isinstance(p, Shard) else p
                 for i, p in enumerate(x.placements))


def gather_for_compute(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """Weights all-gathered over the data-parallel axes they are stored split over (ZeRO-3 /
    FSDP's unshard); other leaves unchanged.

    Without it DTensor picks a strategy per matmul, and for a weight split over fsdp on its
    input dim against a batch split over fsdp it moves the activations instead (all-to-all to a
    split contraction, partial sums of the *global* batch): a 70B layer then saved ~7 GB of
    activations per device instead of ~1.5 GB. The step gathers each layer's weights on entry
    (`train_step`); the backward of the gather is the reduce-scatter of their gradients.
    """
    if mesh.device_mesh is None:
        return tree

    def gather(x: Any) -> Any:
        if not isinstance(x, DTensor):
            return x
        placements = compute_placements(x, rules, mesh)
        return x if placements == tuple(x.placements) else x.redistribute(x.device_mesh, placements)
    return pytree.tree_map(gather, tree)


def shard_like(tree: Any, reference: Any) -> Any:
    """Redistribute each DTensor leaf of `tree` to the placements of the matching `reference` leaf.

    Gradients come back from autograd as Partial or Replicate; redistributing them to their
    parameter's placements is where data-parallel all-reduce and FSDP reduce-scatter happen.
    """
    def move(x, ref):
        if isinstance(ref, DTensor) and tuple(x.placements) != tuple(ref.placements):
            return x.redistribute(ref.device_mesh, ref.placements)
        return x
    return pytree.tree_map(move, tree, reference)


def shard_batch(local_batch: Mapping[str, torch.Tensor], rules: Rules, mesh: Mesh) -> dict:
    """Wrap this rank's slice of a batch as DTensors split on dim 0 by the "batch" rule.

    Each rank passes its own rows ([global_batch / batch_shards(...)[1], seq]); ranks with the
    same `batch_shards(...)[0]` (e.g. the tensor-parallel ranks of one group) must pass equal rows.
    """
    if mesh.device_mesh is None:
        return dict(local_batch)
    placements = spec_for(("batch", None), rules, mesh)
    return {k: DTensor.from_local(v, mesh.device_mesh, placements, run_check=False)
            for k, v in local_batch.items()}


def batch_shards(rules: Rules, mesh: Mesh) -> tuple[int, int]:
    """(index, count): which of `count` equal slices of the global batch this rank loads."""
    (split,) = mesh_axes_for(("batch",), rules, mesh)
    if mesh.device_mesh is None or not split:
        return 0, 1
    index = 0
    for axis in split:  # outermost first, as DTensor nests Shard(0) over several mesh dims
        index = index * mesh.size(axis) + mesh.device_mesh.get_local_rank(axis)
    return index, math.prod(mesh.size(a) for a in split)


def activation_constraint(rules: Rules, mesh: Mesh):
    """The function to install with `lib.constraints.use_constraint`: redistribute activations
    that are DTensors to the layout their logical axes map to (like jax's with_sharding_constraint)."""
    def constrain(x: torch.Tensor, axes: tuple) -> torch.Tensor:
        if not isinstance(x, DTensor):
            return x
        placements = spec_for(axes, rules, mesh)
        if tuple(x.placements) == placements:
            return x
        return x.redistribute(x.device_mesh, placements)
    return constrain
