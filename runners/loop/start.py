"""Where a run's training state comes from: one function decides it for every runner.

    start = initial_state(run, cfg, ckpt, given_model=raw.get("model"), lora_cfg=cfg.lora,
                          params_only=True)

The sources, first match wins:

1. resume: this run's checkpoint dir (`checkpoint.dir`) holds a committed step: everything
   (params, optimizer, step, data position) comes from it, under the model config it records.
2. `checkpoint.load` is a native checkpoint: the model it records. With `params_only`
   (`checkpoint.finetune=true`, and always for SFT) its weights only, with a fresh optimizer at
   step 0; otherwise its whole state, continued in this run's directory.
3. `checkpoint.load` is an HF directory or a Megatron / ModelLink checkpoint: the config it
   records and its weights (params only).
4. scratch: `llama.init(cfg.model, train.seed)`.

`model.*` given on the command line or in the YAML file must agree with a recorded model (they are
not needed at all); a contradiction is an error naming the key. Resuming under another
`train.step.dtype` or LoRA config is refused with the command that does what was meant.

On top, LoRA adapters (fresh, or restored on resume) over the frozen base. Then
`train_step.init_state` makes the trained params in the step dtype and their fp32 master
weights: the only place that does. The base params are created or loaded in `base_params`,
each rank materialising only its own shards (`parallel.sharded`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import torch

from lib import checkpoint as ckpt_lib
from lib import config as config_lib
from lib import dtypes, pytree
from lib.errors import UserError
from models import checkpoints, hf, llama, lora
from parallel import pipeline, pipeline_step, sharded, sharding, train_step
from runners.loop.setup import Run


class RunConfig(Protocol):
    """What `initial_state` reads of a runner's config (PretrainConfig, SftConfig)."""
    model: llama.Config
    train: Any          # trainer.TrainConfig
    checkpoint: ckpt_lib.CheckpointConfig


@dataclass(frozen=True)
class Source:
    kind: str                     # "resume" | "native" | "hf" | "megatron" | "scratch"
    path: str | None = None       # the checkpoint it names (resume: checkpoint.dir)
    whole_state: bool = False     # restore optimizer, step and data position from the checkpointer
    base: str | None = None       # where the base params load from (HF dir or native checkpoint)
    extra: dict | None = None     # the native checkpoint's `extra` (recorded config, position)

    def describe(self, step: int) -> str:
        if self.kind == "scratch":
            return "starting from a random init"
        if self.kind == "resume":
            return f"resuming from {self.path} at step {step}"
        how = f"its whole state, at step {step}" if self.whole_state else "params only"
        what = {"hf": "HF model", "megatron": "Megatron checkpoint"}.get(self.kind, "checkpoint")
        return f"starting from {what} {self.path} ({how})"


@dataclass
class Start:
    """The state a run trains from, and what it is."""
    model: llama.Config
    state: train_step.State
    step: int
    consumed_samples: int
    forward: train_step.ForwardFn | None   # LoRA: the adapters' forward over the frozen base
    source: Source
    # The whole model's parameter tree from the trained one (LoRA: adapters over the frozen
    # base), for what runs the model outside the train step (evaluation tasks).
    params_of: Callable[[llama.Params], llama.Params]


