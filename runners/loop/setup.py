"""What every training run sets up once: device, process group, mesh, rules, kernels, backend."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib import device
from models import llama
from parallel import kernels, sharding
from parallel.mesh import Mesh, MeshConfig, build_mesh
from parallel.pipeline import PipelineConfig


@dataclass
class Run:
    """What the loop needs, built once from the config."""
    dev: device.Device
    dist: device.DistInfo
    mesh: Mesh
    rules: sharding.Rules
    out_dir: Path
    kernels: llama.Kernels
    backend: Any                          # torch.compile backend for this device (None: eager)
    pipeline: PipelineConfig = PipelineConfig()   # how layers split into stages (mesh.pipe > 1)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def setup(train: Any, mesh_cfg: MeshConfig, rule_spec: Any, out_dir: str,
          pipeline: PipelineConfig = PipelineConfig()) -> Run:
    """`train` is a `runners.trainer.TrainConfig` (device, attention, step.compile)."""
    dev = device.detect(train.device)
    dist = device.init_distributed(dev)
    mesh = build_mesh(mesh_cfg, dev.kind)
    rules = sharding.logical_axis_rules(rule_spec, mesh)
    backend = kernels.compile_backend(dev) if train.step.compile else None
    return Run(dev, dist, mesh, rules, Path(out_dir), kernels.kernels_for(dev, train.attention, mesh=mesh),
               backend, pipeline)
