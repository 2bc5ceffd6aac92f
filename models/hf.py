"""Hugging Face LLaMA checkpoints (`LlamaForCausalLM` directories) to and from our parameter tree.

    config, params = hf.load("path/to/Llama-2-7b-hf")           # safetensors or pytorch_model.bin
    hf.save("out/my-model", config, params, dtype=torch.bfloat16)  # from_pretrained() loads it

HF stores Linear weights as [out, in]; we store [in, out], so those are transposed at this
boundary. HF's q/k projections are already in the rotate-half RoPE layout that `models.llama`
uses, so no permutation is needed here (Meta's original checkpoints do need one: `models.meta`).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lib import config as config_lib
from lib import dtypes, files, hostcopy, safetensors_io
from lib.errors import UserError
from models import llama

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"

# The one name table, used in both directions: our key -> (HF name, stored transposed?).
# Linear weights are transposed ([out, in] in HF); embeddings and norms are not.
LAYER_NAMES: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
TOP_NAMES: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# Non-parameter buffers that older transformers versions saved into checkpoints.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name_table(config: llama.Config) -> dict[str, tuple[tuple[str | int, ...], bool]]:
    """HF tensor name -> (path into our params tree, transposed?) for every parameter of `config`."""
    table = {}
    for ours, (name, transposed) in TOP_NAMES.items():
        if ours == "lm_head" and config.tie_embeddings:
            continue
        table[name] = ((ours,), transposed)
    for i in range(config.n_layers):
        for ours, (name, transposed) in LAYER_NAMES.items():
            table[f"model.layers.{i}.{name}"] = (("layers", i, ours), transposed)
    return table


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------
# config.json


def _require(hf_config: Mapping, key: str, where: str) -> Any:
    if key not in hf_config:
        raise UserError(f"{where}: config.json has no {key!r}")
    return hf_config[key]


def config_from_hf(hf_config: Mapping[str, Any], path_for_errors: str | Path) -> llama.Config:
    """Our `llama.Config` from an HF `config.json` mapping (transformers 4.x or 5.x spelling)."""
    where = str(path_for_errors)
    architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if hf_config.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in architectures:
        raise UserError(f"{where}: not a LLaMA checkpoint (model_type={hf_config.get('model_type')!r}, "
                        f"architectures={architectures}); expected LlamaForCausalLM")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf_config.get(key, supported) != supported:
            raise UserError(f"{where}: {key}={hf_config[key]!r} is not supported (only {supported!r})")

    dim = _require(hf_config, "hidden_size", where)
    n_heads = _require(hf_config, "num_attention_heads", where)
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise UserError(f"{where}: head_dim={head_dim} with {n_heads} heads does not match hidden_size={dim}; "
                        "a decoupled head_dim is not supported")
    kv_heads = hf_config.get("num_key_value_heads") or n_heads

    # transformers 5 nests rope_theta inside rope_parameters; 4.x keeps rope_theta + rope_scaling.
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = llama.RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]))
    elif rope_type == "default":
        scaling = None
    else:
        raise UserError(f"{where}: rope type {rope_type!r} is not supported (only 'default' and 'llama3')")

    try:
        return llama.Config(
            vocab_size=_require(hf_config, "vocab_size", where),
            dim=dim,
            n_layers=_require(hf_config, "num_hidden_layers", where),
            n_heads=n_heads,
            n_kv_heads=None if kv_heads == n_heads else kv_heads,
            ffn_dim=_require(hf_config, "intermediate_size", where),
            norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_seq_len=hf_config.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def config_to_hf(config: llama.Config, dtype: torch.dtype = torch.float32, *,
                 bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None) -> dict[str, Any]:
    """An HF `config.json` mapping (the rope_theta/rope_scaling spelling both 4.x and 5.x read)."""
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtypes.torch_name(dtype),
        # Written even when None: a missing key makes transformers assume LLaMA-1's ids 1 and 2.
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position}
    return hf


# ---------------------------------------------------------------------------------------------
# State dicts


def params_from_state_dict(config: llama.Config, tensors: Mapping[str, torch.Tensor], where: str,
                           dtype: torch.dtype | None = None,
                           device: torch.device | str = "cpu") -> llama.Params:
    """Our params tree from HF-named tensors, checking names and shapes against `config`.

    `where` names the source in error messages. Tensors keep their stored dtype unless `dtype`
    is given.
    """
    check_tensors(config, {name: tuple(t.shape) for name, t in tensors.items()}, where)
    params: llama.Params = {"layers": [{} for _ in range(config.n_layers)]}
    for name, (tree_path, transposed) in hf_name_table(config).items():
        tensor = tensors[name].T if transposed else tensors[name]
        _get(params, tree_path[:-1])[tree_path[-1]] = tensor.to(
            device=device, dtype=dtype or tensor.dtype).contiguous()
    return params


def hf_tensors(config: llama.Config, params: llama.Params, dtype: torch.dtype | None = None,
               whole: Callable[[torch.Tensor], torch.Tensor] | None = None,
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, contiguous CPU tensor in HF layout) for every parameter, one at a time.

    `whole` turns a leaf into a plain whole tensor first (`parallel.sharded.save_hf` gathers a
    sharded one there); the generator holds one converted tensor at a time.
    """
    for name, (tree_path, transposed) in hf_name_table(config).items():
        tensor = _get(params, tree_path).detach()
        if whole is not None:
            tensor = whole(tensor)
        if transposed:
            tensor = tensor.T
        yield name, tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()


