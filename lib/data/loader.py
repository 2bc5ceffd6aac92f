"""Batches from a dataset, deterministic and resumable from one integer.

Global batch b holds samples [b * global_batch, (b + 1) * global_batch) of the dataset's
(already shuffled) order; data-parallel rank r of w takes the r-th contiguous slice of it. The
iterator's whole state is `consumed_samples`, so a checkpoint stores that one number and a resumed
run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Iterator

from typing import TYPE_CHECKING

import numpy as np

from lib.errors import UserError

if TYPE_CHECKING:
    import torch


def rank_slice(global_batch: int, rank: int, world: int) -> tuple[int, int]:
    if global_batch % world:
        raise UserError(f"global batch {global_batch} is not divisible by the data-parallel size {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    per_rank = global_batch // world
    return rank * per_rank, (rank + 1) * per_rank


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, "torch.Tensor"]:
    # torch is imported here, not at the top, so that preprocessing workers (which import
    # lib.data) start in a fraction of a second instead of loading torch.
    import torch

    return {k: torch.from_numpy(np.stack([s[k] for s in samples]).astype(np.int64)) for k in samples[0]}


def batches(dataset, global_batch: int, consumed_samples: int, rank: int, world: int,
            micro_batch: int | None = None) -> Iterator[dict[str, "torch.Tensor"]]:
    """This rank's share of each global batch, from sample `consumed_samples` on, until the data runs out.

    One dict per global batch ([global_batch // world, S] tensors), or, with `micro_batch`, that
    share cut into dicts of `micro_batch` rows. `consumed_samples` must be a multiple of `global_batch`.
    """
    lo, hi = rank_slice(global_batch, rank, world)
    if consumed_samples % global_batch:
        raise UserError(f"consumed_samples {consumed_samples} is not a multiple of the global batch "
                        f"{global_batch} (was the batch size changed on resume?)")
    step = micro_batch or hi - lo
    if (hi - lo) % step:
        raise UserError(f"per-rank batch {hi - lo} is not divisible by the micro batch {step}")
    start = consumed_samples
    while start + global_batch <= len(dataset):
        for m in range(lo, hi, step):
            yield collate([dataset[start + i] for i in range(m, m + step)])
        start += global_batch
