"""Megatron-LM, ModelLink and MindSpeed-LLM checkpoints (`--ckpt-format torch`) to and from our tree.

    config, params = megatron.load("ckpts/llama2-7b-tp8pp1")           # its latest iteration
    megatron.save("out/tp2pp2", config, params, tensor_parallel=2, pipeline_parallel=2)

On disk (Megatron-LM's `megatron/training/checkpointing.py`, which ModelLink and MindSpeed-LLM use):

    <root>/latest_checkpointed_iteration.txt        "1000" or "release"
    <root>/iter_0001000/mp_rank_TT/model_optim_rng.pt         pipeline size 1
    <root>/iter_0001000/mp_rank_TT_PPP/model_optim_rng.pt     pipeline size > 1
    <root>/release/...                                         instead of iter_N

Each file is a pickled dict: `args` (the run's argparse.Namespace: the model shape, TP/PP sizes,
the padded vocabulary), `checkpoint_version` (3.0), `iteration`, the model (`model`, or `model0`,
`model1`, ... with virtual pipeline stages) and, from training, optimizer and RNG state. The
files are read with `torch.load(weights_only=True)` and an allow-list of what they legitimately
hold (`_SAFE_GLOBALS`); a file that needs any other type is refused, naming it.

Two key layouts exist (a file's tensors hold the layers of its pipeline stage, numbered from 0
within the file; the global index is the stage's offset plus that number):

    legacy (megatron/legacy, ModelLink legacy; stored nested, one dict per module):
      language_model.embedding.word_embeddings.weight              [vocab/tp, d]
      language_model.encoder.layers.N.input_layernorm.weight        (`input_norm` since core 0.5)
      language_model.encoder.layers.N.self_attention.query_key_value.weight
      language_model.encoder.layers.N.self_attention.dense.weight
      language_model.encoder.layers.N.post_attention_layernorm.weight  (`post_attention_norm`)
      language_model.encoder.layers.N.mlp.dense_h_to_4h.weight
      language_model.encoder.layers.N.mlp.dense_4h_to_h.weight
      language_model.encoder.final_layernorm.weight                (`final_norm`)
      language_model.output_layer.weight                           untied only
      word_embeddings_for_head.weight          tied, last stage of a pipeline (a copy of the embedding)
    mcore (megatron-core GPTModel; flat):
      embedding.word_embeddings.weight, decoder.layers.N.self_attention.linear_qkv.weight,
      ...linear_proj.weight, mlp.linear_fc1.weight, mlp.linear_fc2.weight,
      decoder.final_layernorm.weight, output_layer.weight (untied; or tied on the last stage)
      norms: `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` with TransformerEngine
      ("mcore"), `input_layernorm.weight` / `pre_mlp_layernorm.weight` with the local spec
      ("mcore-local": megatron-core without TE, ModelLink and MindSpeed-LLM on Ascend)

Tensors are [out, in] as torch.nn.Linear, so HF names (`models.hf`) are used as the go-between.
Fused tensors, per tensor-parallel shard:
  - QKV is grouped by kv head: for each of the shard's kv heads g, the rows of its query heads,
    then k_g, then v_g ([ng, nh/ng + 2, head_dim, d]); shards split the groups contiguously.
  - fc1 is [gate; up] of the shard's slice of the MLP (so the full fc1 is not [gate; up]).
  - The vocabulary is padded to a multiple of `make_vocab_size_divisible_by` x TP (Megatron's
    `_vocab_size_with_padding`); written pads repeat the last row as Megatron's savers do, and
    reading keeps the true vocabulary when `args.vocab_size` or `vocab_size=` says what it is.
Rotary embeddings are rotate-half in Megatron as in HF, so q/k need no permutation.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import re
import shutil
import signal
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from lib import config as config_lib
from lib import files
from lib.errors import UserError
from models import hf, llama

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
# Megatron-LM's default `--make-vocab-size-divisible-by`; ModelLink's LLaMA scripts pass 1.
DEFAULT_VOCAB_MULTIPLE = 128

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Key layouts


@dataclass(frozen=True)
class Layout:
    """Where one key layout keeps each tensor (dotted names of Megatron's module tree)."""
    embed: str
    final_norm: str
    output: str          # the untied lm head
    tied_head: str       # a tied model's copy of the embedding on the last pipeline stage
    layers: str          # prefix of "<local index>.<suffix>"
    layer: Mapping[str, str]                 # piece -> suffix
    extra_state: tuple[str, ...] = ()        # layer modules whose `_extra_state` megatron-core saves

    def is_layer_key(self, key: str) -> bool:
        return key.startswith(self.layers)


_LEGACY_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "qkv": "self_attention.query_key_value.weight",
    "proj": "self_attention.dense.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "fc1": "mlp.dense_h_to_4h.weight",
    "fc2": "mlp.dense_4h_to_h.weight",
}
_MCORE_LAYER = {
    "qkv": "self_attention.linear_qkv.weight",
    "proj": "self_attention.linear_proj.weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
}
_MCORE_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_MCORE_TOP = dict(embed="embedding.word_embeddings.weight", final_norm="decoder.final_layernorm.weight",
                  output="output_layer.weight", tied_head="output_layer.weight", layers="decoder.layers.")

