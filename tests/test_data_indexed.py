"""The .bin/.idx files byte for byte against Megatron's documented MMIDIDX layout."""
import os
import struct

import numpy as np
import pytest

from lib.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from lib.errors import UserError

DOCS = [[5, 6, 7], [8], [9, 10, 11, 12]]


def _expected_idx(lengths, doc_ends, dtype_code, itemsize):
    # Megatron-LM megatron/core/datasets/indexed_dataset.py, _IndexWriter: magic, <Q version 1,
    # <B dtype code, <Q sequence count, <Q document count, int32 lengths, int64 byte pointers,
    # int64 document indices (leading 0).
    pointers, at = [], 0
    for n in lengths:
        pointers.append(at)
        at += n * itemsize
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
            + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_ends))
            + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
            + struct.pack(f"<{len(doc_ends)}q", *doc_ends))


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_exact_bytes(tmp_path, dtype, code):
    prefix = str(tmp_path / "ds_text_document")
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in DOCS:
            w.add_document(d)
    fmt = "<" + ("H" if dtype == np.uint16 else "i")
    flat = [t for d in DOCS for t in d]
    assert open(prefix + ".bin", "rb").read() == struct.pack(f"{fmt[0]}{len(flat)}{fmt[1]}", *flat)
    assert open(prefix + ".idx", "rb").read() == _expected_idx([3, 1, 4], [0, 1, 2, 3], code, np.dtype(dtype).itemsize)


def test_multi_sequence_documents_and_round_trip(tmp_path):
    prefix = str(tmp_path / "packed")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_sequence([1, 2])
        w.add_sequence([3])
        w.end_document()
        w.add_document([4, 5, 6])
    assert open(prefix + ".idx", "rb").read() == _expected_idx([2, 1, 3], [0, 2, 3], 8, 2)
    ds = IndexedDataset(prefix)
    assert (len(ds), ds.num_documents, ds.num_tokens) == (3, 2, 6)
    assert [list(s) for s in ds.document(0)] == [[1, 2], [3]]
    assert list(ds.document_span(0)) == [1, 2, 3] and list(ds.document_span(1, 1, 2)) == [5, 6]
    assert ds.dtype == np.uint16


def test_reads_file_built_by_hand(tmp_path):
    # A file written with struct alone (as Megatron would write it) loads here.
    (tmp_path / "m.idx").write_bytes(_expected_idx([2, 3], [0, 1, 2], 4, 4))
    (tmp_path / "m.bin").write_bytes(struct.pack("<5i", 100, 200, 70000, 1, 2))
    ds = IndexedDataset(tmp_path / "m")
    assert [list(ds[0]), list(ds[1])] == [[100, 200], [70000, 1, 2]]


def test_token_dtype_threshold():
    assert token_dtype(32000) == np.uint16 and token_dtype(128256) == np.int32


def _write(prefix):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in DOCS:
            w.add_document(d)


def test_truncated_bin_detected(tmp_path):
    prefix = str(tmp_path / "t")
    _write(prefix)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(UserError, match=r"t\.bin.*disagree"):
        IndexedDataset(prefix)


def test_truncated_idx_and_bad_header_detected(tmp_path):
    prefix = str(tmp_path / "t")
    _write(prefix)
    data = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(data[:-8])
    with pytest.raises(UserError, match=r"t\.idx.*truncated"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(b"NOTMAGIC!" + data[9:])
    with pytest.raises(UserError, match="bad header"):
        IndexedDataset(prefix)
    os.remove(prefix + ".bin")
    with pytest.raises(UserError, match=r"t\.bin: indexed dataset file not found"):
        IndexedDataset(prefix)


def test_failed_write_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="out of range"):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([70000])
    assert os.listdir(tmp_path) == []
