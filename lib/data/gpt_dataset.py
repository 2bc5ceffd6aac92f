"""Fixed-length pretraining samples over an indexed dataset, built as megatron-core's GPTDataset is.

megatron-core's GPTDataset works on the `.idx` file's *sequences*, not its documents: it counts,
splits and shuffles sequences, and what it calls the document index holds sequence ids. Most data
has one sequence per document, so the two agree; in `--split-sentences` output every sentence is a
sequence, and each is then split and shuffled on its own, there as here.

Three index arrays, numpy-vectorised and cached on disk, with megatron-core's values and dtypes:

- document index (int32): the split's sequence ids repeated for as many epochs as the requested
  samples need, shuffled with the seed;
- sample index ([samples + 1, 2], int32; int64 once the document index passes 2**31 - 1 entries):
  `(position in document index, token offset)` where each sample starts. Sample i covers
  `seq_len + 1` tokens of the concatenated stream (it may span sequences) and shares its last
  token with the next sample's first, so labels are the tokens shifted by one;
- shuffle index (uint32; int64 from 2**32 - 2 samples): a seeded permutation of the samples.

So one seed gives one sample order in both: bench/megatron_parity.py compares them sample by
sample with megatron-core itself, and tests/test_data_megatron.py with its recorded outputs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from lib.data.cache import cached_arrays
from lib.data.indexed import IndexedDataset
from lib.errors import UserError

# Bump when the index construction changes, to invalidate old caches. 3: sequences (not documents)
# are split and shuffled, splits are cut at rounded cumulative fractions, the sample index is int32.
INDEX_VERSION = 3
SPLITS = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """ "969,30,1" -> normalised weights for train/valid/test (missing trailing parts are 0)."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise UserError(f"split {split!r}: expected comma-separated numbers like '969,30,1'") from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"split {split!r}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]  # bit for bit megatron-core's normalize (3 numbers: same sum)


