"""Pipeline stages: which layers each stage runs, which parameters it holds, and its function.

The `pipe` mesh axis cuts the layer list into stages; the model stays the same pure functions
(`models.llama.embed`, `decoder_layers`, `logits`), a stage runs a slice of them:

    stage 0:      embed -> layers[0:k]
    stage s:      layers[a:b]
    last stage:   layers[c:n] -> final norm -> lm_head            (the loss is the schedule's)

With `virtual_stages=v` there are `pipe * v` stages and rank r along `pipe` holds stages
r, r + pipe, r + 2 pipe, ... (Megatron's interleaving, and the placement
`torch.distributed.pipelining.ScheduleInterleaved1F1B` expects).

A rank's parameters are a sub-tree of the full model's, with the same paths: its layers stay
under their global index (`{"layers": {4: {...}, 5: {...}}}` flattens to "layers.4.wq" as the
list does), so checkpoints, logical axes and optimizer state keep one naming whatever `pipe` is.
The schedules that run the stages live in `parallel.pipeline_step`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lib.errors import UserError
from models import llama

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B")  # torch.distributed.pipelining's names
Schedule = Literal["GPipe", "1F1B", "Interleaved1F1B"]


@dataclass(frozen=True)
class PipelineConfig:
    """How the layers are split into stages (the `pipe` size itself is `mesh.pipe`).

    schedule:         GPipe (all forwards, then all backwards), 1F1B (one forward, one
                      backward in the steady state: at most `pipe` micro-batches in flight), or
                      Interleaved1F1B (1F1B over `virtual_stages` stages per rank).
    virtual_stages:   stages per rank; more than 1 needs Interleaved1F1B.
    layers_per_stage: layers of each of the pipe x virtual_stages stages, in pipeline order
                      (e.g. [3, 4, 4, 5] to give the first stage, which also embeds, and the
                      last, which also runs the lm_head, less or more work). Default: even.
    """
    schedule: Schedule = "1F1B"
    virtual_stages: int = 1
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.virtual_stages < 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} must be >= 1")
        if self.virtual_stages > 1 and self.schedule != "Interleaved1F1B":
            raise ValueError(f"virtual_stages={self.virtual_stages} needs schedule=Interleaved1F1B "
                             f"({self.schedule} runs one stage per rank)")
        if self.layers_per_stage is not None and any(n < 0 for n in self.layers_per_stage):
            raise ValueError(f"layers_per_stage={list(self.layers_per_stage)} must not be negative")


@dataclass(frozen=True)
class Layout:
    """The stages of a pipeline: `layers[s]` is the range of layers stage s runs."""
    pipe: int                     # ranks along the pipe axis
    layers: tuple[range, ...]     # per stage, in pipeline order

    @property
    def n_stages(self) -> int:
        return len(self.layers)

    @property
    def virtual_stages(self) -> int:
        return self.n_stages // self.pipe

    def rank_of(self, stage: int) -> int:
        """The coordinate along `pipe` of the ranks that run `stage`."""
        return stage % self.pipe

    def stages_of(self, rank: int) -> list[int]:
        """The stages held by the ranks at coordinate `rank` along `pipe`, in pipeline order."""
        return list(range(rank, self.n_stages, self.pipe))


def layout(config: PipelineConfig, n_layers: int, pipe: int) -> Layout:
    """The stage layout of an `n_layers` model over `pipe` ranks (errors name the values)."""
    n_stages = pipe * config.virtual_stages
    stages = f"mesh.pipe={pipe}" + (f" x pipeline.virtual_stages={config.virtual_stages}"
                                    f" = {n_stages} stages" if config.virtual_stages > 1 else "")
    if config.layers_per_stage is None:
        if n_layers % n_stages:
            raise UserError(f"model.n_layers={n_layers} is not divisible by {stages}; pick a size "
                            "that divides it or give pipeline.layers_per_stage=[...] (one count "
                            "per stage)")
        counts = [n_layers // n_stages] * n_stages
    else:
        counts = list(config.layers_per_stage)
        if len(counts) != n_stages:
            raise UserError(f"pipeline.layers_per_stage={counts} has {len(counts)} entries; "
                            f"{stages} needs {n_stages}")
        if sum(counts) != n_layers:
            raise UserError(f"pipeline.layers_per_stage={counts} sums to {sum(counts)}, but "
                            f"model.n_layers={n_layers}")
        empty = [s for s in range(1, n_stages - 1) if counts[s] == 0]
        if empty:
            raise UserError(f"pipeline.layers_per_stage={counts}: stage {empty[0]} has no layers "
                            "(only the first and last stages, which embed and run the lm_head, "
                            "may have none)")
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return Layout(pipe, tuple(range(a, a + n) for a, n in zip(starts, counts)))


def check(config: PipelineConfig, model: llama.Config, pipe: int, micro_batches: int) -> Layout:
    """The layout, after refusing what the stages cannot run (each error names the values)."""
    plan = layout(config, model.n_layers, pipe)
    if pipe > 1 and model.tie_embeddings:
        raise UserError(f"model.tie_embeddings=true with mesh.pipe={pipe}: the first and the last "
                        "stage would share the embedding; tied embeddings are not supported across "
                        "pipeline stages")
    if config.schedule != "GPipe" and micro_batches < pipe:
        # 1F1B keeps `pipe` micro-batches in flight; fewer would leave stages with nothing to do
        # (torch's Schedule1F1B refuses it too).
        raise UserError(f"train.step.micro_batches={micro_batches} is fewer than mesh.pipe={pipe} "
                        f"stages: pipeline.schedule={config.schedule} needs at least {pipe} "
                        "micro-batches (GPipe takes fewer, with a larger bubble)")
    if config.schedule == "Interleaved1F1B":
        rounds = max(1, micro_batches // pipe)
        if micro_batches % rounds:
            raise UserError(f"train.step.micro_batches={micro_batches}: Interleaved1F1B runs them in "
                            f"{rounds} rounds (micro_batches // mesh.pipe), which must divide them; "
                            f"use a multiple of mesh.pipe={pipe}")
    return plan


# ---------------------------------------------------------------------------------------------
# A stage's parameters


def select(tree: llama.Params, plan: Layout, stages: Sequence[int]) -> llama.Params:
    """The part of a full-model tree (params, shapes or logical axes) that `stages` use.

    Layers keep their global index as dict keys, so every leaf keeps its path ("layers.5.wq").
    """
    held = [i for s in stages for i in plan.layers[s]]
    out: llama.Params = {"layers": {i: tree["layers"][i] for i in held}}
    if 0 in stages:
        out["embed"] = tree["embed"]
    if plan.n_stages - 1 in stages:
        out["final_norm"] = tree["final_norm"]
        if "lm_head" in tree:
            out["lm_head"] = tree["lm_head"]
    return out


# ---------------------------------------------------------------------------------------------
# A stage's function

# stage_fn(params, x, *, positions, segment_ids) -> hidden states, or logits on the last stage
StageFn = Callable[..., torch.Tensor]


def stage_function(model: llama.Config, plan: Layout, stage: int, *,
                   kernels: llama.Kernels = llama.Kernels(),
                   remat: Callable[[Callable], Callable] | None = None) -> StageFn:
    """The pure function of `stage`: token ids (first stage) or hidden states [b, s, dim] in,
    hidden states or (last stage) logits out, over a params tree holding at least its part."""
    first, last = stage == 0, stage == plan.n_stages - 1
    layers = plan.layers[stage]

    def run(params: llama.Params, x: torch.Tensor, *, positions: torch.Tensor | None = None,
            segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        if first:
            x = llama.embed(params, x)
        x = llama.decoder_layers([params["layers"][i] for i in layers], x, model,
                                 positions=positions, segment_ids=segment_ids, kernels=kernels,
                                 remat=remat)
        if last:
            x = llama.logits(params, kernels.rms_norm(x, params["final_norm"], model.norm_eps), model)
        return x

    return run


def bubble_fraction(schedule: str, pipe: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle share of a step: (p - 1) / (m + p - 1) for GPipe and 1F1B, divided by v when each
    rank runs v interleaved stages (Narayanan et al. 2021)."""
    if pipe <= 1:
        return 0.0
    bubble = (pipe - 1) / (micro_batches + pipe - 1)
    return bubble / virtual_stages if schedule == "Interleaved1F1B" else bubble


def in_flight(schedule: str, pipe: int, micro_batches: int, virtual_stages: int = 1,
              rank: int = 0) -> int:
    """Forward chunks (one micro-batch through one of its stages) whose activations the rank at
    coordinate `rank` along `pipe` holds at its peak, as torch's schedules order them: GPipe
    all m; 1F1B min(m, p - rank) (the first stage holds the most); Interleaved1F1B its warm-up
    forwards plus one, (v - 1) * m_round + 2 (p - 1 - rank) + 1, at most m * v (each chunk then
    covers 1/v of the rank's layers)."""
    if schedule == "GPipe":
        return micro_batches
    if schedule == "1F1B":
        return min(micro_batches, pipe - rank)
    per_round = micro_batches // max(1, micro_batches // pipe)
    warmup = (virtual_stages - 1) * per_round + 2 * (pipe - 1 - rank)
    return min(warmup + 1, micro_batches * virtual_stages)