def initial_state(run: Run, cfg: RunConfig, ckpt: ckpt_lib.Checkpointer, *, given_model: Any = None,
                  lora_cfg: lora.LoraConfig | None = None, params_only: bool = False) -> Start:
    """The training state this run starts from (see the module docstring).

    given_model: the `model` entry as the user wrote it (YAML + overrides, before defaults), to
    tell a restated model from the config's default. ckpt: this run's checkpointer.
    """
    source = _source(cfg.checkpoint, ckpt, params_only)
    where = source.path or "this run's checkpoint"
    restores_all = source.whole_state and source.base is None and lora_cfg is None
    if restores_all:
        # Everything comes from the checkpoint: check it before anything is allocated (the
        # model asked for, the step dtype, then every tensor's shape from its metadata).
        model = checkpoints.recorded_model(source.extra or {}, where) or cfg.model
        _check_given_model(given_model, model, where)
        _check_resumable(source, cfg, lora_cfg)
        ckpt.check(train_step.init_state(llama.init(model, device="meta"), cfg.train.step))
    model, params = base_params(run, source, cfg.model, cfg.train.seed)
    if not restores_all:
        if source.kind != "scratch":
            _check_given_model(given_model, model, where)
        if source.whole_state:
            _check_resumable(source, cfg, lora_cfg)

    trained, forward, params_of = params, None, _same
    if lora_cfg is not None:
        adapters = lora.init_adapters(model, lora_cfg, seed=cfg.train.seed, device=run.dev.torch_device)
        adapters = sharding.shard_params(adapters, lora.adapter_axes(model, lora_cfg), run.rules, run.mesh)
        trained, frozen = lora.trainable(params, adapters, lora_cfg)
        # The frozen base runs in the step dtype, as the trained params do.
        step_dtype = dtypes.torch_dtype(cfg.train.step.dtype)
        frozen = pytree.tree_map(lambda t: t.to(step_dtype), frozen)
        forward = lora.forward_fn(model, lora_cfg, frozen)
        params_of = lambda t: lora.adapt(*lora.combine(t, frozen), lora_cfg)
    state = train_step.init_state(trained, cfg.train.step)

    step = consumed = 0
    if source.whole_state:
        state, extra = ckpt.restore(state)
        step, consumed = int(state["step"]), int(extra.get("consumed_samples", 0))
    return Start(model, state, step, consumed, forward, source, params_of)


def _same(params: llama.Params) -> llama.Params:
    return params


def base_params(run: Run, source: Source, default: llama.Config, seed: int
                ) -> tuple[llama.Config, llama.Params]:
    """The model config and its params (fp32, sharded by the run's rules) before training
    touches them: the one place they are created or loaded.

    Each rank creates or reads only its own shards (`parallel.sharded`), after checking that
    the mesh divides every dimension: a scratch run draws its blocks of `llama.init(default,
    seed)` (the same values on any mesh), an HF directory is read slice by slice from its
    safetensors, and a resumed run gets empty shards of the recorded model, which `ckpt.restore`
    fills block by block. Megatron and native checkpoints loaded as weights (finetune), and an
    SFT run's frozen base under a resumed LoRA run, go through
    `models.checkpoints.load_pretrained`: read whole on each rank, then sharded.
    """
    dev = run.dev.torch_device
    where = source.path or "this run's checkpoint"
    recorded = checkpoints.recorded_model(source.extra, where) if source.extra else None
    if source.base is not None and checkpoints.checkpoint_kind(source.base) == "hf":
        model = hf.load_config(source.base)
        return sharded.load_hf(source.base, run.rules, run.mesh, dtype=torch.float32, device=dev,
                               select=_stage_part(run, model))
    if source.base is not None:
        # A native checkpoint without a recorded config is read as the config's model.
        expected = recorded or (default if source.kind == "native" else None)
        model, params, _ = checkpoints.load_pretrained(source.base, dtype=torch.float32, device=dev,
                                                       merge_adapter=True, config=expected)
        return model, pipeline_step.place_params(params, model, run.pipeline, run.mesh, run.rules)
    if source.whole_state:
        # Filled by the restore: no values needed, only the tree, shapes and placements.
        model = recorded or default
        part = _stage_part(run, model)
        return model, sharded.empty(part(llama.init(model, device="meta")), part(llama.param_axes(model)),
                                    run.rules, run.mesh, device=dev)
    return default, sharded.init(default, seed, run.rules, run.mesh, device=dev,
                                 select=_stage_part(run, default))


def _stage_part(run: Run, model: llama.Config) -> Callable[[Any], Any]:
    """The part of a model tree this rank holds: its pipeline stages' (all of it without a
    `pipe` axis)."""
    pipe = run.mesh.size("pipe")
    if pipe == 1:
        return lambda tree: tree
    plan = pipeline.layout(run.pipeline, model.n_layers, pipe)
    stages = plan.stages_of(run.mesh.stage)
    return lambda tree: pipeline.select(tree, plan, stages)


