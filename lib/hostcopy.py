"""`dst[...] = src` for host tensors through numpy.

torch's CPU copy kernel is multi-threaded; on a small, busy machine its OpenMP barriers made a
256 x 256 strided copy take 18 ms instead of 10 us (numpy copies in the calling thread). Shards
are assembled from many such blocks (random tiles, file chunks), so they go through here.
"""
from __future__ import annotations

import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assign(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src (same shape; src is cast to dst's dtype first). Strided views are fine."""
    if src.dtype != dst.dtype:
        src = src.to(dst.dtype)
    if dst.device.type != "cpu" or src.device.type != "cpu" or dst.dtype not in _DTYPES_OK:
        dst.copy_(src)
        return
    # Reinterpreting as a same-size integer keeps bf16 (which numpy lacks) bit-exact.
    as_int = _SAME_SIZE_INT[dst.element_size()]
    dst.detach().view(as_int).numpy()[...] = src.detach().view(as_int).numpy()


_DTYPES_OK = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8}