LAYOUTS: dict[str, Layout] = {
    # Written with the `layernorm` spellings: Megatron's legacy ParallelTransformer renames
    # "layernorm" to "norm" when loading, so every version (and ModelLink) reads them.
    "legacy": Layout(embed="language_model.embedding.word_embeddings.weight",
                     final_norm="language_model.encoder.final_layernorm.weight",
                     output="language_model.output_layer.weight",
                     tied_head="word_embeddings_for_head.weight",
                     layers="language_model.encoder.layers.", layer=_LEGACY_LAYER),
    # TransformerEngine fuses each norm into the linear after it.
    "mcore": Layout(**_MCORE_TOP, layer={**_MCORE_LAYER,
                                         "attn_norm": "self_attention.linear_qkv.layer_norm_weight",
                                         "mlp_norm": "mlp.linear_fc1.layer_norm_weight"},
                    extra_state=("self_attention.core_attention", *_MCORE_LINEARS)),
    "mcore-local": Layout(**_MCORE_TOP, layer={**_MCORE_LAYER, "attn_norm": "input_layernorm.weight",
                                               "mlp_norm": "pre_mlp_layernorm.weight"},
                          extra_state=_MCORE_LINEARS),
}
# Spellings of Megatron-LM's legacy model since core 0.5 (and ModelLink's legacy checkpoints).
_LEGACY_ALIASES = {"input_norm.weight": "input_layernorm.weight",
                   "post_attention_norm.weight": "post_attention_layernorm.weight"}
_LEGACY_FINAL_ALIAS = "language_model.encoder.final_norm.weight"
# Non-parameter entries found beside the weights: TransformerEngine / megatron-core extra state
# (None, BytesIO or bytes tensors) and rotary buffers of some versions.
_IGNORED_SUFFIXES = ("._extra_state", "inv_freq")


def _canonical(key: str) -> str:
    if key == _LEGACY_FINAL_ALIAS:
        return LAYOUTS["legacy"].final_norm
    prefix = LAYOUTS["legacy"].layers
    if key.startswith(prefix):
        index, _, suffix = key[len(prefix):].partition(".")
        if suffix in _LEGACY_ALIASES:
            return f"{prefix}{index}.{_LEGACY_ALIASES[suffix]}"
    return key


def detect_layout(keys: Iterable[str]) -> str | None:
    """"legacy", "mcore" or "mcore-local" from a model's key names (None: no known key)."""
    keys = list(keys)
    if any(k.startswith("language_model.") for k in keys):
        return "legacy"
    if any(k.startswith(("decoder.", "embedding.")) for k in keys):
        return "mcore" if any(k.endswith("linear_qkv.layer_norm_weight") for k in keys) else "mcore-local"
    return None


def _family(layout: str) -> str:
    return "legacy" if layout == "legacy" else "mcore"


# ---------------------------------------------------------------------------------------------
# Reading the pickles


class EnumValue(NamedTuple):
    """A Megatron enum member from `args` (e.g. ModelType.encoder_or_decoder), read without
    importing Megatron: the enum's dotted name and the member's value."""
    type_name: str
    value: Any


def _enum_stand_in(type_name: str):
    def member(value: Any) -> EnumValue:
        return EnumValue(type_name, value)
    member.__name__ = member.__qualname__ = type_name.rsplit(".", 1)[1]
    return member


# Enums Megatron puts in `args` (training sets args.model_type; arguments.py parses
# --attention-backend and --cuda-graph-scope into enums).
MEGATRON_ENUMS = ("megatron.core.enums.ModelType", "megatron.core.transformer.enums.AttnBackend",
                  "megatron.core.transformer.enums.CudaGraphScope")
_np_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
# What a Megatron/ModelLink checkpoint legitimately holds besides tensors and plain values:
# the args namespace (ModelLink's conversions add a SimpleNamespace of the HF config to it, and
# Megatron an exit signal), its enums, numpy's RNG state (`np.random.get_state()`: an array),
# and TransformerEngine's extra state (BytesIO).
_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace, types.SimpleNamespace, signal.Signals, io.BytesIO,
    _np_reconstruct, (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_np_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    *[(_enum_stand_in(name), name) for name in MEGATRON_ENUMS],
]


def read_rank_file(file: Path) -> dict[str, Any]:
    """One `model_optim_rng.pt`, unpickled with weights_only and the allow-list above."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # files from torch's pre-zip format cannot be mapped
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else str(e).splitlines()[-1]
        raise UserError(f"{file}: refusing to unpickle {what}: not a type a Megatron checkpoint holds "
                        "(only tensors, plain values, args and RNG state are read)") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UserError(f"{file}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: expected a dict, found {type(state).__name__}")
    return state


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Legacy models save one dict per module (keys may hold dots); join them into dotted names."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _nest_legacy(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nesting legacy Megatron saves: one dict per module, the encoder's own keys flat."""
    encoder = "language_model.encoder."
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith(encoder):
            out.setdefault("language_model", {}).setdefault("encoder", {})[key[len(encoder):]] = value
            continue
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# ---------------------------------------------------------------------------------------------
# Finding the files


_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")
_ITER_DIR = re.compile(r"iter_(\d{7,})")


def _rank_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and _RANK_DIR.fullmatch(p.name)) if d.is_dir() else []


def _iteration_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and (_ITER_DIR.fullmatch(p.name) or p.name == "release"))


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    """A Megatron checkpoint root (tracker file or iteration dirs) or one iteration directory."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / TRACKER).is_file() or bool(_rank_dirs(p)) or any(_rank_dirs(d) for d in _iteration_dirs(p))


def _check_not_distributed(d: Path) -> None:
    if (d / "metadata.json").is_file() or any(d.glob("*.distcp")):
        raise UserError(f"{d} is a torch_dist (distributed) checkpoint; only the torch format "
                        "(mp_rank_*/model_optim_rng.pt) is read: convert it with Megatron-LM first "
                        "(run with --load <it> --ckpt-convert-format torch --ckpt-convert-save <dir>)")


def resolve(path: str | os.PathLike) -> Path:
    """The iteration directory to read: the tracker's, the only one, or `path` itself."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: not a directory")
    if _rank_dirs(p):
        return p
    tracker = p / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            d = p / "release"
        elif text.isdigit():
            d = p / f"iter_{int(text):07d}"
        else:
            raise UserError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
        if not d.is_dir():
            raise UserError(f"{tracker} names iteration {text}, but {d} does not exist")
        _check_not_distributed(d)
        if not _rank_dirs(d):
            raise UserError(f"{d}: no mp_rank_* directories inside")
        return d
    candidates = [d for d in _iteration_dirs(p) if _rank_dirs(d) or (d / "metadata.json").is_file()]
    if not candidates:
        _check_not_distributed(p)
        raise UserError(f"{p}: not a Megatron checkpoint (no {TRACKER}, iter_*/ or release/ with "
                        "mp_rank_* directories inside)")
    if len(candidates) > 1:
        raise UserError(f"{p} holds several iterations ({', '.join(d.name for d in candidates)}) and no "
                        f"{TRACKER} saying which is the latest; give one of those directories")
    _check_not_distributed(candidates[0])
    return candidates[0]


