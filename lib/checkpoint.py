"""Training-state checkpoints on orbax-checkpoint: sharded, async, atomic, resharding on restore.

A state is a pytree (dicts, lists, tuples) of torch tensors, some of them DTensors sharded over a
torch DeviceMesh. Each leaf is saved as a *global* jax.Array built from this rank's local shard,
so every rank writes only its own slice and a restore under another mesh or world size reads only
the slices it needs. Beside the arrays each checkpoint holds `extra`, a JSON dict (data position,
resolved config).

Layout: `<dir>/<step>/state` (orbax PyTree, OCDBT) and `<dir>/<step>/extra` (JSON). orbax writes a
step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a killed save leaves
the previous steps readable, the half-written one is never listed, and the next start removes it.

An async save returns once this rank's pieces are copied into host buffers kept for the next save
(memory: one host copy of this rank's share of the state); the write goes on in orbax's thread.

Several processes: each rank calls `jax.distributed.initialize` (jax's coordination service, beside
torch's gloo/nccl group) so orbax can agree on one checkpoint. The coordinator listens on
`MASTER_ADDR:MASTER_PORT+1` (torchrun sets both); that port must be free on the master host.

Ranks may hold different keys (pipeline stages hold different layers): each rank writes the
keys it holds, the checkpoint holds the union, and a restore reads whatever keys the target tree
of each rank holds, so a state saved under one `pipe` size restores under another (or none).
A key's jax array lives on the processes that hold it (a DTensor's mesh, or, for a plain tensor,
the ranks holding it, replicated); before writing, the ranks exchange which keys each holds.

Limits: one jax CPU device per process; a leaf whose sharding jax cannot express (uneven shards,
`_StridedShard`) is gathered and written replicated.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib import pytree
from lib.errors import UserError

# jax and orbax are imported lazily: importing them costs seconds and starts threads (no fork after).

STATE_ITEM, EXTRA_ITEM = "state", "extra"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # where this run's checkpoints go; None: never save
    every: int = 1000  # save when step % every == 0
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True  # write in the background; training waits only for the host copy
    load: str | None = None  # native checkpoint (root or step dir) to start from when `dir` has none
    finetune: bool = False  # with `load`: take params only, fresh step and optimizer

    def __post_init__(self):
        for name in ("every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


# ---------------------------------------------------------------------------------------------
# pytree <-> flat {"params.layers.0.wq": tensor}: the saved names are lib.pytree's dotted paths


def _tensor_leaves(tree: Any) -> dict[str, torch.Tensor]:
    """{"params.layers.0.wq": tensor}: these dotted paths are the names saved on disk."""
    flat = pytree.flatten_by_path(tree)
    if len(flat) != len(pytree.leaves(tree)):  # a key with a dot in it would collide
        raise ValueError("checkpoint state keys must not contain '.'")
    for key, leaf in flat.items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"checkpoint state leaf {key!r} is a {type(leaf).__name__}, not a tensor "
                            "(put plain values in `extra`)")
    return flat


# ---------------------------------------------------------------------------------------------
# torch <-> numpy, bit-exact (bf16 through an int16 view: no float conversion)


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """`t`'s memory as numpy (no copy; `t` must be on the CPU and contiguous)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch_view(a: np.ndarray) -> torch.Tensor:
    """A read-only numpy array (a restored jax buffer) as torch, to copy from; no copy here."""
    import warnings

    import ml_dtypes
    bf16 = a.dtype == ml_dtypes.bfloat16
    with warnings.catch_warnings():  # torch warns that the array is not writable; we only read it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a.view(np.int16) if bf16 else a)
    return t.view(torch.bfloat16) if bf16 else t


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return torch.empty(0, dtype=dtype).numpy().dtype


# ---------------------------------------------------------------------------------------------
# torch placements <-> jax shardings


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _my_device():
    import jax
    return jax.local_devices()[0]


def _jax_mesh(ranks: np.ndarray, names: tuple[str, ...]):
    """A jax Mesh whose device at each coordinate belongs to the process of that torch rank."""
    import jax
    from jax.sharding import Mesh
    by_process = {d.process_index: d for d in jax.devices()}
    return Mesh(np.vectorize(by_process.__getitem__, otypes=[object])(ranks), names)


