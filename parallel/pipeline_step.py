"""Pipeline-parallel train and eval steps, run by torch.distributed.pipelining's schedules.

    params = pipeline_step.stage_params(full_params, model_cfg, plan, mesh, rules)  # this rank's part
    state = train_step.init_state(params, step_cfg)
    step = pipeline_step.build_train_step(model_cfg, optim_cfg, step_cfg, pipe_cfg, mesh, rules)
    state, metrics = step(state, local_batch)     # the contract of parallel.train_step

The step keeps the functional shape of `parallel.train_step`; only the gradient half differs.
torch's schedules (GPipe, 1F1B, Interleaved1F1B) drive `PipelineStage`s, which run a stage's
forward, send activations and gradients between ranks along `pipe`, and run the backward with
`torch.autograd` (not `torch.func`): each stage's pure function sits in a thin `nn.Module`
that is handed the rank's parameters as autograd leaves for one step; the schedule accumulates
their `.grad` over the micro-batches, and the step collects those as a gradient tree and applies
the same update as every other mesh (`train_step.apply_gradients`: FSDP reduce-scatter, fp16
unscaling, clipping, AdamW). The gradient norm sums its squares over the `pipe` group, so
clipping sees the whole model and every stage agrees to keep or skip a step (and on the fp16
loss scale, which is a function of that agreement).

Within a stage, parameters and activations are DTensors on the stage's sub-mesh (`data`,
`fsdp`, `tensor`; `Mesh.device_mesh`), written in the global view as everywhere else. Between
stages an activation travels as this rank's local shard: the receiving rank of the same
coordinates wraps it back with the placements its logical axes give, and the gradient comes back
the same way (DTensor's from_local/to_local carry the redistribution in the backward).

The per-micro-batch loss is the token-summed cross-entropy times `loss_scale / tokens in the
global batch`, so the accumulated gradient is that of the batch's mean loss, as in
`parallel.train_step`. Each stage's layer function is compiled once for all its layers
(`parallel.layerwise`, fullgraph): inductor (or the device's backend) builds its forward and,
through AOTAutograd, its backward, which the schedule's autograd call runs; the loss and the
update of each layer's parameters (`train_step.build_update_group`) are compiled on their own.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from lib import optim, pytree
from lib.constraints import use_constraint
from lib.errors import UserError
from lib.labels import IGNORE_INDEX
from models import llama
from parallel import jit as jit_lib
from parallel import kernels as kernels_lib
from parallel import layerwise, pipeline, sharding, train_step
from parallel.mesh import Mesh
from parallel.pipeline import Layout, PipelineConfig

State = train_step.State
Batch = train_step.Batch
HIDDEN_AXES = ("batch", "seq", "embed")


def stage_params(params: llama.Params, model: llama.Config, plan: Layout, mesh: Mesh,
                 rules: sharding.Rules) -> llama.Params:
    """This rank's stages' part of a full parameter tree, placed on its stage's sub-mesh."""
    stages = plan.stages_of(mesh.stage)
    return sharding.shard_params(pipeline.select(params, plan, stages),
                                 pipeline.select(llama.param_axes(model), plan, stages), rules, mesh)


def place_params(params: llama.Params, model: llama.Config, pipe_cfg: PipelineConfig, mesh: Mesh,
                 rules: sharding.Rules) -> llama.Params:
    """Full-model `params` placed for this run: this rank's stages' part on its stage's
    sub-mesh when `mesh.pipe` > 1 (the layout checked first), else all of them by the rules."""
    if mesh.size("pipe") == 1:
        return sharding.shard_params(params, llama.param_axes(model), rules, mesh)
    return stage_params(params, model, pipeline.layout(pipe_cfg, model.n_layers, mesh.size("pipe")),
                        mesh, rules)


def _device(mesh: Mesh) -> torch.device:
    kind = mesh.pipe_mesh.device_type
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, getattr(torch, kind).current_device())


class _Stage(torch.nn.Module):
    """One stage's pure function as the module a `PipelineStage` calls.

    It registers no nn.Parameters: the step sets `params` (the rank's tree, leaves requiring
    grad) before running the schedule and clears it after. Inputs and outputs that cross ranks
    are local tensors; inside, everything is in the global (DTensor) view of the stage's mesh.
    """

    def __init__(self, fn: Callable, first: bool, last: bool, mesh: Mesh, rules: sharding.Rules):
        super().__init__()
        self.fn, self.first, self.last = fn, first, last
        self.mesh, self.rules = mesh, rules
        self.params: Any = None
        self._hidden = sharding.spec_for(HIDDEN_AXES, rules, mesh)

    def forward(self, x: torch.Tensor, **batch: torch.Tensor) -> torch.Tensor:
        mesh = self.mesh.device_mesh
        if self.first:
            x = sharding.shard_batch({"tokens": x}, self.rules, self.mesh)["tokens"]
        elif mesh is not None:
            x = DTensor.from_local(x, mesh, self._hidden, run_check=False)
        out = self.fn(self.params, x, **sharding.shard_batch(batch, self.rules, self.mesh))
        if self.last or not isinstance(out, DTensor):
            return out  # the logits go to the loss on this rank, in the global view
        if tuple(out.placements) != self._hidden:
            out = out.redistribute(mesh, self._hidden)
        return out.to_local()


