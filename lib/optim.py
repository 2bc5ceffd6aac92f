"""A functional AdamW, learning-rate schedules, global-norm clipping and fp16 loss scaling.

In the optax mould: the optimizer state is a pytree and every function returns new values::

    opt_state = adamw_init(params)
    grads, norm = clip_by_global_norm(grads, cfg.grad_clip)
    params, opt_state = adamw_update(grads, opt_state, params, learning_rate(cfg, step), cfg)

Nothing here mutates its inputs; a compiled caller may still let the compiler reuse buffers.
Leaves may be plain tensors or DTensors (the step, the lr and the bias corrections are 0-dim
tensors, which DTensor treats as replicated), so the same code runs sharded and unsharded.

Weight decay is decoupled (AdamW) and applied only to leaves with two or more dims: the
matmul weights and embeddings. One-dim leaves are the RMSNorm scales, which decaying would pull
towards zero (LLaMA has no biases). This is the Megatron and nanoGPT convention.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from lib import config, pytree

PyTree = Any


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4                 # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-5             # floor of the decay, held after `decay_steps`
    warmup_steps: int = 0
    decay_steps: int = 10000         # step at which decay ends, warmup included (Megatron's lr-decay-iters)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0           # max global gradient norm; 0 turns clipping off

    def __post_init__(self):
        config.check_finite(self)
        if self.lr < 0 or self.min_lr < 0:
            raise ValueError(f"lr={self.lr} and min_lr={self.min_lr} must be >= 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.schedule != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps={self.decay_steps} must exceed warmup_steps="
                             f"{self.warmup_steps} for the {self.schedule!r} schedule")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1={self.beta1} must lie in [0, 1)")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2={self.beta2} must lie in [0, 1)")
        if self.eps <= 0:
            # eps=0 divides 0 by 0 for any weight whose gradients have all been zero.
            raise ValueError(f"eps={self.eps} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.lr * self.weight_decay >= 1:
            # Decoupled decay multiplies weights by (1 - lr * weight_decay) every step.
            raise ValueError(f"weight_decay={self.weight_decay} times lr={self.lr} is >= 1: every "
                             "step would zero or flip the sign of the weights")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0 (0 = off)")


def learning_rate(cfg: OptimizerConfig, step: torch.Tensor | int) -> torch.Tensor:
    """The learning rate used by optimizer step `step` (counting from 0), as an fp32 0-dim tensor.

    Warmup is linear and reaches `lr` at step `warmup_steps - 1` (step 0 already trains, at
    lr / warmup_steps). Then "cosine" or "linear" decays to `min_lr` at `decay_steps`, and
    holds it; "constant" stays at `lr`. Written with tensor ops so a compiled step that takes
    `step` as a tensor does not recompile as the step changes.
    """
    step = torch.as_tensor(step).to(torch.float32)
    if cfg.warmup_steps > 0:
        warm = torch.clamp((step + 1) / cfg.warmup_steps, max=1.0)
    else:
        warm = torch.ones_like(step)
    if cfg.schedule == "constant":
        return cfg.lr * warm
    progress = torch.clamp((step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps), 0.0, 1.0)
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + torch.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    decayed = cfg.min_lr + (cfg.lr - cfg.min_lr) * decay
    return torch.where(step < cfg.warmup_steps, cfg.lr * warm, decayed)


# ---------------------------------------------------------------------------------------------
# AdamW


def adamw_init(params: PyTree) -> dict[str, Any]:
    """Zero fp32 moments; fp32 master weights when any parameter is in a low-precision dtype.

    {"count": int64 step counter, "mu": first moments, "nu": second moments,
     "master": fp32 copies of the params, present only when the params are low precision}
    """
    fp32 = lambda p: torch.zeros_like(p, dtype=torch.float32)
    low_precision = any(p.dtype != torch.float32 for p in pytree.leaves(params))
    state = {
        "count": torch.zeros((), dtype=torch.int64),
        "mu": pytree.tree_map(fp32, params),
        "nu": pytree.tree_map(fp32, params),
    }
    if low_precision:
        state["master"] = pytree.tree_map(lambda p: p.detach().float().clone(), params)
    return state


def adamw_update(grads: PyTree, state: dict[str, Any], params: PyTree, lr: torch.Tensor | float,
                 cfg: OptimizerConfig) -> tuple[PyTree, dict[str, Any]]:
    """One AdamW step; returns (new_params, new_state). Same arithmetic as torch.optim.AdamW.

    The update is computed in fp32 on the master weights (or on fp32 params) and cast back to
    each parameter's dtype.
    """
    count = state["count"] + 1
    bias1, bias2_sqrt = adamw_bias_corrections(count, cfg)
    grad_leaves, spec = pytree.flatten(grads)
    master = state.get("master", params)
    new_master, mu, nu = [], [], []
    for g, m, v, w in zip(grad_leaves, pytree.leaves(state["mu"]), pytree.leaves(state["nu"]),
                          pytree.leaves(master)):
        out = adamw_leaf(g.float(), m, v, w.float(), lr, bias1, bias2_sqrt, decay_rate(w, cfg), cfg)
        for acc, x in zip((new_master, mu, nu), out):
            acc.append(x)
    new_master = pytree.unflatten(spec, new_master)
    new_params = pytree.tree_map(lambda w, p: w.to(p.dtype), new_master, params)
    new_state = {"count": count, "mu": pytree.unflatten(spec, mu), "nu": pytree.unflatten(spec, nu)}
    if "master" in state:
        new_state["master"] = new_master
    return new_params, new_state


def adamw_bias_corrections(count: torch.Tensor, cfg: OptimizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - beta1^t, sqrt(1 - beta2^t)) for the t-th update (`count` = t, from 1)."""
    c = count.to(torch.float32)
    return 1 - cfg.beta1 ** c, torch.sqrt(1 - cfg.beta2 ** c)


