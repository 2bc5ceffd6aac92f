"""What a training run needs per device, before it is launched: pure functions of the config.

    p = plan(model, mesh_sizes, rules, Workload(global_batch=1024, seq_len=4096, micro_batches=16,
                                                dtype="bf16", remat="full"))
    p.total, p.rows()              # bytes per device, and each term with its explanation

Every figure is bytes on one device, for the step `parallel.train_step` builds, term by term:

- parameters in the step dtype, fp32 master weights (bf16/fp16 steps) and AdamW's two fp32
  moments, each split as the rule table splits it (`sharding.mesh_axes_for`);
- gradients, accumulated over micro-batches in the parameters' dtype and split like them;
- saved activations of one micro-batch, per layer, by remat mode and attention kernel (the
  formula follows what autograd saves in `models.llama`; `tests/test_plan.py` checks it against
  the tensors autograd actually saves, traced on the meta device);
- weights gathered for compute over the data-parallel axes (`sharding.gather_for_compute`):
  held until the backward for every layer without recompute, one layer at a time with full
  recompute;
- temporary peaks: the logits path (logits, their fp32 copy, the log-softmax and its gradient),
  a layer's backward (its recomputed activations and gradients), and the optimizer update,
  which writes the new state beside the old one (the step returns new tensors; nothing is
  donated), with the gradients in fp32;
- the KV cache for decoding: 2 x layers x batch x length x kv_heads x head_dim x bytes, split
  by the same rules (kv_heads over `tensor`, batch over the data axes).

With pipeline stages (`mesh.pipe`), each pipe rank holds its stages' layers (the first also the
embeddings, the last the head) and the activations of the micro-batches its schedule keeps in
flight (`parallel.pipeline`); the plan is the rank that needs the most, with the schedule's idle
share (`pipeline_bubble`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lib import pytree
from lib.errors import UserError
from models import llama
from parallel import pipeline, sharding
from parallel.mesh import PIPE, Mesh
from parallel.pipeline import PipelineConfig

GIB = 2**30
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Workload:
    """What one optimizer step runs (the planner's view of train.* and data.seq_len)."""
    global_batch: int
    seq_len: int
    micro_batches: int = 1
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    remat: Literal["none", "full", "selective"] = "none"
    # "reference": the plain-torch kernel, O(seq^2) scores (what runs on a DTensor mesh today);
    # "fused": flash-style kernels (sdpa on CUDA, npu_fusion_attention), O(seq) extra memory.
    attention: Literal["reference", "fused"] = "reference"
    compile: bool = True
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)   # used when mesh.pipe > 1
    decode_batch: int = 0           # KV cache for decoding `decode_batch` sequences ...
    decode_len: int = 0             # ... of `decode_len` tokens (0: no decoding figure)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str


@dataclass(frozen=True)
class Plan:
    """Bytes per device. The step's peak is the persistent state plus the larger of its two
    phases: forward/backward (gradients, activations, ...) and the optimizer update."""
    persistent: tuple[Term, ...]        # between steps: params, master weights, moments
    forward_backward: tuple[Term, ...]  # on top of it while the micro-batches run
    update: tuple[Term, ...]            # on top of it while the optimizer writes the new state
    decoding: tuple[Term, ...]          # params + KV cache when decoding (not training)
    micro_batch_rows: int               # sequences per device in one micro-batch
    pipeline_bubble: float = 0.0        # idle share of a step under the pipeline schedule
    stage_totals: tuple[int, ...] = ()  # with pipeline stages: each pipe rank's total (the
                                        # terms above are the largest one's)
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_phase(self) -> str:
        fb, up = (sum(t.bytes for t in ts) for ts in (self.forward_backward, self.update))
        return "forward/backward" if fb >= up else "optimizer update"

    @property
    def total(self) -> int:
        fb, up = (sum(t.bytes for t in ts) for ts in (self.forward_backward, self.update))
        return sum(t.bytes for t in self.persistent) + max(fb, up)

    @property
    def decode_total(self) -> int:
        return sum(t.bytes for t in self.decoding)


# ---------------------------------------------------------------------------------------------
# Splitting


