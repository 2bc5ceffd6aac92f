"""Our GPT datasets against megatron-core's own outputs, recorded in tests/data/megatron_*.npz.

The fixtures were written by megatron-core 0.16.1 (GPTDataset through BlendedMegatronDatasetBuilder)
running `bench/megatron_parity.py --write-fixtures` in a venv of its own: CI has no megatron-core.
Each holds a data layout (sequence lengths and documents; token k of a .bin is `base + k`, so a
sample's tokens tell where it came from), the settings, and per split megatron-core's samples
(tokens + last label) and index arrays. Here the same files are written by our writer and read by
`build_datasets`, the path training takes.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from lib.data import DataConfig, build_datasets
from lib.data.blend import BlendedDataset
from lib.data.gpt_dataset import SPLITS
from lib.data.indexed import IndexedDatasetWriter

FIXTURES = Path(__file__).parent / "data"
CASES = ["ordinary", "multi_epoch", "split", "blended", "weighted_single_path", "multi_sequence"]


def _write(prefix: str, lengths: np.ndarray, document_indices: np.ndarray, base: int) -> None:
    dtype = np.uint16 if base + int(lengths.sum()) < 65500 else np.int32
    at = base
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in range(len(document_indices) - 1):
            for s in range(document_indices[d], document_indices[d + 1]):
                w.add_sequence(np.arange(at, at + lengths[s]))
                at += int(lengths[s])
            w.end_document()


def _datasets(case: str, tmp_path: Path) -> tuple[np.lib.npyio.NpzFile, dict]:
    f = np.load(FIXTURES / f"megatron_{case}.npz")
    settings = json.loads(str(f["case"]))
    paths = []
    for i in range(len([k for k in f.files if k.endswith(".base")])):
        prefix = str(tmp_path / f"d{i}_text_document")
        _write(prefix, f[f"data{i}.sequence_lengths"], f[f"data{i}.document_indices"], int(f[f"data{i}.base"]))
        paths.append(prefix)
    weights = tuple(settings["weights"]) if settings["weights"] is not None else None
    cfg = DataConfig(paths=tuple(paths), weights=weights, split=settings["split"], seq_len=settings["seq_len"],
                     seed=settings["seed"], cache_dir=str(tmp_path / "cache"))
    sizes = {name: len(f[f"{name}.samples"]) for name in SPLITS if f"{name}.samples" in f.files}
    return f, build_datasets(cfg, sizes)


@pytest.mark.parametrize("case", CASES)
def test_same_samples_and_indices_as_megatron_core(case, tmp_path):
    f, sets = _datasets(case, tmp_path)
    assert sets, f"{case}: the fixture records no split"
    for name, ours in sets.items():
        expected = f[f"{name}.samples"]
        got = np.stack([np.concatenate([ours[i]["tokens"], ours[i]["labels"][-1:]]) for i in range(len(expected))])
        np.testing.assert_array_equal(got, expected, err_msg=f"{case} {name}: samples")
        blended = f"{name}.dataset_index" in f.files
        assert isinstance(ours, BlendedDataset) == blended, f"{case} {name}: megatron-core blends iff we do"
        if blended:
            assert [d.num_samples for d in ours.datasets] == f[f"{name}.num_samples"].tolist()
            for key in ("dataset_index", "dataset_sample_index"):
                mine = getattr(ours, key)
                assert mine.dtype == f[f"{name}.{key}"].dtype
                np.testing.assert_array_equal(mine, f[f"{name}.{key}"], err_msg=f"{case} {name}: {key}")
            continue
        for key, mine in (("doc", ours.doc_index), ("sample", ours.sample_index), ("shuffle", ours.shuffle_index)):
            assert mine.dtype == f[f"{name}.{key}"].dtype, f"{case} {name}: {key} index dtype"
            np.testing.assert_array_equal(mine, f[f"{name}.{key}"], err_msg=f"{case} {name}: {key} index")


def test_fixtures_cover_what_differed():
    # The recorded cases exercise each behaviour that once differed from megatron-core's (a
    # regenerated fixture must keep doing so), so going back to any of them fails the test above.
    split = np.load(FIXTURES / "megatron_split.npz")
    assert json.loads(str(split["case"]))["split"] == "969,30,1" and len(split["data0.sequence_lengths"]) == 520
    assert sorted(set(split["train.doc"].tolist())) == list(range(504))  # cumulative rounding, not [0, 503)
    blended = np.load(FIXTURES / "megatron_blended.npz")
    assert blended["train.num_samples"].tolist() == [4, 5, 5]  # ceil(ceil(w * 10) * 1.005), not [3, 4, 5]
    multi = np.load(FIXTURES / "megatron_multi_sequence.npz")
    docs = multi["data0.document_indices"]
    assert np.diff(docs).max() > 1 and multi["data0.base"] >= 65500  # several sequences a document; int32 tokens
    assert multi["train.sample"].dtype == np.int32  # megatron-core's sample index dtype
