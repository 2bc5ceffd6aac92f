"""lib/data/cache.py: a damaged sample-index cache is rebuilt with a warning, never a traceback."""
import numpy as np
import pytest

from lib.data import DataConfig, build_datasets
from lib.data.indexed import IndexedDatasetWriter


def samples(ds):
    return [ds[i]["tokens"].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("damage", ["truncated array", "cut header", "deleted array", "cut description"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, capsys, damage):
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for _ in range(30):
            w.add_document(rng.integers(0, 500, int(rng.integers(5, 40))))
    cfg = DataConfig(paths=(str(tmp_path / "d"),), split="1", seq_len=8, cache_dir=str(tmp_path / "cache"))
    expected = samples(build_datasets(cfg, {"train": 50})["train"])
    [shuffle] = (tmp_path / "cache").glob("gpt-train-*-shuffle.npy")
    [description] = (tmp_path / "cache").glob("gpt-train-*.json")
    if damage == "truncated array":
        shuffle.write_bytes(shuffle.read_bytes()[:-16])   # a full disk while another tool copied it
    elif damage == "cut header":
        shuffle.write_bytes(shuffle.read_bytes()[:40])
    elif damage == "deleted array":
        shuffle.unlink()
    else:
        description.write_text(description.read_text()[:25])
    capsys.readouterr()

    assert samples(build_datasets(cfg, {"train": 50})["train"]) == expected
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {description}: the cached dataset index is damaged (")
    assert err.endswith("); rebuilding it\n")
    # rewritten: the next run loads it silently
    assert samples(build_datasets(cfg, {"train": 50})["train"]) == expected
    assert capsys.readouterr().err == ""