def _rank_grid(iter_dir: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp rank) -> model_optim_rng.pt of every mp_rank directory."""
    grid = {}
    for d in _rank_dirs(iter_dir):
        tp, pp, third = _RANK_DIR.fullmatch(d.name).groups()
        if third is not None:
            raise UserError(f"{d}: an expert-parallel rank directory; LLaMA has no experts (MoE "
                            "checkpoints are not supported)")
        file = d / RANK_FILE
        if not file.is_file():
            raise UserError(f"{file}: missing")
        grid[int(tp), int(pp or 0)] = file
    return grid


# ---------------------------------------------------------------------------------------------
# The model config from `args`


_UNSET = object()


def _arg(args: Any, *names: str, default: Any = _UNSET) -> Any:
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def _check_supported(args: Any, where: str) -> None:
    """Refuse what LLaMA is not, naming the argument."""
    rules = [
        ("normalization", "RMSNorm"), ("swiglu", True), ("add_bias_linear", False), ("add_qkv_bias", False),
        ("apply_layernorm_1p", False), ("rotary_interleaved", False), ("position_embedding_type", "rope"),
        ("apply_residual_connection_post_layernorm", False), ("rotary_percent", 1.0),
    ]
    for name, wanted in rules:
        value = getattr(args, name, None)
        if value is not None and value != wanted:
            raise UserError(f"{where}: args.{name}={value!r}; only LLaMA models ({name}={wanted!r}) are read")
    if (_arg(args, "num_experts", default=None) or 0) > 1:
        raise UserError(f"{where}: args.num_experts={args.num_experts}; mixture-of-experts models are not read")
    kv_channels = _arg(args, "kv_channels", default=None)
    if kv_channels is not None and kv_channels * args.num_attention_heads != args.hidden_size:
        raise UserError(f"{where}: args.kv_channels={kv_channels} differs from hidden_size / "
                        "num_attention_heads; a decoupled head dim is not supported")


def _rope_scaling(args: Any) -> llama.RopeScaling | None:
    # ModelLink/MindSpeed spell every constant; megatron-core hard-codes all but the factor.
    if getattr(args, "rope_scaling_type", None) == "llama3":
        return llama.RopeScaling(
            factor=float(args.rope_scaling_factor), low_freq_factor=float(args.low_freq_factor),
            high_freq_factor=float(args.high_freq_factor),
            original_max_position=int(args.original_max_position_embeddings))
    if getattr(args, "rope_scaling_type", None) is not None:
        raise UserError(f"rope_scaling_type={args.rope_scaling_type!r} is not supported (only 'llama3')")
    if getattr(args, "use_rope_scaling", False):
        return llama.RopeScaling(factor=float(_arg(args, "rope_scaling_factor", default=8.0)))
    return None


def config_from_args(args: Any, where: str, overrides: Mapping[str, Any] | None = None,
                     inferred: Mapping[str, int] | None = None) -> llama.Config:
    """Our Config from Megatron's `args`; `overrides` (Config fields) win, and `inferred` (from
    tensor shapes) fills what args do not record. Defaults taken for unrecorded fields are logged."""
    overrides = dict(overrides or {})
    inferred = dict(inferred or {})
    found: dict[str, Any] = {}

    def take(field: str, *names: str, default: Any = _UNSET, note: str = "") -> None:
        if field in overrides:
            return
        value = _arg(args, *names, default=_UNSET)
        if value is _UNSET:
            value = inferred.get(field, _UNSET)
        if value is _UNSET:
            if default is _UNSET:
                raise UserError(f"{where}: args record no {names[0]}; give it as an override "
                                f"({field}=...)")
            log.warning("%s: args record no %s; using %s%s", where, names[0], default, note)
            value = default
        found[field] = value

    take("dim", "hidden_size")
    take("n_layers", "num_layers")
    take("n_heads", "num_attention_heads")
    take("ffn_dim", "ffn_hidden_size", "intermediate_size")
    take("vocab_size", "vocab_size", "padded_vocab_size")
    if found.get("vocab_size") is not None and getattr(args, "tokenizer_type", None) == "NullTokenizer" \
            and getattr(args, "vocab_size", None) is not None:
        found["vocab_size"] += 1  # Megatron's NullTokenizer adds an EOD id after --vocab-size ids
    take("norm_eps", "norm_epsilon", "layernorm_epsilon", default=1e-5, note=" (Megatron's default)")
    take("rope_theta", "rotary_base", default=10000.0, note=" (Megatron's default)")
    take("max_seq_len", "max_position_embeddings", "seq_length", default=4096)
    if "n_kv_heads" not in overrides:
        groups = _arg(args, "num_query_groups", "num_key_value_heads", default=None)
        gqa = getattr(args, "group_query_attention", groups is not None)
        found["n_kv_heads"] = groups if gqa and groups is not None else inferred.get("n_kv_heads")
    if "tie_embeddings" not in overrides:
        untie = getattr(args, "untie_embeddings_and_output_weights", None)
        found["tie_embeddings"] = (not untie) if untie is not None else inferred.get("tie_embeddings", True)
    if "rope_scaling" not in overrides:
        found["rope_scaling"] = _rope_scaling(args)
    raw = {**config_lib.to_dict(llama.Config()), **found}
    raw["rope_scaling"] = config_lib.to_dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    raw.update(overrides)
    if raw["n_kv_heads"] == raw["n_heads"]:
        raw["n_kv_heads"] = None
    try:
        return config_lib.from_dict(llama.Config, raw, "model")
    except config_lib.ConfigError as e:
        raise UserError(f"{where}: {e}") from None


def vocab_size_with_padding(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's `_vocab_size_with_padding`: up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Info:
    """What a Megatron checkpoint is: where, which iteration, how it is split, its key layout."""
    iteration_dir: Path
    iteration: int | None          # None: a `release` checkpoint
    tensor_parallel: int
    pipeline_parallel: int
    virtual_stages: int
    layout: str
    padded_vocab_size: int
    args: Any


def _rank_dir_name(tp_rank: int, pp_rank: int, pipeline_parallel: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pipeline_parallel == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _parallel_sizes(grid: Mapping[tuple[int, int], Path], args: Any, version: float,
                    iter_dir: Path) -> tuple[int, int]:
    """TP and PP sizes from args, checked against the mp_rank directories present."""
    tp_name = "tensor_model_parallel_size" if version >= 3.0 else "model_parallel_size"
    tp = int(_arg(args, tp_name, default=max(t for t, _ in grid) + 1))
    pp = int(_arg(args, "pipeline_model_parallel_size", default=max(p for _, p in grid) + 1))
    sizes = f"args say {tp_name}={tp}, pipeline_model_parallel_size={pp}"
    if pp > 1 and not any(_RANK_DIR.fullmatch(f.parent.name).group(2) for f in grid.values()):
        raise UserError(f"{iter_dir}: {sizes}, but its rank directories carry no stage number "
                        "(mp_rank_TT instead of mp_rank_TT_PPP)")
    for (t, p), file in sorted(grid.items()):
        if t >= tp or p >= pp:
            raise UserError(f"{file.parent} does not fit the checkpoint's parallel layout ({sizes})")
    for p in range(pp):
        for t in range(tp):
            if (t, p) not in grid:
                raise UserError(f"missing {iter_dir / _rank_dir_name(t, p, pp) / RANK_FILE} ({sizes})")
    return tp, pp


def _family_from_args(args: Any) -> str | None:
    # Megatron >= core 0.8 records use_legacy_models; before it (and ModelLink) use_mcore_models.
    if getattr(args, "use_legacy_models", None) is not None:
        return "legacy" if args.use_legacy_models else "mcore"
    if getattr(args, "use_mcore_models", None) is not None:
        return "mcore" if args.use_mcore_models else "legacy"
    return None


def _model_chunks(state: Mapping[str, Any], file: Path) -> list[dict[str, Any]]:
    """The flattened model state dicts of a file: `model`, or `model0`, `model1`, ... (virtual stages)."""
    if "model" in state:
        return [_flatten(state["model"])]
    numbered = sorted((int(k[5:]), k) for k in state if re.fullmatch(r"model\d+", k))
    if not numbered:
        raise UserError(f"{file}: holds no model (its keys: {sorted(state)})")
    if [i for i, _ in numbered] != list(range(len(numbered))):
        raise UserError(f"{file}: virtual stages {[k for _, k in numbered]} are not model0..model{len(numbered) - 1}")
    return [_flatten(state[k]) for _, k in numbered]


@dataclass
class _Chunk:
    """One model chunk of one file: top-level tensors by Megatron name, layers by local index."""
    file: Path
    top: dict[str, torch.Tensor]
    layers: dict[int, dict[str, torch.Tensor]]


def _split_chunk(flat: Mapping[str, Any], layout: str, file: Path) -> _Chunk:
    spec = LAYOUTS[layout]
    piece_of = {suffix: piece for piece, suffix in spec.layer.items()}
    top_names = {spec.embed, spec.final_norm, spec.output, spec.tied_head}
    chunk = _Chunk(file, {}, {})
    for key, value in flat.items():
        key = _canonical(key) if layout == "legacy" else key
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if spec.is_layer_key(key):
            index, _, suffix = key[len(spec.layers):].partition(".")
            if index.isdigit() and suffix in piece_of:
                chunk.layers.setdefault(int(index), {})[piece_of[suffix]] = _tensor(value, key, file)
                continue
        elif key in top_names:
            chunk.top[key] = _tensor(value, key, file)
            continue
        raise UserError(f"{file}: unexpected entry {key!r} for a LLaMA model in the {layout} layout")
    for index, pieces in chunk.layers.items():
        missing = sorted(set(spec.layer) - set(pieces))
        if missing:
            raise UserError(f"{file}: layer {index} has no {spec.layers}{index}.{spec.layer[missing[0]]}")
    if sorted(chunk.layers) != list(range(len(chunk.layers))):
        raise UserError(f"{file}: its layers are numbered {sorted(chunk.layers)}, not 0..{len(chunk.layers) - 1}")
    return chunk


def _tensor(value: Any, key: str, file: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{file}: {key!r} is a {type(value).__name__}, not a tensor")
    return value


def _shard_shapes(config: llama.Config, tp: int, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    d, hd = config.dim, config.head_dim
    return {"attn_norm": (d,), "mlp_norm": (d,), "final_norm": (d,),
            "qkv": ((config.n_heads + 2 * config.kv_heads) * hd // tp, d),
            "proj": (d, config.n_heads * hd // tp),
            "fc1": (2 * config.ffn_dim // tp, d), "fc2": (d, config.ffn_dim // tp),
            "embed": (padded_vocab // tp, d), "output": (padded_vocab // tp, d)}


def _check_splittable(config: llama.Config, tp: int, padded_vocab: int, what: str) -> None:
    for name, n in (("attention heads", config.n_heads), ("kv heads (query groups)", config.kv_heads),
                    ("the MLP width", config.ffn_dim), ("the padded vocabulary", padded_vocab)):
        if n % tp:
            raise UserError(f"{what}: {name} ({n}) cannot be split over tensor_model_parallel_size={tp}")


def split_qkv(fused: torch.Tensor, config: llama.Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ([heads * head_dim, d]) from Megatron's QKV grouped by kv head (all TP shards joined)."""
    groups, per_group, hd = config.kv_heads, config.n_heads // config.kv_heads, config.head_dim
    g = fused.reshape(groups, per_group + 2, hd, fused.shape[-1])
    return (g[:, :per_group].reshape(-1, fused.shape[-1]), g[:, per_group].reshape(-1, fused.shape[-1]),
            g[:, per_group + 1].reshape(-1, fused.shape[-1]))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: llama.Config) -> torch.Tensor:
    """Megatron's fused QKV: for each kv head g, its query heads' rows, then k_g, then v_g."""
    groups, hd, d = config.kv_heads, config.head_dim, q.shape[-1]
    return torch.cat([q.reshape(groups, -1, d), k.reshape(groups, hd, d), v.reshape(groups, hd, d)],
                     dim=1).reshape(-1, d)


