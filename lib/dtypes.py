"""The one table of floating-point dtype names.

Configs say `fp32`, `bf16`, `fp16` (`train.step.dtype`); torch, HF's `config.json`
(`torch_dtype`) and command-line flags say `float32`, `bfloat16`, `float16`. Both spellings are
read here and each is written from here.
"""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in DTYPES.values()}


def torch_dtype(name: str) -> torch.dtype:
    """`fp32`/`bf16`/`fp16` or `float32`/`bfloat16`/`float16` -> the torch dtype."""
    dtype = DTYPES.get(name) or TORCH_NAMES.get(name)
    if dtype is None:
        raise ValueError(f"dtype {name!r} is not one of {', '.join([*DTYPES, *TORCH_NAMES])}")
    return dtype


def short_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the config spelling)."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"{dtype} is not one of {', '.join(DTYPES)}")


def torch_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (HF's `torch_dtype` spelling)."""
    short_name(dtype)  # only the dtypes of the table
    return str(dtype).removeprefix("torch.")