def _source(ckpt_cfg: ckpt_lib.CheckpointConfig, ckpt: ckpt_lib.Checkpointer, params_only: bool) -> Source:
    if ckpt.check_latest() is not None:
        extra = ckpt.read_extra()
        base = None
        if checkpoints.recorded_run_config(extra).get("lora") is not None:
            # A LoRA run saves only its adapters: the frozen base comes from where it started.
            base = _lora_base(extra, ckpt_cfg)
        return Source("resume", ckpt_cfg.dir, whole_state=True, base=base, extra=extra)
    if not ckpt_cfg.load:
        return Source("scratch")
    kind = checkpoints.checkpoint_kind(ckpt_cfg.load)
    if kind in ("hf", "megatron"):
        return Source(kind, ckpt_cfg.load, base=ckpt_cfg.load)
    with ckpt_lib.Reader(ckpt_cfg.load) as reader:
        extra = reader.extra()
    if params_only:
        return Source("native", ckpt_cfg.load, base=ckpt_cfg.load, extra=extra)
    if checkpoints.recorded_run_config(extra).get("lora") is not None:
        raise UserError(f"checkpoint.load={ckpt_cfg.load} is a LoRA run's checkpoint: its state "
                        "holds adapters only; start from its weights with checkpoint.finetune=true")
    return Source("native", ckpt_cfg.load, whole_state=True, extra=extra)


def _lora_base(extra: dict, ckpt_cfg: ckpt_lib.CheckpointConfig) -> str:
    recorded = (checkpoints.recorded_run_config(extra).get("checkpoint") or {}).get("load")
    if ckpt_cfg.load and recorded and Path(ckpt_cfg.load).resolve() != Path(recorded).resolve():
        raise UserError(f"the run in {ckpt_cfg.dir} trained its adapters over {recorded}; "
                        f"checkpoint.load={ckpt_cfg.load} is another base: resume with "
                        f"checkpoint.load={recorded}, or use another out_dir")
    base = recorded or ckpt_cfg.load
    if not base:
        raise UserError(f"the LoRA run in {ckpt_cfg.dir} records no base model: give checkpoint.load")
    return base


def _check_given_model(given: Any, recorded: llama.Config, where: str) -> None:
    """`model` as the user wrote it (a preset name, or a mapping of fields, maybe with a
    `preset`) must not contradict the recorded model."""
    if given is None:
        return
    if isinstance(given, dict) and config_lib.PRESET_KEY not in given:
        # Fields alone edit the recorded model: only those fields are compared.
        wanted = config_lib.from_dict(llama.Config, {**config_lib.to_dict(recorded), **given}, "model")
        keys = list(given)
    else:
        wanted = config_lib.from_dict(llama.Config, given, "model")  # a whole model
        keys = [k for k, v in config_lib.to_dict(wanted).items() if config_lib.to_dict(recorded)[k] != v]
    differ = [k for k in keys if getattr(wanted, k) != getattr(recorded, k)]
    if differ:
        mine = ", ".join(f"model.{k}={getattr(wanted, k)}" for k in differ)
        theirs = ", ".join(f"{k}={getattr(recorded, k)}" for k in differ)
        raise UserError(f"{mine} contradicts {where}, which holds a model with {theirs}: leave "
                        "model.* out to use the model it records")


def _check_resumable(source: Source, cfg: RunConfig, lora_cfg: lora.LoraConfig | None) -> None:
    """A whole state restores only into the same step dtype (bf16/fp16 keep master weights that
    fp32 does not) and the same adapters."""
    run = checkpoints.recorded_run_config(source.extra or {})
    where = source.path or "this run's checkpoint"
    recorded_dtype = ((run.get("train") or {}).get("step") or {}).get("dtype")
    if recorded_dtype and recorded_dtype != cfg.train.step.dtype:
        raise UserError(
            f"{where} was trained with train.step.dtype={recorded_dtype}; resuming it with "
            f"train.step.dtype={cfg.train.step.dtype} is not supported (the optimizer state "
            f"differs). Resume with train.step.dtype={recorded_dtype}, or start a new run from its "
            f"weights: checkpoint.load=<its checkpoints> checkpoint.finetune=true out_dir=<new dir>")
    if "lora" in run:
        recorded_lora = run["lora"]
        given_lora = config_lib.to_dict(lora_cfg) if lora_cfg is not None else None
        if recorded_lora != given_lora:
            raise UserError(f"{where} was trained with lora={recorded_lora}; this run asks for "
                            f"lora={given_lora}: resume with the same lora.* settings, or use another out_dir")
