"""Counter-based random numbers: pure functions of an integer key, as `jax.random` makes them.

    key = prng.fold_in(prng.fold_in(seed, step), micro_batch)    # a 0-dim int64 tensor
    keep = prng.uniform(prng.fold_in(key, layer), x.shape, x.device) >= p

The numbers are a hash of (key, element index), written in integer torch ops. So the same key
gives the same numbers eagerly and under torch.compile, in the forward and when activation
recompute runs it again in the backward (no generator state to save and restore), at any mesh
(indices are global), and after a resume (the key is made from the step). torch's global
generator is never touched.

The hash is a 32-bit integer mixer (xor-shift-multiply rounds) computed in int64 with every
product below 2**63, so it never relies on overflow (undefined in C++ code inductor emits).
"""
from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x5BD1E995   # odd multipliers below 2**31: product of a 32-bit value < 2**63
_GOLDEN = 0x9E3779B9


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    return x ^ (x >> 15)


def _as_tensor(x: int | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.int64)
    return torch.tensor(x, dtype=torch.int64)


def fold_in(key: int | torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from `key` and an integer (a step, a layer index): distinct data give
    independent streams."""
    key, data = _as_tensor(key) & _MASK, _as_tensor(data)
    return _mix(key ^ _mix(((data & _MASK) + _GOLDEN) & _MASK) ^ _mix((data >> 32) & _MASK))


def bits(key: torch.Tensor, shape: tuple[int, ...] | torch.Size, device: torch.device | str) -> torch.Tensor:
    """Random 32-bit values (int64 in [0, 2**32)) of `shape`, a function of `key` only."""
    index = torch.arange(_numel(shape), device=device, dtype=torch.int64).view(shape)
    seed = _mix(_as_tensor(key).to(device) & _MASK)
    hi = _mix(((index >> 32) ^ seed) & _MASK)  # tensors over 2**32 elements stay distinct
    return _mix((index & _MASK) ^ hi)


def uniform(key: torch.Tensor, shape: tuple[int, ...] | torch.Size,
            device: torch.device | str) -> torch.Tensor:
    """float32 uniform in [0, 1), 24 random bits each."""
    return (bits(key, shape, device) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def dropout(x: torch.Tensor, p: float, key: torch.Tensor) -> torch.Tensor:
    """Inverted dropout of `x` with a mask drawn from `key`: zeroed with probability p, the
    rest scaled by 1 / (1 - p), as `torch.nn.functional.dropout` does."""
    keep = uniform(key, x.shape, x.device) >= p
    return x * (keep.to(x.dtype) / (1.0 - p))  # F.dropout's noise: bernoulli(1 - p) / (1 - p)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
