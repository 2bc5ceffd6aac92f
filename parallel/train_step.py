"""The train step, built from options; compiled layer by layer.

    state = init_state(params, step_cfg)                       # {"params", "opt", "step", "loss_scale"}
    train_step = build_train_step(model_cfg, optim_cfg, step_cfg, mesh, rules)
    state, metrics = train_step(state, local_batch)            # metrics: loss, grad_norm, lr, ...

The step: the gradient of the token-summed loss of each micro-batch (`layerwise.grad_and_value`,
torch.autograd), gradients redistributed to their parameter placements (data-parallel
all-reduce, FSDP reduce-scatter), fp16 unscaling and overflow check, global-norm clipping, the
learning rate and the AdamW update. Parameters are DTensors placed by
`parallel.sharding.shard_params` (or plain tensors on one process); the whole step is written
in the global view.

With `compile`, the model's layer function, the loss and the update of one layer's parameters
are each compiled once and reused for every layer (`parallel.layerwise`), so compile time does
not grow with depth; the rest runs eagerly.

`local_batch` is this rank's rows of the global batch (see `sharding.batch_shards`); the step
splits them into micro-batches and wraps them as DTensors.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.utils.checkpoint

from lib import dtypes, optim, prng, pytree
from lib.errors import UserError
from lib.labels import IGNORE_INDEX
from models import llama
from models.llama import ForwardFn
from parallel import jit as jit_lib
from parallel import kernels as kernels_lib
from parallel import layerwise
from parallel import sharding
from parallel.mesh import Mesh

State = dict[str, Any]
Batch = dict[str, torch.Tensor]


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
# torch.utils.checkpoint (non-reentrant): the step differentiates with torch.autograd
# (`layerwise.grad_and_value`), whose saved-tensor hooks checkpoint needs, and under
# torch.compile it becomes a region whose tagged activations the partitioner recomputes in the
# backward instead of saving. (An autograd Function recomputing with torch.func.vjp, used while
# the step was differentiated by torch.func, kept every activation once compiled: the
# partitioner saw the backward's recompute as a copy of the forward and saved the forward's
# values; measured in bench/plan_accuracy.py as remat=full holding what remat=none holds.)


def recompute_in_backward(fn: Callable) -> Callable:
    """`fn` whose intermediate activations are recomputed in the backward instead of stored;
    its arguments (tensors, LoRA weights, configs, kernels) pass through unchanged."""
    def wrapped(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
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


def layer_hook(remat: Callable | None, rules: sharding.Rules, mesh: Mesh) -> Callable | None:
    """The model's per-layer hook (`remat=`): on a sharded mesh each layer first gathers its
    weights over the data-parallel axes (`sharding.gather_for_compute`), inside the recompute
    when there is one, so that full recompute gathers again in the backward instead of keeping
    the gathered weights (FSDP's reshard-after-forward)."""
    if mesh.device_mesh is None:
        return remat

    def hook(layer_fn: Callable) -> Callable:
        def gathered(p, *args, **kwargs):
            return layer_fn(sharding.gather_for_compute(p, rules, mesh), *args, **kwargs)
        return remat(gathered) if remat is not None else gathered
    return hook


def gather_outside_layers(params: Any, rules: sharding.Rules, mesh: Mesh) -> Any:
    """`params` with the weights used outside the layers (embeddings, final norm, output head)
    gathered for compute; the layers gather their own in `layer_hook`."""
    if mesh.device_mesh is None or not isinstance(params, dict) or "layers" not in params:
        return params
    return {k: v if k == "layers" else sharding.gather_for_compute(v, rules, mesh)
            for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# State


def init_state(params: Any, step_cfg: TrainStepConfig) -> State:
    """Training state from (sharded) fp32 params: params cast to the step dtype, fp32 moments
    (and fp32 master weights when that dtype is bf16/fp16), step 0 and the fp16 loss scale.
    The one place that makes master weights: whatever the params were loaded from, the master
    copy is made from them here."""
    dtype = dtypes.torch_dtype(step_cfg.dtype)
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
                    update_group: Callable | None = None) -> tuple[State, dict]:
    """The second half of a step: the new state from the summed (loss-scaled) gradients of the
    params, and the metrics. `loss` is the step's mean loss (unscaled). `sum_across` sums the
    squared gradient norm over ranks holding other parameters (pipeline stages), so clipping
    and the finite check see the whole model and every stage skips the same steps.
    `update_group`: `build_update_group(...)`, compiled or not (None: eager)."""
    params, opt, scale = state["params"], state["opt"], state["loss_scale"]["scale"]
    update_group = update_group or build_update_group(optim_cfg, None)
    grads = sharding.shard_like(grads, params)
    grad_norm = optim.global_norm(grads, sum_across) / scale  # of the unscaled gradients
    # inf/nan anywhere makes the global norm non-finite. Such a step (an fp16 overflow, or a
    # diverging run in any dtype) keeps the old params and moments, so the state, and any
    # checkpoint of it, stays usable.
    finite = torch.isfinite(grad_norm)
    lr = optim.learning_rate(optim_cfg, state["step"])
    count = opt["count"] + 1
    bias1, bias2_sqrt = optim.adamw_bias_corrections(count, optim_cfg)
    grad_factor = optim.clip_factor(grad_norm, optim_cfg.grad_clip) / scale
    flat_params, spec = pytree.flatten(params)
    masters = pytree.leaves(opt["master"]) if "master" in opt else [None] * len(flat_params)
    new_params, mu, nu, new_masters = layerwise.map_groups(
        update_group, layerwise.layer_groups(params),
        [pytree.leaves(grads), flat_params, pytree.leaves(opt["mu"]), pytree.leaves(opt["nu"]),
         masters], grad_factor, lr, bias1, bias2_sqrt, finite)
    new_opt = {"count": torch.where(finite, count, opt["count"]),
               "mu": pytree.unflatten(spec, mu), "nu": pytree.unflatten(spec, nu)}
    if "master" in opt:
        new_opt["master"] = pytree.unflatten(spec, new_masters)
    new_scale = optim.loss_scale_update(state["loss_scale"], finite, step_cfg.loss_scale) \
        if step_cfg.dtype == "fp16" else state["loss_scale"]
    new_state = {"params": pytree.unflatten(spec, new_params), "opt": new_opt,
                 "step": state["step"] + 1, "loss_scale": new_scale}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "loss_scale": scale,
               "skipped": (~finite).to(torch.int64)}
    return new_state, metrics


