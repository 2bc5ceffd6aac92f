"""The train step, built from options and compiled as one graph.

    state = init_state(params, optim_cfg, step_cfg)            # {"params", "opt", "step", "loss_scale"}
    train_step = build_train_step(model_cfg, optim_cfg, step_cfg, mesh, rules)
    state, metrics = train_step(state, local_batch)            # metrics: loss, grad_norm, lr, ...

Inside the compiled function: the gradient of the token-summed loss of each micro-batch
(`torch.func.grad_and_value`; `torch.autograd.grad` inside a compiled function graph-breaks,
DESIGN.md), gradients redistributed to their parameter placements (data-parallel all-reduce,
FSDP reduce-scatter), fp16 unscaling and overflow check, global-norm clipping, the learning rate
and the AdamW update. Parameters are DTensors placed by `parallel.sharding.shard_params` (or
plain tensors on one process); the whole step is written in the global view.

`local_batch` is this rank's rows of the global batch (see `sharding.batch_shards`); the step
splits them into micro-batches and wraps them as DTensors before entering the compiled graph.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import optree
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from lib import optim, pytree
from lib.constraints import use_constraint
from lib.errors import UserError
from models import attention as attention_kernels
from models import llama
from parallel import jit as jit_lib
from parallel import sharding
from parallel.mesh import Mesh

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
State = dict[str, Any]
Batch = dict[str, torch.Tensor]
# forward(params, tokens, *, positions, segment_ids, kernels, remat, training) -> logits
ForwardFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class TrainStepConfig:
    micro_batches: int = 1          # gradient accumulation: local batch rows are split this many ways
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"   # params and activations; moments stay fp32
    remat: Literal["none", "full", "selective"] = "none"  # recompute per layer in the backward
    compile: bool = True            # False: the same step, eager (for debugging)
    loss_scale: optim.LossScaleConfig = field(default_factory=optim.LossScaleConfig)  # fp16 only

    def __post_init__(self):
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches} must be >= 1")


# ---------------------------------------------------------------------------------------------
# Activation recompute
#
# torch.utils.checkpoint (full, or selective with a policy) needs saved-tensor hooks, which
# torch.func.grad rejects on torch 2.13, eagerly and under torch.compile alike. This autograd
# Function keeps only its inputs and recomputes the function with torch.func.vjp in the
# backward: it composes with torch.func.grad_and_value and compiles into the step's graph.


class _RecomputeInBackward(torch.autograd.Function):
    @staticmethod
    def forward(fn, *tensors):
        return fn(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad):
        _, vjp = torch.func.vjp(ctx.fn, *ctx.saved_tensors)
        return (None, *vjp(grad))


def recompute_in_backward(fn: Callable) -> Callable:
    """`fn` whose intermediate activations are recomputed in the backward instead of stored.

    Floating-point tensors among the positional arguments (nested in dicts/lists too) get
    gradients; everything else (int tensors, None, configs, functions, keyword arguments) is
    passed through unchanged.
    """
    def wrapped(*args, **kwargs):
        # Keyword arguments stay out of the flattening: dynamo cannot rebuild the treespec of an
        # empty kwargs dict (optree's DictMetaData) inside the autograd Function.
        leaves, spec = optree.tree_flatten(args)
        diff = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]

        def call(*tensors):
            full = list(leaves)
            for i, t in zip(diff, tensors):
                full[i] = t
            return fn(*optree.tree_unflatten(spec, full), **kwargs)
        return _RecomputeInBackward.apply(call, *[leaves[i] for i in diff])
    return wrapped


def apply_remat(mode: str, kernels: llama.Kernels) -> tuple[Callable | None, llama.Kernels]:
    """(the model's `remat=` hook, the model's kernels) for a recompute mode.

    "full": each transformer layer keeps only its input and recomputes everything in the
    backward. "selective": only the attention kernel is recomputed (Megatron's selective
    recompute: the [b, h, s, s] scores are the large, cheap-to-recompute activations).
    """
    if mode == "none":
        return None, kernels
    if mode == "full":
        return recompute_in_backward, kernels
    if mode == "selective":
        return None, dataclasses.replace(kernels, attention=recompute_in_backward(kernels.attention))
    raise UserError(f"remat={mode!r} is not one of none, full, selective")


# ---------------------------------------------------------------------------------------------
# State


def init_state(params: Any, optim_cfg: optim.OptimizerConfig, step_cfg: TrainStepConfig) -> State:
    """Training state from (sharded) fp32 params: params cast to the step dtype, fp32 moments
    (and fp32 master weights when that dtype is bf16/fp16), step 0 and the fp16 loss scale."""
    del optim_cfg  # AdamW's state does not depend on its hyper-parameters
    dtype = DTYPES[step_cfg.dtype]
    master = pytree.tree_map(lambda p: p.detach().float(), params)
    opt = optim.adamw_init(master)
    if dtype != torch.float32:
        opt["master"] = master
    scale = step_cfg.loss_scale if step_cfg.dtype == "fp16" else optim.LossScaleConfig(initial=1.0)
    return {
        "params": pytree.tree_map(lambda p: p.detach().to(dtype), params),
        "opt": opt,
        "step": torch.zeros((), dtype=torch.int64),
        "loss_scale": optim.loss_scale_init(scale),
    }


# ---------------------------------------------------------------------------------------------
# The step


def base_forward(model_cfg: llama.Config) -> ForwardFn:
    """`models.llama.forward` as a ForwardFn (the plain model behaves the same in training)."""
    def forward(params: Any, tokens: torch.Tensor, *, training: bool, **kw) -> torch.Tensor:
        return llama.forward(params, tokens, model_cfg, **kw)
    return forward


def default_kernels(mesh: Mesh) -> llama.Kernels:
    """The model's pure-torch kernels; on a sharded mesh with reference attention, because
    F.scaled_dot_product_attention has no DTensor sharding strategy on CPU (DESIGN.md)."""
    if mesh.device_mesh is None:
        return llama.Kernels()
    return llama.Kernels(attention=attention_kernels.reference)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def _split_micro_batches(local_batch: Batch, n: int) -> list[Batch]:
    rows = next(iter(local_batch.values())).shape[0]
    if rows % n:
        raise UserError(f"this rank's batch has {rows} rows, not divisible by micro_batches={n}")
    chunks = {k: v.chunk(n, dim=0) for k, v in local_batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(n)]


def _check_batch(batch: Batch) -> None:
    for key in ("tokens", "labels"):
        if key not in batch:
            raise UserError(f"batch has no {key!r} (keys: {sorted(batch)})")


def apply_gradients(state: State, grads: Any, loss: torch.Tensor, optim_cfg: optim.OptimizerConfig,
                    step_cfg: TrainStepConfig,
                    sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    ) -> tuple[State, dict]:
    """The second half of a step: the new state from the summed (loss-scaled) gradients of the
    params, and the metrics. `loss` is the step's mean loss (unscaled). `sum_across` sums the
    squared gradient norm over ranks holding other parameters (pipeline stages), so clipping
    and the finite check see the whole model and every stage skips the same steps."""
    params, scale = state["params"], state["loss_scale"]["scale"]
    grads = sharding.shard_like(grads, params)
    grads = pytree.tree_map(lambda g: g.float() / scale, grads)
    grads, grad_norm = optim.clip_by_global_norm(grads, optim_cfg.grad_clip, sum_across)
    # inf/nan anywhere makes the global norm non-finite. Such a step (an fp16 overflow, or a
    # diverging run in any dtype) keeps the old params and moments, so the state, and any
    # checkpoint of it, stays usable; torch.where keeps the graph free of data-dependent branches.
    finite = torch.isfinite(grad_norm)
    lr = optim.learning_rate(optim_cfg, state["step"])
    new_params, new_opt = optim.adamw_update(grads, state["opt"], params, lr, optim_cfg)
    keep = lambda new, old: torch.where(finite, new, old)
    new_params = pytree.tree_map(keep, new_params, params)
    new_opt = pytree.tree_map(keep, new_opt, state["opt"])
    new_scale = optim.loss_scale_update(state["loss_scale"], finite, step_cfg.loss_scale) \
        if step_cfg.dtype == "fp16" else state["loss_scale"]
    new_state = {"params": new_params, "opt": new_opt, "step": state["step"] + 1,
                 "loss_scale": new_scale}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale,
               "skipped": (~finite).to(torch.int64)}
    return new_state, metrics


def build_train_step(model_cfg: llama.Config, optim_cfg: optim.OptimizerConfig,
                     step_cfg: TrainStepConfig, mesh: Mesh, rules: sharding.Rules,
                     kernels: llama.Kernels | None = None, backend: str | Callable = "inductor",
                     cache_dir: str | None = None, forward: ForwardFn | None = None,
                     ) -> Callable[[State, Batch], tuple[State, dict]]:
    """`train_step(state, local_batch) -> (new_state, metrics)`.

    metrics (plain 0-dim tensors, equal on every rank): "loss" (mean over the valid tokens of
    the global batch, before the update), "grad_norm" (before clipping, after unscaling), "lr",
    "loss_scale" and "skipped" (1 when non-finite gradients skipped the update).
    `kernels` (from `parallel.kernels.kernels_for`) must run on this mesh; None picks
    `default_kernels(mesh)`. `backend`: the torch.compile backend (`parallel.kernels.
    compile_backend(dev)`; unused when step_cfg.compile is False). `cache_dir`: per-rank
    inductor caches go under it. `forward`: the model as a function of the trained tree
    (default `models.llama.forward`; LoRA passes its adapter forward over a frozen base).
    """
    remat, kernels = apply_remat(step_cfg.remat, kernels or default_kernels(mesh))
    forward = forward or base_forward(model_cfg)

    def token_loss_sum(params: Any, mb: Batch) -> torch.Tensor:
        logits = forward(params, mb["tokens"], positions=mb.get("positions"),
                         segment_ids=mb.get("segment_ids"), kernels=kernels, remat=remat,
                         training=True)
        return llama.cross_entropy(logits, mb["labels"], reduction="sum")

    def step_fn(state: State, micro_batches: list[Batch]) -> tuple[State, dict]:
        params, scale = state["params"], state["loss_scale"]["scale"]
        n_tokens = 0
        for mb in micro_batches:  # loops, not generator expressions: dynamo cannot trace those
            n_tokens = n_tokens + (mb["labels"] != llama.IGNORE_INDEX).sum()
        n_tokens = torch.clamp(n_tokens, min=1).float()
        grads, loss = None, 0.0
        for mb in micro_batches:
            # Each micro-batch's token sum over the global token count: the accumulated gradient
            # equals that of the whole batch's mean loss, whatever the padding per micro-batch.
            g, l = torch.func.grad_and_value(
                lambda p: token_loss_sum(p, mb) * (scale / n_tokens))(params)
            grads = g if grads is None else pytree.tree_map(torch.add, grads, g)
            loss = loss + l
        return apply_gradients(state, grads, _plain(loss) / scale, optim_cfg, step_cfg)

    compiled = jit_lib.jit(step_fn, backend if step_cfg.compile else None,
                           cache_dir=cache_dir if step_cfg.compile else None)
    constraint = sharding.activation_constraint(rules, mesh)

    def train_step(state: State, local_batch: Batch) -> tuple[State, dict]:
        _check_batch(local_batch)
        micro = [sharding.shard_batch(mb, rules, mesh)
                 for mb in _split_micro_batches(local_batch, step_cfg.micro_batches)]
        # Plain tensors made inside the model (rope tables, masks) meet DTensors: treat them as
        # replicated. Set around the call, so the backward (inside grad_and_value) sees it too.
        with implicit_replication(), use_constraint(constraint):
            return compiled(state, micro)

    return train_step


def build_eval_step(model_cfg: llama.Config, step_cfg: TrainStepConfig, mesh: Mesh,
                    rules: sharding.Rules, kernels: llama.Kernels | None = None,
                    backend: str | Callable = "inductor", cache_dir: str | None = None,
                    forward: ForwardFn | None = None) -> Callable[[Any, Batch], torch.Tensor]:
    """`eval_step(params, local_batch) -> loss`: mean token loss of the global batch (plain tensor)."""
    kernels = kernels or default_kernels(mesh)
    forward = forward or base_forward(model_cfg)

    def eval_fn(params: Any, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            logits = forward(params, batch["tokens"], positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"), kernels=kernels, training=False)
            return _plain(llama.cross_entropy(logits, batch["labels"]))

    compiled = jit_lib.jit(eval_fn, backend if step_cfg.compile else None,
                           cache_dir=cache_dir if step_cfg.compile else None)
    constraint = sharding.activation_constraint(rules, mesh)

    def eval_step(params: Any, local_batch: Batch) -> torch.Tensor:
        _check_batch(local_batch)
        with implicit_replication(), use_constraint(constraint):
            return compiled(params, sharding.shard_batch(local_batch, rules, mesh))

    return eval_step
