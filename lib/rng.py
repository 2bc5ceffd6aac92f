"""Random values that any piece of a tensor can compute alone, whatever the mesh.

torch's CPU generator has no skip-ahead: drawing rows 1000..1999 of a matrix means drawing rows
0..999 first. So a tensor's random values are drawn in fixed tiles, each from its own generator
seeded by folding (seed, tile index) into a new seed, as `jax.random.fold_in` does::

    seed_of_wq = fold_in(run_seed, "layers.3.wq")
    full  = normal((4096, 11008), seed_of_wq, std=0.02)                       # the whole tensor
    piece = normal((4096, 11008), seed_of_wq, std=0.02, region=(slice(0, 512), slice(None)))
    assert torch.equal(piece, full[:512])                                      # bit for bit

Tiles are TILE x TILE blocks of the first two dims (dims beyond stay whole; a 1-dim tensor is
cut in runs of TILE * TILE). A region draws only the tiles it overlaps, so a rank creating
its shard generates at most one tile row/column more than it keeps on each side, and holds one
tile at a time beside its shard. The values depend on the tensor's shape, the seed and TILE,
never on how a mesh cuts the tensor: the same seed gives the same model on 1 rank or 64.
Values are drawn in fp32 on the CPU (device generators differ from the CPU one) and copied to
`device` and `dtype` tile by tile.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence

import torch

from lib import hostcopy

TILE = 256
Region = tuple[slice, ...]


def fold_in(seed: int, *data: int | str) -> int:
    """A new seed (0 <= s < 2**63) from `seed` and `data`; the same inputs give the same seed on
    every machine and Python version (a hash of their text, not Python's salted `hash`)."""
    text = "/".join([str(int(seed)), *(str(d) for d in data)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def full_region(shape: Sequence[int]) -> Region:
    return tuple(slice(0, n) for n in shape)


def normalize_region(shape: Sequence[int], region: Region | None) -> Region:
    """`region` with explicit bounds, checked against `shape` (None: the whole tensor)."""
    if region is None:
        return full_region(shape)
    if len(region) != len(shape):
        raise ValueError(f"region {region} has {len(region)} dims, the tensor {len(shape)}")
    out = []
    for s, n in zip(region, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"region {region}: only contiguous slices are supported")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def _tile_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) == 0:
        return ()
    if len(shape) == 1:
        return (TILE * TILE,)
    return (TILE, TILE, *shape[2:])


def normal(shape: Sequence[int], seed: int, std: float, region: Region | None = None, *,
           dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """`region` (default: all) of a tensor of `shape` whose elements are normal(0, std**2)."""
    shape = tuple(int(n) for n in shape)
    region = normalize_region(shape, region)
    out = torch.empty(tuple(s.stop - s.start for s in region), dtype=dtype, device=device)
    if out.numel() == 0 or str(out.device) == "meta":
        return out
    tile = _tile_shape(shape)
    tiled_dims = min(len(shape), 2)
    # Indices of the tiles the region overlaps, per tiled dim.
    ranges = [range(region[d].start // tile[d], math.ceil(region[d].stop / tile[d]))
              for d in range(tiled_dims)]
    for index in itertools.product(*ranges):
        bounds = [(i * tile[d], min((i + 1) * tile[d], shape[d])) for d, i in enumerate(index)]
        generator = torch.Generator().manual_seed(fold_in(seed, *index))
        block = torch.empty([hi - lo for lo, hi in bounds] + list(shape[tiled_dims:]),
                            dtype=torch.float32).normal_(0.0, std, generator=generator)
        src, dst = [], []
        for d, (lo, hi) in enumerate(bounds):
            a, b = max(lo, region[d].start), min(hi, region[d].stop)
            src.append(slice(a - lo, b - lo))
            dst.append(slice(a - region[d].start, b - region[d].start))
        rest = [slice(s.start, s.stop) for s in region[tiled_dims:]]
        hostcopy.assign(out[tuple(dst)], block[tuple(src + rest)])
    return out