class _ShapeCheck:
    """Checks each shard against the shape args and TP imply, naming file, key and args."""

    def __init__(self, config: llama.Config, tp: int, padded_vocab: int, layout: str):
        self.shapes = _shard_shapes(config, tp, padded_vocab)
        self.spec = LAYOUTS[layout]
        self.context = (f"tensor_model_parallel_size={tp}, hidden_size={config.dim}, "
                        f"num_attention_heads={config.n_heads}, num_query_groups={config.kv_heads}, "
                        f"ffn_hidden_size={config.ffn_dim}, padded_vocab_size={padded_vocab}")

    def __call__(self, t: torch.Tensor, piece: str, name: str, file: Path) -> torch.Tensor:
        if tuple(t.shape) != self.shapes[piece]:
            raise UserError(f"{file}: {name} has shape {list(t.shape)}, expected {list(self.shapes[piece])} "
                            f"from its args ({self.context})")
        return t


def _merge_layer(shards: list[dict[str, torch.Tensor]], files: list[Path], config: llama.Config,
                 check: _ShapeCheck, index: int) -> dict[str, torch.Tensor]:
    """HF-named tensors (suffixes after `model.layers.N.`) of one layer from its TP shards."""
    spec = check.spec

    def pieces(piece: str) -> list[torch.Tensor]:
        return [check(s[piece], piece, f"{spec.layers}{index}.{spec.layer[piece]}", f)
                for s, f in zip(shards, files)]

    q, k, v = split_qkv(torch.cat(pieces("qkv")), config)
    gate_up = [fc1.chunk(2) for fc1 in pieces("fc1")]
    return {
        "input_layernorm.weight": pieces("attn_norm")[0],
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": torch.cat(pieces("proj"), dim=1),
        "post_attention_layernorm.weight": pieces("mlp_norm")[0],
        "mlp.gate_proj.weight": torch.cat([g for g, _ in gate_up]),
        "mlp.up_proj.weight": torch.cat([u for _, u in gate_up]),
        "mlp.down_proj.weight": torch.cat(pieces("fc2"), dim=1),
    }


