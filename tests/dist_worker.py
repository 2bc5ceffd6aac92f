"""One rank of tests/test_distributed.py: sharded train steps against single-device references.

Launched with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    python tests/dist_worker.py OUT.json CACHE_DIR data=2 fsdp=2 tensor=2 compiled:fsdp=2

Each argument after CACHE_DIR is one mesh case ("fsdp=2,tensor=2"; "remat=full" or
"remat=selective" among the sizes to recompute; prefix "compiled:" to torch.compile the step).
For every case the rank runs three train steps of the "tiny" model on a global batch of
8 x 16 tokens split into 2 micro-batches per rank, and compares with a reference nobody here
wrote the optimizer of: single-device eager gradients of the mean loss (models.llama.loss_fn,
torch.autograd) fed to torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW. The optimizer
uses eps=1, which makes the first update lr * g / (|g| + 1) ~ lr * g: the parameters after
step 1 expose the gradients themselves (the "grad" error below is that difference divided
by lr). Rank 0 writes the maxima as JSON.

Each case also records how many rows of the batch this rank's attention runs on (the leading
dim of the attention scores [b, kv_heads, groups, q, k]): eagerly from the ops a dispatch mode
sees (local tensors inside the per-shard kernel, or DTensors' local shards), compiled from the
graphs inductor is handed (local shapes after AOTAutograd, forward and backward). Every rank
must run only its own rows: a step that reaches the right numbers by computing the whole
global batch on every rank is a defect the numeric comparisons cannot see.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import files, optim, pytree  # noqa: E402
from models import attention, llama  # noqa: E402
from parallel import sharding  # noqa: E402
from parallel.mesh import MeshConfig, build_mesh  # noqa: E402
from parallel.train_step import TrainStepConfig, build_eval_step, build_train_step, init_state  # noqa: E402

MODEL = llama.PRESETS["tiny"]
KERNELS = llama.Kernels(attention=attention.reference)
BATCH, SEQ, STEPS, MICRO = 8, 16, 3, 2
OPT = optim.OptimizerConfig(lr=0.05, min_lr=0.005, warmup_steps=1, decay_steps=4, schedule="cosine",
                            beta1=0.5, beta2=0.5, eps=1.0, weight_decay=0.1, grad_clip=1.0)


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[0, :5] = llama.IGNORE_INDEX  # padding: micro-batches hold unequal token counts
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": labels})
    return out


def attention_score_rows(x) -> int | None:
    """The local rows of `x` if it is an attention-score tensor (float [b, kv, g, SEQ, SEQ];
    the boolean mask has that rank too), else None."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if x.dim() != 5 or tuple(x.shape[-2:]) != (SEQ, SEQ):
        return None
    return (x.to_local() if isinstance(x, DTensor) else x).shape[0]


class AttentionRows(TorchDispatchMode):
    """Eager: the local rows of every attention-score tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.rows: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rows = attention_score_rows(out)
        if rows is not None:
            self.rows.add(rows)
        return out


def recording_inductor(rows: set[int]):
    """Inductor, noting the rows of every attention-score tensor in the graphs it compiles."""
    def inner(gm, example_inputs, **kwargs):
        for node in gm.graph.nodes:
            found = attention_score_rows(node.meta.get("val"))
            if found is not None:
                rows.add(found)
        return compile_fx_inner(gm, example_inputs, **kwargs)
    return functools.partial(compile_fx, inner_compile=inner)


def reference_run(params, data):
    """Single-device eager: torch autograd + clip_grad_norm_ + torch.optim.AdamW."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in pytree.flatten_by_path(params).items()}
    tree = pytree.map_with_path(lambda path, _: leaves[path], params)
    groups = [{"params": [p for p in leaves.values() if p.ndim >= 2], "weight_decay": OPT.weight_decay},
              {"params": [p for p in leaves.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPT.lr, betas=(OPT.beta1, OPT.beta2), eps=OPT.eps)
    losses, norms, snapshots = [], [], []
    for step, batch in enumerate(data):
        opt.zero_grad()
        loss = llama.loss_fn(tree, batch, MODEL, kernels=KERNELS)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(leaves.values()), OPT.grad_clip)))
        for group in opt.param_groups:
            group["lr"] = float(optim.learning_rate(OPT, step))
        opt.step()
        losses.append(float(loss))
        snapshots.append(pytree.tree_map(lambda p: p.detach().clone(), tree))
    return losses, norms, snapshots


def parse_case(text: str) -> tuple[bool, MeshConfig, str]:
    compiled = text.startswith("compiled:")
    options = dict(item.split("=") for item in text.removeprefix("compiled:").split(","))
    remat = options.pop("remat", "none")
    full = {"data": 1, "fsdp": 1, "tensor": 1, **{k: int(v) for k, v in options.items()}}
    return compiled, MeshConfig(**full), remat


def run_case(text, params, data, reference, cache_dir):
    compiled, mesh_cfg, remat = parse_case(text)
    mesh = build_mesh(mesh_cfg)
    rules = sharding.load_rules(mesh=mesh)
    sharded = sharding.shard_params(params, llama.param_axes(MODEL), rules, mesh)
    step_cfg = TrainStepConfig(micro_batches=MICRO, compile=compiled, remat=remat)
    state = init_state(sharded, step_cfg)
    attention_rows: set[int] = set()
    train_step = build_train_step(MODEL, OPT, step_cfg, mesh, rules, kernels=KERNELS,
                                  backend=recording_inductor(attention_rows), cache_dir=cache_dir)
    index, count = sharding.batch_shards(rules, mesh)
    rows = BATCH // count
    local = lambda b: {k: v[index * rows:(index + 1) * rows] for k, v in b.items()}
    ref_losses, ref_norms, ref_params = reference
    result = {"loss": 0.0, "grad_norm": 0.0, "grad": 0.0, "params": 0.0}
    for step, batch in enumerate(data):
        if step == 0 and not compiled:
            with AttentionRows() as mode:
                state, metrics = train_step(state, local(batch))
            attention_rows = mode.rows
        else:
            state, metrics = train_step(state, local(batch))
        result["loss"] = max(result["loss"], abs(float(metrics["loss"]) - ref_losses[step]))
        result["grad_norm"] = max(result["grad_norm"], abs(float(metrics["grad_norm"]) - ref_norms[step]))
        diff, where = pytree.max_abs_diff(state["params"], ref_params[step])
        if step == 0:
            result["grad"] = diff / float(optim.learning_rate(OPT, 0))
            result["grad_where"] = where
        result["params"] = max(result["params"], diff)
    result["lr_last"] = float(metrics["lr"])
    result["attention_rows"] = sorted(attention_rows)
    result["own_rows"] = rows // MICRO
    placements = {p: str(getattr(x, "placements", "plain"))
                  for p, x in pytree.flatten_by_path(state["params"]).items() if p in ("embed", "layers.0.wq")}
    result["placements"] = placements
    if not compiled:  # eval_step, eager: the mean loss of a batch under the sharded params
        eval_step = build_eval_step(MODEL, step_cfg, mesh, rules, kernels=KERNELS)
        ref = float(llama.loss_fn(ref_params[-1], data[0], MODEL, kernels=KERNELS))
        result["eval_loss"] = abs(float(eval_step(state["params"], local(data[0]))) - ref)
    return result


def main() -> None:
    out_path, cache_dir, *cases = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    params = llama.init(MODEL, seed=0)
    data = batches()
    reference = reference_run(params, data)
    results = {case: run_case(case, params, data, reference, cache_dir) for case in cases}
    if dist.get_rank() == 0:
        files.write_text_atomic(out_path, json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
