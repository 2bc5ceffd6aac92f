"""The planner's per-device peak (parallel/plan.py) against the measured peak of real steps.

    python bench/plan_accuracy.py                 # 6 single-process settings + 2 two-rank ones
    python bench/plan_accuracy.py --only bf16-full fsdp2-bf16-full      # a subset, by name

Each setting runs in fresh processes (gloo ranks for the sharded ones) the way `runners.pretrain`
does: the training state built shard by shard, the compiled step (`train.step.compile=true`),
two warm-up steps (compilation), then one measured step. Measured peak = the bytes of the state
(counted exactly) + the step's peak resident set above the resident set just before it (Linux
VmHWM, reset through /proc/self/clear_refs). The CPU allocator has no counter, and the profiler
does not see allocations made by inductor-generated code, so resident memory is the measure,
with malloc told to return every block above 64 KiB to the system when it is freed. Attention is the reference
kernel in both (the one a DTensor mesh runs). Target (issue 11): within 15%.

Run it on a quiet machine: the lead records the table in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = dict(vocab_size=8000, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024)
# name -> (mesh sizes, train-step options, global batch, seq len)
SETTINGS = {
    "fp32-none": ({}, dict(dtype="fp32", remat="none"), 8, 512),
    "fp32-full": ({}, dict(dtype="fp32", remat="full"), 8, 512),
    "bf16-none": ({}, dict(dtype="bf16", remat="none"), 8, 512),
    "bf16-selective": ({}, dict(dtype="bf16", remat="selective"), 8, 512),
    "bf16-full": ({}, dict(dtype="bf16", remat="full"), 8, 512),
    "bf16-none-mb2-seq1024": ({}, dict(dtype="bf16", remat="none", micro_batches=2), 8, 1024),
    "fsdp2-bf16-none": ({"fsdp": 2}, dict(dtype="bf16", remat="none"), 8, 512),
    "tensor2-fp32-full": ({"tensor": 2}, dict(dtype="fp32", remat="full"), 8, 512),
}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(name: str, out: str, cache: str) -> None:
    import torch
    import torch.distributed as dist

    from lib import optim, pytree
    from models import attention, llama
    from parallel import plan, sharded, sharding, train_step
    from parallel.mesh import MeshConfig, build_mesh

    torch.set_num_threads(1)
    sizes, step_kw, global_batch, seq = SETTINGS[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    model = llama.Config(**MODEL)
    mesh = build_mesh(MeshConfig(**{"fsdp": 1, **sizes}))
    rules = sharding.load_rules(mesh=mesh)
    step_cfg = train_step.TrainStepConfig(compile=True, **step_kw)
    opt = optim.OptimizerConfig()
    state = train_step.init_state(sharded.init(model, 0, rules, mesh), step_cfg)
    step = train_step.build_train_step(model, opt, step_cfg, mesh, rules,
                                       kernels=llama.Kernels(attention=attention.reference),
                                       cache_dir=cache)
    index, count = sharding.batch_shards(rules, mesh)
    rows = global_batch // count
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (global_batch, seq + 1), generator=g)
    batch = {"tokens": tokens[index * rows:(index + 1) * rows, :-1].contiguous(),
             "labels": tokens[index * rows:(index + 1) * rows, 1:].contiguous()}
    for _ in range(2):
        state, metrics = step(state, batch)
        float(metrics["loss"])
    state_bytes = sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
                      for t in pytree.leaves(state))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    state, metrics = step(state, batch)
    float(metrics["loss"])
    seconds = time.perf_counter() - start
    step_peak = _status_bytes("VmHWM") - before
    p = plan.plan(model, mesh.sizes, rules, plan.Workload(
        global_batch=global_batch, seq_len=seq, micro_batches=step_cfg.micro_batches,
        dtype=step_cfg.dtype, remat=step_cfg.remat, attention="reference", compile=True))
    result = {"measured": state_bytes + step_peak, "state": state_bytes, "step_peak": step_peak,
              "planned": p.total, "planned_state": sum(t.bytes for t in p.persistent),
              "phase": p.peak_phase, "seconds": seconds}
    results = [result]
    if world > 1:
        results = [None] * world
        dist.all_gather_object(results, result)
        dist.barrier()
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))


def launch(name: str, workdir: Path) -> list[dict]:
    import socket
    world = 1
    for n in SETTINGS[name][0].values():
        world *= n
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = workdir / f"{name}.json"
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TORCH_DEVICE_BACKEND_AUTOLOAD="0",
                   # Blocks above 64 KiB are mapped and unmapped: freed tensors leave the resident
                   # set at once, instead of staying in malloc's heap (glibc's default threshold
                   # grows to 32 MiB), so the resident set follows the live tensors.
                   MALLOC_MMAP_THRESHOLD_="65536")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", name, "--result", str(out),
                                       "--cache", str(workdir / "inductor-cache" / name)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{name} failed (exit codes {codes})")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SETTINGS, help="settings to run (default: all)")
    parser.add_argument("--workdir", default="runs/plan-accuracy")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.result, args.cache)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"model {MODEL}")
    print(f"{'setting':24} {'planned MiB':>11} {'measured MiB':>12} {'planned/measured':>16}  peak phase")
    rows = []
    for name in args.only or SETTINGS:
        results = launch(name, work)
        r = max(results, key=lambda r: r["measured"])
        ratio = r["planned"] / r["measured"]
        rows.append({"setting": name, **r, "ratio": ratio})
        print(f"{name:24} {r['planned'] / 2**20:11.1f} {r['measured'] / 2**20:12.1f} {ratio:16.3f}  "
              f"{r['phase']}{'' if abs(ratio - 1) <= 0.15 else '   OUTSIDE 15%'}", flush=True)
    (work / "plan_accuracy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