def shard_count(axes: Sequence[str | None], rules: sharding.Rules, mesh: Mesh) -> int:
    """Into how many pieces the rules split a tensor with logical `axes`."""
    return math.prod(mesh.size(a) for split in sharding.mesh_axes_for(axes, rules, mesh) for a in split)


def check_divisible(model: llama.Config, rules: sharding.Rules, mesh: Mesh) -> None:
    """UserError naming the first parameter, dim, size and mesh axes that do not divide."""
    sharding.check_shardable(llama.param_shapes(model), llama.param_axes(model), rules, mesh)


def param_elements(shapes: Any, axes: Any, rules: sharding.Rules, mesh: Mesh,
                   gathered: bool = False) -> int:
    """Elements one device holds of the parameters in `shapes` (a tree like
    `llama.param_shapes`, or part of it) with logical `axes`. `gathered`: as used in compute,
    whole along the data-parallel axes (`sharding.gather_for_compute`)."""
    flat_axes = pytree.flatten_by_path(axes, is_leaf=pytree.is_axes)
    data = set(sharding.batch_axes(rules, mesh))
    total = 0
    for path, shape in pytree.flatten_by_path(shapes, is_leaf=sharding.is_shape).items():
        parts = 1
        for split in sharding.mesh_axes_for(flat_axes[path], rules, mesh):
            for a in split:
                if not (gathered and a in data):
                    parts *= mesh.size(a)
        total += math.prod(shape) // parts
    return total


# ---------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class _Dims:
    """One device's view of a micro-batch: rows b, tokens n = b*s, heads and widths after TP."""
    b: int
    s: int
    d: int
    h: int       # query heads on this device
    kv: int      # kv heads on this device
    hd: int
    f: int       # ffn width on this device
    v: int       # vocabulary on this device
    act: int     # activation bytes per element

    @property
    def n(self) -> int:
        return self.b * self.s


def _dims(model: llama.Config, rules: sharding.Rules, mesh: Mesh, rows: int, seq: int,
          dtype: str) -> _Dims:
    split = lambda axis, size: size // shard_count((axis,), rules, mesh)
    return _Dims(b=rows, s=seq, d=model.dim, h=split("heads", model.n_heads),
                 kv=split("kv_heads", model.kv_heads), hd=model.head_dim,
                 f=split("mlp", model.ffn_dim), v=split("vocab", model.vocab_size), act=_BYTES[dtype])


def attention_saved(x: _Dims, attention: str, compiled: bool) -> int:
    """Bytes the attention kernel keeps for its backward, its inputs q, k, v included."""
    qkv = (x.n * x.h * x.hd + 2 * x.n * x.kv * x.hd) * x.act
    if attention == "fused":
        # flash-style: q, k, v, the output and the row log-sum-exp (fp32)
        return qkv + x.n * x.h * x.hd * x.act + x.b * x.h * x.s * 4
    # reference: the fp32 softmax output, and the probs that feed the probs @ v matmul: cast to
    # the activation dtype, or in fp32 with grouped heads regrouped (a copy either way; fp32
    # multi-head attention uses the softmax output itself). Eager autograd also keeps the mask.
    probs = 0 if x.act == 4 and x.h == x.kv else x.act
    mask = 0 if compiled else x.s * x.s
    return qkv + x.b * x.h * x.s * x.s * (4 + probs) + mask


def layer_saved(x: _Dims, remat: str, attention: str, compiled: bool = True) -> int:
    """Bytes one transformer layer keeps from its forward until its backward.

    Eager (`compiled=False`) it is what autograd saves (tests/test_plan.py traces it). One
    compiled graph keeps only what its matmuls and reductions produce: the residual stream (the
    layer's input and the mid-layer sum), the normalised inputs of the matmuls with their
    reciprocal RMS, q/k/v, the attention output, and the MLP's gate, up and product; the fp32
    copies inside RMSNorm and silu(gate) are recomputed where they are used."""
    if remat == "full":
        return x.n * x.d * x.act                     # the layer's input only
    attn_out = x.n * x.h * x.hd * x.act              # input of the output projection
    if remat == "selective":                         # attention recomputed from q, k, v
        attn = (x.n * x.h * x.hd + 2 * x.n * x.kv * x.hd) * x.act
    else:
        attn = attention_saved(x, attention, compiled)
    if compiled:
        residual_and_norms = 4 * x.n * x.d * x.act + 2 * x.n * 4
        mlp = 3 * x.n * x.f * x.act                  # gate, up, their product
    else:
        residual_and_norms = 2 * (x.n * x.d * 4 + x.n * 4 + x.n * x.d * x.act) + 2 * x.n * x.d * x.act
        mlp = 4 * x.n * x.f * x.act                  # gate, up, silu(gate), their product
    return residual_and_norms + attn_out + mlp + attn