def _open(iter_dir: Path, overrides: Mapping[str, Any] | None):
    """(args, tp, pp, {(tp rank, pp rank): state}) of an iteration directory, its grid checked."""
    grid = _rank_grid(iter_dir)
    first_file = grid[min(grid, key=lambda r: (r[1], r[0]))]
    first = read_rank_file(first_file)
    args = first.get("args")
    if args is None:
        if not overrides:
            raise UserError(f"{first_file}: records no args; give the model's shape as overrides")
        args = argparse.Namespace()
    version = float(first.get("checkpoint_version", 0))
    if version < 2.0:
        raise UserError(f"{first_file}: checkpoint_version {version}: QKV ordering from before Megatron "
                        "2.0 is not supported")
    if (_arg(args, "expert_model_parallel_size", default=1) or 1) > 1:
        raise UserError(f"{first_file}: args.expert_model_parallel_size={args.expert_model_parallel_size}; "
                        "mixture-of-experts checkpoints are not supported")
    _check_supported(args, str(first_file))
    tp, pp = _parallel_sizes(grid, args, version, iter_dir)
    order = [(t, p) for p in range(pp) for t in range(tp)]
    states = {rank: first if grid[rank] == first_file else read_rank_file(grid[rank])
              for rank in tqdm(order, desc=f"reading {iter_dir.name}", unit="file", disable=len(order) == 1)}
    return args, tp, pp, states, grid


