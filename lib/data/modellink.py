"""ModelLink / MindSpeed-LLM instruction data, read as their `preprocess_data.py` wrote it.

Their instruction handlers (`--handler-name AlpacaStyleInstructionHandler`, ShareGPT style,
the older GeneralInstructionHandler, ...) write three indexed datasets, one document per sample:

    <prefix>_packed_input_ids_document       token ids
    <prefix>_packed_labels_document          aligned with the ids: the token where it is trained,
                                             -100 on prompts and padding (ModelLink's loss shifts
                                             by one: logits[:-1] against labels[1:])
    <prefix>_packed_attention_mask_document  the tokenizer's mask: all ones, padding included

("packed" names the three-file layout, not packing.) With `--pack` a document is several examples
concatenated and padded with id 0 to `--seq-length`; ModelLink keeps them apart only at training
time, with `--reset-position-ids`, which restarts positions and attention after every EOS token
(its tokenizer's `eos`). The attention-mask file marks no boundary. So here packed data (every
document the same length, as the packer writes it) becomes one segment per EOS-terminated example,
and unpacked data one segment per document; a zero in the attention mask marks padding.

A sample becomes what `lib.data.sft_dataset` yields for our own format: tokens, labels shifted to
"next token" (never across segments), positions restarting per segment, segment ids.
"""
from __future__ import annotations

import numpy as np

from lib.data.indexed import IndexedDataset, exists
from lib.errors import UserError
from lib.labels import IGNORE_INDEX
IDS, LABELS, ATTENTION = "_packed_input_ids_document", "_packed_labels_document", "_packed_attention_mask_document"


def is_modellink(prefix: str) -> bool:
    return exists(prefix + IDS)


class ModelLinkExamples:
    """The three ModelLink files of `prefix`; `sample(d, ...)` is document d as training arrays."""

    def __init__(self, prefix: str, eos_id: int | None):
        for suffix in (IDS, LABELS, ATTENTION):
            if not exists(prefix + suffix):
                raise UserError(f"{prefix}{suffix}.bin/.idx: missing (ModelLink instruction data is "
                                f"{prefix}{IDS}, {LABELS} and {ATTENTION})")
        self.ids, self.labels, self.attention = (IndexedDataset(prefix + s) for s in (IDS, LABELS, ATTENTION))
        for other, suffix in ((self.labels, LABELS), (self.attention, ATTENTION)):
            if not (np.array_equal(self.ids.sequence_lengths, other.sequence_lengths)
                    and np.array_equal(self.ids.document_indices, other.document_indices)):
                raise UserError(f"{prefix}{suffix}: its documents do not match {prefix}{IDS} "
                                "(written by different runs?)")
        ends = np.concatenate([[0], np.cumsum(self.ids.sequence_lengths, dtype=np.int64)])
        lengths = ends[self.ids.document_indices[1:]] - ends[self.ids.document_indices[:-1]]  # per sample
        self.packed = len(lengths) > 1 and bool((lengths == lengths[0]).all())
        if self.packed and eos_id is None:
            raise UserError(f"{prefix}{IDS}: packed ModelLink data (every sample {lengths[0]} tokens) is split "
                            "into its examples at the EOS token: set data.tokenizer to the tokenizer it was "
                            "made with")
        self.eos_id = eos_id
        self.key_file = prefix + IDS

    @property
    def num_documents(self) -> int:
        return self.ids.num_documents

    def trained(self, d: int) -> np.ndarray:
        """Per token of document d: is it a trained (labelled) token."""
        return np.concatenate(self.labels.document(d)) != IGNORE_INDEX

    def sample(self, d: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
        ids = np.concatenate(self.ids.document(d)).astype(np.int64)[:seq_len]
        labels = np.concatenate(self.labels.document(d)).astype(np.int64)[:seq_len]
        attended = np.concatenate(self.attention.document(d))[:seq_len] != 0
        n = len(ids)
        if self.packed:  # a new example starts after each EOS (ModelLink's --reset-position-ids)
            segment = 1 + np.concatenate([[0], np.cumsum(ids[:-1] == self.eos_id)]).astype(np.int64)[:n]
        else:
            segment = np.ones(n, dtype=np.int64)
        segment = np.where(attended, segment, 0)
        starts = np.flatnonzero(np.diff(segment, prepend=-1))  # first index of every run
        positions = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))

        out = {"tokens": np.full(seq_len, pad_id, dtype=np.int64),
               "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
               "positions": np.zeros(seq_len, dtype=np.int64),
               "segment_ids": np.zeros(seq_len, dtype=np.int64)}
        out["tokens"][:n] = ids
        out["positions"][:n] = positions
        out["segment_ids"][:n] = segment
        if n > 1:
            same = (segment[:-1] == segment[1:]) & (segment[:-1] != 0)
            out["labels"][:n - 1] = np.where(same & (labels[1:] != IGNORE_INDEX), labels[1:], IGNORE_INDEX)
        return out
