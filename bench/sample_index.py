"""Time the document, sample and shuffle indices for a 1-billion-token dataset (synthetic lengths).

    .venv/bin/python bench/sample_index.py [--tokens 1e9] [--seq-len 2048]

Compared in the same run against the document-at-a-time loop (Megatron's algorithm, which
Megatron runs in C++; here in Python, as a user without a compiled helper would), on a slice.
"""
from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time

import numpy as np

from lib.data.gpt_dataset import GPTDataset, build_document_index, build_sample_index, build_shuffle_index
from lib.data.indexed import MAGIC, IndexedDataset


def loop_sample_index(lengths: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[0] = 0
    doc, offset, lengths = 0, 0, lengths.tolist()
    for i in range(1, num_samples + 1):
        remaining = seq_len + 1
        while remaining:
            left = lengths[doc] - offset
            remaining -= left
            if remaining <= 0:
                offset += remaining + left - 1
                remaining = 0
            else:
                doc, offset = doc + 1, 0
        out[i] = doc, offset
    return out


def end_to_end(lengths: np.ndarray, seq_len: int, num_samples: int) -> None:
    """GPTDataset over a real .idx (2M documents) and a sparse 2 GB .bin: build + cache, then reload."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/synthetic_text_document"
        pointers = np.concatenate([[0], np.cumsum(lengths[:-1])]) * 2
        with open(prefix + ".idx", "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", 1, 8, len(lengths), len(lengths) + 1))
            f.write(lengths.astype(np.int32).tobytes() + pointers.astype(np.int64).tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(lengths.sum()) * 2)  # sparse: no disk used, the index never reads tokens
        t0 = time.perf_counter()
        ds = GPTDataset(IndexedDataset(prefix), (0, len(lengths)), num_samples, seq_len, 1234, f"{tmp}/cache")
        t1 = time.perf_counter()
        GPTDataset(IndexedDataset(prefix), (0, len(lengths)), num_samples, seq_len, 1234, f"{tmp}/cache")
        t2 = time.perf_counter()
        assert len(ds) == num_samples and os.listdir(f"{tmp}/cache")
        print(f"GPTDataset over the .idx: first build incl. cache write {t1 - t0:.2f} s, cached reopen {t2 - t1:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--loop-fraction", type=float, default=0.02, help="slice timed with the loop, then scaled")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    # Document lengths like web text: log-normal, median ~300 tokens, long tail.
    n_docs = int(args.tokens / 500)
    lengths = np.maximum(1, rng.lognormal(5.7, 1.0, n_docs)).astype(np.int64)
    lengths = lengths * int(args.tokens) // int(lengths.sum()) + 1
    total = int(lengths.sum())
    num_samples = (total - 1) // args.seq_len
    print(f"{n_docs:,} documents, {total:,} tokens, seq_len {args.seq_len}: {num_samples:,} samples")

    t0 = time.perf_counter()
    doc_index = build_document_index(np.arange(n_docs), 1, np.random.RandomState(1234))
    t1 = time.perf_counter()
    sample_index = build_sample_index(lengths[doc_index], args.seq_len, num_samples)
    t2 = time.perf_counter()
    build_shuffle_index(num_samples, num_samples, np.random.RandomState(1234))
    t3 = time.perf_counter()
    print(f"document index {t1 - t0:.2f} s, sample index {t2 - t1:.2f} s, shuffle index {t3 - t2:.2f} s, "
          f"total {t3 - t0:.2f} s")

    k = max(1, int(num_samples * args.loop_fraction))
    t4 = time.perf_counter()
    ref = loop_sample_index(lengths[doc_index], args.seq_len, k)
    t5 = time.perf_counter()
    starts = np.concatenate([[0], np.cumsum(lengths[doc_index])])
    assert np.array_equal(starts[ref[:, 0]] + ref[:, 1], starts[sample_index[: k + 1, 0]] + sample_index[: k + 1, 1])
    loop_full = (t5 - t4) / k * num_samples
    end_to_end(lengths, args.seq_len, num_samples)
    print(f"python loop: {k:,} samples in {t5 - t4:.2f} s -> {loop_full:.1f} s for all; "
          f"vectorised sample index is {loop_full / (t2 - t1):.0f}x faster")


if __name__ == "__main__":
    main()
