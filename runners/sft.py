"""Instruction fine-tuning: `python -m runners.sft config.yaml [key=value ...]`.

Starts from an HF directory (`checkpoint.load=`; a native checkpoint converts with
`runners.convert native-to-hf`), trains on instruction data written by `runners.preprocess
--handler alpaca|sharegpt|moss` (loss on response tokens only), in full or with LoRA
(`lora.r=8 ...`). At the end it writes `<out_dir>/adapter` (PEFT
layout, LoRA) or `<out_dir>/hf` (a transformers directory, full fine-tuning).

    python -m runners.sft checkpoint.load=path/to/hf data.paths=[data/alpaca] lora.r=8
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib import checkpoint as ckpt_lib
from lib import cli
from lib import config as config_lib
from lib import optim, pytree
from lib.data import DataConfig
from lib.errors import UserError
from models import hf, llama, lora, peft
from parallel import sharding, train_step
from parallel.mesh import MeshConfig, require_no_stages
from runners import trainer


@dataclass(frozen=True)
class SftConfig:
    model: llama.Config = llama.PRESETS["tiny"]   # replaced by the loaded HF directory's config
    lora: lora.LoraConfig | None = None            # None: full fine-tuning
    train: trainer.TrainConfig = trainer.TrainConfig(steps=100, global_batch=8, eval_every=0)
    optim: optim.OptimizerConfig = optim.OptimizerConfig(lr=2e-5, min_lr=0.0, warmup_steps=3,
                                                         decay_steps=100, weight_decay=0.0)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logical_axis_rules: tuple[tuple[str, Any], ...] = field(default_factory=sharding.rule_spec)
    data: DataConfig = DataConfig(seq_len=512)
    checkpoint: ckpt_lib.CheckpointConfig = ckpt_lib.CheckpointConfig(every=100, keep=2)
    out_dir: str = "runs/sft"


def lora_forward_fn(model: llama.Config, lora_cfg: lora.LoraConfig,
                    frozen: llama.Params) -> train_step.ForwardFn:
    """The step's forward as a function of the trainable tree only; the base stays frozen.

    Dropout draws from torch's global generator, which the loop reseeds every step, so a resumed
    run draws the same masks (and inductor's RNG follows the same seed when compiled).
    """
    def forward(train: llama.Params, tokens, *, training: bool, **kw):
        params, adapters = lora.combine(train, frozen)
        return lora.lora_forward(params, adapters, tokens, model, lora_cfg, training=training, **kw)
    return forward


def main(argv: Sequence[str]) -> int:
    cfg = config_lib.parse_argv(SftConfig, argv)
    if not cfg.checkpoint.load:
        raise UserError("sft starts from a model: set checkpoint.load=<HF directory>")
    if ckpt_lib.is_native_checkpoint(cfg.checkpoint.load):
        # A pretraining checkpoint holds another run's step, optimizer and data position, and
        # not the adapters LoRA restores into: start SFT from its weights in the HF layout.
        raise UserError(f"checkpoint.load={cfg.checkpoint.load} is a native checkpoint; sft starts "
                        "from an HF directory: python -m runners.convert native-to-hf --input "
                        f"{cfg.checkpoint.load} --output <dir>, then checkpoint.load=<dir>")
    if not cfg.data.paths:
        raise UserError("sft needs instruction data: set data.paths=[<prefix from runners.preprocess>]")
    cfg = dataclasses.replace(cfg, checkpoint=trainer.resolve_out_dirs(cfg.out_dir, cfg.checkpoint))
    require_no_stages(cfg.mesh, "runners.sft")
    run = trainer.setup(cfg.train, cfg.mesh, cfg.logical_axis_rules, cfg.out_dir)
    model, params = trainer.initial_params(run, cfg.checkpoint.load, cfg.model, cfg.train.seed)
    cfg = dataclasses.replace(cfg, model=model)
    trainer.check_vocab(model, cfg.data)
    params = trainer.shard(run, params, llama.param_axes(model))
    cache = run.out_dir / "inductor-cache"
    forward = None
    if cfg.lora is not None:
        if cfg.train.step.remat == "full":
            # Full recompute flattens the layer's arguments as a pytree, and LoRA's weights are
            # not pytree nodes: their gradients would be lost.
            raise UserError("train.step.remat=full does not support LoRA yet; use selective or none")
        adapters = lora.init_adapters(model, cfg.lora, seed=cfg.train.seed,
                                      device=run.dev.torch_device)
        adapters = trainer.shard(run, adapters, lora.adapter_axes(model, cfg.lora))
        trainable, frozen = lora.trainable(params, adapters, cfg.lora)
        # init_state casts what trains to the step dtype; the frozen base must match it.
        dtype = train_step.DTYPES[cfg.train.step.dtype]
        frozen = pytree.tree_map(lambda t: t.to(dtype), frozen)
        params = trainable
        forward = lora_forward_fn(model, cfg.lora, frozen)
    state = train_step.init_state(params, cfg.optim, cfg.train.step)
    step_fn = train_step.build_train_step(model, cfg.optim, cfg.train.step, run.mesh, run.rules,
                                          kernels=run.kernels, backend=run.backend,
                                          cache_dir=cache, forward=forward)
    eval_fn = train_step.build_eval_step(model, cfg.train.step, run.mesh, run.rules,
                                         kernels=run.kernels, backend=run.backend,
                                         cache_dir=cache, forward=forward)

    def export(state: dict) -> None:
        gathered = trainer.gather(state["params"])
        if run.dist.rank != 0:
            return
        if cfg.lora is not None:
            peft.save(Path(cfg.out_dir) / "adapter", cfg.lora, gathered["adapters"],
                      gathered.get("modules"), base_model_name_or_path=str(cfg.checkpoint.load))
            print(f"LoRA adapter (PEFT layout): {cfg.out_dir}/adapter")
        else:
            hf.save(Path(cfg.out_dir) / "hf", model, gathered)
            print(f"fine-tuned model (HF layout): {cfg.out_dir}/hf")

    trainer.train_loop(run=run, cfg=cfg, train=cfg.train, model=model, optim_cfg=cfg.optim,
                       data_cfg=cfg.data, ckpt_cfg=cfg.checkpoint, state=state,
                       step_fn=step_fn, eval_fn=eval_fn, on_finish=export)
    return 0


if __name__ == "__main__":
    cli.run(main)
