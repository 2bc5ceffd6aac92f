"""The device mesh, from config: named axes `pipe`, `data`, `fsdp`, `tensor` (outermost first).

    mesh = build_mesh(MeshConfig(fsdp=-1, tensor=2))      # on 8 ranks: fsdp=4, tensor=2
    mesh = build_mesh(MeshConfig(pipe=2, fsdp=2))         # on 4 ranks: 2 stages of FSDP 2

Axes of size 1 are left out of the torch `DeviceMesh` (a size-1 axis broke DTensor's sharding
propagation for `bmm` on torch 2.13) but stay known by name: a rule that maps a logical axis to
a size-1 mesh axis simply does not shard. With one process there is no DeviceMesh at all and
every parameter stays a plain tensor.

`pipe` is not a sharding axis: it holds whole layers (`parallel.pipeline`). `Mesh.device_mesh`
is the sub-mesh of this rank's pipeline stage (the other axes), so parameters, activations and
batches are placed on the ranks of one stage only; `Mesh.pipe_mesh` is the 1-D mesh along `pipe`
through this rank, whose group carries the activations between stages. A `context` axis would be
a new field here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lib.errors import UserError

AXES = ("pipe", "data", "fsdp", "tensor")  # outermost first: `tensor` ranks are neighbours
PIPE = "pipe"


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1, meaning "whatever fills the world size"."""
    pipe: int = 1
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = {f.name: getattr(self, f.name) for f in fields(self)}
        bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
        if bad:
            raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
        fills = [k for k, v in sizes.items() if v == -1]
        if len(fills) > 1:
            raise ValueError(f"only one mesh axis may be -1 (fill the world size), got {fills}")

    def resolve(self, world_size: int) -> dict[str, int]:
        """Concrete size of every axis for `world_size` processes."""
        sizes = {name: getattr(self, name) for name in AXES}
        known = math.prod(v for v in sizes.values() if v != -1)
        fill = [k for k, v in sizes.items() if v == -1]
        if fill:
            if world_size % known:
                raise UserError(f"mesh {sizes}: world size {world_size} is not divisible by the "
                                f"product of the fixed axes ({known}), so {fill[0]}=-1 cannot fill it")
            sizes[fill[0]] = world_size // known
        elif known != world_size:
            raise UserError(f"mesh {sizes}: product {known} != world size {world_size}")
        return sizes


@dataclass(frozen=True)
class Mesh:
    """A DeviceMesh over this stage's axes of size > 1, plus the size of every named axis.

    device_mesh: the sharding axes (`data`, `fsdp`, `tensor`) of this rank's pipeline stage;
    None when they are all of size 1. pipe_mesh: the `pipe` axis through this rank (None
    without pipeline stages)."""
    device_mesh: DeviceMesh | None
    sizes: dict[str, int]
    pipe_mesh: DeviceMesh | None = None

    @property
    def stage(self) -> int:
        """This rank's coordinate along `pipe` (0 without pipeline stages)."""
        return 0 if self.pipe_mesh is None else self.pipe_mesh.get_local_rank()

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    def size(self, axis: str) -> int:
        if axis not in self.sizes:
            raise UserError(f"unknown mesh axis {axis!r}; mesh axes are {list(self.sizes)}")
        return self.sizes[axis]

    def dim(self, axis: str) -> int | None:
        """Index of `axis` in `device_mesh`, or None when the axis has size 1 (not in the mesh)."""
        self.size(axis)
        names = self.device_mesh.mesh_dim_names if self.device_mesh is not None else ()
        return names.index(axis) if axis in names else None


def require_no_stages(cfg: MeshConfig, what: str) -> None:
    """Refuse `mesh.pipe` > 1 for runners that hold the whole model on each group of ranks
    (evaluation and generation gather a pipeline-trained model to one stage group: its
    checkpoint restores under any mesh)."""
    if cfg.pipe != 1:
        raise UserError(f"mesh.pipe={cfg.pipe}: {what} runs the whole model on every rank group, "
                        "without pipeline stages; a checkpoint trained with stages loads under "
                        "any mesh: split the model with mesh.tensor / mesh.fsdp instead")


def build_mesh(cfg: MeshConfig, device_type: str = "cpu") -> Mesh:
    """The mesh for this process group (or a mesh of one when torch.distributed is not set up)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    sizes = cfg.resolve(world)
    kept = [(name, n) for name, n in sizes.items() if n > 1]
    if not kept:
        return Mesh(None, sizes)
    world = init_device_mesh(device_type, tuple(n for _, n in kept),
                             mesh_dim_names=tuple(name for name, _ in kept))
    if sizes[PIPE] == 1:
        return Mesh(world, sizes)
    stage_axes = tuple(name for name, _ in kept if name != PIPE)
    return Mesh(world[stage_axes] if stage_axes else None, sizes, pipe_mesh=world[PIPE])
