"""Sample/shuffle indices against naive references, splits, caching, blending, cross-process determinism."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lib.data import DataConfig, build_datasets
from lib.data.blend import build_blending_indices, normalize_weights
from lib.data.gpt_dataset import GPTDataset, build_sample_index, split_ranges
from lib.data.indexed import IndexedDataset, IndexedDatasetWriter
from lib.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _make(prefix, n_docs=40, seed=0, empty_every=7):
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in range(n_docs):
            n = 0 if d % empty_every == 3 else int(rng.integers(1, 30))
            doc = rng.integers(0, 60000, n)
            docs.append(doc)
            w.add_document(doc)
    return docs


def _megatron_loop_sample_index(lengths, seq_len, num_samples):
    """The sample-index walk as Megatron's helpers describe it, one document at a time."""
    out = [(0, 0)]
    doc, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_len + 1
        while remaining:
            left = lengths[doc] - offset
            remaining -= left
            if remaining <= 0:
                offset += remaining + left - 1  # the last token is shared with the next sample
                remaining = 0
            else:
                doc, offset = doc + 1, 0
        out.append((doc, offset))
    return np.array(out)


@pytest.mark.parametrize("seq_len,first_length", [(1, 5), (4, 0), (13, 3)])
def test_sample_index_matches_loop_reference(seq_len, first_length):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(0, 20, 200)
    lengths[0] = first_length
    n = (int(lengths.sum()) - 1) // seq_len
    ours = build_sample_index(lengths, seq_len, n)
    ref = _megatron_loop_sample_index(lengths, seq_len, n)
    # identical (sequence, offset) pairs, empty sequences included, even a first one (where the
    # walk starts at (0, 0)); int32 as in megatron-core
    assert np.array_equal(ours, ref) and ours.dtype == np.int32
    starts = np.concatenate([[0], np.cumsum(lengths)])
    assert np.array_equal(starts[ours[:, 0]] + ours[:, 1], np.arange(n + 1) * seq_len)


def test_samples_equal_naive_stream(tmp_path):
    docs = _make(str(tmp_path / "d"))
    data = IndexedDataset(tmp_path / "d")
    seq_len = 8
    ds = GPTDataset(data, (0, len(docs)), num_samples=150, seq_len=seq_len, seed=3, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 150 and len(ds.shuffle_index) > 150  # whole epochs indexed, 150 exposed
    # naive reference: concatenate documents in document-index order, slice overlapping windows
    stream = np.concatenate([docs[d] for d in ds.doc_index])
    epochs = len(ds.doc_index) // len(docs)
    assert sorted(ds.doc_index) == sorted(list(range(len(docs))) * epochs)
    assert sorted(ds.shuffle_index) == list(range(len(ds.shuffle_index)))
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        item = ds[i]
        window = stream[j * seq_len: j * seq_len + seq_len + 1]
        assert np.array_equal(item["tokens"], window[:-1]) and np.array_equal(item["labels"], window[1:])
    # cached: a second build loads the same arrays from disk instead of rebuilding
    again = GPTDataset(data, (0, len(docs)), num_samples=150, seq_len=seq_len, seed=3, cache_dir=str(tmp_path / "c"))
    assert isinstance(again.doc_index, np.memmap) and np.array_equal(again.shuffle_index, ds.shuffle_index)
    other = GPTDataset(data, (0, len(docs)), num_samples=150, seq_len=seq_len, seed=4, cache_dir=str(tmp_path / "c"))
    assert not np.array_equal(other.shuffle_index, ds.shuffle_index)


def test_split_ranges():
    assert split_ranges(1000, "969,30,1") == {"train": (0, 969), "valid": (969, 999), "test": (999, 1000)}
    # megatron-core rounds each cumulative boundary (0.969 * 520 = 503.88 -> 504), not each share
    assert split_ranges(520, "969,30,1") == {"train": (0, 504), "valid": (504, 519), "test": (519, 520)}
    assert split_ranges(10, "1") == {"train": (0, 10), "valid": (10, 10), "test": (10, 10)}
    r = split_ranges(7, "1,1,1")
    assert r["train"][0] == 0 and r["test"][1] == 7 and r["train"][1] == r["valid"][0]
    with pytest.raises(UserError, match="split"):
        split_ranges(10, "a,b")


def test_build_datasets_splits_and_errors(tmp_path):
    _make(str(tmp_path / "d_text_document"), n_docs=100)
    cfg = DataConfig(paths=(str(tmp_path / "d_text_document"),), split="90,10,0", seq_len=8, seed=1)
    sets = build_datasets(cfg, {"train": 64, "valid": 8, "test": 0})
    assert set(sets) == {"train", "valid"} and (len(sets["train"]), len(sets["valid"])) == (64, 8)
    with pytest.raises(UserError, match="test set no documents"):
        build_datasets(cfg, {"test": 4})
    with pytest.raises(UserError, match="longer than the model's maximum"):
        build_datasets(cfg, {"train": 4}, max_seq_len=4)
    with pytest.raises(UserError, match="found neither"):
        build_datasets(DataConfig(paths=(str(tmp_path / "nope"),)), {"train": 4})
    with pytest.raises(UserError, match="2 weights for 1 paths"):
        build_datasets(DataConfig(paths=cfg.paths, weights=(1.0, 2.0)), {"train": 4})


def test_blending_indices_track_weights_in_every_prefix():
    w = normalize_weights([3, 1, 6], 3)
    ds, ss = build_blending_indices(w, 5000)
    counts = np.zeros(3)
    for i, d in enumerate(ds):
        counts[d] += 1
        # the greedy choice keeps every prefix within about one sample of its share
        assert np.all(np.abs(counts - np.array(w) * (i + 1)) <= 1.0 + 1e-9)
    for d in range(3):  # per-dataset sample ids are 0, 1, 2, ... in order
        assert np.array_equal(ss[ds == d], np.arange((ds == d).sum()))


def test_blended_datasets_proportions(tmp_path):
    _make(str(tmp_path / "a"), n_docs=60, seed=1)
    _make(str(tmp_path / "b"), n_docs=60, seed=2)
    cfg = DataConfig(paths=(str(tmp_path / "a"), str(tmp_path / "b")), weights=(0.75, 0.25), split="1", seq_len=4)
    blend = build_datasets(cfg, {"train": 400})["train"]
    assert len(blend) == 400
    assert np.count_nonzero(blend.dataset_index == 0) == 300
    assert blend[399]["tokens"].shape == (4,)


def test_same_samples_in_two_processes(tmp_path):
    _make(str(tmp_path / "d"), n_docs=50)
    script = textwrap.dedent(f"""
        import hashlib, sys
        from lib.data import DataConfig, build_datasets
        cfg = DataConfig(paths=({str(tmp_path / 'd')!r},), split="1", seq_len=16, seed=7, cache_dir=sys.argv[1])
        ds = build_datasets(cfg, {{"train": 40}})["train"]
        h = hashlib.sha256()
        for i in range(40):
            h.update(ds[i]["tokens"].tobytes())
        print(h.hexdigest())
    """)
    outs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / f"cache{k}")], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout for k in range(2)]
    assert outs[0] == outs[1] and len(outs[0].strip()) == 64