class _TokenLoss:
    """loss_fn(logits, labels) for the schedule: token-summed cross-entropy times `weight`
    (loss scale / tokens in the global batch, set per step)."""

    def __init__(self, mesh: Mesh, rules: sharding.Rules, backend, cache_dir):
        self.mesh, self.rules = mesh, rules
        self.weight: torch.Tensor | None = None

        def loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return llama.cross_entropy(logits, labels, reduction="sum") * weight
        self._loss = jit_lib.jit(loss, backend, cache_dir=cache_dir)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = sharding.shard_batch({"labels": labels}, self.rules, self.mesh)["labels"]
        # The stage's whole sum, as a plain tensor for the schedule: gathered outside the
        # compiled region, whose output stayed a DTensor when the stage has a data axis.
        return pytree.full_tensor(self._loss(logits, labels, self.weight))


_SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B,
              "Interleaved1F1B": ScheduleInterleaved1F1B}


def _build_schedule(name: str, modules: list[_Stage], stages: list[int], plan: Layout, mesh: Mesh,
                    micro_batches: int, loss: _TokenLoss):
    group = mesh.pipe_mesh.get_group()
    device = _device(mesh)
    pipeline_stages = [PipelineStage(m, s, plan.n_stages, device, group=group)
                       for m, s in zip(modules, stages)]
    cls = _SCHEDULES[name]
    # scale_grads=False: the loss is already divided by the batch's token count.
    if cls is ScheduleInterleaved1F1B:
        return cls(pipeline_stages, micro_batches, loss_fn=loss, scale_grads=False)
    return cls(pipeline_stages[0], micro_batches, loss_fn=loss, scale_grads=False)


def _check_rows(batch: Batch, micro_batches: int) -> None:
    for key in ("tokens", "labels"):
        if key not in batch:
            raise UserError(f"batch has no {key!r} (keys: {sorted(batch)})")
    rows = batch["tokens"].shape[0]
    if rows % micro_batches:
        raise UserError(f"this rank's batch has {rows} rows, not divisible by "
                        f"micro_batches={micro_batches}")


def _model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("positions", "segment_ids") if k in batch}


