"""Load a model for use anywhere, from whatever checkpoint holds it.

    config, params, lora_cfg = load_pretrained(path, dtype=torch.bfloat16, device="cuda")
    logits = llama.forward(params, tokens, config)
    tokenizer = find_tokenizer(path)          # a file path for lib.tokenizer.load_tokenizer, or None

`path` is an HF `LlamaForCausalLM` directory (config.json + safetensors or .bin), a native
checkpoint of this project (`lib.checkpoint`): its root (the latest step) or one `<step>` dir,
or a Megatron-LM / ModelLink checkpoint (`models.megatron`: its root or one iteration dir).
A native checkpoint records the model it was written for (`extra["config"]["model"]` for a
training run, `extra["model"]` for `runners.convert hf-to-native`), so nothing about the model
needs restating.

`load_pretrained` returns `(config, params, lora_cfg)`:

- `config`: the `llama.Config` of the weights (with the vocabulary an adapter resized it to).
- `params`: the parameter tree in `llama.init`'s layout, every tensor in `dtype` on `device`.
  From a training run's checkpoint these are its fp32 master weights when it kept them (bf16 and
  fp16 runs), else its params. With an adapter and `merge_adapter=False`, each adapted weight
  is a `lora.LoraWeight` (base weight + A, B, inference mode: no dropout), which
  `llama.forward` runs as is; with `merge_adapter=True` all leaves are plain tensors with the
  low-rank update folded in.
- `lora_cfg`: the adapter's `lora.LoraConfig`, or None when no adapter is on the params.

An adapter comes from `adapter=` (a PEFT directory, e.g. `<out_dir>/adapter` of `runners.sft`)
or from `path` itself when it is the native checkpoint of a LoRA fine-tuning run: then the base
model is the one that run started from (its recorded `checkpoint.load`) and the adapters are the
run's. Errors (`UserError`) name the path and, for weights that do not fit, the tensor.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lib import checkpoint as ckpt_lib
from lib import config as config_lib
from lib import pytree
from lib.errors import UserError
from models import hf, llama, lora, megatron, peft

MODEL_KEY = "model"     # extra["model"]: the model config of a converted checkpoint
CONFIG_KEY = "config"   # extra["config"]: a training run's resolved config
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # lib.tokenizer's preference order


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", adapter: str | Path | None = None,
                    merge_adapter: bool = False, config: llama.Config | None = None,
                    ) -> tuple[llama.Config, llama.Params, lora.LoraConfig | None]:
    """(config, params, lora_cfg) of the model at `path` (see the module docstring).

    config: the model config to use when a native checkpoint records none; when the checkpoint
    or HF directory has its own, the two must agree.
    """
    kind = checkpoint_kind(path)
    if kind == "hf":
        model, params = hf.load(path, dtype=dtype, device=device)
        lora_cfg, adapters = None, None
    elif kind == "megatron":
        model, params = megatron.load(path, dtype=dtype, device=device)
        lora_cfg, adapters = None, None
    else:
        model, params, lora_cfg, adapters = _load_native(Path(path), dtype, device, config)
    _check_agrees(model, config, path)
    if adapters is not None and adapter is not None:
        raise UserError(f"{path} is a LoRA fine-tuning checkpoint with its own adapter; give adapter= "
                        "only on top of a base model")
    if adapter is not None:
        model, params, lora_cfg, adapters = peft.attach(model, params, adapter)
    if adapters is None:
        return model, params, None
    if merge_adapter:
        return model, lora.merge(params, adapters, lora_cfg), lora_cfg
    return model, lora.adapt(params, adapters, lora_cfg, training=False), lora_cfg


def checkpoint_kind(path: str | Path) -> str:
    """"hf", "megatron" or "native" for a directory that holds a model; a UserError saying what
    else it is."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if (p / "config.json").is_file():
        return "hf"
    if (p / peft.CONFIG_FILE).is_file():
        base = config_lib.read_json(p / peft.CONFIG_FILE).get("base_model_name_or_path") or "?"
        raise UserError(f"{p} is a PEFT adapter, not a model: give it as the adapter of its base "
                        f"model (its adapter_config.json names {base!r})")
    if megatron.is_megatron_checkpoint(p):
        return "megatron"
    ckpt_lib.resolve(p)  # raises, naming what is wrong, unless it is a native checkpoint
    return "native"


