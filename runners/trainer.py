"""The training loop shared by `runners.pretrain` and `runners.sft`.

It composes the layers below and owns only what a long run needs around the pure step: where
the state comes from (fresh, HF, native checkpoint, resume), the data position, periodic
validation, logging, checkpointing, and stopping cleanly on bad steps or SIGTERM.
"""
from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor

from lib import checkpoint as ckpt_lib
from lib import config as config_lib
from lib import device, metrics, optim, pytree
from lib.data import DataConfig, batches, build_datasets
from lib.errors import UserError
from models import hf, llama, megatron
from parallel import kernels, sharding, train_step
from parallel.mesh import Mesh, MeshConfig, build_mesh


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
class Run:
    """What the loop needs, built once from the config."""
    dev: device.Device
    dist: device.DistInfo
    mesh: Mesh
    rules: sharding.Rules
    out_dir: Path
    kernels: llama.Kernels
    backend: Any                          # torch.compile backend for this device


def setup(train: TrainConfig, mesh_cfg: MeshConfig, rule_spec, out_dir: str) -> Run:
    dev = device.detect(train.device)
    out = Path(out_dir)
    dist = device.init_distributed(dev)
    mesh = build_mesh(mesh_cfg, dev.kind)
    rules = sharding.logical_axis_rules(rule_spec, mesh)
    # Fused attention kernels have no DTensor strategy; under a mesh the reference kernel runs
    # sharded, on one process the device's fastest kernel is used.
    wanted = train.attention
    if mesh.device_mesh is not None and wanted not in ("auto", "reference"):
        raise UserError(f"train.attention={wanted} cannot run on DTensor shards yet; use "
                        "train.attention=reference (or auto) with a multi-device mesh")
    if wanted == "auto" and mesh.device_mesh is not None:
        wanted = "reference"
    backend = kernels.compile_backend(dev) if train.step.compile else None
    return Run(dev, dist, mesh, rules, out, kernels.kernels_for(dev, wanted), backend)


def initial_params(run: Run, load: str | None, model: llama.Config,
                   seed: int) -> tuple[llama.Config, llama.Params]:
    """The HF or Megatron weights named by `checkpoint.load` (with their config), else a random
    init, on this run's device. A native checkpoint in `load` is read later by the checkpointer,
    into this random init.
    """
    if load and megatron.is_megatron_checkpoint(load):
        return megatron.load(load, dtype=torch.float32, device=run.dev.torch_device)
    if load and not ckpt_lib.is_native_checkpoint(load):
        if not Path(load, "config.json").is_file():
            raise UserError(f"checkpoint.load={load!r} is neither a native checkpoint, a Megatron "
                            "checkpoint nor an HF directory with config.json")
        return hf.load(load, dtype=torch.float32, device=run.dev.torch_device)
    return model, llama.init(model, seed, device=run.dev.torch_device)


def check_vocab(model: llama.Config, data: DataConfig) -> None:
    if data.tokenizer is None:
        return
    from lib.tokenizer import load_tokenizer
    n = load_tokenizer(data.tokenizer).vocab_size
    if n > model.vocab_size:
        raise UserError(f"tokenizer {data.tokenizer} has {n} tokens but model.vocab_size is "
                        f"{model.vocab_size}; set model.vocab_size={n} or larger")


def shard(run: Run, tree: Any, axes: Any) -> Any:
    return sharding.shard_params(tree, axes, run.rules, run.mesh)


def gather(tree: Any) -> Any:
    """Whole tensors of a (sharded) tree; a collective: every rank calls it."""
    return pytree.tree_map(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, tree)


def to_device(batch: dict[str, torch.Tensor], dev: device.Device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev.torch_device, non_blocking=True) for k, v in batch.items()}


