"""Peak resident memory per rank while a run starts: from scratch, and from an HF checkpoint.

    python bench/start_memory.py                        # the ~1B shape, 1, 2 and 4 ranks (FSDP, gloo)
    python bench/start_memory.py --shape small --ranks 1 2     # quick check on a small shape

For each rank count and phase, fresh processes (one per rank, torchrun's environment, gloo)
start the way a run does and report the peak resident set (VmHWM) above the resident set just
before the phase (interpreter, torch and the process group are not counted):

  init   parameters from the seed, each rank creating only its shards (`parallel.sharded.init`)
  state  the same, then the training state: bf16 params, fp32 master weights and AdamW moments
         (`train_step.init_state`), as `runners.pretrain` builds it
  hf     parameters read from an HF directory (bf16 safetensors, several files) as fp32
         (`parallel.sharded.load_hf`): each rank reads only its slices

Target (issue 11): peak <= 1.2 x (bytes the phase creates / ranks) + the largest single tensor.
The HF directory is written once under --workdir (streamed, one tensor in memory at a time;
2.2 GB of bf16 for the 1b shape). Memory: the 1-rank `state` phase of the 1b shape needs ~16 GB.
Do not run it on a busy machine for numbers: the lead records them on a quiet one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    # TinyLlama-1.1B's shape: 1,100,048,384 parameters.
    "1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
               max_seq_len=2048),
    "small": dict(vocab_size=8000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408,
                  max_seq_len=1024),
}
PHASES = ("init", "state", "hf")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_checkpoint(config, path: Path) -> None:
    """An HF directory of `config` with init values in bf16, one tensor in memory at a time."""
    import torch

    from models import hf, llama

    def tensors():
        for name, (tree_path, transposed) in hf.hf_name_table(config).items():
            ours = hf.stored_shape(config, name)[::-1] if transposed else hf.stored_shape(config, name)
            t = llama.init_param(".".join(map(str, tree_path)), ours, 1, dtype=torch.bfloat16)
            yield name, t.T.contiguous() if transposed else t
    hf.save_tensors(path, config, tensors(), torch.bfloat16, max_shard_bytes=1 << 30)


def worker(phase: str, shape: str, hf_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from lib import pytree
    from models import llama
    from parallel import sharded, sharding
    from parallel.mesh import MeshConfig, build_mesh
    from parallel.train_step import TrainStepConfig, init_state

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    config = llama.Config(**SHAPES[shape])
    mesh = build_mesh(MeshConfig(fsdp=-1))
    rules = sharding.load_rules(mesh=mesh)
    # Warm up on a tiny model: lazily imported modules and DTensor's dispatch caches are
    # process overhead, not the start-up's.
    sharded.init(llama.PRESETS["tiny"], 0, rules, mesh)
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if phase == "hf":
        _, params = sharded.load_hf(hf_dir, rules, mesh, dtype=torch.float32)
        tree = params
    else:
        params = sharded.init(config, 0, rules, mesh)
        tree = params
        if phase == "state":
            tree = init_state(params, TrainStepConfig(dtype="bf16"))
            del params
    seconds = time.perf_counter() - start
    local = sum((x.to_local() if hasattr(x, "to_local") else x).numel() * x.element_size()
                for x in pytree.leaves(tree))
    result = {"peak_above_start": (_status_kib("VmHWM") - before) * 1024, "peak_rss": _status_kib("VmHWM") * 1024,
              "rss_before": before * 1024, "local_bytes": local, "seconds": seconds}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        dist.barrier()
        dist.destroy_process_group()
    else:
        gathered = [result]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(gathered))


def launch(world: int, phase: str, shape: str, hf_dir: Path, out: Path) -> list[dict]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TORCH_DEVICE_BACKEND_AUTOLOAD="0")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", phase, "--shape", shape,
                                       "--hf-dir", str(hf_dir), "--result", str(out)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{phase} on {world} ranks failed (exit codes {codes})")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--workdir", default="runs/start-memory")
    parser.add_argument("--worker", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.shape, args.hf_dir, args.result)
        return

    from models import llama
    config = llama.Config(**SHAPES[args.shape])
    work = Path(args.workdir)
    hf_dir = work / f"hf-{args.shape}"
    if "hf" in args.phases and not (hf_dir / "config.json").is_file():
        print(f"writing the HF checkpoint {hf_dir} ...", flush=True)
        write_checkpoint(config, hf_dir)
    n = llama.num_params(config)
    largest = max(math.prod(s) for s in _shapes(config)) * 4
    # fp32 params; the state adds bf16 params, fp32 master weights and two fp32 moments.
    sizes = {"init": 4 * n, "hf": 4 * n, "state": (2 + 4 + 4 + 4) * n}
    print(f"shape {args.shape}: {n:,} parameters, fp32 {4 * n / 2**30:.2f} GiB, largest tensor "
          f"{largest / 2**20:.0f} MiB")
    print(f"{'phase':6} {'ranks':>5} {'peak/rank MiB':>14} {'target MiB':>11} {'local MiB':>10} "
          f"{'seconds':>8}  verdict")
    rows = []
    for world in args.ranks:
        for phase in args.phases:
            results = launch(world, phase, args.shape, hf_dir, work / f"result-{phase}-{world}.json")
            peak = max(r["peak_above_start"] for r in results)
            target = 1.2 * sizes[phase] / world + largest
            ok = peak <= target
            rows.append({"phase": phase, "ranks": world, "peak_per_rank": peak, "target": target,
                         "local": max(r["local_bytes"] for r in results),
                         "seconds": max(r["seconds"] for r in results), "ok": ok})
            print(f"{phase:6} {world:5d} {peak / 2**20:14.0f} {target / 2**20:11.0f} "
                  f"{rows[-1]['local'] / 2**20:10.0f} {rows[-1]['seconds']:8.1f}  "
                  f"{'ok' if ok else 'ABOVE TARGET'}", flush=True)
    (work / f"start_memory-{args.shape}.json").write_text(json.dumps(rows, indent=1))


def _shapes(config):
    from models import llama
    from parallel import sharding
    from lib import pytree
    return list(pytree.flatten_by_path(llama.param_shapes(config), is_leaf=sharding.is_shape).values())


if __name__ == "__main__":
    main()
