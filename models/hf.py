"""Hugging Face LLaMA checkpoints (`LlamaForCausalLM` directories) to and from our parameter tree.

    config, params = hf.load("path/to/Llama-2-7b-hf")           # safetensors or pytorch_model.bin
    hf.save("out/my-model", config, params, dtype=torch.bfloat16)  # from_pretrained() loads it

HF stores Linear weights as [out, in]; we store [in, out], so those are transposed at this
boundary. HF's q/k projections are already in the rotate-half RoPE layout that `models.llama`
uses, so no permutation is needed here (Meta's original checkpoints do need one: `models.meta`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lib import config as config_lib
from lib import dtypes, files
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
    return _params_from_stream(config, tensors.items(), where, dtype, device)


def _params_from_stream(config: llama.Config, named_tensors: Iterable[tuple[str, torch.Tensor]],
                        where: str, dtype: torch.dtype | None,
                        device: torch.device | str) -> llama.Params:
    # Each tensor is converted as it arrives, so a loader streaming shards holds about one copy
    # of the model at a time rather than the raw checkpoint plus the converted tree.
    table = hf_name_table(config)
    shapes = llama.param_shapes(config)
    params: llama.Params = {"layers": [{} for _ in range(config.n_layers)]}
    seen = set()
    for name, tensor in named_tensors:
        if name not in table:
            # Tied checkpoints sometimes store the (identical) output weight anyway.
            if name.endswith(_IGNORED_SUFFIXES) or (config.tie_embeddings and name == "lm_head.weight"):
                continue
            raise UserError(f"{where}: unexpected tensor {name!r}")
        path, transposed = table[name]
        ours = tuple(_get(shapes, path))
        expected = ours[::-1] if transposed else ours
        if tuple(tensor.shape) != expected:
            raise UserError(f"{where}: tensor {name!r} has shape {list(tensor.shape)}, "
                            f"expected {list(expected)} from the model config")
        if transposed:
            tensor = tensor.T
        _get(params, path[:-1])[path[-1]] = tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()
        seen.add(name)
    missing = [name for name in table if name not in seen]
    if missing:
        raise UserError(f"{where}: missing tensor {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return params


def state_dict_from_params(config: llama.Config, params: llama.Params,
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named, contiguous CPU tensors from our params tree."""
    out = {}
    for name, (path, transposed) in hf_name_table(config).items():
        tensor = _get(params, path).detach()
        if transposed:
            tensor = tensor.T
        out[name] = tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
    return out


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
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise UserError(f"{index}: names shard {f.name!r}, which does not exist in {path}")
            return files
        if (path / single).is_file():
            return [path / single]
    raise UserError(f"{path}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                    f"{PYTORCH_BIN} or {PYTORCH_BIN_INDEX})")


def _read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            # weights_only: never unpickle arbitrary objects; mmap: do not read the file twice.
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, Mapping):
                raise UserError(f"{file}: expected a mapping of tensors, found {type(state).__name__}")
            yield from state.items()
    except UserError:
        raise
    except Exception as e:  # safetensors/torch raise many types for truncated or corrupt files
        raise UserError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from None


def load(path: str | Path, dtype: torch.dtype | None = None,
         device: torch.device | str = "cpu") -> tuple[llama.Config, llama.Params]:
    """(config, params) from an HF LlamaForCausalLM directory (safetensors or .bin, sharded or not)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: not an HF model directory (no config.json)")
    config = config_from_hf(config_lib.read_json(config_file), config_file)
    files = _weight_files(path)
    named_tensors = (item for file in tqdm(files, desc=f"loading {path.name}", unit="shard",
                                           disable=len(files) == 1)
                     for item in _read_tensors(file))
    return config, _params_from_stream(config, named_tensors, str(path), dtype, device)


# ---------------------------------------------------------------------------------------------
# Saving


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors, each under `max_bytes` unless one tensor alone is larger."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    files.follow_umask(path)  # safetensors writes 0600


def save(path: str | Path, config: llama.Config, params: llama.Params,
         dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30, *,
         bos_token_id: int | None = None,
         eos_token_id: int | list[int] | None = None) -> None:
    """Write an HF LlamaForCausalLM directory: config.json, generation_config.json, safetensors.

    Sharded with `model.safetensors.index.json` above `max_shard_bytes`. The directory is built
    under a temporary name beside `path` and renamed into place, so `path` is never half-written;
    an existing `path` is replaced only once the new one is complete.
    """
    path = Path(path)
    tensors = state_dict_from_params(config, params, dtype)
    dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.make_temp_dir(path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        hf_config = config_to_hf(config, dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id))
                      if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            _save_safetensors(shards[0], tmp / SAFETENSORS)
        else:
            weight_map = {}
            for i, shard in enumerate(tqdm(shards, desc=f"saving {path.name}", unit="shard"), 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _save_safetensors(shard, tmp / name)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
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


__all__ = ["load", "save", "config_from_hf", "config_to_hf", "params_from_state_dict",
           "state_dict_from_params", "hf_name_table"]
