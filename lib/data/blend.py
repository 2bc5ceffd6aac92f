"""Weighted blending of several datasets, as megatron-core's BlendedMegatronDatasetBuilder does.

Sample i goes to the dataset that is furthest behind its share: argmax_d(w_d * max(i, 1) - n_d),
where n_d counts the samples dataset d gave so far. Every prefix of the blend then matches the
weights to within one sample per dataset, unlike sampling sources at random.

Each dataset is built for its share of the blend plus a 0.5% surplus (`samples_per_dataset`);
how many samples a dataset is built for decides its epochs and so its order, so this count, the
weights' normalisation and the choice above all follow megatron-core (>= 0.12) to the last bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lib.data.cache import cached_arrays
from lib.errors import UserError

BLEND_VERSION = 2  # bump when the blending indices change, to invalidate old caches
SURPLUS = 0.005  # megatron-core's mid_level_dataset_surplus (its default)


def _normalize(weights: Sequence[float]) -> list[float]:
    """megatron-core's normalize: numpy's sum (pairwise from 8 weights on), then one division."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def normalize_weights(weights: Sequence[float] | None, num_paths: int) -> list[float]:
    if weights is None:
        return [1.0 / num_paths] * num_paths
    weights = list(weights)
    if len(weights) != num_paths:
        raise UserError(f"data weights: {len(weights)} weights for {num_paths} paths; give one weight per path")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"data weights {weights}: need non-negative numbers with a positive sum")
    return _normalize(weights)


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, sample id within that dataset) for each of `size` blended samples."""
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    # A plain loop: the choice depends on every earlier one, and with a handful of datasets this
    # runs at ~1M samples/s, once, before the result is cached.
    for i in range(size):
        t = max(i, 1)
        best, best_err = 0, w[0] * t - counts[0]
        for d in range(1, len(w)):
            err = w[d] * t - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def samples_per_dataset(weights: Sequence[float], size: int) -> list[int]:
    """How many samples to build of each dataset for `size` blended ones: its share rounded up, plus
    0.5%, rounded up again, as megatron-core (>= 0.12) asks. (Older releases asked for
    ceil(w * size * 1.005): for w = 0.25 and size = 10, 3 samples instead of 4.)"""
    return [int(math.ceil(math.ceil(size * w) * (1 + SURPLUS))) for w in weights]


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised here once more,
    as megatron-core's BlendedDataset does with the builder's already normalised weights)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, cache_dir: str, key: dict):
        self.datasets = list(datasets)
        self.size = size
        weights = _normalize(weights)

        def build() -> dict[str, np.ndarray]:
            ds, ss = build_blending_indices(weights, size)
            return {"dataset": ds, "sample": ss}

        arrays = cached_arrays(cache_dir, "blend", {"v": BLEND_VERSION, "weights": list(weights), "size": size,
                                                    **key}, build)
        self.dataset_index, self.dataset_sample_index = arrays["dataset"], arrays["sample"]
        for d, ds in enumerate(self.datasets):
            used = int(np.count_nonzero(self.dataset_index == d))
            if used > len(ds):
                raise ValueError(f"blend needs {used} samples of dataset {d}, which has {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
