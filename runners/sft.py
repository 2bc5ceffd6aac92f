"""Instruction fine-tuning: `python -m runners.sft config.yaml [key=value ...]`.

Starts from a model (`checkpoint.load=`: an HF directory or a native checkpoint, root or step
dir, whose recorded model config is used; its weights only, with a fresh optimizer), trains on
instruction data written by `runners.preprocess --handler alpaca|sharegpt|moss` (loss on
response tokens only), in full or with LoRA (`lora.r=8 ...`). At the end it writes
`<out_dir>/adapter` (PEFT layout, LoRA) or `<out_dir>/hf` (a transformers directory, full
fine-tuning).

    python -m runners.sft checkpoint.load=path/to/hf data.paths=[data/alpaca] lora.r=8
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
from lib import optim, pytree
from lib.data import DataConfig
from lib.errors import UserError
from models import hf, llama, lora, peft
from parallel import sharding
from parallel.mesh import MeshConfig, require_no_stages
from runners import trainer


@dataclass(frozen=True)
class SftConfig:
    model: llama.Config = llama.PRESETS["tiny"]   # replaced by the loaded model's config
    lora: lora.LoraConfig | None = None            # None: full fine-tuning
    train: trainer.TrainConfig = trainer.TrainConfig(steps=100, global_batch=8, eval_every=0)
    optim: optim.OptimizerConfig = optim.OptimizerConfig(lr=2e-5, min_lr=0.0, warmup_steps=3,
                                                         decay_steps=100, weight_decay=0.0)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logical_axis_rules: tuple[tuple[str, Any], ...] = field(default_factory=sharding.rule_spec)
    data: DataConfig = DataConfig(seq_len=512)
    eval: evals.TaskConfig = evals.TaskConfig()   # tasks scored every train.eval_every steps
    checkpoint: ckpt_lib.CheckpointConfig = ckpt_lib.CheckpointConfig(every=100, keep=2)
    out_dir: str = "runs/sft"

    def __post_init__(self):
        trainer.check_out_dir(self.out_dir)


def main(argv: Sequence[str]) -> int:
    raw = config_lib.parse_argv_raw(argv)
    cfg = config_lib.from_dict(SftConfig, raw)
    if not cfg.checkpoint.load:
        raise UserError("sft starts from a model: set checkpoint.load=<HF directory or native checkpoint>")
    if not cfg.data.paths:
        raise UserError("sft needs instruction data: set data.paths=[<prefix from runners.preprocess>]")
    cfg = dataclasses.replace(cfg, checkpoint=trainer.resolve_out_dirs(cfg.out_dir, cfg.checkpoint))
    require_no_stages(cfg.mesh, "runners.sft")
    run = trainer.setup(cfg.train, cfg.mesh, cfg.logical_axis_rules, cfg.out_dir)

    def export(state: dict, model: llama.Config) -> None:
        gathered = pytree.gather(state["params"])
        if not run.is_main:
            return
        if cfg.lora is not None:
            peft.save(Path(cfg.out_dir) / "adapter", cfg.lora, gathered["adapters"],
                      gathered.get("modules"), base_model_name_or_path=str(cfg.checkpoint.load))
            print(f"LoRA adapter (PEFT layout): {cfg.out_dir}/adapter")
        else:
            hf.save(Path(cfg.out_dir) / "hf", model, gathered)
            print(f"fine-tuned model (HF layout): {cfg.out_dir}/hf")

    trainer.train(run, cfg, given_model=raw.get("model"), lora_cfg=cfg.lora, params_only=True,
                  instruction=True, on_finish=export)
    return 0


if __name__ == "__main__":
    cli.run(main)
