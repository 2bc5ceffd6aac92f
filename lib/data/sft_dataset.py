"""Instruction-tuning samples from `<prefix>_input_ids_document` + `<prefix>_loss_mask_document`
(runners.preprocess), or from ModelLink's `<prefix>_packed_*_document` files (`lib.data.modellink`).

Both indexed datasets share one layout: a document is one training sample, its sequences are
the examples packed into it (one sequence when not packed). A sample becomes

    tokens      ids, padded with pad_id to seq_len
    labels      next token where it is a trained response token, else -100; never across examples
    positions   0.. restarting at each example
    segment_ids 1, 2, ... per example, 0 on padding (attention never crosses segments)
"""
from __future__ import annotations

import numpy as np

from lib.data.cache import cached_arrays
from lib.data.gpt_dataset import _file_key, build_document_index, default_cache_dir
from lib.data.indexed import IndexedDataset
from lib.data.modellink import ModelLinkExamples, is_modellink
from lib.errors import UserError
from lib.labels import IGNORE_INDEX


IDS_SUFFIX, MASK_SUFFIX = "_input_ids_document", "_loss_mask_document"
SFT_INDEX_VERSION = 1


def open_sft_pair(prefix: str) -> tuple[IndexedDataset, IndexedDataset]:
    ids, mask = IndexedDataset(prefix + IDS_SUFFIX), IndexedDataset(prefix + MASK_SUFFIX)
    if not (np.array_equal(ids.sequence_lengths, mask.sequence_lengths)
            and np.array_equal(ids.document_indices, mask.document_indices)):
        raise UserError(f"{prefix}{MASK_SUFFIX}: does not match {prefix}{IDS_SUFFIX} (written by different runs?)")
    return ids, mask


def sample_arrays(seqs: list[np.ndarray], masks: list[np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    tokens = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    segment_ids = np.zeros(seq_len, dtype=np.int64)
    at = 0
    for seg, (t, m) in enumerate(zip(seqs, masks), 1):
        n = min(len(t), seq_len - at)
        if n <= 0:
            break
        t = np.asarray(t[:n], dtype=np.int64)
        m = np.asarray(m[:n])
        tokens[at:at + n] = t
        labels[at:at + n - 1] = np.where(m[1:] != 0, t[1:], IGNORE_INDEX)
        positions[at:at + n] = np.arange(n)
        segment_ids[at:at + n] = seg
        at += n
    return {"tokens": tokens, "labels": labels, "positions": positions, "segment_ids": segment_ids}


class OwnExamples:
    """runners.preprocess's pair of files; `sample(d, ...)` is document d as training arrays."""

    def __init__(self, prefix: str):
        self.ids, self.mask = open_sft_pair(prefix)
        self.key_file = prefix + IDS_SUFFIX

    @property
    def num_documents(self) -> int:
        return self.ids.num_documents

    def sample(self, d: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
        return sample_arrays(self.ids.document(d), self.mask.document(d), seq_len, pad_id)

    def trained(self, d: int) -> np.ndarray:
        """Per token of document d (its examples end to end): is it a trained response token."""
        return self.mask.document_span(d) != 0


def open_examples(prefix: str, eos_id: int | None = None) -> OwnExamples | ModelLinkExamples:
    """Our instruction files at `prefix`, else ModelLink's (their packed examples split at `eos_id`)."""
    return ModelLinkExamples(prefix, eos_id) if is_modellink(prefix) else OwnExamples(prefix)


class SFTDataset:
    def __init__(self, prefix: str, documents: tuple[int, int], num_samples: int, seq_len: int, seed: int,
                 pad_id: int, cache_dir: str | None = None, name: str = "train", eos_id: int | None = None):
        self.examples = open_examples(prefix, eos_id)
        self.seq_len, self.pad_id, self.num_samples = seq_len, pad_id, num_samples
        lo, hi = documents
        if hi <= lo:
            raise UserError(f"{prefix}: the {name} split holds no examples")
        epochs = max(1, -(-num_samples // (hi - lo)))

        def build() -> dict[str, np.ndarray]:
            return {"doc": build_document_index(np.arange(lo, hi), epochs, np.random.RandomState(seed))}

        key = {"v": SFT_INDEX_VERSION, "file": _file_key(self.examples.key_file), "documents": [lo, hi],
               "epochs": epochs, "seed": seed}
        self.doc_index = cached_arrays(cache_dir or default_cache_dir(prefix), f"sft-{name}", key, build)["doc"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} outside 0..{self.num_samples - 1}")
        d = int(self.doc_index[i])
        return self.examples.sample(d, self.seq_len, self.pad_id)


def response_token_counts(prefix: str, documents: tuple[int, int], seq_len: int,
                          eos_id: int | None = None) -> tuple[int, int]:
    """(trained response tokens in documents [lo, hi), how many of them lie beyond `seq_len`):
    samples are cut at seq_len, so those are never trained on."""
    examples = open_examples(prefix, eos_id)
    total = dropped = 0
    for d in range(*documents):
        trained = examples.trained(d)
        total += int(np.count_nonzero(trained))
        dropped += int(np.count_nonzero(trained[seq_len:]))
    return total, dropped