def build_update_group(optim_cfg: optim.OptimizerConfig, backend: str | Callable | None,
                       cache_dir: str | None = None) -> Callable:
    """The update of a group of parameters (`layerwise.layer_groups`: one layer's, say) for
    `apply_gradients`, compiled by `backend` (None: eager): one graph serves every layer."""
    return jit_lib.jit(functools.partial(_update_group, cfg=optim_cfg), backend, cache_dir)


def _update_group(grads: list[torch.Tensor], params: list[torch.Tensor], mus: list[torch.Tensor],
                  nus: list[torch.Tensor], masters: list[torch.Tensor | None],
                  grad_factor: torch.Tensor, lr: torch.Tensor, bias1: torch.Tensor,
                  bias2_sqrt: torch.Tensor, finite: torch.Tensor, *, cfg: optim.OptimizerConfig,
                  ) -> tuple[list, list, list, list]:
    """Local shards of a group of parameters: unscale and clip (`grad_factor`), AdamW on the
    fp32 master weights (the params themselves in fp32), cast back; all kept as they were when
    the step is not finite. Returns new (params, mus, nus, masters); a None master stays None."""
    keep = lambda new, old: torch.where(finite, new, old)
    out: tuple[list, list, list, list] = ([], [], [], [])
    for g, p, m, v, master in zip(grads, params, mus, nus, masters):
        weight = p if master is None else master
        w, new_m, new_v = optim.adamw_leaf(g.float() * grad_factor, m, v, weight.float(), lr, bias1,
                                           bias2_sqrt, optim.decay_rate(p, cfg), cfg)
        new = (keep(w.to(p.dtype), p), keep(new_m, m), keep(new_v, v),
               None if master is None else keep(w, master))
        for acc, x in zip(out, new):
            acc.append(x)
    return out