def recorded_model(extra: dict, where: str | Path) -> llama.Config | None:
    """The model config a native checkpoint's `extra` records, or None."""
    raw = extra.get(MODEL_KEY)
    run = extra.get(CONFIG_KEY)
    if raw is None and isinstance(run, dict):
        raw = run.get("model")
    if raw is None:
        return None
    try:
        return config_lib.from_dict(llama.Config, raw, "model")
    except config_lib.ConfigError as e:
        raise UserError(f"checkpoint {where}: its recorded model config is not valid here: {e}") from None


def recorded_run_config(extra: dict) -> dict:
    """The resolved run config a training run stored in its checkpoints ({} for others)."""
    run = extra.get(CONFIG_KEY)
    return run if isinstance(run, dict) else {}


def model_difference(a: llama.Config, b: llama.Config) -> str:
    """The fields where two model configs differ, as "n_layers: 2 vs 4, dim: ..."."""
    da, db = config_lib.to_dict(a), config_lib.to_dict(b)
    return ", ".join(f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db[k])


def _check_agrees(model: llama.Config, expected: llama.Config | None, path) -> None:
    if expected is not None and expected != model:
        raise UserError(f"{path} holds another model than the one expected "
                        f"({model_difference(model, expected)}; checkpoint vs expected)")


def _empty(shapes: Any, dtype: torch.dtype, device) -> Any:
    return pytree.tree_map(lambda s: torch.empty(s, dtype=dtype, device=device), shapes,
                           is_leaf=_is_shape)


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def _trained_prefix(saved: dict) -> str:
    """Where a training state keeps the weights at full precision: its fp32 master weights
    (bf16/fp16 runs; `params` are their rounding), else `params`."""
    return "opt.master" if any(k.startswith("opt.master.") for k in saved) else "params"


def _load_native(path: Path, dtype: torch.dtype, device, expected: llama.Config | None):
    """(config, params, lora_cfg, adapters) of a native checkpoint; adapters None unless it is
    a LoRA run's."""
    with ckpt_lib.Reader(path) as reader:
        extra = reader.extra()
        model = recorded_model(extra, reader.where) or expected
        if model is None:
            raise UserError(f"checkpoint {reader.where} records no model config; give the model "
                            "config it was written for (e.g. --model PRESET)")
        saved = reader.shapes()
        prefix = _trained_prefix(saved)
        run = recorded_run_config(extra)
        if run.get("lora") is None:
            if not any(k.startswith(prefix + ".layers.") for k in saved) and any(
                    k.startswith(prefix + ".adapters.") for k in saved):
                raise UserError(f"checkpoint {reader.where} holds LoRA adapters but records no LoRA "
                                "config; it cannot be loaded as a model")
            params = reader.read(_empty(llama.param_shapes(model), dtype, device), prefix)
            return model, params, None, None

        # A LoRA run saves only what it trains: the adapters (and modules_to_save) over a base.
        lora_cfg = config_lib.from_dict(lora.LoraConfig, run["lora"], "lora")
        base = (run.get("checkpoint") or {}).get("load")
        if not base:
            raise UserError(f"checkpoint {reader.where} is a LoRA run's but records no base model "
                            "(checkpoint.load)")
        if not Path(base).exists():
            raise UserError(f"checkpoint {reader.where} is a LoRA run's adapters over the base model "
                            f"{base} (its checkpoint.load), which does not exist (from {Path.cwd()})")
        base_model, params, _ = load_pretrained(base, dtype=dtype, device=device)
        if base_model != model:
            raise UserError(f"checkpoint {reader.where}: its base model {base} has changed since the "
                            f"run ({model_difference(base_model, model)}; now vs then)")
        shapes: dict[str, Any] = {"adapters": lora.adapter_shapes(model, lora_cfg)}
        full = llama.param_shapes(model)
        if lora_cfg.modules_to_save:
            shapes["modules"] = {m: full[m] for m in lora_cfg.modules_to_save}
        trained = reader.read(_empty(shapes, dtype, device), prefix)
    params, adapters = lora.combine(trained, params)
    return model, params, lora_cfg, adapters