def head_saved(x: _Dims, global_rows: int, compiled: bool = True) -> int:
    """The final norm's input and output, the token ids and labels, the rotary tables (built
    for the global batch: plain tensors DTensor treats as replicated) and, for the loss: eagerly
    the fp32 log-softmax; compiled, the logits themselves and two fp32 statistics per row (one
    graph recomputes the softmax from them in the backward instead of keeping it)."""
    common = 2 * x.n * 8 + 2 * global_rows * x.s * x.hd * x.act
    if compiled:
        return common + 2 * x.n * x.d * x.act + x.n * 4 + x.n * x.v * x.act + 2 * x.n * 4
    return common + x.n * x.d * 4 + x.n * 4 + 2 * x.n * x.d * x.act + x.n * x.v * 4


def logits_peak(x: _Dims, compiled: bool = True) -> int:
    """Beside the head's saved tensors, at the start of the backward: the logits' gradient
    (eagerly also the logits and the fp32 gradient it is cast from)."""
    return x.n * x.v * x.act if compiled else x.n * x.v * (x.act + 4 + x.act)


def layer_backward(x: _Dims, remat: str, attention: str, compiled: bool = True) -> int:
    """Bytes a layer's backward adds beyond what the layers keep: with full recompute, its
    activations recomputed (torch.utils.checkpoint), their gradients taking their place as they
    are consumed; with selective, the attention recomputed and its gradients; without, its gradients take the
    place of the activations they consume. Plus the residual stream's fp32 gradient. (The
    factors are what inductor's memory plan of the compiled step shows on CPU, measured by
    bench/plan_accuracy.py; another compiler may schedule differently.)"""
    residual_grad = 2 * x.n * x.d * 4
    if remat == "full":
        return layer_saved(x, "none", attention, compiled) + residual_grad
    if remat == "selective":
        recomputed = attention_saved(x, attention, compiled) - (x.n * x.h * x.hd + 2 * x.n * x.kv * x.hd) * x.act
        return 2 * recomputed + residual_grad
    return residual_grad


# ---------------------------------------------------------------------------------------------
# The plan


def micro_batch_rows(workload: Workload, rules: sharding.Rules, mesh: Mesh) -> int:
    """Sequences per device per micro-batch; UserError when the batch does not divide."""
    data = math.prod(mesh.size(a) for a in sharding.batch_axes(rules, mesh))
    per_step = data * workload.micro_batches
    if workload.global_batch % per_step:
        raise UserError(f"train.global_batch={workload.global_batch} is not divisible by the data-"
                        f"parallel ranks ({data}) x train.step.micro_batches ({workload.micro_batches})")
    return workload.global_batch // per_step