class _Pipeline:
    """The stages of this rank and a schedule over them (one for training, one for eval)."""

    def __init__(self, model: llama.Config, plan: Layout, schedule: str, mesh: Mesh,
                 rules: sharding.Rules, micro_batches: int, kernels: llama.Kernels,
                 remat: Callable | None, backend, cache_dir):
        self.mesh, self.rules, self.plan = mesh, rules, plan
        self.stages = plan.stages_of(mesh.stage)
        self.first = 0 in self.stages
        self.last = plan.n_stages - 1 in self.stages
        # One compiled layer for all the rank's stages (`parallel.layerwise`); embedding and
        # lm head run eagerly around it.
        layer = layerwise.compiled_layers(remat, backend, cache_dir)
        self.modules = [
            _Stage(pipeline.stage_function(model, plan, s, kernels=kernels, remat=layer),
                   s == 0, s == plan.n_stages - 1, mesh, rules)
            for s in self.stages]
        self.loss = _TokenLoss(mesh, rules, backend, cache_dir)
        self.schedule = _build_schedule(schedule, self.modules, self.stages, plan, mesh,
                                        micro_batches, self.loss)
        self.constraint = sharding.activation_constraint(rules, mesh)
        self.group = mesh.pipe_mesh.get_group()

    def global_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Valid labels in the global batch (every rank of the stage holds its rows)."""
        labels = sharding.shard_batch({"labels": labels}, self.rules, self.mesh)["labels"]
        return torch.clamp(pytree.full_tensor((labels != IGNORE_INDEX).sum()), min=1).float()

    def run(self, params: Any, batch: Batch, weight: torch.Tensor, train: bool) -> torch.Tensor:
        """Run the schedule over `batch`; returns the sum of the per-micro-batch losses, equal
        on every rank of the pipe group (the last stage computes it)."""
        for m in self.modules:
            m.params = params
        self.loss.weight = weight
        losses: list[torch.Tensor] = []
        args = (batch["tokens"],) if self.first else ()
        target = batch["labels"] if self.last else None
        try:
            with implicit_replication(), use_constraint(self.constraint):
                run = self.schedule.step if train else self.schedule.eval
                run(*args, target=target, losses=losses, **_model_inputs(batch))
        finally:
            for m in self.modules:
                m.params = None
        total = torch.stack(losses).sum() if losses else torch.zeros((), dtype=torch.float32)
        total = total.detach().float().to(_device(self.mesh))
        dist.all_reduce(total, group=self.group)  # only the last stage's is non-zero
        return total


def _remat_and_kernels(step_cfg: train_step.TrainStepConfig, mesh: Mesh,
                       kernels: llama.Kernels | None):
    return train_step.apply_remat(step_cfg.remat, kernels or kernels_lib.kernels_for(None, mesh=mesh))


def build_train_step(model_cfg: llama.Config, optim_cfg: optim.OptimizerConfig,
                     step_cfg: train_step.TrainStepConfig, pipe_cfg: PipelineConfig, mesh: Mesh,
                     rules: sharding.Rules, kernels: llama.Kernels | None = None,
                     backend: str | Callable = "inductor", cache_dir: str | None = None,
                     ) -> Callable[[State, Batch], tuple[State, dict]]:
    """`train_step(state, local_batch) -> (new_state, metrics)` over the stages of `mesh.pipe`.

    `state["params"]` is this rank's part (`stage_params`); metrics as `parallel.train_step`,
    equal on every rank. Arguments as `parallel.train_step.build_train_step`.
    """
    plan = pipeline.check(pipe_cfg, model_cfg, mesh.size("pipe"), step_cfg.micro_batches)
    remat, kernels = _remat_and_kernels(step_cfg, mesh, kernels)
    backend = backend if step_cfg.compile else None
    cache_dir = cache_dir if step_cfg.compile else None
    pipe = _Pipeline(model_cfg, plan, pipe_cfg.schedule, mesh, rules, step_cfg.micro_batches,
                     kernels, remat, backend, cache_dir)
    group = pipe.group

    def sum_over_stages(x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(x, "sum", group)

    update_group = train_step.build_update_group(optim_cfg, backend, cache_dir)

    def step(state: State, local_batch: Batch) -> tuple[State, dict]:
        _check_rows(local_batch, step_cfg.micro_batches)
        scale = state["loss_scale"]["scale"]
        leaves = pytree.tree_map(lambda p: p.detach().requires_grad_(True), state["params"])
        weight = scale / pipe.global_tokens(local_batch["labels"])
        total = pipe.run(leaves, local_batch, weight, train=True)
        grads = pytree.map_with_path(_grad_of, leaves)
        with implicit_replication(), use_constraint(pipe.constraint):
            return train_step.apply_gradients(state, grads, total / scale, optim_cfg, step_cfg,
                                              sum_across=sum_over_stages, update_group=update_group)

    step.schedule = pipe.schedule  # torch's schedule object, for inspection (its pipeline_order)
    return step


def _grad_of(path: str, leaf: torch.Tensor) -> torch.Tensor:
    if leaf.grad is None:
        raise AssertionError(f"pipeline stage produced no gradient for {path}")
    return leaf.grad


def build_eval_step(model_cfg: llama.Config, step_cfg: train_step.TrainStepConfig,
                    pipe_cfg: PipelineConfig, mesh: Mesh, rules: sharding.Rules,
                    kernels: llama.Kernels | None = None, backend: str | Callable = "inductor",
                    cache_dir: str | None = None) -> Callable[[Any, Batch], torch.Tensor]:
    """`eval_step(params, local_batch) -> loss`: the mean token loss of the global batch, run
    forward-only through the stages (GPipe order; equal on every rank)."""
    plan = pipeline.layout(pipe_cfg, model_cfg.n_layers, mesh.size("pipe"))
    _, kernels = _remat_and_kernels(step_cfg, mesh, kernels)
    backend = backend if step_cfg.compile else None
    cache_dir = cache_dir if step_cfg.compile else None
    # Its own stages and schedule: a schedule switching between train and eval would redo its
    # set-up (a metadata forward and backward) at every switch.
    schedule = "Interleaved1F1B" if plan.virtual_stages > 1 else "GPipe"
    pipe = _Pipeline(model_cfg, plan, schedule, mesh, rules, step_cfg.micro_batches, kernels,
                     None, backend, cache_dir)

    def eval_step(params: Any, local_batch: Batch) -> torch.Tensor:
        _check_rows(local_batch, step_cfg.micro_batches)
        with torch.no_grad():
            return pipe.run(params, local_batch, 1.0 / pipe.global_tokens(local_batch["labels"]),
                            train=False)

    return eval_step
