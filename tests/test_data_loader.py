"""Batches: rank slices, exact resumption from consumed_samples, instruction masking and packing."""
import numpy as np
import pytest
import torch

from lib.data import DataConfig, batches, build_datasets
from lib.data.indexed import IndexedDatasetWriter
from lib.data.instruction import pack
from lib.data.sft_dataset import IDS_SUFFIX, MASK_SUFFIX, sample_arrays
from lib.errors import UserError


class Numbered:
    """Sample i is [i, i+1, ...]: batches can be checked against the sample ids they must hold."""

    def __init__(self, n, seq=3):
        self.n, self.seq = n, seq

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": np.arange(i, i + self.seq), "labels": np.arange(i + 1, i + 1 + self.seq)}


def test_ranks_split_each_global_batch():
    ds = Numbered(64)
    per_rank = [list(batches(ds, 8, 0, r, 4)) for r in range(4)]
    assert len(per_rank[0]) == 8
    for step in range(8):
        rows = torch.cat([per_rank[r][step]["tokens"][:, 0] for r in range(4)])
        assert rows.tolist() == list(range(step * 8, step * 8 + 8))
    b = per_rank[1][0]
    assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (2, 3)
    assert torch.equal(b["labels"], b["tokens"] + 1)


def test_resume_yields_exactly_the_rest(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for d in range(30):
            w.add_document(np.arange(d, d + 1 + d % 9))
    ds = build_datasets(DataConfig(paths=(str(tmp_path / "d"),), split="1", seq_len=5, seed=2), {"train": 48})["train"]
    full = list(batches(ds, 6, 0, rank=1, world=2, micro_batch=1))
    resumed = list(batches(ds, 6, 18, rank=1, world=2, micro_batch=1))
    assert len(full) == len(resumed) + 9  # 3 global batches x 3 micro-batches of rank 1 consumed
    for a, b in zip(full[9:], resumed):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(UserError, match="not a multiple of the global batch"):
        next(batches(ds, 6, 5, 0, 2))
    with pytest.raises(UserError, match="not divisible by the data-parallel size"):
        next(batches(ds, 6, 0, 0, 4))


def test_instruction_labels_mask_prompt_and_never_cross_examples():
    a = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1]))  # prompt 10 11, response 12 13
    b = (np.array([20, 21, 22]), np.array([0, 1, 1]))
    s = sample_arrays([a[0], b[0]], [a[1], b[1]], seq_len=10, pad_id=0)
    assert s["tokens"].tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0, 0]
    # label j = token j+1 when that token is a trained response token; the last token of each
    # example predicts nothing (the next token belongs to another example); padding is ignored
    assert s["labels"].tolist() == [-100, 12, 13, -100, 21, 22, -100, -100, -100, -100]
    assert s["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    assert s["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 0, 0]
    # truncated to the sequence length
    t = sample_arrays([a[0], b[0]], [a[1], b[1]], seq_len=5, pad_id=0)
    assert t["tokens"].tolist() == [10, 11, 12, 13, 20] and t["labels"].tolist() == [-100, 12, 13, -100, -100]


def test_pack_is_greedy_and_ordered():
    ex = [(list(range(n)), [1] * n) for n in (3, 4, 2, 5, 1)]
    groups = list(pack(ex, 7))
    assert [[len(e[0]) for e in g] for g in groups] == [[3, 4], [2, 5], [1]]


def test_sft_dataset_from_packed_files(tmp_path):
    prefix = str(tmp_path / "sft")
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    with IndexedDatasetWriter(prefix + IDS_SUFFIX, np.uint16) as wi, IndexedDatasetWriter(prefix + MASK_SUFFIX, np.uint8) as wm:
        for group in pack(examples, 6):
            for ids, mask in group:
                wi.add_sequence(ids)
                wm.add_sequence(mask)
            wi.end_document()
            wm.end_document()
    ds = build_datasets(DataConfig(paths=(prefix,), split="1", seq_len=6, seed=0), {"train": 2})["train"]
    got = sorted(tuple(ds[i]["segment_ids"].tolist()) for i in range(2))
    assert got == [(1, 1, 1, 1, 0, 0), (1, 1, 1, 2, 2, 0)]
    b = next(batches(ds, 2, 0, 0, 1))
    assert set(b) == {"tokens", "labels", "positions", "segment_ids"} and b["tokens"].shape == (2, 6)
    assert (b["labels"] != -100).sum().item() == 5  # 2 + 1 + 2 trained next-token targets