def _world_mesh():
    import jax
    return _jax_mesh(np.arange(jax.process_count()), ("world",))


def _sharding_of(t: torch.Tensor):
    """The jax NamedSharding equivalent to `t`'s placements, or None if jax cannot express it."""
    from jax.sharding import NamedSharding, PartitionSpec
    from torch.distributed.tensor import Replicate, Shard
    if not _is_dtensor(t):
        return NamedSharding(_world_mesh(), PartitionSpec())
    mesh = t.device_mesh
    names = mesh.mesh_dim_names or tuple(f"mesh{i}" for i in range(mesh.ndim))
    axes_per_dim: list[list[str]] = [[] for _ in range(t.ndim)]
    for name, placement in zip(names, t.placements):
        if type(placement) is Shard:
            axes_per_dim[placement.dim].append(name)
        elif not isinstance(placement, Replicate):  # Partial is reduced first; _StridedShard: no
            return None
    for size, axes in zip(t.shape, axes_per_dim):
        parts = int(np.prod([mesh.size(names.index(a)) for a in axes])) if axes else 1
        if size % parts:
            return None  # torch pads the last shard short; a jax sharding needs equal blocks
    spec = PartitionSpec(*(None if not a else a[0] if len(a) == 1 else tuple(a) for a in axes_per_dim))
    return NamedSharding(_jax_mesh(mesh.mesh.cpu().numpy(), tuple(names)), spec)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src. Between contiguous host tensors through numpy: one plain memcpy, where
    torch's multi-threaded copy_ ran 20x slower on a small, busy machine (OpenMP barriers)."""
    dst, src = dst.detach(), src.detach()  # a leaf that requires grad is still filled in place
    if dst.device.type == src.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous():
        np.copyto(_numpy_view(dst), _numpy_view(src))
    else:
        dst.copy_(src)


def _local_piece(t: torch.Tensor):
    """(this rank's piece of `t`, the jax sharding that says where the piece sits in `t`)."""
    if not _is_dtensor(t):
        return t.detach(), _sharding_of(t)
    from torch.distributed.tensor import Partial, Replicate
    if any(isinstance(p, Partial) for p in t.placements):
        t = t.redistribute(placements=[Replicate() if isinstance(p, Partial) else p for p in t.placements])
    sharding = _sharding_of(t)
    if sharding is None:  # jax cannot express this layout: write the whole tensor, replicated
        full = t.full_tensor().detach()
        return full, _sharding_of(full)
    return t.to_local().detach(), sharding


def _global_array(shape: tuple[int, ...], sharding, host_piece: torch.Tensor):
    import jax
    piece = jax.device_put(_numpy_view(host_piece), _my_device())
    return jax.make_array_from_single_device_arrays(shape, sharding, [piece])


# ---------------------------------------------------------------------------------------------
# keys held by some ranks only (pipeline stages)
#
# orbax writes a jax array from the pieces each process holds, and needs a piece on every
# process that saves. A key that only one pipeline stage holds is therefore spread over the
# `spread` mesh (the `pipe` axis through each rank) for the write: its holder splits its block
# along the first dim the pipe size divides and scatters the parts to its peers along `pipe`, so
# each rank writes 1/pipe of its peers' blocks and the host memory of a save stays one share of
# the state. The array's jax sharding is the stage's sharding with `pipe` added as the minor
# split of that dim (the block copied whole to every peer when no dim divides).