def state_dict_from_params(config: llama.Config, params: llama.Params,
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named, contiguous CPU tensors from our params tree (all at once: for `load_state_dict`)."""
    return dict(hf_tensors(config, params, dtype))


# ---------------------------------------------------------------------------------------------
# Loading


def _weight_files(path: Path) -> list[Path]:
    """The weight files of an HF directory, from its index when sharded."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (PYTORCH_BIN_INDEX, PYTORCH_BIN)):
        index = path / index_name
        if index.is_file():
            weight_map = config_lib.read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: has no 'weight_map'")
            weight_files = [path / name for name in dict.fromkeys(weight_map.values())]
            for f in weight_files:
                if not f.is_file():
                    raise UserError(f"{index}: names shard {f.name!r}, which does not exist in {path}")
            return weight_files
        if (path / single).is_file():
            return [path / single]
    raise UserError(f"{path}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                    f"{PYTORCH_BIN} or {PYTORCH_BIN_INDEX})")


def _weight_map(weight_files: list[Path]) -> dict[str, tuple[Path, safetensors_io.TensorInfo]]:
    """HF tensor name -> (file, header info), from the safetensors headers alone (`.bin` files
    have no header and are left out)."""
    out = {}
    for file in weight_files:
        if file.suffix == ".safetensors":
            for name, info in safetensors_io.read_header(file).items():
                out[name] = (file, info)
    return out


def check_tensors(config: llama.Config, stored: Mapping[str, Sequence[int]], where: str,
                  complete: bool = True) -> None:
    """Raise UserError for the first stored tensor the model does not have or whose shape
    differs from the config's, and (`complete`) the first model tensor missing from `stored`."""
    table = hf_name_table(config)
    for name, shape in stored.items():
        if name not in table:
            # Tied checkpoints sometimes store the (identical) output weight anyway.
            if name.endswith(_IGNORED_SUFFIXES) or (config.tie_embeddings and name == "lm_head.weight"):
                continue
            raise UserError(f"{where}: unexpected tensor {name!r}")
        expected = stored_shape(config, name)
        if tuple(shape) != expected:
            raise UserError(f"{where}: tensor {name!r} has shape {list(shape)}, "
                            f"expected {list(expected)} from the model config")
    if complete:
        missing = [name for name in table if name not in stored]
        if missing:
            raise UserError(f"{where}: missing tensor {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def stored_shape(config: llama.Config, name: str) -> tuple[int, ...]:
    """The shape HF stores tensor `name` in ([out, in] for Linear weights)."""
    path, transposed = hf_name_table(config)[name]
    ours = tuple(_get(llama.param_shapes(config), path))
    return ours[::-1] if transposed else ours


def _read_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A pytorch_model.bin's tensors. weights_only: never unpickle arbitrary objects; mmap: pages
    are read as tensors are used. A .bin has no header, so it is opened whole, not by block."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated or corrupt files
        raise UserError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise UserError(f"{file}: expected a mapping of tensors, found {type(state).__name__}")
    yield from state.items()


# region(path of the parameter in our tree, its shape in our [in, out] layout) -> the block to
# read, or None to leave that parameter out
RegionFn = Callable[[str, tuple[int, ...]], tuple[slice, ...] | None]


def load_config(path: str | Path) -> llama.Config:
    """The model config of an HF LlamaForCausalLM directory (no weight is read)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: not an HF model directory (no config.json)")
    return config_from_hf(config_lib.read_json(config_file), config_file)


def load(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
         region: RegionFn | None = None) -> tuple[llama.Config, llama.Params]:
    """(config, params) from an HF LlamaForCausalLM directory (safetensors or .bin, sharded or not).

    Tensors keep their stored dtype unless `dtype` is given. With `region`, each parameter is
    only the block `region(path, shape)` of it, in our [in, out] layout, and left out where that
    is None (`parallel.sharded.load_hf` passes each rank's blocks of its pipeline stage). safetensors files are read file by file and block by
    block, transposing [out, in] -> [in, out] a few rows at a time: no whole tensor is assembled.
    Every tensor's name and shape is checked against the config from the safetensors headers
    before any weight is read.
    """
    path = Path(path)
    config = load_config(path)
    weight_files = _weight_files(path)
    where = str(path)
    headers = _weight_map(weight_files)
    only_safetensors = all(f.suffix == ".safetensors" for f in weight_files)
    check_tensors(config, {n: info.shape for n, (_, info) in headers.items()}, where,
                  complete=only_safetensors)
    table = hf_name_table(config)
    params: llama.Params = {"layers": [{} for _ in range(config.n_layers)]}
    seen = set()

    def put(name: str, block: torch.Tensor | None) -> None:
        tree_path = table[name][0]
        if block is not None:
            _get(params, tree_path[:-1])[tree_path[-1]] = block
        seen.add(name)

    for file in tqdm(weight_files, desc=f"loading {path.name}", unit="file",
                     disable=len(weight_files) == 1):
        if file.suffix == ".safetensors":
            for name, (in_file, info) in headers.items():
                if in_file == file and name in table:
                    put(name, _read_block(file, info, table[name], region, dtype, device))
        else:
            for name, tensor in _read_bin(file):
                check_tensors(config, {name: tuple(tensor.shape)}, where, complete=False)
                if name in table:
                    put(name, _block_of(tensor, table[name], region, dtype, device))
    check_tensors(config, {n: stored_shape(config, n) for n in seen}, where, complete=True)
    return config, params


def _our_region(ours: tuple[int, ...], tree_path: tuple,
                region: RegionFn | None) -> tuple[slice, ...] | None:
    if region is None:
        return tuple(slice(0, n) for n in ours)
    block = region(".".join(str(k) for k in tree_path), ours)
    return None if block is None else tuple(block)


_TRANSPOSE_CHUNK = 1 << 22  # elements read per chunk while transposing (16 MB of fp32)


def _read_block(file: Path, info: safetensors_io.TensorInfo, entry: tuple[tuple, bool],
                region: RegionFn | None, dtype: torch.dtype | None,
                device: torch.device | str) -> torch.Tensor | None:
    """Our block of one stored tensor. A transposed one is read a few stored rows at a time,
    each chunk transposed into the result: the only extra memory is one chunk."""
    tree_path, transposed = entry
    block = _our_region(info.shape[::-1] if transposed else info.shape, tree_path, region)
    if block is None:
        return None
    out_dtype = dtype or info.dtype
    if not transposed:
        return safetensors_io.read(file, info, block).to(device=device, dtype=out_dtype)
    cols, rows = block  # ours [in, out] is stored [out, in]: our columns are stored rows
    out = torch.empty((cols.stop - cols.start, rows.stop - rows.start), dtype=out_dtype, device=device)
    step = max(1, _TRANSPOSE_CHUNK // max(1, cols.stop - cols.start))
    for r in range(rows.start, rows.stop, step):
        r_end = min(r + step, rows.stop)
        chunk = safetensors_io.read(file, info, (slice(r, r_end), cols))
        hostcopy.assign(out[:, r - rows.start:r_end - rows.start], chunk.T)
    return out


def _block_of(tensor: torch.Tensor, entry: tuple[tuple, bool], region: RegionFn | None,
              dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor | None:
    tree_path, transposed = entry
    if transposed:
        tensor = tensor.T
    block = _our_region(tuple(tensor.shape), tree_path, region)
    if block is None:
        return None
    return tensor[block].to(device=device, dtype=dtype or tensor.dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Saving


def _plan_files(infos: Mapping[str, safetensors_io.TensorInfo],
                max_bytes: int) -> list[dict[str, safetensors_io.TensorInfo]]:
    """Consecutive groups of tensors, each under `max_bytes` unless one tensor alone is larger."""
    groups: list[dict[str, safetensors_io.TensorInfo]] = [{}]
    size = 0
    for name, info in infos.items():
        if groups[-1] and size + info.nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = info
        size += info.nbytes
    return groups


def save(path: str | Path, config: llama.Config, params: llama.Params,
         dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30, *,
         bos_token_id: int | None = None,
         eos_token_id: int | list[int] | None = None) -> None:
    """Write an HF LlamaForCausalLM directory: config.json, generation_config.json, safetensors.

    Sharded with `model.safetensors.index.json` above `max_shard_bytes`. Tensors are converted
    and written one at a time. The directory is built under a temporary name beside `path` and
    renamed into place, so `path` is never half-written; an existing `path` is replaced only
    once the new one is complete.
    """
    save_tensors(path, config, hf_tensors(config, params, dtype), dtype or params["embed"].dtype,
                 max_shard_bytes, bos_token_id=bos_token_id, eos_token_id=eos_token_id)


def save_tensors(path: str | Path, config: llama.Config, tensors: Iterable[tuple[str, torch.Tensor]],
                 dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30, *,
                 bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None) -> None:
    """`save` from a stream of (HF name, tensor in HF layout and `dtype`) in `hf_name_table`
    order, as `hf_tensors` yields them: file headers are planned from the config, so each
    tensor is written as it arrives and dropped (a sharded model is gathered one tensor at a
    time by `parallel.sharded.save_hf`)."""
    path = Path(path)
    infos = {name: safetensors_io.TensorInfo(dtype, stored_shape(config, name))
             for name in hf_name_table(config)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.make_temp_dir(path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        hf_config = config_to_hf(config, dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id))
                      if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

        groups = _plan_files(infos, max_shard_bytes)
        names = ([SAFETENSORS] if len(groups) == 1 else
                 [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
        stream = iter(tensors)
        for name, file_infos in zip(tqdm(names, desc=f"saving {path.name}", unit="file",
                                         disable=len(groups) == 1), groups):
            safetensors_io.write(tmp / name, file_infos, itertools.islice(stream, len(file_infos)),
                                 metadata={"format": "pt"})
        if len(groups) > 1:
            weight_map = {t: name for name, file_infos in zip(names, groups) for t in file_infos}
            index = {"metadata": {"total_size": sum(i.nbytes for i in infos.values())},
                     "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["load", "load_config", "save", "save_tensors", "hf_tensors", "check_tensors",
           "config_from_hf", "config_to_hf", "params_from_state_dict", "state_dict_from_params",
           "hf_name_table", "stored_shape"]