def test_other_ranks_wait_for_rank0_and_never_build(tmp_path, monkeypatch):
    from lib.data import cache

    def must_not_build():
        raise AssertionError("only rank 0 builds")

    monkeypatch.setattr(cache, "distributed_rank", lambda: 1)
    monkeypatch.setattr(cache, "WAIT_TIMEOUT_S", 0.3)
    with pytest.raises(UserError, match="rank 0 did not build"):
        cache.cached_arrays(tmp_path, "k", {"a": 1}, must_not_build)
    monkeypatch.setattr(cache, "distributed_rank", lambda: 0)
    cache.cached_arrays(tmp_path, "k", {"a": 1}, lambda: {"x": np.arange(3)})
    monkeypatch.setattr(cache, "distributed_rank", lambda: 1)
    assert cache.cached_arrays(tmp_path, "k", {"a": 1}, must_not_build)["x"].tolist() == [0, 1, 2]


def test_indices_equal_megatron_golden_values():
    # Produced by Megatron-LM's own _build_document_index / _build_shuffle_index (gpt_dataset.py,
    # commit d98e8a64dd) for these lengths, documents 3..12, seq_len 4, 14 samples, seed 1234: two
    # epochs, the second used for 3 of its 11 samples, so it is shuffled separately.
    from lib.data.gpt_dataset import build_indices

    lengths = np.array([5, 3, 0, 7, 2, 9, 4, 1, 6, 8, 3, 5, 2, 7])
    ours = build_indices(np.arange(3, 13), lengths, num_samples=14, seq_len=4, seed=1234)
    assert ours["doc"].tolist() == [10, 5, 12, 4, 3, 11, 7, 8, 9, 6, 10, 6, 8, 4, 7, 11, 3, 5, 9, 12]
    assert ours["shuffle"].tolist() == [8, 1, 7, 10, 9, 5, 4, 3, 0, 2, 6, 19, 16, 17, 12, 15, 22, 13, 14, 21, 20, 11, 18]
    assert (ours["doc"].dtype, ours["shuffle"].dtype) == (np.int32, np.uint32)
    assert np.array_equal(ours["sample"], _megatron_loop_sample_index(lengths[ours["doc"]], 4, 23))


def test_index_cache_of_an_older_version_is_not_reused(tmp_path, monkeypatch):
    # Caches written before the megatron-core alignment (documents split and shuffled, int64
    # sample index) must be rebuilt, not read back: the version is part of the cache key.
    from lib.data import gpt_dataset

    _make(str(tmp_path / "d"), n_docs=20)
    data = IndexedDataset(tmp_path / "d")
    with monkeypatch.context() as m:
        m.setattr(gpt_dataset, "INDEX_VERSION", gpt_dataset.INDEX_VERSION - 1)
        GPTDataset(data, (0, 20), 10, 4, 1, str(tmp_path / "c"))
    ds = GPTDataset(data, (0, 20), 10, 4, 1, str(tmp_path / "c"))
    assert not isinstance(ds.sample_index, np.memmap) and ds.sample_index.dtype == np.int32
    assert len(list((tmp_path / "c").glob("gpt-train-*.json"))) == 2
