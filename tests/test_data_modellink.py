"""ModelLink's instruction data (`<prefix>_packed_{input_ids,labels,attention_mask}_document`),
written here as its preprocess_data.py writes it, read into training samples.

What ModelLink stores (modellink/tasks/preprocess/data_handler.py): labels aligned with the ids,
-100 on prompts; int32 files, one document per sample; `--pack` concatenates examples and pads to
--seq-length with id 0, label -100, attention 1. Its training shifts labels by one and, with
--reset-position-ids, restarts positions and attention after each EOS (decoder_packed_mtf_dataset).
The expected arrays below are written out by hand from those rules.
"""
from __future__ import annotations

import numpy as np
import pytest

from lib.data import DataConfig, build_datasets, modellink
from lib.data.indexed import IndexedDatasetWriter
from lib.errors import UserError

EOS, PAD, X = 2, 0, -100


def write_modellink(prefix, samples) -> None:
    """samples: (input_ids, labels) pairs; one document each, attention all ones, as ModelLink."""
    for suffix, column in ((modellink.IDS, 0), (modellink.LABELS, 1), (modellink.ATTENTION, None)):
        with IndexedDatasetWriter(f"{prefix}{suffix}", np.int32) as w:
            for sample in samples:
                w.add_document(np.ones(len(sample[0])) if column is None else sample[column])


PACKED = [  # two examples (prompt 1 5 | answer 6 EOS; prompt 1 7 | answer 8 9 EOS) + 3 pads: 12 tokens
    ([1, 5, 6, EOS, 1, 7, 8, 9, EOS, PAD, PAD, PAD], [X, X, 6, EOS, X, X, 8, 9, EOS, X, X, X]),
    ([1, 5, 6, 6, EOS, 1, 5, 5, 8, EOS, PAD, PAD], [X, X, 6, 6, EOS, X, X, X, 8, EOS, X, X]),
]


def test_packed_samples_split_at_eos_with_labels_shifted(tmp_path):
    write_modellink(tmp_path / "alpaca", PACKED)
    examples = modellink.ModelLinkExamples(str(tmp_path / "alpaca"), eos_id=EOS)
    assert examples.packed and examples.num_documents == 2
    s = examples.sample(0, seq_len=14, pad_id=PAD)
    assert s["tokens"].tolist() == [1, 5, 6, EOS, 1, 7, 8, 9, EOS, PAD, PAD, PAD, PAD, PAD]
    assert s["labels"].tolist() == [X, 6, EOS, X, X, 8, 9, EOS, X, X, X, X, X, X]
    assert s["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 0, 0]
    assert s["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    cut = examples.sample(1, seq_len=8, pad_id=PAD)  # longer than seq_len: cut, as ModelLink's _cut_token
    assert cut["labels"].tolist() == [X, 6, 6, EOS, X, X, X, X]
    assert cut["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]


def test_unpacked_samples_are_one_example_each(tmp_path):
    # Multi-turn, with an EOS inside the example: without packing it stays one segment.
    write_modellink(tmp_path / "chat", [([1, 5, 6, EOS, 7, 8, EOS], [X, X, 6, EOS, X, 8, EOS]),
                                        ([1, 4, 9, EOS], [X, X, 9, EOS])])
    examples = modellink.ModelLinkExamples(str(tmp_path / "chat"), eos_id=None)
    assert not examples.packed
    s = examples.sample(0, seq_len=8, pad_id=PAD)
    assert s["labels"].tolist() == [X, 6, EOS, X, 8, EOS, X, X]
    assert s["segment_ids"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    assert s["positions"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]

    # build_datasets (what runners.sft calls) takes ModelLink's --data-path prefix as it is.
    sets = build_datasets(DataConfig(paths=(str(tmp_path / "chat"),), seq_len=8, split="1,0,0"),
                          {"train": 4}, vocab_size=16)
    assert {tuple(sets["train"][i]["labels"]) for i in range(4)} == {
        (X, 6, EOS, X, 8, EOS, X, X), (X, 9, EOS, X, X, X, X, X)}


def test_bad_modellink_data(tmp_path):
    write_modellink(tmp_path / "packed", PACKED)
    with pytest.raises(UserError, match=r"packed ModelLink data \(every sample 12 tokens\) is split into its "
                                        r"examples at the EOS token: set data.tokenizer"):
        build_datasets(DataConfig(paths=(str(tmp_path / "packed"),), seq_len=12, split="1,0,0"), {"train": 2})
    write_modellink(tmp_path / "labels", [([1, 5, 6], [X, -200, 6])])
    with pytest.raises(UserError, match=r"labels_packed_labels_document.bin: holds label -200; labels must be "
                                        r"token ids of the model's vocabulary \(0..9\) or -100"):
        build_datasets(DataConfig(paths=(str(tmp_path / "labels"),), seq_len=12, split="1,0,0"), {"train": 2},
                       vocab_size=10)
    (tmp_path / f"packed{modellink.LABELS}.bin").unlink()
    with pytest.raises(UserError, match=r"packed_packed_labels_document.bin/.idx: missing"):
        modellink.ModelLinkExamples(str(tmp_path / "packed"), eos_id=EOS)
    write_modellink(tmp_path / "other", PACKED[:1])
    for ext in (".bin", ".idx"):
        (tmp_path / f"other{modellink.LABELS}{ext}").replace(tmp_path / f"packed{modellink.LABELS}{ext}")
    with pytest.raises(UserError, match=r"packed_packed_labels_document: its documents do not match"):
        modellink.ModelLinkExamples(str(tmp_path / "packed"), eos_id=EOS)