def build_train_step(model_cfg: llama.Config, optim_cfg: optim.OptimizerConfig,
                     step_cfg: TrainStepConfig, mesh: Mesh, rules: sharding.Rules,
                     kernels: llama.Kernels | None = None, backend: str | Callable = "inductor",
                     cache_dir: str | None = None, forward: ForwardFn | None = None,
                     seed: int = 0) -> Callable[[State, Batch], tuple[State, dict]]:
    """`train_step(state, local_batch) -> (new_state, metrics)`.

    metrics (plain 0-dim tensors, equal on every rank): "loss" (mean over the valid tokens of
    the global batch, before the update), "grad_norm" (before clipping, after unscaling), "lr",
    "loss_scale" and "skipped" (1 when non-finite gradients skipped the update).
    `kernels` (from `parallel.kernels.kernels_for`) must run on this mesh; None picks the pure
    torch kernels for it. `backend`: the torch.compile backend (`parallel.kernels.
    compile_backend(dev)`; unused when step_cfg.compile is False). `cache_dir`: per-rank
    inductor caches go under it. `forward`: the model as a function of the trained tree
    (default the plain model; LoRA passes its adapter forward over a frozen base). `seed`: the
    dropout key of micro-batch i at step s is fold_in(fold_in(seed, s), i) (`lib.prng`), so the
    masks are a function of (seed, step): a resumed run draws what an uninterrupted one would.
    """
    # Recompute wraps the plain attention kernel before `_on_mesh` runs it per shard, so
    # selective recompute's backward differentiates local tensors only.
    remat, kernels = apply_remat(step_cfg.remat, kernels or kernels_lib.kernels_for(None, mesh=mesh))
    kernels = _on_mesh(kernels, rules, mesh)
    forward = forward or llama.model_forward(model_cfg)
    backend = backend if step_cfg.compile else None
    layer = layerwise.compiled_layers(layer_hook(remat, rules, mesh), backend, cache_dir)
    cross_entropy = compiled_cross_entropy(backend, cache_dir)
    update_group = build_update_group(optim_cfg, backend, cache_dir)

    def step_fn(state: State, micro_batches: list[Batch]) -> tuple[State, dict]:
        params, scale = state["params"], state["loss_scale"]["scale"]
        step_key = prng.fold_in(seed, state["step"])
        n_tokens = 0
        for mb in micro_batches:
            n_tokens = n_tokens + (mb["labels"] != IGNORE_INDEX).sum()
        n_tokens = torch.clamp(n_tokens, min=1).float()
        grads, loss = None, 0.0
        for i, mb in enumerate(micro_batches):
            # Each micro-batch's token sum over the global token count: the accumulated gradient
            # equals that of the whole batch's mean loss, whatever the padding per micro-batch.
            def scaled_loss(p: Any, mb: Batch = mb, key: torch.Tensor = prng.fold_in(step_key, i)):
                token_sum = llama.batch_loss(forward, gather_outside_layers(p, rules, mesh), mb,
                                             reduction="sum", kernels=kernels, remat=layer,
                                             training=True, key=key, cross_entropy_fn=cross_entropy)
                return token_sum * (scale / n_tokens)
            g, l = layerwise.grad_and_value(scaled_loss)(params)
            grads = g if grads is None else pytree.tree_map(torch.add, grads, g)
            loss = loss + l
        return apply_gradients(state, grads, pytree.full_tensor(loss) / scale, optim_cfg, step_cfg,
                               update_group=update_group)

    # Eager around the compiled regions, under the mesh's contexts (`parallel.jit`).
    step_under_mesh = jit_lib.jit(step_fn, None, mesh=mesh, rules=rules)

    def train_step(state: State, local_batch: Batch) -> tuple[State, dict]:
        _check_batch(local_batch)
        micro = [sharding.shard_batch(mb, rules, mesh)
                 for mb in _split_micro_batches(local_batch, step_cfg.micro_batches)]
        return step_under_mesh(state, micro)

    return train_step


def _on_mesh(kernels: llama.Kernels, rules: sharding.Rules, mesh: Mesh) -> llama.Kernels:
    """`kernels` with attention run per shard on a sharded mesh (`kernels.per_shard_attention`)."""
    if mesh.device_mesh is None:
        return kernels
    return dataclasses.replace(kernels, attention=kernels_lib.per_shard_attention(kernels.attention,
                                                                                  rules, mesh))


def compiled_cross_entropy(backend: str | Callable | None, cache_dir: str | None = None) -> Callable:
    """`llama.cross_entropy` as a region of its own: fused, the [tokens, vocab] softmax and its
    gradient take one pass instead of several full-size copies (None: eager)."""
    return jit_lib.jit(llama.cross_entropy, backend, cache_dir)


def build_eval_step(model_cfg: llama.Config, step_cfg: TrainStepConfig, mesh: Mesh,
                    rules: sharding.Rules, kernels: llama.Kernels | None = None,
                    backend: str | Callable = "inductor", cache_dir: str | None = None,
                    forward: ForwardFn | None = None) -> Callable[[Any, Batch], torch.Tensor]:
    """`eval_step(params, local_batch) -> loss`: mean token loss of the global batch (plain tensor)."""
    kernels = _on_mesh(kernels or kernels_lib.kernels_for(None, mesh=mesh), rules, mesh)
    forward = forward or llama.model_forward(model_cfg)
    backend = backend if step_cfg.compile else None
    layer = layerwise.compiled_layers(layer_hook(None, rules, mesh), backend, cache_dir)
    cross_entropy = compiled_cross_entropy(backend, cache_dir)

    def eval_fn(params: Any, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            loss = llama.batch_loss(forward, gather_outside_layers(params, rules, mesh), batch,
                                    kernels=kernels, remat=layer, training=False,
                                    cross_entropy_fn=cross_entropy)
            return pytree.full_tensor(loss)

    eval_under_mesh = jit_lib.jit(eval_fn, None, mesh=mesh, rules=rules)

    def eval_step(params: Any, local_batch: Batch) -> torch.Tensor:
        _check_batch(local_batch)
        return eval_under_mesh(params, sharding.shard_batch(local_batch, rules, mesh))

    return eval_step
