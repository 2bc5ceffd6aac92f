"""One rank of tests/test_sharded.py: parameters created, loaded and saved shard by shard.

Launched with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    python tests/shard_worker.py OUT.json HF_DIR SAVE_DIR fsdp=2 tensor=2 fsdp=2,tensor=2

For each mesh case every rank creates the model with `sharded.init`, loads HF_DIR with
`sharded.load_hf` and writes it back with `sharded.save_hf`. Rank 0 compares the gathered
results with single-process references: `llama.init` with the same seed (bit for bit), and the
checkpoint's tensors as the `safetensors` library reads them (`load_file`, transposed), and
writes the largest differences as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import files, pytree  # noqa: E402
from models import hf, llama  # noqa: E402
from parallel import sharded, sharding  # noqa: E402
from parallel.mesh import MeshConfig, build_mesh  # noqa: E402
from parallel.train_step import TrainStepConfig, init_state  # noqa: E402

# Dims above lib.rng.TILE and not multiples of it: shards cut tiles at odd places.
MODEL = llama.Config(vocab_size=1000, dim=320, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=864,
                     max_seq_len=64)
SEED = 11


def reference_hf(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint as the safetensors library reads it, in our layout and fp32, by our path."""
    from safetensors.torch import load_file
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    out = {}
    for name, (tree_path, transposed) in hf.hf_name_table(MODEL).items():
        t = tensors[name].float()
        out[".".join(map(str, tree_path))] = t.T if transposed else t
    return out


def whole(tree) -> dict[str, torch.Tensor]:
    return {p: (x.full_tensor() if hasattr(x, "full_tensor") else x)
            for p, x in pytree.flatten_by_path(tree).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def run_case(text: str, hf_dir: Path, save_dir: Path, reference: dict) -> dict:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1,
             **{k: int(v) for k, v in (item.split("=") for item in text.split(","))}}
    mesh = build_mesh(MeshConfig(**sizes))
    rules = sharding.load_rules(mesh=mesh)
    result = {}

    params = sharded.init(MODEL, SEED, rules, mesh)
    result["local_fraction"] = (sum(x.to_local().numel() for x in pytree.leaves(params))
                                / llama.num_params(MODEL))
    state = init_state(params, TrainStepConfig(dtype="bf16"))
    result["moments_like_params"] = all(
        m.placements == p.placements and m.to_local().shape == p.to_local().shape
        for m, p in zip(pytree.leaves(state["opt"]["mu"]), pytree.leaves(params)))
    full_init = whole(params)

    config, loaded = sharded.load_hf(hf_dir, rules, mesh, dtype=torch.float32)
    full_loaded = whole(loaded)

    out = save_dir / text.replace(",", "_").replace("=", "")
    sharded.save_hf(out, MODEL, params)
    if dist.get_rank() == 0:
        result["init"] = max_diff(full_init, {p: t for p, t in
                                              pytree.flatten_by_path(llama.init(MODEL, SEED)).items()})
        result["load"] = max_diff(full_loaded, reference)
        result["config"] = config == MODEL
        result["save"] = max_diff(reference_hf(out), full_init)
        result["placements"] = str(params["layers"][0]["wq"].placements)
    return result


def main() -> None:
    out_path, hf_dir, save_dir, *cases = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    reference = reference_hf(Path(hf_dir))
    results = {case: run_case(case, Path(hf_dir), Path(save_dir), reference) for case in cases}
    if dist.get_rank() == 0:
        files.write_text_atomic(out_path, json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
