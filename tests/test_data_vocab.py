"""Token ids against the model's vocabulary (lib/data/vocab.py): refused when the dataset opens."""
import os

import numpy as np
import pytest

import lib.data
from lib.data import DataConfig, build_datasets, vocab
from lib.data.indexed import IndexedDataset, IndexedDatasetWriter
from lib.data.sft_dataset import IDS_SUFFIX, MASK_SUFFIX
from lib.errors import UserError
from runners import pretrain


def write_text_data(prefix, largest_id, n_docs=20, dtype=np.uint16):
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in range(n_docs):
            doc = rng.integers(0, 100, 30)
            if d == n_docs // 2:
                doc[7] = largest_id  # one id, in the middle of the file
            w.add_document(doc)
    return str(prefix)


def test_token_range_scans_in_chunks(tmp_path, monkeypatch):
    prefix = write_text_data(tmp_path / "d", largest_id=600, dtype=np.int32)
    with IndexedDatasetWriter(tmp_path / "neg", np.int32) as w:
        w.add_document([5, -3, 9])
    monkeypatch.setattr(vocab, "CHUNK_TOKENS", 64)  # several chunks, the id in one of them
    assert vocab.token_id_range(IndexedDataset(prefix)) == (0, 600)
    assert vocab.token_id_range(IndexedDataset(tmp_path / "neg")) == (-3, 9)
    with pytest.raises(UserError, match=r"neg\.bin: holds token id -3, a negative id"):
        vocab.check_token_ids(IndexedDataset(tmp_path / "neg"), 512)


def test_ids_beyond_the_vocabulary_are_refused_naming_file_id_and_size(tmp_path):
    prefix = write_text_data(tmp_path / "big_text_document", largest_id=600)
    cfg = DataConfig(paths=(prefix,), split="1", seq_len=8)
    with pytest.raises(UserError, match=rf"^{prefix}\.bin: holds token id 600, but the model's vocabulary "
                                        r"has 512 ids \(0\.\.511\): the data was tokenized with a larger"):
        build_datasets(cfg, {"train": 4}, vocab_size=512)
    assert len(build_datasets(cfg, {"train": 4}, vocab_size=601)["train"]) == 4  # 600 is the last id


def test_the_range_is_cached_per_file_version(tmp_path, monkeypatch):
    prefix = write_text_data(tmp_path / "d", largest_id=99)
    data = IndexedDataset(prefix)
    assert vocab.token_id_range(data) == (0, 99)

    def must_not_scan(_):
        raise AssertionError("scanned again")
    monkeypatch.setattr(vocab, "_scan", must_not_scan)
    assert vocab.token_id_range(data) == (0, 99)  # the cache answers
    monkeypatch.undo()
    write_text_data(prefix, largest_id=700)  # the same prefix rewritten: another size/mtime
    st = os.stat(f"{prefix}.bin")
    os.utime(f"{prefix}.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on a coarse clock
    assert vocab.token_id_range(IndexedDataset(prefix)) == (0, 700)


def test_instruction_data_and_its_pad_id(tmp_path, monkeypatch):
    prefix = str(tmp_path / "sft")
    with IndexedDatasetWriter(prefix + IDS_SUFFIX, np.uint16) as ids, \
            IndexedDatasetWriter(prefix + MASK_SUFFIX, np.uint8) as mask:
        for example in ([1, 5, 6, 2], [1, 7, 1000, 2]):
            ids.add_document(example)
            mask.add_document([0, 0, 1, 1])
    cfg = DataConfig(paths=(prefix,), split="1", seq_len=8)
    with pytest.raises(UserError, match=rf"sft{IDS_SUFFIX}\.bin: holds token id 1000, .* has 512 ids"):
        build_datasets(cfg, {"train": 2}, vocab_size=512)
    assert len(build_datasets(cfg, {"train": 2}, vocab_size=1001)["train"]) == 2
    # Padding is embedded too: a tokenizer whose pad id the model lacks is refused.
    monkeypatch.setattr(lib.data, "_pad_id", lambda cfg: 1001)
    with pytest.raises(UserError, match="data.tokenizer tok.model: its pad id 1001 is outside the model's "
                                        "vocabulary of 1001 ids"):
        build_datasets(DataConfig(paths=(prefix,), split="1", seq_len=8, tokenizer="tok.model"), {"train": 2},
                       vocab_size=1001)


def test_pretrain_refuses_data_from_a_larger_tokenizer(tmp_path):
    """The trainer passes the model's vocabulary: model=tiny has 512 ids, the data holds 600."""
    prefix = write_text_data(tmp_path / "big_text_document", largest_id=600)
    with pytest.raises(UserError, match=r"big_text_document\.bin: holds token id 600, but the model's "
                                        r"vocabulary has 512 ids"):
        pretrain.main(["model=tiny", f"data.paths=[{prefix}]", "data.seq_len=16", "data.split=1",
                       "train.steps=2", "train.global_batch=2", "train.eval_every=0", "optim.warmup_steps=0",
                       "optim.decay_steps=2", "train.step.compile=false", f"out_dir={tmp_path / 'run'}"])
