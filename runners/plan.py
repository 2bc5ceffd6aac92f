"""Will it fit? `python -m runners.plan [config.yaml] [key=value ...]`: memory per device and
throughput of a training config on named devices, before anything is launched or allocated.

    python -m runners.plan model=llama2-70b mesh.fsdp=8 mesh.tensor=8 train.global_batch=1024 \\
        data.seq_len=4096 train.step.micro_batches=128 train.step.remat=full train.step.dtype=bf16 \\
        device=910b-64g

It reads `runners.pretrain`'s config (the same YAML and overrides: a config the planner passes is
the config that gets launched) plus a few keys of its own: `device`, `device_memory` (GiB),
`world_size` (when a mesh axis is -1), `mfu`, `reserve` (GiB kept for the runtime) and
`generate.batch_size` / `generate.max_len` (the KV cache for decoding); `pipeline.*` is
`runners.pretrain`'s own. The figures come from
`parallel.plan`. Exit status: 0 when it fits, 1 when it does not, 2 for bad input.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lib import cli
from lib import config as config_lib
from lib import device as device_lib
from lib.errors import UserError
from models import llama
from parallel import plan as plan_lib
from parallel import sharding
from parallel.mesh import AXES
from runners.pretrain import PretrainConfig
from runners.trainer import TrainConfig

GIB = plan_lib.GIB

# name -> (device name for lib.device's peak FLOP/s table, memory in GiB as the runtime reports it)
# NVIDIA: torch.cuda.get_device_properties().total_memory of each part; Ascend: the nominal HBM
# (32/64 GB); both 910B sizes take the 910B family's 354 TFLOP/s (lib/device.py says why).
DEVICES: dict[str, tuple[str, float]] = {
    "910b-32g": ("Ascend910B", 32.0),
    "910b-64g": ("Ascend910B", 64.0),
    "a100-40g": ("NVIDIA A100-SXM4-40GB", 39.6),
    "a100-80g": ("NVIDIA A100-SXM4-80GB", 79.3),
    "h100-80g": ("NVIDIA H100 80GB HBM3", 79.2),
    "h200-141g": ("NVIDIA H200", 140.4),
}


@dataclass(frozen=True)
class GenerateConfig:
    batch_size: int = 0     # sequences decoded at once (0: no decoding figure)
    max_len: int = 0        # prompt + generated tokens

    def __post_init__(self):
        if self.batch_size < 0 or self.max_len < 0:
            raise ValueError(f"batch_size={self.batch_size} and max_len={self.max_len} must be >= 0")


@dataclass(frozen=True)
class PlanConfig(PretrainConfig):
    device: str | None = None            # a name from DEVICES
    device_memory: float | None = None   # GiB per device (instead of, or overriding, `device`'s)
    world_size: int | None = None        # devices in the job; needed when a mesh axis is -1
    mfu: float = 0.4                     # assumed model FLOPs utilisation for the throughput
    reserve: float = 2.0                 # GiB per device kept for the runtime (context, comm buffers)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu} must lie in (0, 1]")
        if self.device_memory is not None and self.device_memory <= 0:
            raise ValueError(f"device_memory={self.device_memory} must be > 0 (GiB)")
        if self.reserve < 0:
            raise ValueError(f"reserve={self.reserve} must be >= 0 (GiB)")


def _memory_and_name(cfg: PlanConfig) -> tuple[float, str | None]:
    if cfg.device is not None and cfg.device not in DEVICES:
        raise UserError(f"device={cfg.device!r} is not a known device ({', '.join(DEVICES)}); "
                        "give device_memory=<GiB> for another one")
    if cfg.device_memory is not None:
        return cfg.device_memory * GIB, DEVICES[cfg.device][0] if cfg.device else None
    if cfg.device is None:
        raise UserError(f"say which device: device=<{'|'.join(DEVICES)}> or device_memory=<GiB>")
    name, gib = DEVICES[cfg.device]
    return gib * GIB, name


def mesh_sizes(cfg: PlanConfig) -> dict[str, int]:
    """Concrete axis sizes: `world_size` fills a -1 axis, and must match a fully given mesh."""
    given = {a: getattr(cfg.mesh, a) for a in AXES}
    fixed = math.prod(v for v in given.values() if v != -1)
    if cfg.world_size is None:
        if -1 in given.values():
            fill = next(a for a, v in given.items() if v == -1)
            raise UserError(f"mesh.{fill}=-1 fills the world size: give world_size=<devices>, or "
                            f"mesh.{fill}=<size>")
        return given
    return cfg.mesh.resolve(cfg.world_size) if fixed else given


def workload(cfg: PlanConfig, sizes: dict[str, int]) -> plan_lib.Workload:
    accelerator = cfg.device is not None and not cfg.device.startswith("cpu")
    one_device = math.prod(sizes.values()) == 1
    # Fused attention runs only on a single device (TrainConfig.attention; trainer.setup refuses
    # it on a mesh), and only accelerators have one that keeps O(seq) memory.
    fused = one_device and accelerator and cfg.train.attention != "reference"
    step = cfg.train.step
    return plan_lib.Workload(
        global_batch=cfg.train.global_batch, seq_len=cfg.data.seq_len, micro_batches=step.micro_batches,
        dtype=step.dtype, remat=step.remat, attention="fused" if fused else "reference",
        compile=step.compile, pipeline=cfg.pipeline, decode_batch=cfg.generate.batch_size,
        decode_len=cfg.generate.max_len)


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _with_step(cfg: PlanConfig, **changes) -> PlanConfig:
    step = dataclasses.replace(cfg.train.step, **changes)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, step=step))


def _alternatives(cfg: PlanConfig, sizes: dict[str, int], budget: float) -> list[str]:
    """Edits of the config that fit, each with its free memory: recompute more, smaller
    micro-batches, wider tensor parallelism (same world size); single edits first, then full
    recompute together with one of the others."""
    step = cfg.train.step
    remats = {"none": ("selective", "full"), "selective": ("full",), "full": ()}[step.remat]
    singles: list[tuple[str, PlanConfig, dict[str, int]]] = [
        (f"train.step.remat={r}", _with_step(cfg, remat=r), sizes) for r in remats]
    for factor in (2, 4, 8):
        mb = step.micro_batches * factor
        singles.append((f"train.step.micro_batches={mb}", _with_step(cfg, micro_batches=mb), sizes))
    for donor in ("fsdp", "data"):
        if sizes[donor] % 2 == 0:
            wider = dict(sizes, tensor=sizes["tensor"] * 2, **{donor: sizes[donor] // 2})
            singles.append((f"mesh.tensor={wider['tensor']} mesh.{donor}={wider[donor]}", cfg, wider))
            break
    pairs = [] if step.remat == "full" else [
        (f"train.step.remat=full {text}", _with_step(candidate, remat="full"), candidate_sizes)
        for text, candidate, candidate_sizes in singles if not text.startswith("train.step.remat")]
    rules = sharding.logical_axis_rules(cfg.logical_axis_rules)
    fits = []
    for text, candidate, candidate_sizes in singles + pairs:
        try:
            p = plan_lib.plan(candidate.model, candidate_sizes, rules, workload(candidate, candidate_sizes))
        except UserError:
            continue
        if p.total <= budget:
            fits.append(f"{text} (fits with {(budget - p.total) / GIB:.1f} GiB free)")
    return fits[:3]


def main(argv: Sequence[str]) -> int:
    cfg = config_lib.parse_argv(PlanConfig, argv)
    memory, device_name = _memory_and_name(cfg)
    sizes = mesh_sizes(cfg)
    rules = sharding.logical_axis_rules(cfg.logical_axis_rules)
    for axis in {a for target in rules.values() for a in target}:
        if axis not in sizes:
            raise UserError(f"logical_axis_rules name mesh axis {axis!r}; mesh axes are {list(sizes)}")
    work = workload(cfg, sizes)
    p = plan_lib.plan(cfg.model, sizes, rules, work)
    budget = memory - cfg.reserve * GIB
    world = math.prod(sizes.values())
    model = cfg.model

    mesh_text = " x ".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "one device"
    print(f"model: {llama.num_params(model):,} parameters, {model.n_layers} layers, dim {model.dim}, "
          f"vocab {model.vocab_size}")
    print(f"mesh: {mesh_text} ({world} devices); step: global batch {cfg.train.global_batch} x "
          f"{work.seq_len} tokens, {work.micro_batches} micro-batch(es) of {p.micro_batch_rows} "
          f"sequence(s) per device, {work.dtype}, remat={work.remat}, {work.attention} attention")
    where = f"{cfg.device} ({device_name}), " if cfg.device else ""
    print(f"per device: {where}{memory / GIB:.1f} GiB, {cfg.reserve:.1f} GiB kept for the runtime")
    rows = [("", t) for t in p.persistent]
    rows += [("forward/backward", t) for t in p.forward_backward]
    rows += [("optimizer update", t) for t in p.update]
    width = max(len(t.name) for _, t in rows) + 2
    for title, terms in (("between steps", p.persistent), ("+ forward/backward", p.forward_backward),
                         ("+ optimizer update", p.update)):
        marker = "  <- the peak" if title.endswith(p.peak_phase) else ""
        print(f"  {title}: {_gib(sum(t.bytes for t in terms)).strip()}{marker}")
        for t in terms:
            print(f"    {t.name:<{width}}{_gib(t.bytes)}   {t.note}")
    print(f"  total (peak of the step): {p.total / GIB:.2f} GiB")
    if p.stage_totals:
        print(f"  pipeline: {len(p.stage_totals)} ranks along pipe need "
              f"{', '.join(f'{t / GIB:.1f}' for t in p.stage_totals)} GiB (the figures above are the "
              f"largest); {cfg.pipeline.schedule} bubble {p.pipeline_bubble:.1%} of each step")
    for note in p.notes:
        print(f"  note: {note}")
    if p.decoding:
        print(f"decoding: {' + '.join(f'{t.name} {t.bytes / GIB:.2f}' for t in p.decoding)} = "
              f"{p.decode_total / GIB:.2f} GiB ({p.decoding[-1].note})")

    dtype = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[work.dtype]
    import torch
    peak = device_lib.table_peak_flops(device_name, getattr(torch, {"bf16": "bfloat16", "fp16": "float16",
                                                                   "fp32": "float32"}[dtype])) \
        if device_name else None
    if peak:
        tps = plan_lib.tokens_per_second(model, work.seq_len, peak, cfg.mfu) * (1 - p.pipeline_bubble)
        print(f"throughput: ~{tps:,.0f} tokens/s per device ({tps * world:,.0f} for {world} devices) at "
              f"MFU {cfg.mfu:.0%} of {peak / 1e12:.0f} TFLOP/s {dtype}"
              + (f" less the pipeline bubble" if p.pipeline_bubble else "") + "; a step of "
              f"{cfg.train.global_batch * work.seq_len:,} tokens every {cfg.train.global_batch * work.seq_len / (tps * world):.1f} s")
    else:
        print("throughput: unknown (no peak FLOP/s for this device in lib/device.py)")

    free = budget - p.total
    if free >= 0:
        print(f"verdict: fits with {free / GIB:.1f} GiB free")
        return 0
    tries = _alternatives(cfg, sizes, budget)
    hint = f": try {'; or '.join(tries)}" if tries else ": no edit of remat, micro-batches or tensor width fits; more devices?"
    print(f"verdict: needs {-free / GIB:.1f} GiB more{hint}")
    return 1


if __name__ == "__main__":
    cli.run(main)
