"""Meta's original LLaMA checkpoints: `params.json` + `consolidated.NN.pth` model-parallel shards.

    config, params = meta.load("path/to/llama-2-7b")

Each shard holds one model-parallel slice (fairscale layers): column-parallel weights are split
along their output rows, row-parallel ones along their input columns, norms are replicated.
Meta's q/k projections order each head's rotary pairs interleaved (rows 2i, 2i+1 rotate
together); HF and `models.llama` use rotate-half (rows i, i + head_dim/2), so q/k rows are
reordered here. The result goes through the HF name table, so the shape checks are shared.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lib import config as config_lib
from lib.errors import UserError
from models import hf, llama

# Meta layer name -> (HF layer name, dim its shards are concatenated on; None: replicated).
_LAYER_NAMES: dict[str, tuple[str, int | None]] = {
    "attention_norm.weight": ("input_layernorm.weight", None),
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
}
_TOP_NAMES: dict[str, tuple[str, int | None]] = {
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    # tok_embeddings is split by the embedding dim (LLaMA-1/2) or by vocab (LLaMA-3): see below.
}
# Buffers some releases saved beside the weights (LLaMA-1/2's precomputed rotary frequencies).
_IGNORED = {"rope.freqs"}


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


def config_from_params(params: Mapping[str, Any], vocab_size: int, where: str) -> llama.Config:
    """Our Config from Meta's params.json (vocab_size given separately: it may be -1 there)."""
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        kv_heads = params.get("n_kv_heads") or n_heads
        scaled = bool(params.get("use_scaled_rope", False))
        rope_theta = float(params.get("rope_theta", 10000.0))
        norm_eps = float(params["norm_eps"])
        # params.json does not record the training context; Meta's release notes do.
        if scaled:
            max_seq_len = 131072
        elif vocab_size >= 128000:
            max_seq_len = 8192
        elif norm_eps == 1e-5:
            max_seq_len = 4096
        else:
            max_seq_len = 2048
        return llama.Config(
            vocab_size=vocab_size, dim=dim, n_layers=int(params["n_layers"]), n_heads=n_heads,
            n_kv_heads=None if kv_heads == n_heads else int(kv_heads),
            ffn_dim=ffn_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
            norm_eps=norm_eps, rope_theta=rope_theta,
            # Meta's reference code hard-codes these LLaMA-3.1 scaling constants.
            rope_scaling=llama.RopeScaling() if scaled else None,
            max_seq_len=max_seq_len)
    except KeyError as e:
        raise UserError(f"{where}: params.json has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    head_dim = w.shape[0] // n_heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return w.reshape(n_heads, head_dim, -1)[:, order].reshape(w.shape)


def _concat(name: str, pieces: list[torch.Tensor], dim: int | None, where: str) -> torch.Tensor:
    if dim is None or len(pieces) == 1:
        return pieces[0]
    try:
        return torch.cat(pieces, dim=dim)
    except RuntimeError as e:
        raise UserError(f"{where}: shards of {name!r} do not fit together ({e})") from None


def _read_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle with non-tensor objects, ...
        raise UserError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise UserError(f"{file}: expected a mapping of tensors, found {type(state).__name__}")
    return dict(state)


def load(path: str | Path, dtype: torch.dtype | None = None,
         device: torch.device | str = "cpu") -> tuple[llama.Config, llama.Params]:
    """(config, params) from a Meta checkpoint directory; stored dtype kept unless `dtype` given."""
    path = Path(path)
    params_file = path / "params.json"
    if not params_file.is_file():
        raise UserError(f"{path}: not a Meta LLaMA checkpoint (no params.json)")
    meta_params = config_lib.read_json(params_file)
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{path}: no consolidated.*.pth shards")
    shards = [_read_shard(f) for f in tqdm(files, desc=f"loading {path.name}", unit="shard",
                                           disable=len(files) == 1)]
    where = str(path)
    for file, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            odd = sorted(shard.keys() ^ shards[0].keys())[0]
            raise UserError(f"{file}: tensor {odd!r} is in some shards but not others")

    def pieces(name: str) -> list[torch.Tensor]:
        if name not in shards[0]:
            raise UserError(f"{where}: missing tensor {name!r}")
        return [s[name] for s in shards]

    # Meta splits tok_embeddings by the embedding dim in LLaMA-1/2 and by vocab in LLaMA-3;
    # a slice as wide as the model's dim can only be a vocab slice (with two or more shards).
    dim = int(meta_params.get("dim", 0))
    embed_pieces = pieces("tok_embeddings.weight")
    embed = _concat("tok_embeddings.weight", embed_pieces,
                    0 if embed_pieces[0].shape[-1] == dim else 1, where)
    vocab = int(meta_params.get("vocab_size", -1))
    config = config_from_params(meta_params, embed.shape[0] if vocab == -1 else vocab, str(params_file))

    tensors = {"model.embed_tokens.weight": embed}
    for meta_name, (hf_name, cat_dim) in _TOP_NAMES.items():
        tensors[hf_name] = _concat(meta_name, pieces(meta_name), cat_dim, where)
    for i in range(config.n_layers):
        for meta_name, (hf_name, cat_dim) in _LAYER_NAMES.items():
            full = f"layers.{i}.{meta_name}"
            tensors[f"model.layers.{i}.{hf_name}"] = _concat(full, pieces(full), cat_dim, where)
    known = {f"layers.{i}.{n}" for i in range(config.n_layers) for n in _LAYER_NAMES}
    known |= set(_TOP_NAMES) | {"tok_embeddings.weight"} | _IGNORED
    unexpected = sorted(set(shards[0]) - known)
    if unexpected:
        raise UserError(f"{where}: unexpected tensor {unexpected[0]!r}")

    for i in range(config.n_layers):
        for proj, heads in (("q_proj", config.n_heads), ("k_proj", config.kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            if tensors[name].shape[0] % heads == 0:  # wrong shapes are reported by the shared check
                tensors[name] = interleaved_to_rotate_half(tensors[name], heads)
    return config, hf.params_from_state_dict(config, tensors, where, dtype=dtype, device=device)
