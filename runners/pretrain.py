"""Pretraining: `python -m runners.pretrain [config.yaml] [key=value ...]`.

With no arguments it trains a small LLaMA on the generated default corpus on this machine's
device, and says where its logs and checkpoints went. With a config it trains any preset under
any mesh; launch several processes with torchrun.

    python -m runners.pretrain configs/llama2-7b.yaml mesh.fsdp=8 train.steps=1000
    torchrun --nproc_per_node 2 -m runners.pretrain configs/tiny.yaml mesh.fsdp=2
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib import checkpoint as ckpt_lib
from lib import cli, evals
from lib import config as config_lib
from lib import optim
from lib.data import DataConfig
from lib.data import corpus
from models import llama
from parallel import sharding
from parallel.mesh import MeshConfig
from parallel.pipeline import PipelineConfig
from runners import trainer

# The embedded default: a model small enough to learn the generated corpus in minutes on a CPU.
DEFAULT_MODEL = llama.Config(vocab_size=corpus.DEFAULT_VOCAB, dim=128, n_layers=4, n_heads=4,
                             n_kv_heads=2, ffn_dim=352, max_seq_len=256)


@dataclass(frozen=True)
class PretrainConfig:
    model: llama.Config = DEFAULT_MODEL            # a checkpoint's recorded model replaces it
    train: trainer.TrainConfig = field(default_factory=trainer.TrainConfig)
    optim: optim.OptimizerConfig = optim.OptimizerConfig(lr=2e-3, min_lr=2e-4, warmup_steps=30,
                                                         decay_steps=300, weight_decay=0.1)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)   # stages, with mesh.pipe > 1
    logical_axis_rules: tuple[tuple[str, Any], ...] = field(default_factory=sharding.rule_spec)
    data: DataConfig = DataConfig(seq_len=128)   # no paths: the generated default corpus
    eval: evals.TaskConfig = evals.TaskConfig()   # tasks scored every train.eval_every steps
    checkpoint: ckpt_lib.CheckpointConfig = ckpt_lib.CheckpointConfig(every=100, keep=2)
    out_dir: str = "runs/pretrain"

    def __post_init__(self):
        trainer.check_out_dir(self.out_dir)


def with_defaults(cfg: PretrainConfig) -> PretrainConfig:
    """Fill what the config leaves implicit: the default corpus (only when data.paths is not
    given at all: an explicit empty list is an error), the checkpoint directory."""
    data = cfg.data
    if data.paths is None:
        # The tokenizer is trained to fit the model: min(vocab, 1000) pieces for the ~1 MB corpus.
        vocab = min(cfg.model.vocab_size, corpus.DEFAULT_VOCAB)
        prefix, tokenizer = corpus.default_dataset(Path(cfg.out_dir).parent / "default-data",
                                                   vocab_size=vocab)
        data = dataclasses.replace(data, paths=(prefix,), tokenizer=tokenizer)
    return dataclasses.replace(cfg, data=data,
                               checkpoint=trainer.resolve_out_dirs(cfg.out_dir, cfg.checkpoint))


def main(argv: Sequence[str]) -> int:
    raw = config_lib.parse_argv_raw(argv)
    cfg = config_lib.from_dict(PretrainConfig, raw)
    run = trainer.setup(cfg.train, cfg.mesh, cfg.logical_axis_rules, cfg.out_dir, cfg.pipeline)
    cfg = with_defaults(cfg)  # after setup: with several ranks, rank 0 builds the default corpus
    trainer.train(run, cfg, given_model=raw.get("model"))
    return 0


if __name__ == "__main__":
    cli.run(main)