def decay_rate(param: torch.Tensor, cfg: OptimizerConfig) -> float:
    """The weight decay of one parameter: matmul weights and embeddings decay, norms do not."""
    return cfg.weight_decay if param.ndim >= 2 else 0.0


def adamw_leaf(grad: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, weight: torch.Tensor,
               lr: torch.Tensor | float, bias1: torch.Tensor, bias2_sqrt: torch.Tensor,
               weight_decay: torch.Tensor | float, cfg: OptimizerConfig,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW on one tensor, all fp32: (new weight, new mu, new nu).

    Elementwise, so it runs as well on a shard as on the whole tensor (the train step calls it
    on local shards, one layer's parameters at a time, compiled once for every layer).
    """
    b1, b2 = cfg.beta1, cfg.beta2
    mu = mu * b1 + grad * (1 - b1)
    nu = nu * b2 + grad * grad * (1 - b2)
    weight = weight * (1 - lr * weight_decay)
    return weight - (lr / bias1) * mu / (torch.sqrt(nu) / bias2_sqrt + cfg.eps), mu, nu


# ---------------------------------------------------------------------------------------------
# Gradient norm and clipping


def global_norm(tree: PyTree, sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """sqrt(sum of squares of every element), as an fp32 0-dim plain tensor, on every rank.

    For a DTensor leaf, each rank squares its local shard and divides by the number of ranks
    holding a replica of that shard; one all-reduce over the mesh then sums every element once.
    That is a single collective per mesh instead of one per leaf. `sum_across` adds the sums of
    squares of the parts of the tree other ranks hold (pipeline stages) before the root.
    """
    plain: list[torch.Tensor] = []
    by_mesh: dict[Any, tuple[list[torch.Tensor], list[float]]] = {}
    for x in pytree.leaves(tree):
        if isinstance(x, DTensor):
            # List comprehensions, not generator expressions: dynamo cannot trace those.
            if [p for p in x.placements if isinstance(p, Partial)]:
                x = x.redistribute(x.device_mesh, [Replicate() if isinstance(p, Partial) else p
                                                   for p in x.placements])
            replicas = math.prod([x.device_mesh.size(i) for i, p in enumerate(x.placements)
                                  if isinstance(p, Replicate)])
            shards, weights = by_mesh.setdefault(x.device_mesh, ([], []))
            shards.append(x.to_local())
            weights.append(1.0 / replicas)
        else:
            plain.append(x)
    total = _sum_of_squares(plain) if plain else torch.zeros((), dtype=torch.float32)
    for mesh, (shards, weights) in by_mesh.items():
        summed = DTensor.from_local(_sum_of_squares(shards, weights), mesh, [Partial()] * mesh.ndim,
                                    run_check=False)
        total = total + summed.full_tensor()
    if sum_across is not None:
        total = sum_across(total)
    return torch.sqrt(total)


def _sum_of_squares(tensors: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """sum_i weights[i] * |tensors[i]|^2 in fp32, with one multi-tensor norm for all of them."""
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    squares = norms * norms
    if weights is not None:
        squares = squares * torch.tensor(weights, dtype=torch.float32, device=squares.device)
    return squares.sum()


def clip_by_global_norm(grads: PyTree, max_norm: float,
                        sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        ) -> tuple[PyTree, torch.Tensor]:
    """Scale grads so their global norm is at most `max_norm` (as torch's clip_grad_norm_).

    Returns (clipped_grads, norm_before_clipping). max_norm <= 0 returns the grads unchanged.
    `sum_across`: as in `global_norm`, when other ranks hold the rest of the gradients.
    """
    norm = global_norm(grads, sum_across)
    if max_norm <= 0:
        return grads, norm
    scale = clip_factor(norm, max_norm)
    return pytree.tree_map(lambda g: g * scale.to(g.dtype), grads), norm


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What `clip_by_global_norm` multiplies gradients of global norm `norm` by (1 when off)."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


# ---------------------------------------------------------------------------------------------
# Dynamic loss scaling (fp16)


@dataclass(frozen=True)
class LossScaleConfig:
    """fp16 dynamic loss scaling: back off on overflow, grow after a run of finite steps."""
    initial: float = 2.0 ** 16
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0

    def __post_init__(self):
        config.check_finite(self)
        if self.initial <= 0:
            raise ValueError(f"initial={self.initial} must be > 0")
        if not 0 < self.min_scale <= self.initial:
            raise ValueError(f"min_scale={self.min_scale} must be > 0 and at most initial={self.initial}")
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval={self.growth_interval} must be >= 1")
        if self.growth_factor < 1:
            raise ValueError(f"growth_factor={self.growth_factor} must be >= 1")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"backoff_factor={self.backoff_factor} must lie in (0, 1)")


def loss_scale_init(cfg: LossScaleConfig) -> dict[str, torch.Tensor]:
    return {"scale": torch.tensor(cfg.initial, dtype=torch.float32),
            "good_steps": torch.zeros((), dtype=torch.int64)}


def loss_scale_update(state: dict[str, torch.Tensor], finite: torch.Tensor,
                      cfg: LossScaleConfig) -> dict[str, torch.Tensor]:
    """After a step: halve the scale on overflow, double it after `growth_interval` finite steps."""
    good = torch.where(finite, state["good_steps"] + 1, torch.zeros_like(state["good_steps"]))
    grow = good >= cfg.growth_interval
    scale = torch.where(finite, torch.where(grow, state["scale"] * cfg.growth_factor, state["scale"]),
                        torch.clamp(state["scale"] * cfg.backoff_factor, min=cfg.min_scale))
    return {"scale": scale, "good_steps": torch.where(grow, torch.zeros_like(good), good)}
