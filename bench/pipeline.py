"""Pipeline-parallel throughput: tokens/s for PP 1, 2 and 4 at equal world size (CPU, gloo).

    .venv/bin/python bench/pipeline.py                                   # 4 processes, preset "small"
    .venv/bin/python bench/pipeline.py preset=tiny seq=64 rounds=2 compile=false   # a quick smoke run
    .venv/bin/python bench/pipeline.py device=cuda world=4                # on 4 GPUs (nccl)

It starts `world` processes itself (torchrun's environment, one thread each) and builds one train
step per pipe size in {1, 2, 4} that divides the world and the layers: `pipe` stages with the rest
of the world as data parallel (`data = world / pipe`), the same global batch, micro-batches and
model (PP 1 without micro-batches: it needs none). Steps of the contenders are interleaved round by round, so a load spike on a shared
machine hits all of them alike; the median step is reported, with the bubble the schedule
predicts ((p - 1) / (m + p - 1), parallel.pipeline.bubble_fraction). PP 1 is the plain step
(parallel.train_step), the others parallel.pipeline_step. Rank 0 prints a markdown table.
"""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import config as config_lib  # noqa: E402
from lib import optim  # noqa: E402
from models import attention, llama  # noqa: E402
from parallel import pipeline, pipeline_step, sharding, train_step  # noqa: E402
from parallel.mesh import MeshConfig, build_mesh  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "small"            # 8 layers, dim 512
    seq: int = 128
    global_batch: int = 32
    micro_batches: int = 8           # of the pipelined contenders (>= the largest pipe for 1F1B);
                                     # PP 1 runs its rows in one go, as a user would
    schedule: str = "1F1B"
    world: int = 4
    rounds: int = 5                  # timed steps per contender, after one warm-up step each
    compile: bool = True
    device: str = "cpu"              # cpu (gloo) or cuda (nccl, one GPU per process)


def contenders(cfg: BenchConfig, model: llama.Config) -> list[int]:
    return [p for p in (1, 2, 4) if cfg.world % p == 0 and model.n_layers % p == 0
            and (cfg.schedule == "GPipe" or cfg.micro_batches >= p)]


def build(cfg: BenchConfig, model: llama.Config, pipe: int, cache: str):
    mesh = build_mesh(MeshConfig(pipe=pipe, data=cfg.world // pipe, fsdp=1), cfg.device)
    rules = sharding.load_rules(mesh=mesh)
    opt = optim.OptimizerConfig(lr=1e-4, warmup_steps=0, decay_steps=1000)
    step_cfg = train_step.TrainStepConfig(micro_batches=cfg.micro_batches if pipe > 1 else 1,
                                          compile=cfg.compile)
    kernels = llama.Kernels(attention=attention.reference) if mesh.device_mesh is not None else None
    params = llama.init(model, seed=0, device=_device(cfg))
    if pipe == 1:
        params = sharding.shard_params(params, llama.param_axes(model), rules, mesh)
        step = train_step.build_train_step(model, opt, step_cfg, mesh, rules, kernels=kernels,
                                           cache_dir=cache)
    else:
        pipe_cfg = pipeline.PipelineConfig(schedule=cfg.schedule)
        plan = pipeline.check(pipe_cfg, model, pipe, cfg.micro_batches)
        params = pipeline_step.stage_params(params, model, plan, mesh, rules)
        step = pipeline_step.build_train_step(model, opt, step_cfg, pipe_cfg, mesh, rules,
                                              kernels=kernels, cache_dir=cache)
    index, count = sharding.batch_shards(rules, mesh)
    return train_step.init_state(params, step_cfg), step, (index, count)


def _device(cfg: BenchConfig) -> torch.device:
    if cfg.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def batch(cfg: BenchConfig, model: llama.Config, index: int, count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (cfg.global_batch, cfg.seq + 1), generator=g)
    rows = cfg.global_batch // count
    local = tokens[index * rows:(index + 1) * rows].to(_device(cfg))
    return {"tokens": local[:, :-1].contiguous(), "labels": local[:, 1:].contiguous()}


def worker(cfg: BenchConfig) -> None:
    torch.set_num_threads(1)
    if cfg.device == "cuda":
        torch.cuda.set_device(_device(cfg))
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    model = llama.PRESETS[cfg.preset]
    cache = str(Path(tempfile.gettempdir()) / "llamax-bench-pipeline-inductor")
    runs = {}
    for pipe in contenders(cfg, model):
        state, step, (index, count) = build(cfg, model, pipe, cache)
        b = batch(cfg, model, index, count)
        start = time.perf_counter()
        state, _ = step(state, b)  # warm-up: compiles
        runs[pipe] = {"state": state, "step": step, "batch": b, "times": [],
                      "first": time.perf_counter() - start}
    for _ in range(cfg.rounds):
        for run in runs.values():
            dist.barrier()
            start = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], run["batch"])
            float(metrics["loss"])  # waits for the device
            run["times"].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        tokens = cfg.global_batch * cfg.seq
        print(f"\n{cfg.preset} ({llama.num_params(model) / 1e6:.1f}M params), seq {cfg.seq}, global batch "
              f"{cfg.global_batch}, {cfg.micro_batches} micro-batches, {cfg.schedule}, world {cfg.world}, "
              f"{cfg.device}, compile={cfg.compile}")
        print("| pipe | data | predicted bubble | first step s | median step s | tokens/s | tokens/s/device |")
        print("|---|---|---|---|---|---|---|")
        for pipe, run in runs.items():
            median = statistics.median(run["times"])
            bubble = pipeline.bubble_fraction(cfg.schedule, pipe, cfg.micro_batches)
            print(f"| {pipe} | {cfg.world // pipe} | {bubble:.2f} | {run['first']:.1f} | {median:.3f} | "
                  f"{tokens / median:.0f} | {tokens / median / cfg.world:.0f} |")
    dist.destroy_process_group()


def launch(cfg: BenchConfig, argv: list[str]) -> int:
    """Run this script as `cfg.world` ranks with torchrun's environment; returns the worst exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(cfg.world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg.world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TORCH_DEVICE_BACKEND_AUTOLOAD="0")
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    return max(p.wait() for p in procs)


def main(argv: list[str]) -> int:
    cfg = config_lib.load(BenchConfig, None, argv)
    if "RANK" in os.environ:
        worker(cfg)
        return 0
    model = llama.PRESETS[cfg.preset]
    if len(contenders(cfg, model)) < 2:
        raise SystemExit(f"nothing to compare: world={cfg.world}, {model.n_layers} layers, "
                         f"micro_batches={cfg.micro_batches}")
    return launch(cfg, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
