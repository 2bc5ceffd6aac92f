"""Our GPT datasets against megatron-core's, sample by sample, on data written by lib.data.indexed.

megatron-core is a test-only reference, never a dependency: run this with a Python that has it,
not with the project's venv (our lib is imported from this checkout):

    python3 -m venv /tmp/megatron
    /tmp/megatron/bin/pip install torch==2.13.0 megatron-core==0.16.1 pyyaml tqdm  # pyyaml, tqdm: our lib
    /tmp/megatron/bin/python bench/megatron_parity.py                   # compare, exit 1 on a difference
    /tmp/megatron/bin/python bench/megatron_parity.py --write-fixtures  # and rewrite tests/data/megatron_*.npz

(The megatron-core wheel ships its C++ index helpers compiled, `helpers_cpp`; nothing to build.)

Each case writes `.bin/.idx` files whose token at position k of the `.bin` is `base + k`, so a
sample's tokens say exactly where in which file it came from. It builds megatron-core's datasets
with BlendedMegatronDatasetBuilder and ours with lib.data.build_datasets from the same prefixes,
weights, split, sequence length and seed, then compares every sample's tokens and labels, the
document, sample and shuffle indices (values and dtypes), each split's sequence range, and for
blends the per-dataset sample counts and the dataset / dataset-sample indices. Besides the named
cases (ordinary, multi-epoch, split, blended, multi-sequence, one weighted path), `--random N`
cases mix all of these with random sizes.

The named cases marked `fixture` are recorded as megatron-core produced them in tests/data/, where
tests/test_data_megatron.py compares our output with them in the ordinary test suite.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.data import DataConfig, build_datasets  # noqa: E402
from lib.data.blend import BlendedDataset  # noqa: E402
from lib.data.gpt_dataset import SPLITS, parse_split, split_ranges  # noqa: E402
from lib.data.indexed import IndexedDataset, IndexedDatasetWriter  # noqa: E402

FIXTURES = REPO / "tests" / "data"


@dataclass(frozen=True)
class Layout:
    """One indexed dataset: its sequence lengths, how sequences group into documents, token base."""
    sequence_lengths: tuple[int, ...]
    document_indices: tuple[int, ...]  # document d = sequences [doc[d], doc[d + 1])
    base: int = 0  # tokens are base + position in .bin; base >= 65500 makes an int32 file


@dataclass(frozen=True)
class Case:
    name: str
    datasets: tuple[Layout, ...]
    sizes: tuple[int, int, int]  # samples asked for train, valid, test
    split: str = "1"
    weights: tuple[float, ...] | None = None
    seq_len: int = 16
    seed: int = 1234
    fixture: bool = False


def random_layout(rng: np.random.Generator, num_documents: int, max_len: int, max_sequences: int = 1,
                  empty_share: float = 0.1, base: int = 0) -> Layout:
    per_doc = rng.integers(1, max_sequences + 1, num_documents)
    lengths = rng.integers(1, max_len + 1, int(per_doc.sum()))
    lengths[rng.random(len(lengths)) < empty_share] = 0  # empty sequences happen (empty lines)
    return Layout(tuple(int(x) for x in lengths), tuple(int(x) for x in np.concatenate([[0], np.cumsum(per_doc)])),
                  base)


def write_layout(prefix: str, layout: Layout) -> None:
    dtype = np.uint16 if layout.base + sum(layout.sequence_lengths) < 65500 else np.int32
    lengths, doc = layout.sequence_lengths, layout.document_indices
    at = layout.base
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in range(len(doc) - 1):
            for s in range(doc[d], doc[d + 1]):
                w.add_sequence(np.arange(at, at + lengths[s]))
                at += lengths[s]
            w.end_document()


def named_cases() -> list[Case]:
    rng = np.random.default_rng(0)
    blend_weights = (0.25, 0.35, 0.4)
    n_blend = 10
    # The blend's size is chosen where megatron-core's per-dataset count differs from the older
    # ceil(w * n * 1.005), so the case would catch the old formula.
    assert ([math.ceil(math.ceil(n_blend * w) * 1.005) for w in blend_weights]
            != [math.ceil(n_blend * w * 1.005) for w in blend_weights])
    return [
        Case("ordinary", (random_layout(rng, 40, 30),), (60, 0, 0), fixture=True),
        Case("multi-epoch", (random_layout(rng, 12, 20),), (75, 0, 0), seq_len=8, seed=7, fixture=True),
        Case("multi-epoch-last-kept", (random_layout(rng, 12, 20),), (110, 0, 0), seq_len=8, seed=7),
        Case("split", (random_layout(rng, 520, 6, empty_share=0.0),), (40, 10, 2), split="969,30,1",
             seq_len=8, fixture=True),
        Case("blended", tuple(random_layout(rng, 25, 12, base=1000 * (i + 1)) for i in range(3)),
             (n_blend, 6, 3), split="80,15,5", weights=(2.5, 3.5, 4.0), seq_len=8, seed=5, fixture=True),
        Case("blended-large", tuple(random_layout(rng, 300, 50, base=20000 * i) for i in range(3)),
             (2000, 100, 30), split="90,8,2", weights=(0.3, 0.2, 0.5), seq_len=32, seed=11),
        Case("weighted-single-path", (random_layout(rng, 30, 20),), (43, 0, 0), weights=(1.0,), seq_len=8,
             fixture=True),
        Case("multi-sequence", (random_layout(rng, 30, 9, max_sequences=5, empty_share=0.2, base=70000),),
             (40, 8, 4), split="85,10,5", seq_len=8, seed=3, fixture=True),
    ]


def _splits_hold_tokens(layouts: tuple[Layout, ...], split: str) -> bool:
    """Whether every split with a share has two tokens in every dataset: megatron-core builds every
    such split (even for 0 samples) and loops forever on one without tokens."""
    for layout in layouts:
        lengths = np.array(layout.sequence_lengths)
        for share, (lo, hi) in zip(parse_split(split), split_ranges(len(lengths), split).values()):
            if share > 0 and lengths[lo:hi].sum() < 2:
                return False
    return True


def random_cases(count: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        num_paths = int(rng.integers(1, 4))
        seq_len = int(rng.choice([2, 3, 8, 16, 64]))
        layouts = tuple(random_layout(rng, int(rng.integers(20, 200)), int(rng.integers(1, 80)),
                                      max_sequences=int(rng.choice([1, 1, 4])), empty_share=float(rng.choice([0, 0.2])),
                                      base=int(rng.choice([0, 70000]))) for _ in range(num_paths))
        split = str(rng.choice(["1", "969,30,1", "90,10", "70,20,10", "1,1,1"]))
        if not _splits_hold_tokens(layouts, split):
            continue
        sizes = tuple(int(rng.integers(1, 400)) for _ in SPLITS)
        weighted = num_paths > 1 or rng.random() < 0.3
        weights = tuple(float(x) for x in rng.integers(1, 10, num_paths)) if weighted else None
        out.append(Case(f"random-{len(out)}", layouts, sizes, split=split, weights=weights, seq_len=seq_len,
                        seed=int(rng.integers(0, 2**31))))
    return out


class _Tokenizer:
    """What GPTDatasetConfig reads of a tokenizer. No pad id, so megatron-core masks nothing."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod = vocab_size, 0
        self.unique_identifiers = {"class": "ParityTokenizer", "vocab_size": vocab_size}