# stream_native reads this many bytes of tensors at a time (at least one tensor).
STREAM_GROUP_BYTES = 1 << 30


def stream_native(path: str | Path, *, dtype: torch.dtype = torch.float32,
                  config: llama.Config | None = None, group_bytes: int | None = None,
                  ) -> tuple[llama.Config, Iterator[tuple[str, torch.Tensor]]] | None:
    """(config, (HF name, tensor in HF layout and `dtype`)) of a native checkpoint, read a group
    of tensors at a time (`STREAM_GROUP_BYTES`), in `hf.hf_name_table` order, for
    `hf.save_tensors`: converting a 70B checkpoint holds one group in memory, not the model.
    The weights are those `load_pretrained` gives (fp32 master weights when saved). None for a
    LoRA run's checkpoint, whose adapters merge into a base model (`load_pretrained`)."""
    with ckpt_lib.Reader(path) as reader:
        extra = reader.extra()
        if recorded_run_config(extra).get("lora") is not None:
            return None
        model = recorded_model(extra, reader.where) or config
        if model is None:
            raise UserError(f"checkpoint {reader.where} records no model config; give the model "
                            "config it was written for (e.g. --model PRESET)")
        _check_agrees(model, config, path)
        prefix = _trained_prefix(reader.shapes())
    return model, _stream_groups(Path(path), model, dtype, prefix, group_bytes or STREAM_GROUP_BYTES)


def _stream_groups(path: Path, model: llama.Config, dtype: torch.dtype, prefix: str,
                   group_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    table = hf.hf_name_table(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name in table:
        nbytes = math.prod(hf.stored_shape(model, name)) * itemsize
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    with ckpt_lib.Reader(path) as reader:
        for group in groups:
            # A partial target ({"layers": {"3": {"wq": ...}}}) has the saved tree's keys.
            target: dict = {}
            for name in group:
                tree_path, transposed = table[name]
                node = target
                for key in tree_path[:-1]:
                    node = node.setdefault(str(key), {})
                shape = hf.stored_shape(model, name)
                node[tree_path[-1]] = torch.empty(shape[::-1] if transposed else shape, dtype=dtype)
            filled = reader.read(target, prefix)
            for name in group:
                tree_path, transposed = table[name]
                tensor = filled
                for key in tree_path:
                    tensor = tensor[str(key)]
                yield name, tensor.T.contiguous() if transposed else tensor


def find_tokenizer(path: str | Path, adapter: str | Path | None = None) -> str | None:
    """The tokenizer file that goes with the model at `path` (and `adapter`), or None.

    An adapter directory's own tokenizer wins (a vocabulary-extending adapter ships one); an HF
    directory's tokenizer.json / tokenizer.model; for a native checkpoint the run's
    `data.tokenizer`, else the tokenizer of the model it started from or was converted from;
    for a Megatron checkpoint the one its args name, when it exists here.
    A recorded tokenizer that no longer exists is an error naming it (Megatron's excepted: their
    args name paths of the machine that trained).
    """
    if adapter is not None:
        found = _tokenizer_in(Path(adapter))
        if found is not None:
            return found
    kind = checkpoint_kind(path)
    if kind == "hf":
        return _tokenizer_in(Path(path))
    if kind == "megatron":
        recorded = megatron.recorded_tokenizer(path)
        return (_tokenizer_in(recorded) if recorded.is_dir() else str(recorded)) if recorded else None
    with ckpt_lib.Reader(path) as reader:
        extra = reader.extra()
        where = reader.where
    run = recorded_run_config(extra)
    recorded = (run.get("data") or {}).get("tokenizer")
    if recorded:
        if not Path(recorded).exists():
            raise UserError(f"checkpoint {where} was trained with the tokenizer {recorded} "
                            f"(data.tokenizer), which does not exist (from {Path.cwd()})")
        return str(recorded)
    origin = (run.get("checkpoint") or {}).get("load") or extra.get("converted_from")
    if origin and Path(origin).exists():
        return find_tokenizer(origin)
    return None


def _tokenizer_in(d: Path) -> str | None:
    for name in TOKENIZER_FILES:
        if (d / name).is_file():
            return str(d / name)
    return None