def _layout_and_chunks(states: Mapping[tuple[int, int], Any], grid: Mapping[tuple[int, int], Path], args: Any
                       ) -> tuple[str, dict[tuple[int, int], list[_Chunk]]]:
    """The key layout (the first stage's; every file and the args must agree) and each file's chunks."""
    layout = detect_layout(_model_chunks(states[0, 0], grid[0, 0])[0])
    if layout is None:
        raise UserError(f"{grid[0, 0]}: no known Megatron model keys (expected language_model.* or "
                        "embedding.* / decoder.*)")
    claimed = _family_from_args(args)
    if claimed is not None and claimed != _family(layout):
        flag = ("use_legacy_models=" + str(args.use_legacy_models) if hasattr(args, "use_legacy_models")
                else "use_mcore_models=" + str(args.use_mcore_models))
        raise UserError(f"{grid[0, 0]}: its keys are in the {layout} layout, but its args say {flag} "
                        f"({claimed} models)")
    claimed_v = _arg(args, "virtual_pipeline_model_parallel_size", default=None) or 1
    chunks: dict[tuple[int, int], list[_Chunk]] = {}
    for rank, state in states.items():
        flats = _model_chunks(state, grid[rank])
        if len(flats) != claimed_v:
            raise UserError(f"{grid[rank]}: holds {len(flats)} model chunk(s), but its args say "
                            f"virtual_pipeline_model_parallel_size={claimed_v}")
        for flat in flats:
            found = detect_layout(flat)
            has_layers = any(LAYOUTS[layout].is_layer_key(k) for k in flat)
            if found is not None and (_family(found) != _family(layout) or (has_layers and found != layout)):
                raise UserError(f"{grid[rank]}: its keys are in the {found} layout, but "
                                f"{grid[0, 0]}'s are in the {layout} layout")
        chunks[rank] = [_split_chunk(flat, layout, grid[rank]) for flat in flats]
    return layout, chunks


def read(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
         ) -> tuple[llama.Config, dict[str, torch.Tensor], Info]:
    """(config, HF-named tensors, info) of a Megatron checkpoint; see `load`."""
    iter_dir = resolve(path)
    where = str(iter_dir)
    args, tp, pp, states, grid = _open(iter_dir, overrides)
    layout, chunks = _layout_and_chunks(states, grid, args)
    vstages = len(chunks[0, 0])
    # Megatron's layer order: virtual stage 0 of every pipeline stage, then virtual stage 1, ...
    stage_order = [(p, v) for v in range(vstages) for p in range(pp)]
    for p, v in stage_order:
        expected = sorted(chunks[0, p][v].layers)
        for t in range(1, tp):
            if sorted(chunks[t, p][v].layers) != expected:
                raise UserError(f"{grid[t, p]}: holds layers {sorted(chunks[t, p][v].layers)}, but "
                                f"{grid[0, p]} holds {expected}")
    counts = {(p, v): len(chunks[0, p][v].layers) for p, v in stage_order}

    spec = LAYOUTS[layout]
    first_chunk, last_chunk = chunks[0, 0][0], chunks[0, pp - 1][vstages - 1]
    if spec.embed not in first_chunk.top:
        raise UserError(f"{grid[0, 0]}: the first pipeline stage holds no {spec.embed}")
    if spec.final_norm not in last_chunk.top:
        raise UserError(f"{grid[0, pp - 1]}: the last pipeline stage holds no {spec.final_norm}")
    embed0, head0 = first_chunk.top[spec.embed], last_chunk.top.get(spec.output)
    # Shapes fill in what args do not record (MindSpeed-LLM's converters save few args).
    layer0 = next(c.layers[0] for cs in chunks.values() for c in cs if c.layers)
    inferred: dict[str, Any] = {"n_layers": sum(counts.values()), "dim": embed0.shape[-1],
                                "vocab_size": embed0.shape[0] * tp, "ffn_dim": layer0["fc2"].shape[1] * tp}
    heads = (overrides or {}).get("n_heads", getattr(args, "num_attention_heads", None))
    if heads:
        rows = layer0["qkv"].shape[0] * tp // (inferred["dim"] // int(heads))
        inferred["n_kv_heads"] = (rows - int(heads)) // 2
    # megatron-core keeps a tied model's head copy on the last stage under the untied name.
    one_stage = pp * vstages == 1
    inferred["tie_embeddings"] = head0 is None or (not one_stage and head0.shape == embed0.shape
                                                   and torch.equal(head0, embed0))
    config = config_from_args(args, where, overrides, inferred)
    if config.tie_embeddings and head0 is not None and (layout == "legacy" or one_stage
                                                         or not torch.equal(head0, embed0)):
        raise UserError(f"{grid[0, pp - 1]}: holds an output layer ({spec.output}) of its own, but its args "
                        "say it is tied to the embedding (untie_embeddings_and_output_weights=False)")
    if not config.tie_embeddings and head0 is None:
        raise UserError(f"{grid[0, pp - 1]}: its args say the output layer is untied, but the last stage "
                        f"holds no {spec.output}")
    if layout == "legacy" and "rope_theta" not in (overrides or {}) and config.rope_theta != 10000.0:
        log.warning("%s: args.rotary_base=%s is used; Megatron-LM's legacy model ignores --rotary-base "
                    "(always 10000) while ModelLink's applies it: give rope_theta=10000 for a Megatron-LM "
                    "legacy checkpoint", where, config.rope_theta)
    padded = int(_arg(args, "padded_vocab_size", default=embed0.shape[0] * tp))
    if "vocab_size" not in (overrides or {}) and getattr(args, "vocab_size", None) is None:
        log.warning("%s: args record no vocab_size; keeping the padded vocabulary of %d rows "
                    "(give vocab_size=... to drop the padding)", where, padded)
    if config.vocab_size > padded:
        raise UserError(f"{where}: vocab_size {config.vocab_size} is larger than the checkpoint's padded "
                        f"vocabulary ({padded} rows)")
    if config.n_layers != inferred["n_layers"]:
        raise UserError(f"{where}: its files hold {inferred['n_layers']} layers "
                        f"({', '.join(f'stage {p}.{v}: {n}' for (p, v), n in counts.items())}), but args say "
                        f"num_layers={config.n_layers}")
    _check_splittable(config, tp, padded, where)
    check = _ShapeCheck(config, tp, padded, layout)

    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for p, v in stage_order:
        stage = [chunks[t, p][v] for t in range(tp)]
        for local in range(counts[p, v]):
            merged = _merge_layer([c.layers[local] for c in stage], [c.file for c in stage], config, check, local)
            tensors.update({f"model.layers.{offset + local}.{k}": t for k, t in merged.items()})
        offset += counts[p, v]

    def joined(rank_chunks: list[_Chunk], name: str, piece: str) -> torch.Tensor:
        return torch.cat([check(c.top[name], piece, name, c.file) for c in rank_chunks])[:config.vocab_size]

    tensors["model.embed_tokens.weight"] = joined([chunks[t, 0][0] for t in range(tp)], spec.embed, "embed")
    tensors["model.norm.weight"] = check(last_chunk.top[spec.final_norm], "final_norm", spec.final_norm,
                                         last_chunk.file)
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = joined([chunks[t, pp - 1][vstages - 1] for t in range(tp)], spec.output,
                                           "output")
    iteration = None if iter_dir.name == "release" else states[0, 0].get("iteration")
    return config, tensors, Info(iter_dir, iteration, tp, pp, vstages, layout, padded, args)


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
         overrides: Mapping[str, Any] | None = None) -> tuple[llama.Config, llama.Params]:
    """(config, params) from a Megatron / ModelLink / MindSpeed-LLM checkpoint of any TP x PP.

    `path`: the checkpoint root (the iteration its tracker names, or its only one) or one
    `iter_NNNNNNN` / `release` directory. The model config comes from the files' `args`;
    `overrides` (llama.Config fields, e.g. {"vocab_size": 32000}) replace or complete it.
    Tensors keep their stored dtype unless `dtype` is given.
    """
    config, tensors, info = read(path, overrides)
    return config, hf.params_from_state_dict(config, tensors, str(info.iteration_dir), dtype=dtype, device=device)


