"""The generated default corpus: deterministic, real text, built once and reused."""
import os

from lib.data import DataConfig, build_datasets
from lib.data.corpus import corpus_documents, default_dataset, procedural_documents
from lib.data.indexed import IndexedDataset
from lib.tokenizer import load_tokenizer


def test_corpus_is_deterministic_prose():
    a, b = corpus_documents(150_000), corpus_documents(150_000)
    assert a == b and sum(map(len, a)) >= 150_000
    assert list(procedural_documents(5000, seed=3)) == list(procedural_documents(5000, seed=3))


def test_default_dataset_built_once(tmp_path):
    prefix, tok_path = default_dataset(tmp_path, max_bytes=150_000, vocab_size=600)
    ds, tok = IndexedDataset(prefix), load_tokenizer(tok_path)
    assert tok.vocab_size == 600 and ds.num_documents > 5 and ds.num_tokens > 10_000
    first = ds.document_span(0)
    assert first[0] == tok.bos_id and first[-1] == tok.eos_id
    assert corpus_documents(150_000)[0] == tok.decode(first[1:-1])
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    assert default_dataset(tmp_path, max_bytes=150_000, vocab_size=600) == (prefix, tok_path)
    assert os.stat(prefix + ".bin").st_mtime_ns == mtime
    train = build_datasets(DataConfig(paths=(prefix,), seq_len=32), {"train": 16})["train"]
    assert train[0]["tokens"].shape == (32,)
