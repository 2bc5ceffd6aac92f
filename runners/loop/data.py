"""The run's batches: this rank's share of each global batch, resumable from one number."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lib.data import DataConfig, batches, build_datasets, data_kind
from lib.data.gpt_dataset import split_ranges
from lib.data import modellink
from lib.data.sft_dataset import open_examples, response_token_counts
from lib.errors import UserError
from models import llama
from parallel import sharding
from runners.loop.setup import Run

Batch = dict[str, torch.Tensor]


class TrainData:
    """Training batches from sample `consumed` on (the count a checkpoint stores), and the
    validation set. `instruction=True` (SFT) requires instruction data and measures how much of
    its responses `data.seq_len` cuts off."""

    def __init__(self, run: Run, data_cfg: DataConfig, train: Any, model: llama.Config,
                 consumed: int, *, instruction: bool = False):
        self.run, self.global_batch, self.seq_len = run, train.global_batch, data_cfg.seq_len
        self.consumed = consumed
        self.notes: list[str] = []
        if instruction:
            self.notes += instruction_data_notes(data_cfg)
        eval_samples = train.global_batch * train.eval_batches if train.eval_every else 0
        self.sets = build_datasets(data_cfg, {"train": train.steps * train.global_batch,
                                              "valid": eval_samples},
                                   max_seq_len=model.max_seq_len, vocab_size=model.vocab_size)
        self.shard_index, self.shard_count = sharding.batch_shards(run.rules, run.mesh)
        self._train: Iterator[Batch] = batches(self.sets["train"], self.global_batch, consumed,
                                               self.shard_index, self.shard_count)

    def next_batch(self, step: int) -> Batch:
        """This rank's rows of step `step`'s global batch, on the run's device."""
        batch = next(self._train, None)
        if batch is None:
            raise UserError(f"the training data ran out at step {step}")
        self.consumed += self.global_batch
        return self.to_device(batch)

    def valid_batches(self) -> Iterator[Batch]:
        """The validation set's batches (the same ones every time)."""
        if "valid" not in self.sets:
            return iter(())
        return (self.to_device(b) for b in batches(self.sets["valid"], self.global_batch, 0,
                                                   self.shard_index, self.shard_count))

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.run.dev.torch_device, non_blocking=True) for k, v in batch.items()}

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def instruction_data_notes(cfg: DataConfig) -> list[str]:
    """Checks SFT data: instruction data only, with trained (response) tokens in its training
    split, not all cut off by `seq_len`. Returns a note on the share of response tokens that
    `seq_len` cuts off (never trained on), if any."""
    trained = dropped = 0
    for path in cfg.paths:
        if data_kind(path) != "sft":
            raise UserError(f"data path {path} holds pretraining text ({path}.bin/.idx), not "
                            "instruction data: SFT trains on responses only, which needs "
                            "runners.preprocess --handler ...; for plain text use runners.pretrain")
        eos_id = None
        if modellink.is_modellink(path) and cfg.tokenizer:  # packed ModelLink data splits at EOS
            from lib.tokenizer import load_tokenizer
            eos_id = load_tokenizer(cfg.tokenizer).eos_id
        documents = split_ranges(open_examples(path, eos_id).num_documents, cfg.split)["train"]
        total, cut = response_token_counts(path, documents, cfg.seq_len, eos_id)
        if total == 0:
            raise UserError(f"{path}: its training split holds no trained (response) tokens: "
                            "nothing to learn from (is its loss mask all zeros?)")
        trained, dropped = trained + total, dropped + cut
    if dropped == trained:
        raise UserError(f"data.seq_len={cfg.seq_len} cuts off every response token of the "
                        "training data: raise data.seq_len")
    if not dropped:
        return []
    return [f"{dropped} of {trained} response tokens ({100 * dropped / trained:.1f}%) lie beyond "
            f"data.seq_len={cfg.seq_len} and are never trained on (raise data.seq_len, or "
            "preprocess with a smaller --seq-length)"]
