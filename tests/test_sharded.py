"""Parameters created, loaded and saved shard by shard (parallel/sharded.py, lib/rng.py,
lib/safetensors_io.py, models/hf.py's block reads).

References: the `safetensors` library's own reader and writer (load_file, safe_open) for the
file format; the single-process `llama.init` for the values of a sharded init; torch's
profiler for the bytes each rank allocates (on a fake process group, in this process).
"""
import dataclasses
import json
import math
import random

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.testing._internal.distributed.fake_pg import FakeStore

from lib import pytree, rng, safetensors_io
from lib.errors import UserError
from lib.memtrace import AllocationTrace
from models import hf, llama
from parallel import sharded, sharding
from parallel.mesh import MeshConfig, build_mesh
from tests.launch import spawn_ranks
from tests.shard_worker import MODEL, SEED

WORKER = __import__("pathlib").Path(__file__).resolve().parent / "shard_worker.py"


# ---------------------------------------------------------------------------------------------
# Random values by tile


@pytest.mark.parametrize("shape", [(700, 600), (300,), (70000,), (520, 260, 3), (5, 7)])
def test_any_region_equals_the_same_slice_of_the_whole_tensor(shape):
    full = rng.normal(shape, seed=3, std=0.02)
    assert abs(float(full.std()) - 0.02) < 0.02 * (0.5 if full.numel() > 100 else 1.0)
    r = random.Random(0)
    for _ in range(6):
        region = []
        for n in shape:
            a = r.randrange(n)
            region.append(slice(a, r.randrange(a, n) + 1))
        assert torch.equal(rng.normal(shape, 3, 0.02, tuple(region)), full[tuple(region)])
    assert not torch.equal(rng.normal(shape, 4, 0.02), full)


def test_fold_in_is_a_fixed_function_of_its_inputs():
    # A pinned value: init values must not change silently between versions or machines
    # (blake2b of "0/layers.0.wq", the top 63 bits of its first 8 bytes, little-endian).
    assert rng.fold_in(0, "layers.0.wq") == 7862748121563055875
    assert rng.fold_in(0, "layers.0.wq") != rng.fold_in(1, "layers.0.wq") != rng.fold_in(0, "layers.1.wq")


def test_init_param_region_matches_full_init_and_norms_are_ones():
    params = llama.init(MODEL, seed=SEED)
    wq = params["layers"][0]["wq"]
    region = (slice(100, 300), slice(77, 240))
    assert torch.equal(llama.init_param("layers.0.wq", tuple(wq.shape), SEED, region), wq[region])
    assert torch.equal(params["final_norm"], torch.ones(MODEL.dim))
    assert not torch.equal(params["layers"][0]["wk"][:, :10], params["layers"][0]["wv"][:, :10])


# ---------------------------------------------------------------------------------------------
# safetensors blocks