def plan(model: llama.Config, mesh_sizes: dict[str, int], rules: sharding.Rules,
         workload: Workload) -> Plan:
    """The per-device memory of a training step (and of decoding) under this mesh and rules;
    with pipeline stages (`mesh.pipe`), that of the rank that needs the most.

    Raises UserError, before anything else, for a mesh that does not divide a parameter, a batch
    that does not divide over the data-parallel ranks and micro-batches, or stages that cannot
    hold the layers."""
    mesh = Mesh(None, dict(mesh_sizes))
    check_divisible(model, rules, mesh)
    pipe = mesh_sizes.get(PIPE, 1)
    if pipe == 1:
        return _plan_rank(model, mesh, rules, workload, llama.param_shapes(model),
                          llama.param_axes(model), in_flight=1, chunk_layers=model.n_layers, head=True)
    layout = pipeline.check(workload.pipeline, model, pipe, workload.micro_batches)
    plans = []
    for rank in range(pipe):
        stages = layout.stages_of(rank)
        # Forward chunks held at the peak: a chunk is one micro-batch through one of the rank's
        # stages (interleaved: 1/v of its layers; the largest stage counted for uneven splits).
        in_flight = pipeline.in_flight(workload.pipeline.schedule, pipe, workload.micro_batches,
                                       layout.virtual_stages, rank)
        plans.append(_plan_rank(model, mesh, rules, workload,
                                pipeline.select(llama.param_shapes(model), layout, stages),
                                pipeline.select(llama.param_axes(model), layout, stages),
                                in_flight=in_flight,
                                chunk_layers=max(len(layout.layers[s]) for s in stages),
                                head=layout.n_stages - 1 in stages, pipe_rank=rank))
    worst = max(plans, key=lambda p: p.total)
    bubble = pipeline.bubble_fraction(workload.pipeline.schedule, pipe, workload.micro_batches,
                                      layout.virtual_stages)
    notes = worst.notes
    if worst.decoding:  # generation holds the whole model per rank group, without stages
        notes += ("decoding runs without pipeline stages (generation refuses mesh.pipe): "
                  "plan it with mesh.pipe=1",)
    return dataclasses.replace(worst, decoding=(), notes=notes, pipeline_bubble=bubble,
                               stage_totals=tuple(p.total for p in plans))


def _plan_rank(model: llama.Config, mesh: Mesh, rules: sharding.Rules, workload: Workload,
               shapes: Any, axes: Any, *, in_flight: int, chunk_layers: int, head: bool,
               pipe_rank: int | None = None) -> Plan:
    """The plan of a rank holding the parameters in `shapes` (all, or a pipeline stage's),
    with the activations of `in_flight` chunks (a micro-batch through `chunk_layers` layers) at
    its peak and the output head if `head`."""
    layers = len(shapes["layers"])
    rows = micro_batch_rows(workload, rules, mesh)
    global_rows = workload.global_batch // workload.micro_batches
    x = _dims(model, rules, mesh, rows, workload.seq_len, workload.dtype)
    p_bytes = _BYTES[workload.dtype]
    n_local = param_elements(shapes, axes, rules, mesh)
    params, moments = n_local * p_bytes, 2 * n_local * 4
    master = n_local * 4 if workload.dtype != "fp32" else 0

    # A layer's weights whole along the data axes (FSDP), as its matmuls use and keep them.
    one_layer = llama.param_shapes(dataclasses.replace(model, n_layers=1))["layers"][0]
    one_layer_axes = llama.param_axes(dataclasses.replace(model, n_layers=1))["layers"][0]
    layer_gathered = param_elements(one_layer, one_layer_axes, rules, mesh, gathered=True) * p_bytes
    if layer_gathered == param_elements(one_layer, one_layer_axes, rules, mesh) * p_bytes:
        layer_gathered = 0  # nothing split over a data axis: the weights are used in place
    held_layers = min(layers, 1 if workload.remat == "full" else layers)
    activations = in_flight * chunk_layers * layer_saved(x, workload.remat, workload.attention,
                                                         workload.compile)
    # On top of the layers' activations, the larger of two moments: the start of the backward
    # (the head's tensors and the logits' gradient), or a layer's backward (with the logits'
    # gradient still alive).
    logits = logits_peak(x, workload.compile) if head else 0
    start_of_backward = (head_saved(x, global_rows, workload.compile) if head else 0) + logits
    backward = layer_backward(x, workload.remat, workload.attention, workload.compile) + logits
    working = max(start_of_backward, backward)
    remat_note = {"none": "every layer keeps its activations", "full": "each layer keeps its input only",
                  "selective": "attention recomputed from q, k, v"}[workload.remat]
    where = "" if pipe_rank is None else f" (pipeline rank {pipe_rank}: {layers} layers" + \
        (", the output head" if head else "") + f", {in_flight} x {chunk_layers} layers in flight)"

    persistent = (
        Term("parameters", params, f"{n_local:,} elements on this device, {workload.dtype}{where}"),
        Term("master weights", master, "fp32 copies the optimizer updates" if master else "none (fp32 step)"),
        Term("optimizer state", moments, "AdamW moments mu and nu, fp32"),
    )
    forward_backward = (
        Term("gradients", n_local * p_bytes,
             f"{workload.dtype}, accumulated over {workload.micro_batches} micro-batch(es)"),
        Term("activations", activations,
             f"{in_flight} x {chunk_layers} layers x micro-batch {rows} x {workload.seq_len} tokens, "
             f"remat={workload.remat} ({remat_note}), {workload.attention} attention"),
        Term("gathered weights", layer_gathered * held_layers,
             (f"{held_layers} layer(s) whole along the data axes, kept for the backward"
              if layer_gathered else "none (no parameter is split over a data axis)")),
        Term("temporaries", working,
             "start of the backward: the head's activations, the logits and their gradient"
             if working == start_of_backward else "a layer's backward (recomputed activations, gradients)"),
    )
    update = (
        Term("gradients", n_local * p_bytes, f"{workload.dtype}, as the backward left them"),
        Term("update", n_local * 4 + params + master + moments,
             "fp32 gradients, and the new params, master weights and moments beside the old"),
    )
    decoding: tuple[Term, ...] = ()
    if workload.decode_batch and workload.decode_len:
        kv = kv_cache_bytes(model, rules, mesh, workload.decode_batch, workload.decode_len,
                            workload.dtype, layers)
        decoding = (Term("parameters", params, f"{workload.dtype}, no optimizer state"),
                    Term("KV cache", kv, f"{workload.decode_batch} sequences x {workload.decode_len} "
                                         f"tokens, {workload.dtype}"))
    notes = []
    if workload.attention == "reference":
        per_layer = x.b * x.h * x.s * x.s * (4 + x.act)
        notes.append(f"reference attention keeps O(seq^2) scores: {per_layer / GIB:.2f} GiB per layer "
                     "per micro-batch (fused kernels do not run on a DTensor mesh yet)")
    if any(n > 1 for axis, n in mesh.sizes.items() if axis != PIPE):
        notes.append("tensor-parallel compiled steps measured above the plan on CPU "
                     "(bench/plan_accuracy.py: TP 2 measured 1.3x the plan; FSDP 2 0.87x)")
    if not workload.compile:
        notes.append("train.step.compile=false: the eager figures are what autograd saves, "
                     "not validated against measured peaks")
    return Plan(persistent, forward_backward, update, decoding, rows, notes=tuple(notes))


