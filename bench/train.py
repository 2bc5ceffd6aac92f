"""Training throughput on CPU: our compiled train step vs HF LlamaForCausalLM + torch.optim.AdamW.

    .venv/bin/python bench/train.py                      # preset "small", seq 256, batch 8, fp32
    .venv/bin/python bench/train.py rounds=3 preset=tiny  # a quick smoke run

All three contenders (ours compiled; HF eager; HF with torch.compile on the model, the optimizer
eager as a user would write it) do the same work per step: forward, backward, global-norm
clipping at 1.0 and an AdamW update, on the same batch. Their steps are interleaved round by
round, so a load spike on a shared machine hits all of them alike; the median step is reported.
MFU divides model FLOP/s (models.llama.flops_per_token) by an fp32 GEMM rate measured here.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import config as config_lib  # noqa: E402
from lib import optim  # noqa: E402
from models import llama  # noqa: E402
from parallel import sharding  # noqa: E402
from parallel.mesh import MeshConfig, build_mesh  # noqa: E402
from parallel.train_step import TrainStepConfig, build_train_step, init_state  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "small"
    seq: int = 256
    batch: int = 8
    rounds: int = 5          # timed steps per contender (after one warm-up step each)
    # "first step" includes compiling; the inductor cache persists under /tmp between runs, so a
    # rerun's first step is warm. Delete /tmp/llamax-bench-inductor to time a cold compile.
    gemm_size: int = 1024


def gemm_flops(n: int, seconds: float = 0.5) -> float:
    """Best-of-5 FLOP/s of an n x n x n fp32 matmul: the ceiling a well-shaped matmul reaches."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(5):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            a @ b
            count += 1
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


def hf_model(cfg: llama.Config):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attn_implementation="sdpa"))
    return hf.train()


def hf_step_fn(model, opt, forward):
    def step(tokens, labels):
        opt.zero_grad(set_to_none=True)
        logits = forward(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss
    return step


def main(argv: list[str]) -> None:
    bc = config_lib.parse_argv(BenchConfig, argv)
    cfg = llama.PRESETS[bc.preset]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (bc.batch, bc.seq + 1), generator=g)
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    optim_cfg = optim.OptimizerConfig(lr=3e-4, min_lr=3e-5, warmup_steps=10, decay_steps=1000)
    step_cfg = TrainStepConfig(compile=True)
    mesh = build_mesh(MeshConfig())
    rules = sharding.load_rules(mesh=mesh)
    params = llama.init(cfg, seed=0)
    state = init_state(params, step_cfg)
    ours = build_train_step(cfg, optim_cfg, step_cfg, mesh, rules,  # sdpa attention: one process
                            cache_dir=Path(tempfile.gettempdir()) / "llamax-bench-inductor")

    eager_model = hf_model(cfg)
    compiled_model = hf_model(cfg)
    hf_kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    hf_eager = hf_step_fn(eager_model, torch.optim.AdamW(eager_model.parameters(), **hf_kw), eager_model)
    compiled_forward = torch.compile(compiled_model)
    hf_compiled = hf_step_fn(compiled_model, torch.optim.AdamW(compiled_model.parameters(), **hf_kw),
                             compiled_forward)

    def run_ours():
        nonlocal state
        state, metrics = ours(state, batch)
        return metrics["loss"]

    contenders = {"ours (compiled step)": run_ours,
                  "HF eager + AdamW": lambda: hf_eager(batch["tokens"], batch["labels"]),
                  "HF torch.compile + AdamW": lambda: hf_compiled(batch["tokens"], batch["labels"])}
    first_step = {}
    for name, fn in contenders.items():  # the first step includes compilation
        start = time.perf_counter()
        float(fn().detach())
        first_step[name] = time.perf_counter() - start
        print(f"{name}: first step {first_step[name]:.1f} s", flush=True)
    times = {name: [] for name in contenders}
    for r in range(bc.rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            float(fn().detach())
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{bc.rounds}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
              flush=True)

    ceiling = gemm_flops(bc.gemm_size)
    flops_per_step = llama.flops_per_token(cfg, bc.seq) * bc.batch * bc.seq
    base = statistics.median(times["HF torch.compile + AdamW"])
    print(f"\npreset={bc.preset} seq={bc.seq} batch={bc.batch} fp32, threads={torch.get_num_threads()}, "
          f"fp32 GEMM ceiling {ceiling / 1e9:.0f} GFLOP/s ({bc.gemm_size}^3, measured after the runs)")
    print("| contender | median step (s) | tokens/s | vs HF compiled | % of GEMM ceiling | first step (s) |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.2f} | {bc.batch * bc.seq / med:.0f} | {base / med:.2f}x | "
              f"{100 * flops_per_step / med / ceiling:.0f}% | {first_step[name]:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
