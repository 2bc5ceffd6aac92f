"""The data path: indexed datasets, sample indices, blending, instruction data and batches.

    cfg = DataConfig(paths=("data/corpus_text_document",), seq_len=2048, seed=1234)
    sets = build_datasets(cfg, {"train": steps * global_batch, "valid": ..., "test": ...})
    for batch in batches(sets["train"], global_batch, consumed_samples, rank, world): ...

A path is a Megatron prefix: `<p>.bin/.idx` for pretraining text, or the prefix of
`<p>_input_ids_document` / `<p>_loss_mask_document` for instruction data (or of ModelLink's
`<p>_packed_{input_ids,labels,attention_mask}_document`, its --data-path: `lib.data.modellink`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lib.data.blend import BlendedDataset, normalize_weights, samples_per_dataset
from lib import config as config_lib
from lib.data.gpt_dataset import GPTDataset, SPLITS, parse_split, split_ranges
from lib.data.indexed import IndexedDataset, exists
from lib.data.loader import batches
from lib.data import modellink
from lib.data.sft_dataset import IDS_SUFFIX, SFTDataset, open_examples
from lib.data.vocab import check_token_ids, token_id_range
from lib.errors import UserError

__all__ = ["DataConfig", "build_datasets", "batches", "data_kind", "IndexedDataset"]


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] | None = None  # None: the runner's default (pretrain: a generated corpus)
    weights: tuple[float, ...] | None = None  # one per path; None = equal
    split: str = "969,30,1"  # train,valid,test proportions of each path's sequences (megatron-core's split)
    seq_len: int = 2048
    seed: int = 1234
    tokenizer: str | None = None  # instruction data: its pad id (and EOS for packed ModelLink data)
    cache_dir: str | None = None  # index cache; default `<data folder>/cache`

    def __post_init__(self):
        config_lib.check_finite(self)
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len} must be >= 1")
        if not 0 <= self.seed < 2**32:  # numpy's RandomState takes 32-bit seeds, as Megatron's does
            raise ValueError(f"seed={self.seed} must lie in [0, 2**32)")
        try:
            shares = parse_split(self.split)
        except UserError as e:
            raise ValueError(str(e)) from None
        if not all(math.isfinite(w) for w in shares):
            raise ValueError(f"split={self.split!r} must hold finite numbers")


def data_kind(path: str) -> str:
    """"text" (pretraining `.bin/.idx`) or "sft" (instruction data) for a dataset prefix."""
    if exists(path):
        return "text"
    if exists(path + IDS_SUFFIX) or modellink.is_modellink(path):
        return "sft"
    raise UserError(f"data path {path!r}: found neither {path}.bin/.idx (pretraining text) nor "
                    f"{path}{IDS_SUFFIX}.bin/.idx (instruction data) nor ModelLink's "
                    f"{path}{modellink.IDS}.bin/.idx")


def _pad_id(cfg: DataConfig) -> int:
    if cfg.tokenizer is None:
        return 0  # padding is never attended (segment 0) nor trained (-100): any id is correct
    from lib.tokenizer import load_tokenizer
    return load_tokenizer(cfg.tokenizer).pad_id


def _eos_id(cfg: DataConfig) -> int | None:
    """What separates the examples of packed ModelLink data (None: no tokenizer given)."""
    if cfg.tokenizer is None:
        return None
    from lib.tokenizer import load_tokenizer
    return load_tokenizer(cfg.tokenizer).eos_id


def _check_ids(path: str, vocab_size: int, cache_dir: str | None) -> None:
    if exists(path):
        check_token_ids(IndexedDataset(path), vocab_size, cache_dir)
    elif not modellink.is_modellink(path):
        check_token_ids(IndexedDataset(path + IDS_SUFFIX), vocab_size, cache_dir)
    else:
        check_token_ids(IndexedDataset(path + modellink.IDS), vocab_size, cache_dir)
        labels = IndexedDataset(path + modellink.LABELS)
        lo, hi = token_id_range(labels, cache_dir)
        if hi >= vocab_size or lo < modellink.IGNORE_INDEX:
            bad = hi if hi >= vocab_size else lo
            raise UserError(f"{labels.prefix}.bin: holds label {bad}; labels must be token ids of the model's "
                            f"vocabulary (0..{vocab_size - 1}) or {modellink.IGNORE_INDEX}")


def build_datasets(cfg: DataConfig, num_samples: dict[str, int], max_seq_len: int | None = None,
                   vocab_size: int | None = None) -> dict:
    """Datasets for the splits asked for with a positive sample count ("train", "valid", "test").

    Each has exactly that many samples; `max_seq_len` (the model's) rejects a longer `cfg.seq_len`,
    `vocab_size` (the model's) data holding a token id it does not have.
    """
    if not cfg.paths:
        raise UserError("data.paths is empty: give at least one dataset prefix")
    if max_seq_len is not None and cfg.seq_len > max_seq_len:
        raise UserError(f"data.seq_len {cfg.seq_len} is longer than the model's maximum sequence length {max_seq_len}")
    unknown = set(num_samples) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}")
    weights = normalize_weights(cfg.weights, len(cfg.paths))
    kinds = {p: data_kind(p) for p in cfg.paths}
    if len(set(kinds.values())) > 1:
        raise UserError(f"data paths mix pretraining text and instruction data: {kinds}")
    pad_id = _pad_id(cfg) if "sft" in kinds.values() else 0
    eos_id = _eos_id(cfg) if any(modellink.is_modellink(p) for p in kinds if kinds[p] == "sft") else None
    if vocab_size is not None:
        for path in kinds:
            _check_ids(path, vocab_size, cfg.cache_dir)
        if pad_id >= vocab_size:
            raise UserError(f"data.tokenizer {cfg.tokenizer}: its pad id {pad_id} is outside the model's "
                            f"vocabulary of {vocab_size} ids (padding is fed to the embedding)")

    def one(path: str, split: str, n: int):
        cache = cfg.cache_dir
        if kinds[path] == "text":
            data = IndexedDataset(path)
            rng = split_ranges(len(data), cfg.split)[split]  # megatron-core splits sequences
            if rng[1] <= rng[0]:
                raise UserError(f"{path}: split {cfg.split!r} leaves the {split} set no documents "
                                f"(of {len(data)} sequences); change data.split or ask for no {split} samples")
            return GPTDataset(data, rng, n, cfg.seq_len, cfg.seed, cache, name=split)
        examples = open_examples(path, eos_id)
        rng = split_ranges(examples.num_documents, cfg.split)[split]
        if rng[1] <= rng[0]:
            raise UserError(f"{path}: split {cfg.split!r} leaves the {split} set no examples "
                            f"(of {examples.num_documents}); change data.split or ask for no {split} samples")
        return SFTDataset(path, rng, n, cfg.seq_len, cfg.seed, pad_id, cache, name=split, eos_id=eos_id)

    out = {}
    for split, n in num_samples.items():
        if n <= 0:
            continue
        if len(cfg.paths) == 1 and cfg.weights is None:  # with a weight, megatron-core blends even one path
            out[split] = one(cfg.paths[0], split, n)
            continue
        parts = [one(p, split, m) for p, m in zip(cfg.paths, samples_per_dataset(weights, n))]
        cache = cfg.cache_dir or os.path.join(os.path.dirname(cfg.paths[0]), "cache")
        key = {"paths": [os.path.abspath(p) for p in cfg.paths], "split": split, "cfg_split": cfg.split,
               "seq_len": cfg.seq_len, "seed": cfg.seed}
        out[split] = BlendedDataset(parts, weights, n, cache, key)
    return out
