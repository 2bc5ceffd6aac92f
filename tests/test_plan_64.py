"""The seeds' 64-device jobs, planned on this machine: a fake process group of 64 ranks in this
process (this test is rank 37), meta tensors, no real memory.

- llama2-70b on fsdp=8 x tensor=8 and llama3-70b on data=2 x fsdp=4 x tensor=8: every parameter,
  optimizer moment, master weight and KV-cache entry becomes a DTensor of the right local shape
  (`parallel.sharded` on the meta device), the planner's per-device counts agree with DTensor's
  own local shapes, and every activation the model constrains divides over the mesh;
- the train step of the first, with 70B's widths and one layer (layers trace alike), traces with
  dynamo (fullgraph, the eager backend: the graph runs on meta tensors).

A wrong rule table fails here instead of after a 64-device job has queued for a day. The second
mesh is not traced op by op: on a 3-dim mesh DTensor's graph-based redistribution planner, which
grouped-query attention's head reshape (a _StridedShard) switches on, ran for over 15 minutes.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from lib import optim, pytree
from lib.constraints import use_constraint
from models import llama
from parallel import plan, sharded, sharding, train_step
from parallel.mesh import Mesh, MeshConfig, build_mesh

CASES = {
    "llama2-70b fsdp8 x tensor8": ("llama2-70b", MeshConfig(fsdp=8, tensor=8)),
    "llama3-70b data2 x fsdp4 x tensor8": ("llama3-70b", MeshConfig(data=2, fsdp=4, tensor=8)),
}
GLOBAL_ROWS, SEQ = 16, 4096  # one micro-batch: 2 rows per data-parallel rank in both meshes


@pytest.fixture(scope="module")
def world():
    dist.init_process_group("fake", store=FakeStore(), rank=37, world_size=64)
    yield
    dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@pytest.mark.parametrize("case", CASES)
def test_state_and_kv_cache_are_placed_without_memory(world, case):
    preset, mesh_cfg = CASES[case]
    model = llama.PRESETS[preset]
    mesh = build_mesh(mesh_cfg)
    rules = sharding.load_rules(mesh=mesh)
    params = sharded.empty(llama.init(model, dtype=torch.bfloat16, device="meta"),
                           llama.param_axes(model), rules, mesh, device="meta")
    state = train_step.init_state(params, train_step.TrainStepConfig(dtype="bf16"))
    cache = sharded.empty(llama.init_cache(model, GLOBAL_ROWS, SEQ, dtype=torch.bfloat16, device="meta"),
                          llama.cache_axes(model), rules, mesh, device="meta")
    # No memory: every tensor of the state and the cache is on meta (step and loss scale, host
    # scalars, aside).
    for tree in (state["params"], state["opt"]["mu"], state["opt"]["nu"], state["opt"]["master"], cache):
        assert all(leaf.device.type == "meta" for leaf in pytree.leaves(tree))

    # The planner counts elements with the rule table; DTensor computed these local shapes itself.
    plan_mesh = Mesh(None, mesh.sizes)
    n_local = sum(_local(p).numel() for p in pytree.leaves(params))
    assert n_local == plan.param_elements(llama.param_shapes(model), llama.param_axes(model), rules, plan_mesh)
    flat_params = pytree.flatten_by_path(params)
    for tree in (state["params"], state["opt"]["mu"], state["opt"]["nu"], state["opt"]["master"]):
        for path, leaf in pytree.flatten_by_path(tree).items():
            assert leaf.placements == flat_params[path].placements, path
            assert _local(leaf).shape == _local(flat_params[path]).shape, path
    kv_bytes = sum(_local(t).numel() * t.element_size() for t in pytree.leaves(cache))
    assert kv_bytes == plan.kv_cache_bytes(model, rules, plan_mesh, GLOBAL_ROWS, SEQ, "bf16")
    # 70B: 8192 x 1024 heads' columns of wq per device; kv heads (8) one per tensor rank
    assert tuple(_local(params["layers"][0]["wq"]).shape) == (8192 // mesh.sizes["fsdp"], 8192 // 8)
    assert tuple(_local(cache["layers"][0]["k"]).shape) == (2, SEQ, 1, model.head_dim)


@pytest.mark.parametrize("case", CASES)
def test_every_constrained_activation_divides_over_the_mesh(world, case):
    preset, mesh_cfg = CASES[case]
    model = llama.PRESETS[preset]
    mesh = build_mesh(mesh_cfg)
    rules = sharding.load_rules(mesh=mesh)
    seen = {}

    def record(x, axes):
        seen[tuple(axes), tuple(x.shape)] = x
        return x

    # One process, whole tensors on meta: the shapes the constraints see, globally.
    one_layer = dataclasses.replace(model, n_layers=1)
    tokens = torch.zeros(GLOBAL_ROWS, SEQ, dtype=torch.long, device="meta")
    with use_constraint(record):
        llama.forward(llama.init(one_layer, dtype=torch.bfloat16, device="meta"), tokens, one_layer)
    assert {axes for axes, _ in seen} == {("batch", "seq", "embed"), ("batch", "seq", "heads", None),
                                          ("batch", "seq", "kv_heads", None), ("batch", "seq", "mlp"),
                                          ("batch", "seq", "vocab")}
    sharding.check_shardable({f"{axes}": shape for axes, shape in seen},
                             {f"{axes}": axes for axes, _ in seen}, rules, mesh)


def test_the_compiled_step_traces_on_the_64_rank_mesh(world):
    model = dataclasses.replace(llama.PRESETS["llama2-70b"], n_layers=1)
    mesh = build_mesh(MeshConfig(fsdp=8, tensor=8))
    rules = sharding.load_rules(mesh=mesh)
    step_cfg = train_step.TrainStepConfig(dtype="bf16", remat="none", compile=True)
    params = sharded.empty(llama.init(model, device="meta"), llama.param_axes(model), rules, mesh, device="meta")
    state = train_step.init_state(params, step_cfg)
    step = train_step.build_train_step(model, optim.OptimizerConfig(), step_cfg, mesh, rules, backend="eager")
    rows = GLOBAL_ROWS // sharding.batch_shards(rules, mesh)[1]
    batch = {k: torch.zeros(rows, SEQ, dtype=torch.long, device="meta") for k in ("tokens", "labels")}
    new_state, metrics = step(state, batch)
    for path, leaf in pytree.flatten_by_path(new_state["params"]).items():
        assert leaf.placements == pytree.flatten_by_path(state["params"])[path].placements, path
    assert metrics["loss"].device.type == "meta" and metrics["grad_norm"].shape == ()
