"""The training loop shared by `runners.pretrain` and `runners.sft`.

    state = trainer.train(run, cfg, given_model=raw.get("model"))

`train` opens what a run holds (the out_dir lock, the checkpointer, the loggers: closed on every
path out, errors included), asks `runners.loop.start` for the initial state, and runs `Loop`,
which reads as the few lines it is: each concern is an object of `runners.loop` (data, step,
divergence, reporting, validation, checkpointing, stop signals).

Exit: a finished run returns; bad input, divergence and failed saves raise `UserError` (exit
2); SIGTERM/SIGINT save the step and raise `Interrupted` (exit 143/130).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lib import checkpoint as ckpt_lib
from lib import config as config_lib
from lib import dtypes
from lib.data import DataConfig
from lib.errors import UserError
from lib.lock import DirLock
from models import llama, lora
from parallel import pipeline_step, train_step
from runners.loop.data import TrainData
from runners.loop.evaluation import TaskScores
from runners.loop.guards import DivergenceGuard, StopRequest
from runners.loop.report import Reporter, Validator, reporting
from runners.loop.saving import Saver
from runners.loop.setup import Run, setup
from runners.loop.start import Start, initial_state

__all__ = ["TrainConfig", "Run", "setup", "train", "resolve_out_dirs"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    global_batch: int = 16                 # samples per optimizer step, all ranks together
    seed: int = 0                          # parameter init (data order has data.seed)
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    attention: Literal["auto", "reference", "sdpa", "npu_fusion"] = "auto"
    step: train_step.TrainStepConfig = field(default_factory=train_step.TrainStepConfig)
    log_every: int = 10
    eval_every: int = 100                  # 0: no periodic validation
    eval_batches: int = 4
    max_bad_steps: int = 3                 # consecutive non-finite losses before stopping

    def __post_init__(self):
        for name in ("steps", "global_batch", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 0 (0 = no validation)")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must lie in [0, 2**32)")
        if self.eval_every and self.eval_batches < 1:
            raise ValueError(f"eval_batches={self.eval_batches} must be >= 1 when eval_every="
                             f"{self.eval_every} (eval_every=0 turns validation off)")


@dataclass
class Loop:
    """The loop, and the objects it delegates to."""
    step_fn: Callable[[train_step.State, dict], tuple[train_step.State, dict]]
    data: TrainData
    divergence: DivergenceGuard
    reporter: Reporter
    validator: Validator
    tasks: TaskScores
    saver: Saver
    stop: StopRequest
    steps: int

    def run(self, state: train_step.State, start_step: int) -> train_step.State:
        step = start_step
        for step in range(start_step + 1, self.steps + 1):
            state, metrics = self.step_fn(state, self.data.next_batch(step))
            self.divergence.check(step, metrics, self.saver.ckpt.latest_step())
            self.reporter.record(step, metrics, tokens=self.data.tokens_per_step,
                                 samples=self.data.global_batch)
            with self.reporter.paused():
                self.validator.maybe_run(step, state, self.reporter)
                self.tasks.maybe_run(step, state, self.reporter)
                self.saver.maybe_save(step, state)
            if signum := self.stop.agreed():
                self.saver.save_now(step, state)
                raise self.stop.interrupted(step, signum, saved=self.saver.ckpt.cfg.dir is not None)
        self.saver.save_now(step, state)
        return state


def train(run: Run, cfg: Any, *, given_model: Any = None, lora_cfg: lora.LoraConfig | None = None,
          params_only: bool | None = None, instruction: bool = False,
          on_finish: Callable[[train_step.State, llama.Config], None] | None = None) -> train_step.State:
    """Train the runner config `cfg` (a RunConfig with data, optim, mesh, out_dir) to
    `cfg.train.steps`, resuming from its checkpoints; `on_finish(state, model)` exports.

    given_model: `model` as the user wrote it (to check against a checkpoint's recorded model).
    params_only: take only the params of `checkpoint.load` (default `checkpoint.finetune`).
    instruction: the data must be instruction data (SFT).
    """
    params_only = cfg.checkpoint.finetune if params_only is None else params_only
    with contextlib.ExitStack() as resources:
        _lock_out_dir(run, resources)
        ckpt = resources.enter_context(
            ckpt_lib.Checkpointer(cfg.checkpoint, run.dist.rank, run.dist.world_size,
                                  spread=run.mesh.pipe_mesh))
        start = initial_state(run, cfg, ckpt, given_model=given_model, lora_cfg=lora_cfg,
                              params_only=params_only)
        cfg = dataclasses.replace(cfg, model=start.model)
        check_vocab(start.model, cfg.data)
        _say(run, start.source.describe(start.step))
        state = start.state
        if start.step < cfg.train.steps:
            state = _train_from(run, cfg, start, ckpt, instruction, resources)
        else:
            _say(run, f"nothing to do: the checkpoint is at step {start.step} >= "
                      f"train.steps={cfg.train.steps}")
    if on_finish is not None:
        on_finish(state, start.model)
    return state


def _train_from(run: Run, cfg: Any, start: Start, ckpt: ckpt_lib.Checkpointer, instruction: bool,
                resources: contextlib.ExitStack) -> train_step.State:
    data = TrainData(run, cfg.data, cfg.train, start.model, start.consumed_samples,
                     instruction=instruction)
    step_fn, eval_fn = _steps(run, cfg, start)
    # Evaluation tasks are read and tokenized before the first step: a bad task file fails now.
    tasks = TaskScores(run, cfg.eval, cfg.train.eval_every, model=start.model,
                       tokenizer=cfg.data.tokenizer, dtype=dtypes.torch_dtype(cfg.train.step.dtype),
                       params_of=start.params_of)
    if run.is_main:
        config_lib.dump(cfg, run.out_dir / "config.yaml")
    reporter = resources.enter_context(reporting(
        run, model=start.model, seq_len=cfg.data.seq_len, step_dtype=cfg.train.step.dtype,
        log_every=cfg.train.log_every, start_step=start.step, total_steps=cfg.train.steps))
    for note in data.notes:
        reporter.say(f"note: {note}")
    loop = Loop(step_fn, data,
                DivergenceGuard(cfg.train.max_bad_steps, cfg.train.step.dtype,
                                cfg.train.step.loss_scale.min_scale),
                reporter, Validator(eval_fn, data, cfg.train.eval_every), tasks,
                Saver(ckpt, config_lib.to_dict(cfg), data),
                resources.enter_context(StopRequest(run.dev)), cfg.train.steps)
    state = loop.run(start.state, start.step)
    summary = [f"done: step {cfg.train.steps}", f"logs: {run.out_dir}/metrics.jsonl",
               f"TensorBoard: {run.out_dir}/tensorboard"]
    if cfg.checkpoint.dir:
        summary.append(f"checkpoints: {cfg.checkpoint.dir}")
    reporter.say("; ".join(summary + data.notes))
    return state


def _steps(run: Run, cfg: Any, start: Start) -> tuple[Callable, Callable]:
    """The train and eval steps: torch's pipeline schedules over the stages when mesh.pipe > 1."""
    common = dict(kernels=run.kernels, backend=run.backend, cache_dir=run.out_dir / "inductor-cache")
    if run.mesh.size("pipe") > 1:
        if start.forward is not None:
            raise UserError(f"mesh.pipe={run.mesh.size('pipe')}: LoRA has no pipeline stages yet; "
                            "split the model with mesh.fsdp / mesh.tensor")
        return (pipeline_step.build_train_step(start.model, cfg.optim, cfg.train.step, run.pipeline,
                                               run.mesh, run.rules, **common),
                pipeline_step.build_eval_step(start.model, cfg.train.step, run.pipeline, run.mesh,
                                              run.rules, **common))
    common["forward"] = start.forward
    return (train_step.build_train_step(start.model, cfg.optim, cfg.train.step, run.mesh, run.rules,
                                        seed=cfg.train.seed, **common),
            train_step.build_eval_step(start.model, cfg.train.step, run.mesh, run.rules, **common))


def _lock_out_dir(run: Run, resources: contextlib.ExitStack) -> None:
    """Rank 0 locks out_dir for the run; every rank learns whether it could."""
    error = None
    if run.is_main:
        try:
            resources.enter_context(DirLock(run.out_dir))
        except UserError as e:
            error = e
    if torch.distributed.is_initialized():
        failed = torch.tensor(int(error is not None), device=run.dev.torch_device)
        torch.distributed.all_reduce(failed)
        if failed.item() and error is None:
            raise UserError(f"rank 0 could not lock {run.out_dir} (see its error)")
    if error is not None:
        raise error


def _say(run: Run, message: str) -> None:
    if run.is_main:
        print(message, flush=True)


def check_vocab(model: llama.Config, data: DataConfig) -> None:
    if data.tokenizer is None:
        return
    from lib.tokenizer import load_tokenizer
    n = load_tokenizer(data.tokenizer).vocab_size
    if n > model.vocab_size:
        raise UserError(f"tokenizer {data.tokenizer} has {n} tokens but model.vocab_size is "
                        f"{model.vocab_size}; set model.vocab_size={n} or larger")


def check_out_dir(out_dir: str) -> None:
    """For the runner configs' __post_init__: an empty out_dir would write into the cwd."""
    if not out_dir.strip():
        raise ValueError("out_dir is empty: give the directory the run writes to (out_dir=runs/name)")


def resolve_out_dirs(out_dir: str, ckpt_cfg: ckpt_lib.CheckpointConfig) -> ckpt_lib.CheckpointConfig:
    """Checkpoints default to `<out_dir>/checkpoints`."""
    if ckpt_cfg.dir is None:
        return dataclasses.replace(ckpt_cfg, dir=str(Path(out_dir) / "checkpoints"))
    return ckpt_cfg