def split_ranges(num_elements: int, split: str) -> dict[str, tuple[int, int]]:
    """Ranges [lo, hi) of train/valid/test over `num_elements` (sequences for GPTDataset), cut as
    megatron-core cuts them: each boundary is its cumulative share times the count, rounded
    (969,30,1 of 520 gives train [0, 504); rounding each share and trimming the excess would give
    [0, 503))."""
    bounds = [0.0]
    for share in parse_split(split):
        bounds.append(bounds[-1] + share)
    cuts = [int(round(b * float(num_elements))) for b in bounds]
    return {name: (cuts[i], cuts[i + 1]) for i, name in enumerate(SPLITS)}


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    # Samples overlap by one token, so e epochs give (e * tokens - 1) // seq_len samples.
    needed = num_samples * seq_len + 1
    return max(1, math.ceil(needed / tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    index = np.tile(documents.astype(np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(lengths_in_order: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] (document-index position, offset) where each sample starts.

    Sample i spans stream tokens [i * seq_len, (i + 1) * seq_len]; a start is located by binary
    search in the cumulative sequence ends, which skips empty sequences as megatron-core's
    sequence-at-a-time walk does. Its dtype is megatron-core's: int32 unless the document index
    is too long for it (offsets always fit: sequence lengths are int32 in the .idx).
    """
    ends = np.cumsum(lengths_in_order, dtype=np.int64)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    if num_samples and starts[-1] >= ends[-1]:
        raise ValueError("not enough tokens for the requested samples")
    doc = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[doc] - lengths_in_order[doc])
    doc[0] = 0  # the walk starts at (0, 0) even on an empty first sequence: same tokens, same array
    dtype = np.int32 if len(lengths_in_order) <= np.iinfo(np.int32).max else np.int64
    return np.stack([doc, offset], axis=1).astype(dtype)


def build_shuffle_index(num_shuffled: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of range(total) that keeps [0, num_shuffled) and the rest apart."""
    dtype = np.uint32 if total < 2**32 - 2 else np.int64
    first = np.arange(num_shuffled, dtype=dtype)
    rng.shuffle(first)
    if num_shuffled == total:
        return first
    last = np.arange(num_shuffled, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_indices(sequence_ids: np.ndarray, sequence_lengths: np.ndarray, num_samples: int, seq_len: int,
                  seed: int) -> dict[str, np.ndarray]:
    """Document, sample and shuffle indices over `sequence_ids` (`sequence_lengths` is indexed by
    id); for the same inputs and seed, the arrays megatron-core's GPTDataset builds.

    When the last epoch is needed for fewer than 80% of its samples, it is shuffled apart from the
    others, so the samples actually used are not biased towards a partial epoch's sequences.
    """
    tokens_per_epoch = int(sequence_lengths[sequence_ids].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_len, num_samples)
    total = (epochs * tokens_per_epoch - 1) // seq_len
    separate_final = False
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_len
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate_final = num_samples - before_final < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)
    if separate_final:
        doc_index = np.concatenate([build_document_index(sequence_ids, epochs - 1, rng),
                                    build_document_index(sequence_ids, 1, rng)])
    else:
        doc_index = build_document_index(sequence_ids, epochs, rng)
    sample_index = build_sample_index(sequence_lengths[doc_index], seq_len, total)
    shuffle_index = build_shuffle_index(before_final if separate_final else total, total, rng)
    return {"doc": doc_index, "sample": sample_index, "shuffle": shuffle_index}


def default_cache_dir(prefix: str) -> str:
    return str(Path(prefix).parent / "cache")


def _file_key(prefix: str) -> dict:
    st = os.stat(f"{prefix}.idx")
    return {"prefix": os.path.abspath(prefix), "idx_size": st.st_size, "idx_mtime_ns": st.st_mtime_ns}


class GPTDataset:
    """`ds[i]` -> {"tokens": int64[seq_len], "labels": int64[seq_len]} for i < num_samples.

    `sequences` is the split's range of the .idx's sequences (see `split_ranges`). The indices
    cover whole epochs; only the first `num_samples` of the shuffle are exposed, which are the
    ones megatron-core trains on.
    """

    def __init__(self, data: IndexedDataset, sequences: tuple[int, int], num_samples: int, seq_len: int,
                 seed: int, cache_dir: str | None = None, name: str = "train"):
        self.data, self.seq_len, self.num_samples = data, seq_len, num_samples
        lo, hi = sequences
        tokens_per_epoch = int(data.sequence_lengths[lo:hi].sum(dtype=np.int64))
        if tokens_per_epoch < 2:
            raise UserError(f"{data.prefix}: the {name} split (sequences {lo}..{hi}) holds {tokens_per_epoch} "
                            "tokens, too few to make a sample")
        key = {"v": INDEX_VERSION, "file": _file_key(data.prefix), "sequences": [lo, hi],
               "num_samples": num_samples, "seq_len": seq_len, "seed": seed}
        ids = np.arange(lo, hi, dtype=np.int32)
        arrays = cached_arrays(cache_dir or default_cache_dir(data.prefix), f"gpt-{name}", key,
                               lambda: build_indices(ids, data.sequence_lengths, num_samples, seq_len, seed))
        self.doc_index, self.sample_index, self.shuffle_index = arrays["doc"], arrays["sample"], arrays["shuffle"]

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_len + 1 tokens of sample i (after shuffling)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside 0..{self.num_samples - 1}")
        j = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = self.sample_index[j], self.sample_index[j + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        seq = self.doc_index
        if d0 == d1:
            return np.asarray(self.data.get(int(seq[d0]), o0, o1 - o0 + 1), dtype=np.int64)
        parts = [self.data.get(int(seq[d0]), o0)]
        parts += [self.data.get(int(seq[d])) for d in range(d0 + 1, d1)]
        parts.append(self.data.get(int(seq[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        x = self.sample_tokens(i)
        return {"tokens": x[:-1], "labels": x[1:]}