def megatron_datasets(case: Case, prefixes: list[str], sizes: list[int], cache: str) -> list:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    vocab = 1 + max(layout.base + sum(layout.sequence_lengths) for layout in case.datasets)
    config = GPTDatasetConfig(
        random_seed=case.seed, sequence_length=case.seq_len, split=case.split, path_to_cache=cache,
        blend=(prefixes, list(case.weights) if case.weights is not None else None),
        tokenizer=_Tokenizer(vocab), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _window(sample: dict) -> np.ndarray:
    """tokens + the last label: the seq_len + 1 tokens a sample was cut from."""
    tokens, labels = (np.asarray(sample[k]) for k in ("tokens", "labels"))
    assert np.array_equal(tokens[1:], labels[:-1])
    return np.concatenate([tokens, labels[-1:]]).astype(np.int64)


def _gpt_arrays(ds) -> dict[str, np.ndarray]:
    if hasattr(ds, "document_index"):  # megatron-core's
        return {"doc": ds.document_index, "sample": ds.sample_index, "shuffle": ds.shuffle_index}
    return {"doc": ds.doc_index, "sample": ds.sample_index, "shuffle": ds.shuffle_index}


def _is_blend(ds) -> bool:
    return hasattr(ds, "dataset_index")


def megatron_record(theirs, n: int) -> dict[str, np.ndarray]:
    """What megatron-core gives for a split of n samples: the samples (tokens + last label), and its
    index arrays, or for a blend its dataset / dataset-sample indices and per-dataset sample counts."""
    record = {"samples": np.stack([_window(theirs[i]) for i in range(n)])}
    if _is_blend(theirs):
        record["dataset_index"] = np.asarray(theirs.dataset_index[:n])
        record["dataset_sample_index"] = np.asarray(theirs.dataset_sample_index[:n])
        record["num_samples"] = np.array([d.num_samples for d in theirs.datasets])
    else:
        record.update({k: np.asarray(v) for k, v in _gpt_arrays(theirs).items()})
    return record


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def compare_split(name: str, record: dict, theirs, ours, num_sequences: list[int], split: str) -> list[str]:
    """How ours differs from megatron-core's `record` and datasets `theirs` (empty: identical)."""
    expected = record["samples"]
    n = len(expected)
    if len(ours) != n:
        return [f"{name}: {len(ours)} samples here, {n} asked"]
    problems = []
    mine = np.stack([_window(ours[i]) for i in range(n)])
    differ = np.flatnonzero((mine != expected).any(axis=1))
    if len(differ):
        i = differ[0]
        problems.append(f"{name}: {len(differ)} of {n} samples differ, first {i}: "
                        f"megatron-core {expected[i].tolist()} vs ours {mine[i].tolist()}")
    if _is_blend(theirs) != isinstance(ours, BlendedDataset):
        return problems + [f"{name}: megatron-core built a {type(theirs).__name__}, we a {type(ours).__name__}"]
    pairs = list(zip(theirs.datasets, ours.datasets)) if _is_blend(theirs) else [(theirs, ours)]
    if _is_blend(theirs):
        if record["num_samples"].tolist() != [o.num_samples for _, o in pairs]:
            problems.append(f"{name}: samples built per dataset {record['num_samples'].tolist()} "
                            f"vs ours {[o.num_samples for _, o in pairs]}")
        for key in ("dataset_index", "dataset_sample_index"):
            if not _same(record[key], np.asarray(getattr(ours, key))):
                problems.append(f"{name}: {key} differs")
    for d, ((t, o), count) in enumerate(zip(pairs, num_sequences)):
        lo, hi = split_ranges(count, split)[name]
        if (int(t.indices[0]), int(t.indices[-1]) + 1) != (lo, hi):
            problems.append(f"{name}: dataset {d} sequences [{t.indices[0]}, {t.indices[-1] + 1}) vs ours [{lo}, {hi})")
        t_arrays, o_arrays = _gpt_arrays(t), _gpt_arrays(o)
        for key, a in t_arrays.items():
            b = o_arrays[key]
            if not _same(np.asarray(a), np.asarray(b)):
                problems.append(f"{name}: dataset {d} {key} index differs "
                                f"(megatron-core {a.dtype}{list(a.shape)}, ours {b.dtype}{list(b.shape)})")
    return problems


def asked_sizes(case: Case) -> list[int]:
    """Samples asked per split; none for a split without a share (megatron-core builds none, ours
    refuses samples for it)."""
    return [n if share > 0 else 0 for n, share in zip(case.sizes, parse_split(case.split))]


def run_case(case: Case, tmp: Path) -> tuple[list[str], dict]:
    """Differences, and megatron-core's outputs keyed `<split>.<array>`."""
    if not _splits_hold_tokens(case.datasets, case.split):
        raise ValueError(f"{case.name}: a split with a share holds under two tokens")
    prefixes = []
    for i, layout in enumerate(case.datasets):
        prefix = str(tmp / case.name / f"d{i}_text_document")
        write_layout(prefix, layout)
        prefixes.append(prefix)
    num_sequences = [len(IndexedDataset(p)) for p in prefixes]
    sizes = asked_sizes(case)
    theirs = megatron_datasets(case, prefixes, sizes, str(tmp / case.name / "megatron-cache"))
    cfg = DataConfig(paths=tuple(prefixes), weights=case.weights, split=case.split, seq_len=case.seq_len,
                     seed=case.seed, cache_dir=str(tmp / case.name / "our-cache"))
    ours = build_datasets(cfg, dict(zip(SPLITS, sizes)))
    problems, records = [], {}
    for i, name in enumerate(SPLITS):
        if sizes[i]:
            record = megatron_record(theirs[i], sizes[i])
            problems += compare_split(name, record, theirs[i], ours[name], num_sequences, case.split)
            records.update({f"{name}.{k}": v for k, v in record.items()})
    return problems, records


def write_fixture(case: Case, records: dict) -> Path:
    arrays = {"case": np.array(json.dumps({k: v for k, v in asdict(case).items() if k != "datasets"}))}
    for i, layout in enumerate(case.datasets):
        arrays[f"data{i}.sequence_lengths"] = np.array(layout.sequence_lengths, dtype=np.int32)
        arrays[f"data{i}.document_indices"] = np.array(layout.document_indices, dtype=np.int64)
        arrays[f"data{i}.base"] = np.array(layout.base)
    arrays.update(records)
    path = FIXTURES / f"megatron_{case.name.replace('-', '_')}.npz"
    FIXTURES.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random", type=int, default=30, help="random cases besides the named ones")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--write-fixtures", action="store_true", help=f"rewrite {FIXTURES}/megatron_*.npz")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # megatron-core warns about absent Transformer Engine / Apex
    logging.disable(logging.WARNING)
    import megatron.core
    import torch

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        # megatron-core's BlendedDataset asks torch.distributed for the rank: one process, gloo.
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        print(f"megatron-core {megatron.core.__version__} vs {REPO.name} ({REPO})")
        for case in named_cases() + random_cases(args.random, args.random_seed):
            problems, records = run_case(case, Path(tmp))
            sizes = dict(zip(SPLITS, asked_sizes(case)))
            what = (f"{len(case.datasets)} path(s), weights {case.weights}, split {case.split}, "
                    f"seq_len {case.seq_len}, samples {sizes}")
            print(f"{'PASS' if not problems else 'FAIL'} {case.name}: {what}", flush=True)
            for p in problems:
                print(f"    {p}", flush=True)
            failed += bool(problems)
            if args.write_fixtures and case.fixture:  # megatron-core's output, whatever ours is
                path = write_fixture(case, records)
                print(f"    wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")
        torch.distributed.destroy_process_group()
    print(f"{failed} of {len(named_cases()) + args.random} cases differ" if failed else "all cases identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
