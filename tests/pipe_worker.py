"""One rank of tests/test_pipeline.py: pipeline-parallel train steps against single-device eager.

Launched with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    python tests/pipe_worker.py OUT.json WORK_DIR pipe=2 pipe=2,tensor=2 pipe=2,virtual=2 ...

Each argument after WORK_DIR is one case: mesh sizes (`pipe`, `data`, `fsdp`, `tensor`) and
pipeline options (`schedule=GPipe|1F1B|Interleaved1F1B`, `virtual=V`, `micro=M`, `remat=full`,
`dtype=bf16`, `compiled=aot_eager`); `save=NAME` saves the state after RESUME_AT steps,
`resume=NAME` starts from that checkpoint (written under another mesh) at that step. The case
`agree` checks that pipeline stages agree to skip an fp16 step one of them overflowed.

For every case the rank runs STEPS train steps of a 4-layer model on a global batch of 8 x 16
tokens in MICRO micro-batches per rank and compares with a reference nobody here wrote the
optimizer or the backward of: single-device eager gradients of the mean loss
(models.llama.loss_fn, torch.autograd) fed to torch.nn.utils.clip_grad_norm_ and
torch.optim.AdamW (eps=1: the first update is ~lr * g, so the parameters after step 1 expose the
gradients; "grad" below is that difference divided by lr). Losses are compared relatively (train
and eval). The eval step's loss is compared with the reference's loss on the same batch. Rank 0
writes the maxima as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import checkpoint as ckpt_lib  # noqa: E402
from lib import files, optim, pytree  # noqa: E402
from models import attention, llama  # noqa: E402
from parallel import pipeline_step, sharding  # noqa: E402
from parallel import train_step as plain_step  # noqa: E402
from parallel.mesh import MeshConfig, build_mesh  # noqa: E402
from parallel.pipeline import PipelineConfig, in_flight, layout  # noqa: E402
from parallel.train_step import TrainStepConfig, init_state  # noqa: E402

MODEL = llama.Config(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=176,
                     max_seq_len=64)
KERNELS = llama.Kernels(attention=attention.reference)
BATCH, SEQ, STEPS, MICRO, RESUME_AT = 8, 16, 3, 2, 2
OPT = optim.OptimizerConfig(lr=0.05, min_lr=0.005, warmup_steps=1, decay_steps=4, schedule="cosine",
                            beta1=0.5, beta2=0.5, eps=1.0, weight_decay=0.1, grad_clip=1.0)


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[0, :5] = llama.IGNORE_INDEX  # padding: micro-batches hold unequal token counts
        # Two packed documents per row: positions restart and attention stops at the boundary.
        positions = torch.cat([torch.arange(6), torch.arange(SEQ - 6)]).expand(BATCH, SEQ)
        segment_ids = torch.cat([torch.zeros(6), torch.ones(SEQ - 6)]).long().expand(BATCH, SEQ)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": labels,
                    "positions": positions.contiguous(), "segment_ids": segment_ids.contiguous()})
    return out


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
        losses.append(float(loss.detach()))
        snapshots.append(pytree.tree_map(lambda p: p.detach().clone(), tree))
    return losses, norms, snapshots


def peak_in_flight(actions) -> int:
    """Most forward chunks not yet run backward, along one rank's list of torch actions."""
    held = peak = 0
    for action in actions:
        kind = str(getattr(action, "computation_type", ""))
        if kind.endswith("FORWARD") and "BACKWARD" not in kind:
            held += 1
        elif "BACKWARD" in kind and "WEIGHT" not in kind:
            held -= 1
        peak = max(peak, held)
    return peak


def rel(x: float, ref: float) -> float:
    return abs(x - ref) / abs(ref)


def parse_case(text: str) -> dict:
    items = dict(item.split("=") for item in text.split(","))
    sizes = {k: int(items.pop(k, 1)) for k in ("pipe", "data", "fsdp", "tensor")}
    virtual = int(items.pop("virtual", 1))
    schedule = items.pop("schedule", "Interleaved1F1B" if virtual > 1 else "1F1B")
    case = {"mesh": MeshConfig(**sizes),
            "pipeline": PipelineConfig(schedule=schedule, virtual_stages=virtual),
            "step": TrainStepConfig(micro_batches=int(items.pop("micro", MICRO)),
                                    remat=items.pop("remat", "none"), dtype=items.pop("dtype", "fp32"),
                                    compile="compiled" in items),
            "backend": items.pop("compiled", None), "save": items.pop("save", None),
            "resume": items.pop("resume", None)}
    if items:
        raise ValueError(f"unknown case options {items}")
    return case


def _checkpointer(work_dir: Path, name: str, mesh) -> ckpt_lib.Checkpointer:
    cfg = ckpt_lib.CheckpointConfig(dir=str(work_dir / name), every=1, keep=1, async_save=False)
    return ckpt_lib.Checkpointer(cfg, dist.get_rank(), dist.get_world_size(), spread=mesh.pipe_mesh)


