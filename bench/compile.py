"""Compile time against depth: the layerwise-compiled train step vs one whole-graph step.

    .venv/bin/python bench/compile.py                                   # depths 2, 8, 32 at dim 128
    .venv/bin/python bench/compile.py depths=[2,4] whole_depths=[2] rounds=2   # a quick smoke run
    .venv/bin/python bench/compile.py whole_depths=[] throughput_layers=0      # layerwise only

Every compile is timed in a fresh process (dynamo starts empty) with a fresh inductor cache
(cold), then again in a second process reusing that cache (a warm restart). "first step" is the
wall time of the first call, compile included; "compile" subtracts the median step measured
in the same process (both columns are in the table).

Contenders:
- layerwise: `parallel.train_step` as shipped: the layer function and the per-parameter update
  compiled once each (`parallel.layerwise`), the rest eager.
- whole graph: the step as it was compiled before (one torch.compile graph with
  torch.func.grad_and_value inside, the layers unrolled and the update fused over all
  parameters), rebuilt here as the yardstick.

Throughput: both steps of the `throughput_layers` model in one process, their steps interleaved
round by round so a load spike hits both alike; median step time and tokens/s.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import config as config_lib  # noqa: E402
from lib import optim, pytree  # noqa: E402
from models import llama  # noqa: E402
from parallel import jit as jit_lib  # noqa: E402
from parallel import sharding  # noqa: E402
from parallel.mesh import MeshConfig, build_mesh  # noqa: E402
from parallel.train_step import TrainStepConfig, build_train_step, init_state  # noqa: E402

MECHANISMS = ("layerwise", "whole graph")


@dataclass(frozen=True)
class BenchConfig:
    # The width of every case; n_layers is set per case.
    model: llama.Config = dataclasses.replace(llama.PRESETS["tiny"], dim=128, ffn_dim=352)
    depths: tuple[int, ...] = (2, 8, 32)        # layerwise step, cold and warm
    whole_depths: tuple[int, ...] = (2, 8)      # whole-graph step: compile time linear in depth
    throughput_layers: int = 8                  # 0: no throughput comparison
    seq: int = 128
    batch: int = 8
    rounds: int = 10                            # timed steps per contender, after the first
    optim: optim.OptimizerConfig = field(default_factory=lambda: optim.OptimizerConfig(
        lr=3e-4, min_lr=3e-5, warmup_steps=10, decay_steps=1000))


def make_batch(cfg: llama.Config, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def whole_graph_step(model_cfg: llama.Config, optim_cfg: optim.OptimizerConfig, cache_dir: Path):
    """The step compiled as one graph (fp32, one process, one micro-batch, no recompute)."""
    def step_fn(state, batch):
        params = state["params"]
        grads, loss = torch.func.grad_and_value(lambda p: llama.loss_fn(p, batch, model_cfg))(params)
        grads, grad_norm = optim.clip_by_global_norm(grads, optim_cfg.grad_clip)
        finite = torch.isfinite(grad_norm)
        lr = optim.learning_rate(optim_cfg, state["step"])
        new_params, new_opt = optim.adamw_update(grads, state["opt"], params, lr, optim_cfg)
        keep = lambda new, old: torch.where(finite, new, old)
        new_state = {"params": pytree.tree_map(keep, new_params, params),
                     "opt": pytree.tree_map(keep, new_opt, state["opt"]),
                     "step": state["step"] + 1, "loss_scale": state["loss_scale"]}
        return new_state, {"loss": loss, "grad_norm": grad_norm}
    return jit_lib.jit(step_fn, "inductor", cache_dir)


def build(mechanism: str, model_cfg: llama.Config, optim_cfg: optim.OptimizerConfig, cache_dir: Path):
    step_cfg = TrainStepConfig(compile=True)
    state = init_state(llama.init(model_cfg, seed=0), step_cfg)
    if mechanism == "whole graph":
        return state, whole_graph_step(model_cfg, optim_cfg, cache_dir)
    mesh = build_mesh(MeshConfig())
    return state, build_train_step(model_cfg, optim_cfg, step_cfg, mesh,
                                   sharding.load_rules(mesh=mesh), cache_dir=cache_dir)


def timed_steps(steps: dict, batch: dict, rounds: int) -> tuple[dict, dict]:
    """First-call and per-round wall times of each (state, step) in `steps`, interleaved."""
    first, times = {}, {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, (state, step) in steps.items():
            start = time.perf_counter()
            state, metrics = step(state, batch)
            float(metrics["loss"])
            elapsed = time.perf_counter() - start
            steps[name] = (state, step)
            if r == 0:
                first[name] = elapsed
            else:
                times[name].append(elapsed)
    return first, times


def child(case: dict) -> dict:
    """One process: build the listed mechanisms at one depth, time them."""
    bc = config_lib.from_dict(BenchConfig, case["bench"])
    cfg = dataclasses.replace(bc.model, n_layers=case["n_layers"])
    torch._dynamo.reset()
    steps = {m: build(m, cfg, bc.optim, Path(case["cache"][m])) for m in case["mechanisms"]}
    first, times = timed_steps(steps, make_batch(cfg, bc.batch, bc.seq), case["rounds"])
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return {m: {"first_step": first[m], "median_step": statistics.median(times[m]) if times[m] else None,
                "graphs": graphs if len(steps) == 1 else None} for m in steps}


def compile_time(run: dict) -> float:
    """The first step's wall time less a later step's: what compiling (or loading) cost."""
    return run["first_step"] - run["median_step"]


def run_child(case: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    bc = config_lib.parse_argv(BenchConfig, argv)
    bench = config_lib.to_dict(bc)
    root = Path(tempfile.mkdtemp(prefix="llamax-bench-compile-"))
    print(f"model {bc.model.dim=} {bc.model.n_heads=} {bc.model.ffn_dim=} {bc.model.vocab_size=}, "
          f"batch {bc.batch} x seq {bc.seq}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"caches under {root}", flush=True)
    rows = []
    for mechanism, depths in (("layerwise", bc.depths), ("whole graph", bc.whole_depths)):
        for n_layers in depths:
            cache = {mechanism: str(root / f"{mechanism.replace(' ', '-')}-{n_layers}")}
            case = {"bench": bench, "n_layers": n_layers, "mechanisms": [mechanism], "cache": cache,
                    "rounds": 2}
            cold = run_child(case)[mechanism]
            warm = run_child(case)[mechanism]
            rows.append((mechanism, n_layers, cold, warm))
            print(f"{mechanism}, {n_layers} layers: cold first step {cold['first_step']:.1f} s, "
                  f"warm {warm['first_step']:.1f} s, graphs {cold['graphs']}", flush=True)

    print("\n| step | layers | cold: first step (s) | cold: compile (s) | warm restart: first step (s) "
          "| warm: compile (s) | step (s) | graphs compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for mechanism, n_layers, cold, warm in rows:
        print(f"| {mechanism} | {n_layers} | {cold['first_step']:.1f} | {compile_time(cold):.1f} | "
              f"{warm['first_step']:.1f} | {compile_time(warm):.1f} | {cold['median_step']:.2f} | "
              f"{cold['graphs']} |")
    for m in MECHANISMS:
        ours = [(n, c) for mm, n, c, _ in rows if mm == m]
        if len(ours) > 1:
            (n0, c0), (n1, c1) = ours[0], ours[-1]
            print(f"{m}: compile time at {n1} layers / at {n0} layers = "
                  f"{compile_time(c1) / compile_time(c0):.2f}")

    n = bc.throughput_layers
    if not n:
        return
    cache = {m: str(root / f"{m.replace(' ', '-')}-{n}") for m in MECHANISMS}
    result = run_child({"bench": bench, "n_layers": n, "mechanisms": list(MECHANISMS), "cache": cache,
                        "rounds": bc.rounds})
    tokens = bc.batch * bc.seq
    whole = result["whole graph"]["median_step"]
    print(f"\nthroughput, {n} layers, median of {bc.rounds} interleaved steps:")
    print("| step | median step (s) | tokens/s | vs whole graph |")
    print("|---|---|---|---|")
    for m in MECHANISMS:
        med = result[m]["median_step"]
        print(f"| {m} | {med:.3f} | {tokens / med:.0f} | {whole / med:.2f}x |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main(sys.argv[1:])