def _all_gather(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (torch's process group; [obj] without one)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _describe(sharding) -> tuple | None:
    """A NamedSharding as picklable data (process of each mesh device, axis names, spec)."""
    ranks = np.vectorize(lambda d: d.process_index, otypes=[int])(sharding.mesh.devices)
    return ranks.tolist(), tuple(sharding.mesh.axis_names), tuple(sharding.spec)


def _union(leaves: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """{key: (shape, dtype, holders, description)} over the keys of every rank, sorted.

    A collective: every rank calls it. `description` is a DTensor's sharding (`_describe`);
    None means whole on each holder (a plain tensor, or a layout jax cannot express)."""
    def describe(t: torch.Tensor) -> tuple | None:
        sharding = _sharding_of(t) if _is_dtensor(t) else None
        return _describe(sharding) if sharding is not None else None
    mine = {k: (tuple(t.shape), t.dtype, describe(t)) for k, t in leaves.items()}
    union: dict[str, tuple] = {}
    for rank, theirs in enumerate(_all_gather(mine)):
        for key, (shape, dtype, description) in theirs.items():
            if key in union:
                union[key][2].append(rank)
            else:
                union[key] = (shape, dtype, [rank], description)
    return dict(sorted(union.items()))


def _spread(key: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
            holders: list[int], description: tuple | None, spread, peers: list[list[int]]):
    """(this rank's part of `key`, its jax sharding over every process), for a key held by one
    rank of each `spread` group; a collective over the group (the holder scatters)."""
    import torch.distributed as dist
    from jax.sharding import NamedSharding, PartitionSpec
    rank = dist.get_rank()
    if spread is None:
        raise UserError(f"checkpoint state key {key!r} is held by ranks {holders} only, but the "
                        "checkpointer was given no `spread` mesh (the pipe axis) to write it through")
    mine = peers[rank]
    (holder,) = [r for r in mine if r in holders] or [None]
    if holder is None:
        raise UserError(f"checkpoint state key {key!r} is held by ranks {holders}, none of them in "
                        f"this rank's pipe group {mine}")
    p, axis = len(mine), spread.mesh_dim_names[0]
    if description is None:  # whole on each holder
        grid, names, spec = np.array(holders), ("holders",), [None] * len(shape)
        block = list(shape)
    else:
        ranks, names, spec = description
        grid = np.array(ranks)
        spec = list(spec) + [None] * (len(shape) - len(spec))
        sizes = dict(zip(names, grid.shape))
        block = [n // int(np.prod([sizes[a] for a in _spec_axes(e)])) for n, e in zip(shape, spec)]
    dim = next((d for d, n in enumerate(block) if n and n % p == 0), None)
    part = list(block)
    if dim is not None:
        part[dim] //= p
        spec[dim] = (*_spec_axes(spec[dim]), axis)
    kind = spread.device_type
    out = torch.empty(part, dtype=dtype, device=kind if kind == "cpu" else
                      torch.device(kind, getattr(torch, kind).current_device()))
    pieces = None
    if rank == holder:
        local, _ = _local_piece(t)
        pieces = [c.contiguous() for c in local.chunk(p, dim)] if dim is not None else [local] * p
    dist.scatter(out, pieces, src=holder, group=spread.get_group())
    # grid[..] holds the holders' ranks; the peer at pipe coordinate i of each holds that part
    world_grid = np.stack([np.vectorize(lambda r: peers[r][i], otypes=[int])(grid) for i in range(p)])
    sharding = NamedSharding(_jax_mesh(world_grid, (axis, *names)), PartitionSpec(*spec))
    return out, sharding


def _spec_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _fill(target: torch.Tensor, arr) -> torch.Tensor:
    """Copy a restored jax array (sharded like `target`, or whole) into `target`'s memory."""
    piece = _torch_view(arr if isinstance(arr, np.ndarray) else np.asarray(arr.addressable_shards[0].data))
    if not _is_dtensor(target):
        _copy(target, piece)
        return target
    local = target.to_local()
    if tuple(piece.shape) != tuple(local.shape):  # read whole (uneven layout): cut out our part
        from torch.distributed.tensor import distribute_tensor
        piece = distribute_tensor(piece, target.device_mesh, target.placements, src_data_rank=None).to_local()
    _copy(local, piece)
    return target


def _restore_arg(target: torch.Tensor):
    """How orbax should read the leaf for `target`: this rank's slice as a sharded jax array, or
    (plain tensors, layouts jax cannot express) the whole array as numpy, which skips a copy."""
    import orbax.checkpoint as ocp
    dtype = _numpy_dtype(target.dtype)
    sharding = _sharding_of(target) if _is_dtensor(target) else None
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(target.shape), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# jax process group


def _init_jax(rank: int, world: int) -> None:
    import jax
    jax.config.update("jax_platforms", "cpu")  # host arrays only; never grab the accelerator
    jax.config.update("jax_enable_x64", True)  # keep int64/float64 leaves as they are
    if world == 1 or jax.distributed.is_initialized():
        return
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise UserError("a multi-process checkpoint needs MASTER_ADDR and MASTER_PORT (torchrun sets them)")
    coordinator = f"{addr}:{int(port) + 1}"
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=world, process_id=rank)
    except Exception as e:  # noqa: BLE001 - jax raises RuntimeError/XlaRuntimeError by version
        raise UserError(f"checkpoint: cannot start jax's process group at {coordinator} (MASTER_PORT + 1 "
                        f"must be free on the master host): {e}") from e


# ---------------------------------------------------------------------------------------------
# paths

# Files orbax writes last into a step's items; a step dir without them is damaged.
_STATE_METADATA = "_METADATA"


def _step_dirs(root: Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []


def _is_step_dir(p: Path) -> bool:
    return p.name.isdigit() and ((p / STATE_ITEM).exists() or (p / EXTRA_ITEM).exists())


def is_native_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint root (holding committed `<step>/` dirs) or one step dir of it."""
    p = Path(path)
    if (p / STATE_ITEM).is_dir() and (p / EXTRA_ITEM).exists():
        return True
    return any((p / str(s) / STATE_ITEM).is_dir() for s in _step_dirs(p))


def _missing_metadata(step_dir: Path) -> list[str]:
    """The metadata a complete step dir has and `step_dir` lacks (relative names)."""
    wanted = [Path(STATE_ITEM) / _STATE_METADATA, Path(EXTRA_ITEM)]
    return [str(w) for w in wanted if not (step_dir / w).exists()]


def resolve(path: str | os.PathLike) -> tuple[Path, int | None]:
    """(root, step) of a native checkpoint given as its root (step None: the latest committed
    step) or as one `<root>/<step>` dir. Errors say what `path` is instead."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if _is_step_dir(p):
        missing = _missing_metadata(p)
        if missing:
            others = [s for s in _step_dirs(p.parent) if s != int(p.name)]
            hint = f"; other steps in {p.parent}: {others}" if others else ""
            raise UserError(f"checkpoint step dir {p} is missing its metadata ({', '.join(missing)}): "
                            f"it is damaged or incomplete{hint}")
        return p.parent, int(p.name)
    if not is_native_checkpoint(p):
        hint = ""
        if (p / "config.json").is_file():
            hint = " (it is an HF model directory)"
        elif is_native_checkpoint(p / "checkpoints"):
            hint = f" (a run directory: its checkpoints are in {p / 'checkpoints'})"
        raise UserError(f"{p} is not a checkpoint written by this project (no <step>/state inside){hint}")
    return p, None


def _check_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=d)
        os.write(fd, b"probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"checkpoint dir {d} is not writable: {e.strerror or e}") from e


# ---------------------------------------------------------------------------------------------
# reading (shared by Reader and Checkpointer)


def _open_manager(root: Path, *, read_only: bool, keep: int = 1, async_save: bool = False):
    import orbax.checkpoint as ocp
    _quiet_read_only_notices()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(), EXTRA_ITEM: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(root.absolute(), options=options, item_handlers=handlers)


class _Unreadable(UserError):
    """A checkpoint step whose files cannot be read back (damaged), as opposed to one that does
    not fit the model."""


def _saved_metadata(manager, step: int, where: Path) -> dict:
    """{saved key: array metadata (.shape, .dtype)} of one step."""
    try:
        saved = manager.item_metadata(step)[STATE_ITEM].tree
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable metadata
        raise _Unreadable(f"cannot read checkpoint {where}: {type(e).__name__}: {e}") from e
    if saved is None:
        raise _Unreadable(f"cannot read checkpoint {where}: no state metadata")
    return dict(saved)


def _shape_problem(saved: dict, where: Path, wanted: dict[str, torch.Tensor], exact: bool,
                   everyone: set[str] | None = None) -> str | None:
    """Why `saved` cannot fill `wanted` (a missing key, another shape), else None. With `exact`,
    a saved key that no rank wants is a problem too (`everyone`: the keys all ranks want,
    default `wanted`)."""
    for key, t in wanted.items():
        if key not in saved:
            return (f"checkpoint {where} has no {key!r} (model shape {tuple(t.shape)}); "
                    "was it written for another model?")
        if tuple(saved[key].shape) != tuple(t.shape):
            return (f"checkpoint {where}: {key!r} has shape {tuple(saved[key].shape)}, "
                    f"the model expects {tuple(t.shape)}")
    if exact:
        extra_keys = sorted(k for k in saved if k not in (everyone or wanted))
        if extra_keys:
            return (f"checkpoint {where} has {extra_keys[0]!r} (shape "
                    f"{tuple(saved[extra_keys[0]].shape)}), which the model does not")
    return None


def _check_shapes(saved: dict, where: Path, wanted: dict[str, torch.Tensor], exact: bool) -> None:
    problem = _shape_problem(saved, where, wanted, exact)
    if problem:
        raise UserError(problem)


def _check_shapes_everywhere(saved: dict, where: Path, wanted: dict[str, torch.Tensor],
                             exact: bool) -> None:
    """`_check_shapes` for every rank's `wanted` (pipeline stages want different keys), as a
    collective: all ranks raise the first problem of any, so none waits in a restore alone."""
    everyone = {k for keys in _all_gather(sorted(wanted)) for k in keys}
    problems = _all_gather(_shape_problem(saved, where, wanted, exact, everyone))
    first = next((p for p in problems if p), None)
    if first:
        raise UserError(first)


def _restore_into(manager, step: int, where: Path, wanted: dict[str, torch.Tensor], *,
                  partial: bool, with_extra: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Fill the `wanted` tensors (by saved key) from `step`, in their dtypes and placements;
    also returns `extra` when `with_extra`."""
    import jax
    import orbax.checkpoint as ocp
    restore_args = {k: _restore_arg(v) for k, v in wanted.items()}
    abstract = {k: jax.ShapeDtypeStruct(tuple(wanted[k].shape), a.dtype, sharding=getattr(a, "sharding", None))
                for k, a in restore_args.items()}
    items = {STATE_ITEM: ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial)}
    if with_extra:
        items[EXTRA_ITEM] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
        raise _Unreadable(f"cannot read checkpoint {where}: {type(e).__name__}: {e}") from e
    arrays = restored[STATE_ITEM]
    filled = {k: _fill(v, arrays[k]) for k, v in wanted.items()}
    extra = dict(restored[EXTRA_ITEM] or {}) if with_extra else {}
    return filled, extra


class Reader:
    """Read-only access to one step of a native checkpoint, for loading a model anywhere.

        with Reader("runs/pretrain/checkpoints") as r:        # the latest step (or a <step> dir)
            config = r.extra()["config"]["model"]
            params = r.read(target_params, prefix="params")    # filled in target's dtypes/devices
    """

    def __init__(self, path: str | os.PathLike):
        _init_jax(0, 1)
        self.root, step = resolve(path)
        self._manager = _open_manager(self.root, read_only=True)
        self.step = self._manager.latest_step() if step is None else step
        if self.step is None:
            self.close()
            raise UserError(f"{path}: no committed checkpoint step inside")
        self.where = self.root / str(self.step)

    def extra(self) -> dict:
        """The step's JSON `extra` (data position, the run's resolved config)."""
        import orbax.checkpoint as ocp
        try:
            restored = self._manager.restore(self.step, args=ocp.args.Composite(
                **{EXTRA_ITEM: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read checkpoint {self.where} (its extra JSON): "
                            f"{type(e).__name__}: {e}") from e
        return dict(restored[EXTRA_ITEM] or {})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{saved key ("params.layers.0.wq"): shape} of every saved tensor."""
        return {k: tuple(m.shape) for k, m in _saved_metadata(self._manager, self.step, self.where).items()}

    def read(self, target: Any, prefix: str = "params") -> Any:
        """`target`'s tree filled from the saved tensors under `prefix` (key `prefix.<path>`),
        cast to target's dtypes; a missing key or another shape is an error naming the tensor."""
        flat = _tensor_leaves(target)
        wanted = {f"{prefix}.{k}" if prefix else k: v for k, v in flat.items()}
        _check_shapes(_saved_metadata(self._manager, self.step, self.where), self.where, wanted, exact=False)
        filled, _ = _restore_into(self._manager, self.step, self.where, wanted, partial=True, with_extra=False)
        return pytree.unflatten_like(target, {k: filled[w] for k, w in zip(flat, wanted)})

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the training state of this run; every rank constructs one and calls
    every method (they synchronise inside).

    `spread`: the 1-D DeviceMesh of the `pipe` axis through this rank, when pipeline stages hold
    different keys (see "keys held by some ranks only").

    Faults: a state holding NaN/inf is never saved (UserError naming the tensor). A failed save
    (full disk, unwritable dir) raises one UserError naming the step, at `save`/`poll`/`wait`,
    once: its partial output is removed and the last committed step stays the latest. A
    damaged latest step (unreadable metadata or arrays) is moved aside to `damaged-<step>-<time>`
    with a warning and the previous step is used (`restore`, `latest_step` after `check_latest`).
    """

    def __init__(self, cfg: CheckpointConfig, rank: int = 0, world: int = 1, spread=None):
        if cfg.every < 1 or cfg.keep < 1:
            raise UserError(f"checkpoint.every and checkpoint.keep must be >= 1, got {cfg.every} and {cfg.keep}")
        if cfg.finetune and not cfg.load:
            raise UserError("checkpoint.finetune=true needs checkpoint.load=<checkpoint or HF dir>")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.spread = spread
        self._peer_ranks: list[list[int]] | None = None
        _init_jax(rank, world)
        _quiet_orbax_errors()
        self._manager = None
        self._staging: dict[str, torch.Tensor] = {}
        self._pending: int | None = None   # the step of an async save not yet known to be committed
        self._failed = False               # a save failed and was reported: do not report it twice
        if cfg.dir:
            _check_writable(Path(cfg.dir))  # every rank: each fails alike instead of hanging in a barrier
            self._manager = _open_manager(Path(cfg.dir), read_only=False, keep=cfg.keep,
                                          async_save=cfg.async_save)

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: Any, extra: dict | None = None, *, force: bool = False) -> bool:
        """Save `state` (+ JSON `extra`) as `step` if it is a multiple of `every` (or `force`).
        Returns once the arrays are copied to host memory; with async_save the disk write goes
        on in the background (`poll()` reports its failure, `wait()` blocks until committed)."""
        if self._manager is None or not (force or step % self.cfg.every == 0):
            return False
        if step in self._manager.all_steps():
            return False  # e.g. the last step of a run that resumed exactly there
        import orbax.checkpoint as ocp
        self.wait()  # orbax would wait too; and the staging buffers must be free again
        leaves = _tensor_leaves(state)
        self._check_finite(step, leaves)
        arrays = {}
        for key, (shape, dtype, holders, description) in _union(leaves).items():
            if len(holders) == self.world:
                piece, sharding = _local_piece(leaves[key])
            else:  # one pipeline stage's: spread over the pipe axis to be written
                piece, sharding = _spread(key, leaves.get(key), shape, dtype, holders, description,
                                          self.spread, self._peers())
            arrays[key] = _global_array(shape, sharding, self._host_copy(key, piece))
        self._pending = step
        try:
            self._manager.save(step, args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.PyTreeSave(arrays), EXTRA_ITEM: ocp.args.JsonSave(extra or {})}),
                force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for I/O
            raise self._save_failed(e) from None
        if not self.cfg.async_save:
            self._pending = None
        return True

    def _peers(self) -> list[list[int]]:
        """For every rank, the ranks of its `spread` group in order (gathered once)."""
        if self._peer_ranks is None:
            mine = self.spread.mesh.flatten().tolist() if self.spread is not None else [self.rank]
            self._peer_ranks = _all_gather(mine)
        return self._peer_ranks

    def _check_finite(self, step: int, leaves: dict[str, torch.Tensor]) -> None:
        """Refuse to save NaN/inf: a poisoned checkpoint would be resumed from, and would replace
        the good ones as older steps are deleted. Ranks agree (each checks its own pieces of the
        keys it holds), so none saves alone."""
        # This rank's shard of each leaf (no collective: states hold no Partial placements).
        pieces = {k: t.to_local() if _is_dtensor(t) else t for k, t in leaves.items()
                  if t.is_floating_point()}
        floats = [k for k, p in pieces.items() if p.numel()]
        bad_key = None
        if floats:
            bad = torch.stack([(~torch.isfinite(pieces[k])).any() for k in floats])
            if bool(bad.any()):
                bad_key = floats[int(bad.nonzero()[0, 0])]
        if torch.distributed.is_initialized():
            device = next(iter(pieces.values())).device if pieces else "cpu"
            flag = torch.tensor(int(bad_key is not None), device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item():
                keys = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(keys, bad_key)
                bad_key = next(k for k in keys if k is not None)
        if bad_key is not None:
            last = self.latest_step()
            kept = f"; the last checkpoint (step {last}) is kept" if last is not None else ""
            raise UserError(f"not saving step {step}: {bad_key!r} holds NaN or inf values{kept}")

    def _host_copy(self, key: str, piece: torch.Tensor) -> torch.Tensor:
        """`piece` in host memory that training cannot touch until the save is committed.

        An async save copies into buffers kept from the last save: allocating (and page-faulting)
        hundreds of MB anew each time cost more than the copy itself. A sync save of a CPU
        tensor needs no copy at all: save() returns only after the write."""
        if not self.cfg.async_save and piece.device.type == "cpu":
            return piece.contiguous()
        buf = self._staging.get(key)
        if buf is None or buf.shape != piece.shape or buf.dtype != piece.dtype:
            buf = self._staging[key] = torch.empty(piece.shape, dtype=piece.dtype,
                                                   pin_memory=piece.device.type == "cuda")
        _copy(buf, piece)
        return buf

    def poll(self) -> None:
        """Raise now if the background save has finished with an error (cheap: call every step),
        so a failure is reported at the step it is known, not at the next save."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the last async save is committed (raises its error, if any)."""
        if self._manager is None or self._pending is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e) from None
        self._pending = None

    def _save_failed(self, e: Exception) -> UserError:
        """Remove the failed step's partial output and say, once, what happened."""
        step, self._pending, self._failed = self._pending, None, True
        root = Path(self.cfg.dir)
        if self.rank == 0:
            for partial in root.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        last = self.latest_step()
        kept = (f"the last good checkpoint is step {last}" if last is not None
                else "no checkpoint was committed")
        return UserError(f"saving checkpoint step {step} to {root} failed: {_io_reason(e)}; its "
                         f"partial output was removed and {kept}")

    # -- restoring ------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest committed step in `dir` (half-written steps are never listed)."""
        return None if self._manager is None else self._manager.latest_step()

    def can_restore(self) -> bool:
        """True when `restore` has something to read: a checkpoint in `dir`, or a native checkpoint
        in `load` (an HF directory in `load` is the runner's to read)."""
        return self.latest_step() is not None or bool(self.cfg.load and is_native_checkpoint(self.cfg.load))

    def check_latest(self) -> int | None:
        """The latest step in `dir` whose metadata and `extra` read back; damaged newer steps are
        moved aside with a warning. An error when no step is readable."""
        while (step := self.latest_step()) is not None:
            try:
                _saved_metadata(self._manager, step, Path(self.cfg.dir) / str(step))
                self.read_extra(step)
                return step
            except _Unreadable as e:
                self._set_aside(step, e)
        return None

    def read_extra(self, step: int | None = None) -> dict:
        """The JSON `extra` of `step` in `dir` (default: the latest)."""
        import orbax.checkpoint as ocp
        step = self.latest_step() if step is None else step
        where = Path(self.cfg.dir) / str(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **{EXTRA_ITEM: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(f"cannot read checkpoint {where} (its extra JSON): "
                              f"{type(e).__name__}: {e}") from e
        return dict(restored[EXTRA_ITEM] or {})

    def _set_aside(self, step: int, error: UserError) -> None:
        """Move a damaged step out of orbax's sight (kept for inspection) and fall back to the
        previous one; with no previous step the error stands."""
        root = Path(self.cfg.dir)
        previous = [s for s in self._manager.all_steps() if s < step]
        if not previous:
            raise UserError(f"{error}; it is the only checkpoint in {root}: delete {root / str(step)} "
                            "to start afresh, or give another out_dir") from None
        aside = root / f"damaged-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.rank == 0:
            os.replace(root / str(step), aside)
            print(f"warning: checkpoint step {step} in {root} is damaged ({error}); moved it to "
                  f"{aside.name} and using step {max(previous)}", file=sys.stderr, flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self._manager.reload()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """The checkpointed state in `target`'s tree, dtypes, devices and placements, and `extra`.

        The values are copied into `target`'s tensors (materialized, not meta), which are returned.

        Reads `dir` (the given step, or the latest readable one: a damaged latest step is set
        aside) when it holds a checkpoint, else `load`; with `finetune` a `load` gives params
        only (target's opt and step are kept) and extra {}."""
        flat_target = _tensor_leaves(target)
        if step is not None or self.latest_step() is not None:
            root = Path(self.cfg.dir)
            if step is not None:
                if step not in self._manager.all_steps():
                    raise UserError(f"no checkpoint for step {step} in {root} (have {self._manager.all_steps()})")
                return self._restore_step(self._manager, step, root / str(step), target, flat_target, False)
            while (latest := self.check_latest()) is not None:
                try:
                    return self._restore_step(self._manager, latest, root / str(latest), target,
                                              flat_target, False)
                except _Unreadable as e:
                    self._set_aside(latest, e)
        if not self.cfg.load:
            raise UserError("nothing to restore: no checkpoint in checkpoint.dir and no checkpoint.load")
        with Reader(self.cfg.load) as reader:
            return self._restore_step(reader._manager, reader.step, reader.where, target, flat_target,
                                      self.cfg.finetune)

    def check(self, target: Any) -> None:
        """Raise UserError naming the first tensor that `restore(target)` would find missing or of
        another shape, from the checkpoint's metadata alone. `target` may hold meta tensors (the
        abstract state), so a run refuses a checkpoint before it allocates anything."""
        flat_target = _tensor_leaves(target)
        if self.latest_step() is not None:
            step = self.latest_step()
            self._check_step(self._manager, step, Path(self.cfg.dir) / str(step), flat_target, False)
        elif self.cfg.load:
            with Reader(self.cfg.load) as reader:
                self._check_step(reader._manager, reader.step, reader.where, flat_target, self.cfg.finetune)

    @staticmethod
    def _check_step(manager, step: int, where: Path, flat_target: dict, params_only: bool) -> dict:
        wanted = {k: v for k, v in flat_target.items() if not params_only or k.split(".")[0] == "params"}
        _check_shapes_everywhere(_saved_metadata(manager, step, where), where, wanted,
                                 exact=not params_only)
        return wanted

    def _restore_step(self, manager, step: int, where: Path, target: Any, flat_target: dict,
                      params_only: bool) -> tuple[Any, dict]:
        wanted = self._check_step(manager, step, where, flat_target, params_only)
        # partial: each rank reads its own keys (pipeline stages want different ones); the
        # check above makes sure the ranks together want every saved key.
        filled, extra = _restore_into(manager, step, where, wanted, partial=True, with_extra=True)
        flat = {k: filled.get(k, v) for k, v in flat_target.items()}
        return pytree.unflatten_like(target, flat), {} if params_only else extra

    def close(self) -> None:
        """Finish pending saves and release orbax's threads. A save failure already reported is
        not raised again (close runs while that error unwinds the run)."""
        if self._manager is not None:
            try:
                self.wait()
            finally:
                self._manager.close()
                self._manager = None
                self._staging.clear()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _io_reason(e: Exception) -> str:
    """The OS reason inside a tensorstore/orbax error ("No space left on device"), else its text."""
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return f"{os.strerror(int(code.group(1)))} ({type(e).__name__})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {text[:300]}"


class _OrbaxErrorFilter(logging.Filter):
    """orbax logs (through absl) a traceback from each of its threads a failed write passes
    through; the same error is raised to the Checkpointer, which reports it once, so absl error
    records that carry a traceback are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info is not None)


class _ReadOnlyNoticeFilter(logging.Filter):
    """A read-only manager makes orbax warn (through absl) that it ignores the saving options and
    that the directory "is read only": every generate, chat and evaluate would open with three
    warnings about a choice made here, none of them about the user's input."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno == logging.WARNING
                    and ("read_only=True" in message or message.startswith("Given directory is read only")))


def _quiet_read_only_notices() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _ReadOnlyNoticeFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_ReadOnlyNoticeFilter())


def _quiet_orbax_errors() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxErrorFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxErrorFilter())
    if getattr(sys.unraisablehook, "__wrapped__", None) is None:
        sys.unraisablehook = _ignore_closed_loop_callbacks(sys.unraisablehook)


def _ignore_closed_loop_callbacks(previous):
    """After a failed write, tensorstore completes its other writes into the asyncio loop that
    orbax already closed; each prints an "Event loop is closed" traceback through
    sys.unraisablehook. That is the same failure, reported once by the Checkpointer."""
    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)
    hook.__wrapped__ = previous
    return hook