def _gathered(state_params, plan, mesh) -> dict:
    """This rank's params as whole tensors, by path (DTensors gathered over the stage)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
            for k, v in pytree.flatten_by_path(state_params).items()}


def run_case(text: str, params, data, reference, work_dir: Path) -> dict:
    case = parse_case(text)
    # A fresh copy: states share storage with the params they start from, and a restore fills
    # them in place.
    params = pytree.tree_map(torch.clone, params)
    mesh = build_mesh(case["mesh"])
    rules = sharding.load_rules(mesh=mesh)
    plan = layout(case["pipeline"], MODEL.n_layers, mesh.size("pipe"))
    backend, cache = case["backend"] or "inductor", str(work_dir / "inductor")
    if mesh.size("pipe") > 1:
        state = init_state(pipeline_step.stage_params(params, MODEL, plan, mesh, rules), case["step"])
        train_step = pipeline_step.build_train_step(MODEL, OPT, case["step"], case["pipeline"], mesh,
                                                    rules, kernels=KERNELS, backend=backend,
                                                    cache_dir=cache)
    else:  # no stages: the plain step, e.g. to resume a pipeline checkpoint without them
        state = init_state(sharding.shard_params(params, llama.param_axes(MODEL), rules, mesh), case["step"])
        train_step = plain_step.build_train_step(MODEL, OPT, case["step"], mesh, rules,
                                                 kernels=KERNELS, backend=backend, cache_dir=cache)
    index, count = sharding.batch_shards(rules, mesh)
    rows = BATCH // count
    local = lambda b: {k: v[index * rows:(index + 1) * rows] for k, v in b.items()}
    ref_losses, ref_norms, ref_params = reference
    result = {"loss": 0.0, "grad_norm": 0.0, "params": 0.0}
    first = 0
    if case["resume"]:
        ckpt = _checkpointer(work_dir, case["resume"], mesh)
        state, _ = ckpt.restore(state)
        ckpt.close()
        first = int(state["step"])
        result["resumed_at"] = first
    for step in range(first, STEPS):
        state, metrics = train_step(state, local(data[step]))
        result["loss"] = max(result["loss"], rel(float(metrics["loss"]), ref_losses[step]))
        result["grad_norm"] = max(result["grad_norm"], abs(float(metrics["grad_norm"]) - ref_norms[step]))
        mine = _gathered(state["params"], plan, mesh)
        ref = pytree.flatten_by_path(ref_params[step])
        diff = max(float((v.double() - ref[k].double()).abs().max()) for k, v in mine.items())
        if step == 0:
            result["grad"] = diff / float(optim.learning_rate(OPT, 0))
        result["params"] = max(result["params"], diff)
        if case["save"] and step + 1 == RESUME_AT:
            ckpt = _checkpointer(work_dir, case["save"], mesh)
            ckpt.save(step + 1, state, {}, force=True)
            ckpt.close()
    if mesh.size("pipe") > 1:  # the schedule's own order: peak forward chunks held per rank
        order = train_step.schedule.pipeline_order
        result["in_flight"] = {"torch": [peak_in_flight(order[r]) for r in sorted(order)],
                               "ours": [in_flight(case["pipeline"].schedule, mesh.size("pipe"),
                                                  case["step"].micro_batches,
                                                  case["pipeline"].virtual_stages, r)
                                        for r in sorted(order)]}
    # Every parameter is held by exactly the ranks of its stage: gather the key sets.
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, sorted(pytree.flatten_by_path(state["params"])))
    result["all_keys_once_per_stage_group"] = sorted({k for ks in keys for k in ks}) == \
        sorted(pytree.flatten_by_path(params))
    result["keys_on_rank0"] = keys[0]
    if not case["step"].compile and mesh.size("pipe") > 1:
        eval_step = pipeline_step.build_eval_step(MODEL, case["step"], case["pipeline"], mesh, rules,
                                                  kernels=KERNELS)
        ref = float(llama.loss_fn(ref_params[-1], data[0], MODEL, kernels=KERNELS))
        result["eval_loss"] = rel(float(eval_step(state["params"], local(data[0]))), ref)
    return result


def agreement_case(work_dir: Path) -> dict:
    """fp16 on `pipe` ranks holding different parameters, one of them with an overflowed
    gradient: every stage must skip the step and back off the loss scale alike (the gradient
    norm is summed over the pipe group before the finite check)."""
    mesh = build_mesh(MeshConfig(pipe=dist.get_world_size()))
    step_cfg = TrainStepConfig(dtype="fp16")
    stage = mesh.stage
    state = init_state({f"w{stage}": torch.ones(4)}, step_cfg)
    grads = {f"w{stage}": torch.full((4,), float("inf") if stage == 0 else 1.0, dtype=torch.float16)}
    group = mesh.pipe_mesh.get_group()
    new, metrics = plain_step.apply_gradients(
        state, grads, torch.tensor(1.0), OPT, step_cfg,
        sum_across=lambda x: funcol.all_reduce(x, "sum", group))
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (int(metrics["skipped"]), float(new["loss_scale"]["scale"]),
                                  bool(torch.equal(new["params"][f"w{stage}"].float(), torch.ones(4)))))
    return {"skipped": [s[0] for s in seen], "scale": [s[1] for s in seen], "kept": [s[2] for s in seen],
            "initial_scale": step_cfg.loss_scale.initial}


def main() -> None:
    out_path, work_dir, *cases = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    params = llama.init(MODEL, seed=0)
    data = batches()
    reference = reference_run(params, data)
    results = {case: agreement_case(Path(work_dir)) if case == "agree" else
               run_case(case, params, data, reference, Path(work_dir)) for case in cases}
    if dist.get_rank() == 0:
        files.write_text_atomic(out_path, json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
