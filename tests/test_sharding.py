"""Mesh sizes, rule tables and placements, in one process (tests/test_distributed.py shards for real).

Placement logic only needs the names and sizes of the mesh axes, so a stand-in with
`mesh_dim_names` and `ndim` replaces the DeviceMesh here.
"""
import types

import pytest
from torch.distributed.tensor import Replicate, Shard

from lib.errors import UserError
from models import llama
from parallel import sharding
from parallel.mesh import Mesh, MeshConfig, build_mesh


def fake_mesh(**sizes) -> Mesh:
    full = {"pipe": 1, "data": 1, "fsdp": 1, "tensor": 1, **sizes}
    kept = tuple(k for k, v in full.items() if v > 1)
    return Mesh(types.SimpleNamespace(mesh_dim_names=kept, ndim=len(kept)) if kept else None, full)


RULES = sharding.load_rules()


def test_mesh_fill_axis_and_errors():
    assert MeshConfig(fsdp=-1, tensor=2).resolve(8) == {"pipe": 1, "data": 1, "fsdp": 4, "tensor": 2}
    assert MeshConfig(data=2, fsdp=1, tensor=2).resolve(4) == {"pipe": 1, "data": 2, "fsdp": 1, "tensor": 2}
    assert MeshConfig(pipe=2, fsdp=-1).resolve(8) == {"pipe": 2, "data": 1, "fsdp": 4, "tensor": 1}
    with pytest.raises(UserError, match="product 4 != world size 8"):
        MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
    with pytest.raises(UserError, match="not divisible"):
        MeshConfig(fsdp=-1, tensor=3).resolve(8)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="positive or -1"):
        MeshConfig(tensor=0)


def test_single_process_mesh_has_no_device_mesh():
    mesh = build_mesh(MeshConfig())
    assert mesh.device_mesh is None and mesh.world_size == 1
    assert mesh.dim("tensor") is None  # size-1 axes stay resolvable by name


def test_default_rules_give_megatron_and_fsdp_layouts():
    mesh = fake_mesh(fsdp=2, tensor=4)
    spec = lambda axes: sharding.spec_for(axes, RULES, mesh)
    assert spec(("embed", "heads")) == (Shard(0), Shard(1))      # wq: fsdp on in, tensor on out
    assert spec(("heads", "embed")) == (Shard(1), Shard(0))      # wo: row-parallel
    assert spec(("vocab", "embed")) == (Shard(1), Shard(0))
    assert spec(("norm",)) == (Replicate(), Replicate())
    # An activation: batch takes fsdp, so embed (also fsdp) is not split again.
    assert spec(("batch", "seq", "embed")) == (Shard(0), Replicate())
    assert spec(("batch", "seq", "mlp")) == (Shard(0), Shard(2))


def test_batch_split_over_data_and_fsdp_size_one_axes_dropped():
    mesh = fake_mesh(data=2, fsdp=2)
    assert mesh.device_mesh.mesh_dim_names == ("data", "fsdp")
    assert sharding.spec_for(("batch", None), RULES, mesh) == (Shard(0), Shard(0))
    assert sharding.spec_for(("embed", "heads"), RULES, mesh) == (Replicate(), Shard(0))


def test_rules_from_yaml_list_forms():
    rules = sharding.logical_axis_rules([["batch", ["data", "fsdp"]], ["vocab", "tensor"], ["norm", None]])
    assert rules == {"batch": ("data", "fsdp"), "vocab": ("tensor",), "norm": ()}


def test_rule_naming_unknown_mesh_axis():
    with pytest.raises(UserError, match="'heads' -> 'model' names an unknown mesh axis"):
        sharding.logical_axis_rules([["heads", "model"]], fake_mesh(tensor=2))


def test_duplicate_rule():
    with pytest.raises(UserError, match="two rules"):
        sharding.logical_axis_rules([["heads", "tensor"], ["heads", None]])


def test_logical_axis_without_rule_is_named():
    rules = {k: v for k, v in RULES.items() if k != "kv_heads"}
    params = llama.init(llama.PRESETS["tiny"], device="meta")
    with pytest.raises(UserError, match="logical axis 'kv_heads' has no rule"):
        sharding.shard_params(params, llama.param_axes(llama.PRESETS["tiny"]), rules, fake_mesh(tensor=2))


def test_indivisible_dimension_names_param_dim_and_axes():
    cfg = llama.PRESETS["tiny"]  # vocab 512
    params = llama.init(cfg, device="meta")
    with pytest.raises(UserError, match=r"embed: dim 0 \('vocab'\) of size 512 is not "
                                        r"divisible by mesh axes \['tensor'\] \(total 3\)"):
        sharding.shard_params(params, llama.param_axes(cfg), RULES, fake_mesh(tensor=3))


def test_param_without_axes_is_named():
    cfg = llama.PRESETS["tiny"]
    params = llama.init(cfg, device="meta")
    axes = llama.param_axes(cfg)
    del axes["final_norm"]
    with pytest.raises(UserError, match="'final_norm' has no logical axes"):
        sharding.shard_params(params, axes, RULES, fake_mesh(tensor=2))


def test_unsharded_mesh_returns_params_as_they_are():
    cfg = llama.PRESETS["tiny"]
    params = llama.init(cfg)
    out = sharding.shard_params(params, llama.param_axes(cfg), RULES, fake_mesh())
    assert out["layers"][1]["wq"] is params["layers"][1]["wq"]