def _compute_count(axes, rules, mesh) -> int:
    data = set(sharding.batch_axes(rules, mesh))
    return math.prod(mesh.size(a) for split in sharding.mesh_axes_for(axes, rules, mesh)
                     for a in split if a not in data)


def kv_cache_bytes(model: llama.Config, rules: sharding.Rules, mesh: Mesh, batch: int, length: int,
                   dtype: str, layers: int | None = None) -> int:
    """`llama.init_cache`'s tree (K and V [batch, length, kv_heads, head_dim] per layer) split
    by the rules like the parameters: 2 x layers x batch x length x kv_heads x head_dim x bytes
    over the shards. UserError when the mesh does not divide an entry."""
    shapes = llama.cache_shapes(dataclasses.replace(model, n_layers=layers or model.n_layers), batch, length)
    axes = llama.cache_axes(dataclasses.replace(model, n_layers=layers or model.n_layers))
    try:
        sharding.check_shardable(shapes, axes, rules, mesh)
    except UserError as e:
        raise UserError(f"KV cache (generate.batch_size={batch}, generate.max_len={length}): {e}") from None
    flat_axes = pytree.flatten_by_path(axes, is_leaf=pytree.is_axes)
    total = 0
    for path, shape in pytree.flatten_by_path(shapes, is_leaf=sharding.is_shape).items():
        per_element = _BYTES[dtype] if path.startswith("layers.") else 8  # positions are int64
        total += math.prod(shape) // shard_count(flat_axes[path], rules, mesh) * per_element
    return total


def tokens_per_second(model: llama.Config, seq_len: int, peak_flops: float, mfu: float) -> float:
    """Training tokens per second per device at model FLOPs utilisation `mfu`."""
    return mfu * peak_flops / llama.flops_per_token(model, seq_len)