def read_args(path: str | os.PathLike) -> Any:
    """The `args` of a checkpoint's first rank file (None when it records none)."""
    grid = _rank_grid(resolve(path))
    return read_rank_file(grid[min(grid, key=lambda r: (r[1], r[0]))]).get("args")


def recorded_tokenizer(path: str | os.PathLike) -> Path | None:
    """The tokenizer the checkpoint's args name (Megatron's --tokenizer-model, ModelLink's
    --tokenizer-name-or-path), when it exists on this machine."""
    args = read_args(path)
    for name in ("tokenizer_model", "tokenizer_name_or_path"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value and Path(value).exists():
            return Path(value)
    return None


# ---------------------------------------------------------------------------------------------
# Writing


def megatron_args(config: llama.Config, *, tensor_parallel: int, pipeline_parallel: int, virtual_stages: int,
                  layout: str, dtype: torch.dtype, padded_vocab: int, vocab_multiple: int,
                  iteration: int) -> argparse.Namespace:
    """The `args` Megatron-LM and ModelLink read back (load_args_from_checkpoint, check_checkpoint_args)."""
    s = config.rope_scaling
    return argparse.Namespace(
        num_layers=config.n_layers, hidden_size=config.dim, ffn_hidden_size=config.ffn_dim,
        num_attention_heads=config.n_heads, num_query_groups=config.kv_heads,
        group_query_attention=config.kv_heads != config.n_heads, kv_channels=config.head_dim,
        seq_length=config.max_seq_len, max_position_embeddings=config.max_seq_len,
        position_embedding_type="rope", add_position_embedding=False, use_rotary_position_embeddings=True,
        rotary_base=int(config.rope_theta) if float(config.rope_theta).is_integer() else config.rope_theta,
        rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=s is not None, rope_scaling_factor=s.factor if s else 8.0,
        # ModelLink / MindSpeed-LLM spell out every llama3 scaling constant.
        rope_scaling_type="llama3" if s else None, low_freq_factor=s.low_freq_factor if s else None,
        high_freq_factor=s.high_freq_factor if s else None,
        original_max_position_embeddings=s.original_max_position if s else None,
        normalization="RMSNorm", norm_epsilon=config.norm_eps, layernorm_epsilon=config.norm_eps,
        swiglu=True, add_bias_linear=False, add_qkv_bias=False, apply_layernorm_1p=False,
        apply_query_key_layer_scaling=False, attention_dropout=0.0, hidden_dropout=0.0,
        untie_embeddings_and_output_weights=not config.tie_embeddings,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1 else None,
        num_layers_per_virtual_pipeline_stage=(config.n_layers // (pipeline_parallel * virtual_stages)
                                               if virtual_stages > 1 else None),
        vocab_size=config.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=vocab_multiple,
        params_dtype=dtype, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
        use_legacy_models=layout == "legacy", use_mcore_models=layout != "legacy",
        transformer_impl="transformer_engine" if layout == "mcore" else "local",
        ckpt_format="torch", tokenizer_type="Llama2Tokenizer", bert_binary_head=False,
        iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
    )


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    # Megatron-LM's and ModelLink's savers fill the padding with copies of the last row.
    return torch.cat([t, t[-1:].expand(padded - t.shape[0], -1)]) if padded > t.shape[0] else t


def _stage_layers(config: llama.Config, pp: int, vstages: int, p: int, v: int) -> range:
    """Global indices of the layers of pipeline stage p, virtual stage v (an even split)."""
    per_chunk = config.n_layers // (pp * vstages)
    start = v * (config.n_layers // vstages) + p * per_chunk
    return range(start, start + per_chunk)


def _layer_shards(tensors: Mapping[str, torch.Tensor], i: int, config: llama.Config,
                  tp: int) -> list[dict[str, torch.Tensor]]:
    """Megatron pieces of layer i for each TP rank (copies, so each file stores only its slice)."""
    name = f"model.layers.{i}."
    qkv = fuse_qkv(tensors[name + "self_attn.q_proj.weight"], tensors[name + "self_attn.k_proj.weight"],
                   tensors[name + "self_attn.v_proj.weight"], config).chunk(tp)
    gates = tensors[name + "mlp.gate_proj.weight"].chunk(tp)
    ups = tensors[name + "mlp.up_proj.weight"].chunk(tp)
    proj = tensors[name + "self_attn.o_proj.weight"].chunk(tp, dim=1)
    fc2 = tensors[name + "mlp.down_proj.weight"].chunk(tp, dim=1)
    return [{"attn_norm": tensors[name + "input_layernorm.weight"].clone(), "qkv": qkv[r].clone(),
             "proj": proj[r].clone(), "mlp_norm": tensors[name + "post_attention_layernorm.weight"].clone(),
             "fc1": torch.cat([gates[r], ups[r]]), "fc2": fc2[r].clone()} for r in range(tp)]


def save(path: str | os.PathLike, config: llama.Config, params: llama.Params, *, tensor_parallel: int = 1,
         pipeline_parallel: int = 1, virtual_stages: int = 1, layout: str = "mcore",
         dtype: torch.dtype | None = None, vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
         iteration: int = 1) -> None:
    """Write a Megatron checkpoint root: tracker + iter_NNNNNNN/mp_rank_*/model_optim_rng.pt.

    layout: "legacy", "mcore" (TransformerEngine names) or "mcore-local" (separate norm modules:
    megatron-core's local spec, ModelLink / MindSpeed-LLM). Layers are split evenly over the
    pipeline stages (and `virtual_stages` chunks per stage, Megatron's interleaved order); the
    vocabulary is padded to a multiple of `vocab_multiple` x TP, which must equal the
    `--make-vocab-size-divisible-by` of the run that loads it. The directory is built under a
    temporary name and renamed into place; an existing non-empty `path` is refused.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r}: expected one of {sorted(LAYOUTS)}")
    tp, pp, vs = tensor_parallel, pipeline_parallel, virtual_stages
    if min(tp, pp, vs, vocab_multiple) < 1:
        raise UserError(f"tensor/pipeline/virtual sizes and the vocabulary multiple must be >= 1 "
                        f"(got {tp}, {pp}, {vs}, {vocab_multiple})")
    if vs > 1 and pp == 1:
        raise UserError("virtual pipeline stages need a pipeline size > 1")
    if config.n_layers % (pp * vs):
        raise UserError(f"{config.n_layers} layers cannot be split evenly over {pp} pipeline stage(s)"
                        + (f" x {vs} virtual stages" if vs > 1 else ""))
    padded = vocab_size_with_padding(config.vocab_size, vocab_multiple, tp)
    _check_splittable(config, tp, padded, "target")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not empty; choose a new directory")

    tensors = hf.state_dict_from_params(config, params, dtype)
    dtype = tensors["model.embed_tokens.weight"].dtype
    args = megatron_args(config, tensor_parallel=tp, pipeline_parallel=pp, virtual_stages=vs, layout=layout,
                         dtype=dtype, padded_vocab=padded, vocab_multiple=vocab_multiple, iteration=iteration)
    spec = LAYOUTS[layout]
    embed = _pad_vocab(tensors["model.embed_tokens.weight"], padded).chunk(tp)
    output = None if config.tie_embeddings else _pad_vocab(tensors["lm_head.weight"], padded).chunk(tp)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.make_temp_dir(path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        iter_dir = tmp / f"iter_{iteration:07d}"
        with tqdm(total=pp * tp, desc=f"writing {path.name}", unit="file", disable=pp * tp == 1) as bar:
            for p in range(pp):
                states = [{"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
                          for _ in range(tp)]
                for v in range(vs):
                    first, last = (p, v) == (0, 0), (p, v) == (pp - 1, vs - 1)
                    flats: list[dict[str, Any]] = [{} for _ in range(tp)]
                    for t, flat in enumerate(flats):
                        if first:
                            flat[spec.embed] = embed[t].clone()
                    for local, i in enumerate(_stage_layers(config, pp, vs, p, v)):
                        for flat, pieces in zip(flats, _layer_shards(tensors, i, config, tp)):
                            for piece, suffix in spec.layer.items():
                                flat[f"{spec.layers}{local}.{suffix}"] = pieces[piece]
                            for module in spec.extra_state:  # what megatron-core's own state_dict holds
                                flat[f"{spec.layers}{local}.{module}._extra_state"] = None
                    for t, flat in enumerate(flats):
                        if last:
                            flat[spec.final_norm] = tensors["model.norm.weight"].clone()
                            if output is not None:
                                flat[spec.output] = output[t].clone()
                            elif not first:  # a tied model's last stage keeps its own copy of the embedding
                                flat[spec.tied_head] = embed[t].clone()
                            if layout != "legacy":
                                flat["output_layer._extra_state"] = None
                        states[t]["model" if vs == 1 else f"model{v}"] = (
                            _nest_legacy(flat) if layout == "legacy" else flat)
                for t, state in enumerate(states):
                    file = iter_dir / _rank_dir_name(t, p, pp) / RANK_FILE
                    file.parent.mkdir(parents=True)
                    torch.save(state, file)
                    bar.update()
        (tmp / TRACKER).write_text(f"{iteration}\n")
        if path.exists():
            path.rmdir()  # checked empty above
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["load", "read", "save", "read_args", "recorded_tokenizer", "resolve", "is_megatron_checkpoint", "read_rank_file", "detect_layout",
           "config_from_args", "megatron_args", "split_qkv", "fuse_qkv", "vocab_size_with_padding",
           "LAYOUTS", "Info", "EnumValue"]
