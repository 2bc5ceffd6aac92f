"""Token ids against the model's vocabulary, checked when a dataset is opened.

Data tokenized with a larger tokenizer than the model's (or a smaller `model.vocab_size`) would
otherwise fail deep in the forward, as an IndexError in the embedding or an abort inside
compiled code. The range of ids is one vectorised pass over the memory-mapped .bin, cached beside
the sample indices and keyed by the .bin's size and modification time, so a rerun pays nothing.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from tqdm import tqdm

from lib.data.cache import cached_arrays
from lib.data.gpt_dataset import default_cache_dir
from lib.data.indexed import IndexedDataset
from lib.errors import UserError

CHUNK_TOKENS = 1 << 26  # 128-256 MB of uint16/int32 per reduction: bounded memory, few calls


def token_id_range(data: IndexedDataset, cache_dir: str | None = None) -> tuple[int, int]:
    """(smallest, largest) token id in `data`; (0, -1) when it holds no token."""
    st = os.stat(f"{data.prefix}.bin")
    key = {"prefix": os.path.abspath(data.prefix), "bin_size": st.st_size, "bin_mtime_ns": st.st_mtime_ns}
    arrays = cached_arrays(cache_dir or default_cache_dir(data.prefix), "token-range", key,
                           lambda: {"range": _scan(data)})
    lo, hi = arrays["range"]
    return int(lo), int(hi)


def _scan(data: IndexedDataset) -> np.ndarray:
    tokens = data.tokens
    if len(tokens) == 0:
        return np.array([0, -1], dtype=np.int64)
    starts = range(0, len(tokens), CHUNK_TOKENS)
    lows, highs = [], []
    for start in tqdm(starts, desc=f"token range of {os.path.basename(data.prefix)}", unit="chunk",
                      disable=len(starts) < 4, file=sys.stderr):
        chunk = tokens[start:start + CHUNK_TOKENS]
        lows.append(int(chunk.min()))
        highs.append(int(chunk.max()))
    return np.array([min(lows), max(highs)], dtype=np.int64)


def check_token_ids(data: IndexedDataset, vocab_size: int, cache_dir: str | None = None) -> None:
    """UserError naming the .bin when one of its token ids is outside [0, vocab_size)."""
    lo, hi = token_id_range(data, cache_dir)
    if hi >= vocab_size:
        raise UserError(f"{data.prefix}.bin: holds token id {hi}, but the model's vocabulary has "
                        f"{vocab_size} ids (0..{vocab_size - 1}): the data was tokenized with a larger "
                        "tokenizer than the model's, or model.vocab_size is too small")
    if lo < 0:
        raise UserError(f"{data.prefix}.bin: holds token id {lo}, a negative id (a corrupt file?)")