def test_read_blocks_and_headers_agree_with_the_safetensors_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 53, generator=g), "b": torch.randn(9, 4, 5, generator=g).bfloat16(),
               "c": torch.arange(11, dtype=torch.int64)}
    save_file(tensors, tmp_path / "x.safetensors")
    infos = safetensors_io.read_header(tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert {n: (f.get_slice(n).get_dtype(), f.get_slice(n).get_shape()) for n in f.keys()} == \
            {n: (safetensors_io.DTYPE_NAMES[i.dtype], list(i.shape)) for n, i in infos.items()}
    for region in [(slice(3, 20), slice(10, 11)), (slice(0, 37), slice(5, 53)), (slice(36, 37), slice(0, 53))]:
        assert torch.equal(safetensors_io.read(tmp_path / "x.safetensors", infos["a"], region), tensors["a"][region])
    region = (slice(2, 7), slice(1, 3), slice(0, 5))
    assert torch.equal(safetensors_io.read(tmp_path / "x.safetensors", infos["b"], region), tensors["b"][region])
    assert torch.equal(safetensors_io.read(tmp_path / "x.safetensors", infos["c"]), tensors["c"])


def test_written_files_are_read_by_the_safetensors_library(tmp_path):
    tensors = {"w": torch.randn(6, 5).bfloat16(), "n": torch.ones(3)}
    infos = {k: safetensors_io.TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    safetensors_io.write(tmp_path / "y.safetensors", infos, iter(tensors.items()), {"format": "pt"})
    loaded = load_file(tmp_path / "y.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="expected 'n'"):
        safetensors_io.write(tmp_path / "z.safetensors", infos, iter([("w", tensors["w"]), ("w", tensors["w"])]))


def test_truncated_and_corrupt_headers_name_the_file(tmp_path):
    save_file({"a": torch.zeros(100)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="cut.safetensors.*truncated"):
        safetensors_io.read_header(tmp_path / "cut.safetensors")
    with pytest.raises(UserError, match="junk.safetensors.*not a safetensors file"):
        safetensors_io.read_header(tmp_path / "junk.safetensors")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """MODEL with other values than init's, stored bf16 over several files, as HF would."""
    path = tmp_path_factory.mktemp("hf") / "model"
    params = pytree.tree_map(lambda t: t + 0.5, llama.init(MODEL, seed=SEED + 1))
    hf.save(path, MODEL, params, dtype=torch.bfloat16, max_shard_bytes=400_000)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    return path


def test_block_loads_equal_the_safetensors_library_and_keep_the_dtype(hf_dir):
    tensors = {}
    for file in hf_dir.glob("*.safetensors"):
        tensors.update(load_file(file))
    table = hf.hf_name_table(MODEL)
    region = lambda path, shape: tuple(slice(n // 3, n - n // 5) for n in shape)
    _, blocks = hf.load(hf_dir, region=region)
    for name, (tree_path, transposed) in table.items():
        ref = tensors[name].T if transposed else tensors[name]
        got = blocks
        for k in tree_path:
            got = got[k]
        assert got.dtype == torch.bfloat16 and got.is_contiguous()
        assert torch.equal(got, ref[region(None, tuple(ref.shape))]), name


def test_checkpoint_shapes_are_checked_from_headers_before_reading(hf_dir, tmp_path, monkeypatch):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["intermediate_size"] = 432
    (bad / "config.json").write_text(json.dumps(raw))
    monkeypatch.setattr(safetensors_io, "read", lambda *a, **k: pytest.fail("read a weight"))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \[(864, 320|320, 864)\]"):
        hf.load(bad)


# ---------------------------------------------------------------------------------------------
# One rank of many, in this process: a fake process group (no communication)


@pytest.fixture
def fake_rank():
    """Be rank 3 of 4 on a fake process group (collectives do nothing)."""
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=4)
    yield
    dist.destroy_process_group()


def _local_bytes(tree) -> int:
    return sum(x.to_local().numel() * x.element_size() for x in pytree.leaves(tree))


def test_each_rank_allocates_only_its_shards(fake_rank, hf_dir):
    mesh = build_mesh(MeshConfig(fsdp=2, tensor=2))
    rules = sharding.load_rules(mesh=mesh)
    full = llama.num_params(MODEL) * 4
    tile = rng.TILE * rng.TILE * 4
    with AllocationTrace() as init_trace:
        params = sharded.init(MODEL, SEED, rules, mesh)
    local = _local_bytes(params)
    norms = (2 * MODEL.n_layers + 1) * MODEL.dim * 4  # norm scales are replicated
    assert local == (full - norms) // 4 + norms
    assert init_trace.peak <= local + 2 * tile, (init_trace.peak, local)
    with AllocationTrace() as load_trace:
        _, loaded = sharded.load_hf(hf_dir, rules, mesh, dtype=torch.float32)
    largest_block = max(x.to_local().numel() for x in pytree.leaves(loaded)) * 4
    # bf16 chunks read from the file and their fp32 cast: at most one parameter's block each.
    assert load_trace.peak <= local + 2 * largest_block, (load_trace.peak, local)
    region = sharding.local_region((MODEL.dim, MODEL.ffn_dim), ("embed", "mlp"), rules, mesh)
    assert torch.equal(params["layers"][0]["w_up"].to_local(),
                       llama.init(MODEL, SEED)["layers"][0]["w_up"][region])


def test_an_indivisible_mesh_is_refused_before_anything_is_allocated(fake_rank):
    mesh = build_mesh(MeshConfig(tensor=4))
    rules = sharding.load_rules(mesh=mesh)
    odd = llama.Config(vocab_size=1000, dim=320, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=866)
    with AllocationTrace() as trace, pytest.raises(UserError, match=r"layers\.0\.w_down: dim 0 \('mlp'\) of size 866 "
                                                                      r"is not divisible by mesh axes \['tensor'\]"):
        sharded.init(odd, 0, rules, mesh)
    assert trace.peak == 0


# ---------------------------------------------------------------------------------------------
# Real ranks (gloo): the same full model on 1, 2 and 4 ranks


def _spawn(world, cases, hf_dir, tmp_path):
    out = tmp_path / "result.json"
    spawn_ranks(WORKER, world, [str(out), str(hf_dir), str(tmp_path / "saved"), *cases])
    return json.loads(out.read_text())


def _check(results, world):
    for case, r in results.items():
        assert r["init"] == 0.0, f"{case}: sharded init differs from llama.init by {r['init']}"
        assert r["load"] == 0.0, f"{case}: sharded HF load differs from safetensors' by {r['load']}"
        assert r["save"] == 0.0, f"{case}: saved tensors differ from the params by {r['save']}"
        assert r["config"] and r["moments_like_params"]
        assert math.isclose(r["local_fraction"], 1 / world, rel_tol=0.05) or "tensor" in case


@pytest.mark.distributed
def test_two_ranks_fsdp_and_tensor_build_the_single_process_model(hf_dir, tmp_path):
    results = _spawn(2, ["fsdp=2", "tensor=2"], hf_dir, tmp_path)
    _check(results, 2)
    assert results["fsdp=2"]["placements"] == "(Shard(dim=0),)"
    assert results["tensor=2"]["placements"] == "(Shard(dim=1),)"


@pytest.mark.distributed
def test_four_ranks_fsdp_x_tensor_build_the_single_process_model(hf_dir, tmp_path):
    results = _spawn(4, ["fsdp=2,tensor=2"], hf_dir, tmp_path)
    _check(results, 4)
    assert results["fsdp=2,tensor=2"]["placements"] == "(Shard(dim=0), Shard(dim=1))"


def test_a_native_checkpoint_of_another_shape_is_refused_from_its_metadata(tmp_path):
    from lib import checkpoint as ckpt_lib
    saver = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(dir=str(tmp_path / "ckpt"), async_save=False))
    try:
        saver.save(1, {"params": llama.init(MODEL, seed=0)}, force=True)
    finally:
        saver.close()
    reader = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(load=str(tmp_path / "ckpt"), finetune=True))
    try:
        reader.check({"params": llama.init(MODEL, device="meta")})  # the same model: no error
        wider = dataclasses.replace(MODEL, ffn_dim=MODEL.ffn_dim * 2)
        with pytest.raises(UserError, match=r"'params\.layers\.0\.w_down' has shape \(864, 320\), the model "
                                            r"expects \(1728, 320\)"):
            reader.check({"params": llama.init(wider, device="meta")})  # meta: nothing allocated
    finally:
        reader.close()


def test_a_pipeline_stage_creates_and_reads_only_its_layers(hf_dir, monkeypatch):
    from parallel import pipeline
    mesh = build_mesh(MeshConfig(fsdp=1))
    rules = sharding.load_rules(mesh=mesh)
    layout = pipeline.layout(pipeline.PipelineConfig(), 2, pipe=2)
    config = dataclasses.replace(MODEL, n_layers=2)
    last = lambda tree: pipeline.select(tree, layout, [1])
    created = sharded.init(config, 5, rules, mesh, select=last)
    assert sorted(created["layers"]) == [1] and "embed" not in created and "lm_head" in created
    assert torch.equal(created["layers"][1]["w_up"], llama.init(config, 5)["layers"][1]["w_up"])

    two_layers = hf_dir.parent / "two-layers"
    hf.save(two_layers, config, llama.init(config, 6), max_shard_bytes=400_000)
    reads, real_read = [], safetensors_io.read
    monkeypatch.setattr(safetensors_io, "read", lambda f, info, region=None: reads.append((f, info.offset)) or
                        real_read(f, info, region))
    _, loaded = sharded.load_hf(two_layers, rules, mesh, select=last)
    assert sorted(loaded["layers"]) == [1] and "embed" not in loaded
    assert torch.equal(loaded["layers"][1]["wq"], llama.init(config, 6)["layers"][1]["wq"])
    assert len(set(reads)) == 9 + 2  # layer 1's tensors, the final norm and lm_head: nothing else