def _scalar(x: torch.Tensor) -> float:
    return float(x.detach().float().cpu())


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits.

    Ranks may receive the signal in different steps, so `agreed()` takes the maximum over the
    process group: every rank stops after the same step (a rank alone in the save's collectives
    while the others enter the next step would deadlock)."""

    def __init__(self, dev: device.Device):
        self.requested = False
        self._previous = {}
        self._dev = dev

    def agreed(self) -> bool:
        if not torch.distributed.is_initialized():
            return self.requested
        flag = torch.tensor(int(self.requested), device=self._dev.torch_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_loop(*, run: Run, cfg: Any, train: TrainConfig, model: llama.Config,
               optim_cfg: optim.OptimizerConfig, data_cfg: DataConfig,
               ckpt_cfg: ckpt_lib.CheckpointConfig, state: dict,
               step_fn: Callable, eval_fn: Callable | None,
               on_finish: Callable[[dict], None] | None = None) -> dict:
    """Train `state` with `step_fn` for `train.steps` steps, resuming from checkpoints.

    `state` is the freshly initialised (sharded) state: it is the restore target, so a
    checkpoint is read straight into its dtypes and placements.
    """
    rank = run.dist.rank
    ckpt = ckpt_lib.Checkpointer(ckpt_cfg, rank, run.dist.world_size)
    consumed = 0
    start_step = 0
    if ckpt.can_restore():
        # The run's own checkpoints resume everything; `load` with finetune gives params only.
        params_only = ckpt.latest_step() is None and ckpt_cfg.finetune
        state, extra = ckpt.restore(state)
        if params_only and "master" in state["opt"]:
            # The fp32 master weights are what the optimizer updates: they must be the loaded
            # params, not the random init they were made from.
            state["opt"]["master"] = pytree.tree_map(lambda p: p.detach().float(), state["params"])
        consumed = int(extra.get("consumed_samples", 0))
        start_step = int(state["step"])
        if rank == 0:
            source = ckpt_cfg.dir if ckpt.latest_step() is not None else ckpt_cfg.load
            how = "params only (finetune)" if start_step == 0 else f"resuming at step {start_step}"
            print(f"loaded checkpoint from {source}: {how}", flush=True)
    if start_step >= train.steps:
        if rank == 0:
            print(f"nothing to do: the checkpoint is at step {start_step} >= train.steps={train.steps}")
        ckpt.close()
        if on_finish is not None:
            on_finish(state)
        return state

    gb = train.global_batch
    eval_samples = gb * train.eval_batches if train.eval_every else 0
    sets = build_datasets(data_cfg, {"train": train.steps * gb, "valid": eval_samples},
                          max_seq_len=model.max_seq_len, vocab_size=model.vocab_size)
    index, count = sharding.batch_shards(run.rules, run.mesh)
    train_batches = batches(sets["train"], gb, consumed, index, count)

    dtype = train_step.DTYPES[train.step.dtype]
    meter = metrics.ThroughputMeter(
        flops_per_token=llama.flops_per_token(model, data_cfg.seq_len),
        peak_flops=device.peak_flops(run.dev, dtype), world_size=run.dist.world_size,
        sync=lambda: device.synchronize(run.dev))
    config_dict = config_lib.to_dict(cfg)
    if rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, run.out_dir / "config.yaml")

    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, state, {"consumed_samples": consumed, "config": config_dict}, force=force)

    bad_steps = 0
    step = start_step
    # However the loop ends (done, signal, divergence, an error), a pending async save is
    # committed before the process exits, so the last checkpoint is always complete.
    try:
        with metrics.MetricsLogger(run.out_dir, every=train.log_every, rank=rank,
                                   resume_step=start_step or None) as logger, \
                _StopRequest(run.dev) as stop:
            progress = _progress(rank, start_step, train.steps)
            for step in range(start_step + 1, train.steps + 1):
                batch = next(train_batches, None)
                if batch is None:
                    raise UserError(f"the training data ran out at step {step}")
                # Randomness (LoRA dropout) is a function of (seed, step), as jax.random.fold_in
                # makes it: a resumed run draws what an uninterrupted one would, no RNG state saved.
                torch.manual_seed(train.seed * 1_000_003 + step)
                state, m = step_fn(state, to_device(batch, run.dev))
                consumed += gb
                loss = _scalar(m["loss"])
                meter.update(tokens=gb * data_cfg.seq_len, samples=gb)
                # A non-finite step leaves the state untouched (the step skips it). Under fp16 that is
                # loss scaling at work until the scale hits its floor; otherwise it is divergence,
                # tolerated a few times in a row.
                diverged = not math.isfinite(loss) or bool(_scalar(m["skipped"]))
                scaling = (train.step.dtype == "fp16"
                           and _scalar(m["loss_scale"]) > train.step.loss_scale.min_scale)
                if diverged and not scaling:
                    bad_steps += 1
                    if bad_steps >= train.max_bad_steps:
                        raise UserError(
                            f"training diverged at step {step}: loss {loss}, grad norm "
                            f"{_scalar(m['grad_norm'])} ({bad_steps} non-finite steps in a row, "
                            f"train.max_bad_steps={train.max_bad_steps}; those updates were skipped, "
                            f"the last checkpoint is step {ckpt.latest_step()}). Lower optim.lr, "
                            "clip gradients (optim.grad_clip) or train in fp32/bf16")
                else:
                    bad_steps = 0
                progress.update(1)
                if logger.should_log(step) or step == train.steps:
                    row = {"loss": loss, "lr": _scalar(m["lr"]), "grad_norm": _scalar(m["grad_norm"]),
                           "loss_scale": _scalar(m["loss_scale"]), "skipped": int(_scalar(m["skipped"])),
                           **meter.read(), **metrics.memory_metrics(device.memory_stats(run.dev))}
                    logger.log(step, row)
                    progress.set_postfix(loss=f"{loss:.4f}")
                with meter.paused():
                    if eval_fn is not None and train.eval_every and step % train.eval_every == 0:
                        logger.log(step, {"val_loss": evaluate(eval_fn, state, sets["valid"], gb,
                                                               index, count, run.dev)})
                    save(step)
                if stop.agreed():
                    save(step, force=True)
                    if rank == 0:
                        print(f"stopped by signal at step {step}; checkpoint saved", flush=True)
                    break
            progress.close()
            if step == train.steps:
                save(step, force=True)
    finally:
        ckpt.close()
    if on_finish is not None:
        on_finish(state)
    if rank == 0:
        print(f"logs: {run.out_dir}/metrics.jsonl, TensorBoard: {run.out_dir}/tensorboard"
              + (f", checkpoints: {ckpt_cfg.dir}" if ckpt_cfg.dir else ""), flush=True)
    return state


def evaluate(eval_fn: Callable, state: dict, dataset, global_batch: int, index: int, count: int,
             dev: device.Device) -> float:
    """Mean token loss over the validation set's first batches (the same ones every time);
    batches are weighted by their trained tokens, which differ on masked instruction data."""
    total = tokens = 0.0
    for b in batches(dataset, global_batch, 0, index, count):
        n = float((b["labels"] != llama.IGNORE_INDEX).sum())
        total += _scalar(eval_fn(state["params"], to_device(b, dev))) * n
        tokens += n
    return total / tokens if tokens else float("nan")


def _progress(rank: int, start: int, total: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=rank != 0, desc="train", unit="step",
                dynamic_ncols=True, leave=False)


def resolve_out_dirs(out_dir: str, ckpt_cfg: ckpt_lib.CheckpointConfig) -> ckpt_lib.CheckpointConfig:
    """Checkpoints default to `<out_dir>/checkpoints`."""
    if ckpt_cfg.dir is None:
        return dataclasses.replace(ckpt_cfg, dir=str(Path(out_dir) / "checkpoints"))
    return ckpt_cfg
