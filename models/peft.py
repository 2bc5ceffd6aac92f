"""LoRA adapters in the Hugging Face PEFT layout, and merging a chain of them into base params.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (older
ones `adapter_model.bin`) with keys such as

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
    base_model.model.model.embed_tokens.weight                      [vocab, dim]   (modules_to_save)
    base_model.model.lm_head.weight                                 [vocab, dim]   (modules_to_save)

HF stores Linear weights [out, in]; our A [in, r] and B [r, out] are their transposes. The layout
was checked against files written by the `peft` library itself (tests/test_lora.py).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lib import config as config_lib, files
from lib.errors import UserError
from models import hf, llama
from models.lora import SAVABLE_MODULES, TARGETS, Adapters, LoraConfig, Params, merge

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

# Derived from the two name tables that exist (lora.TARGETS: "q" -> "wq"; models.hf: "wq" ->
# "self_attn.q_proj.weight"): "q" -> its module path in an HF layer, and PEFT's module name.
_HF_MODULE_PATH = {t: hf.LAYER_NAMES[p][0].removesuffix(".weight") for t, p in TARGETS.items()}
HF_TARGETS = {t: path.rsplit(".", 1)[-1] for t, path in _HF_MODULE_PATH.items()}   # "q" -> "q_proj"
_MODULE_KEYS = {m: PREFIX + hf.TOP_NAMES[m][0] for m in SAVABLE_MODULES}  # "embed" -> its HF key
HF_MODULES = {m: key.removesuffix(".weight").rsplit(".", 1)[-1] for m, key in _MODULE_KEYS.items()}
_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight")


def _lora_key(layer: int, target: str, which: str) -> str:
    return f"{PREFIX}model.layers.{layer}.{_HF_MODULE_PATH[target]}.lora_{which}.weight"


def save(path: str | Path, lora_cfg: LoraConfig, adapters: Adapters,
         modules: dict[str, torch.Tensor] | None = None, base_model_name_or_path: str = "") -> None:
    """Write adapters (and the fully trained modules_to_save) as a PEFT adapter directory.

    modules: {"embed": [V, D], "lm_head": [D, V]} in our layout, as `lora.trainable` returns them.
    The config file is written last, so a directory with it is complete.
    """
    modules = modules or {}
    if set(modules) != set(lora_cfg.modules_to_save):
        raise ValueError(f"modules {sorted(modules)} differ from modules_to_save "
                         f"{sorted(lora_cfg.modules_to_save)}")
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapters["layers"]):
        for target in lora_cfg.target_modules:
            ab = layer[TARGETS[target]]
            tensors[_lora_key(i, target, "A")] = ab["a"].detach().T.contiguous().cpu()
            tensors[_lora_key(i, target, "B")] = ab["b"].detach().T.contiguous().cpu()
    if "embed" in modules:
        tensors[_MODULE_KEYS["embed"]] = modules["embed"].detach().contiguous().cpu()
    if "lm_head" in modules:
        tensors[_MODULE_KEYS["lm_head"]] = modules["lm_head"].detach().T.contiguous().cpu()
    hf_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": [HF_TARGETS[t] for t in lora_cfg.target_modules],
        "modules_to_save": [HF_MODULES[m] for m in lora_cfg.modules_to_save] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        files.follow_umask(tmp)  # safetensors writes 0600
    files.write_text_atomic(out / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")


def read_config(path: str | Path) -> LoraConfig:
    """Our LoraConfig from a PEFT `adapter_config.json`; unsupported PEFT features are errors."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise UserError(f"{file} does not exist (not a PEFT adapter directory)")
    raw = config_lib.read_json(file)
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{file}: peft_type is {raw.get('peft_type')!r}, only 'LORA' is supported")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if raw.get(key):
            raise UserError(f"{file}: {key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if raw.get(key):
            raise UserError(f"{file}: {key} is not supported (every layer must share r and alpha)")
    if raw.get("bias", "none") != "none":
        raise UserError(f"{file}: bias={raw['bias']!r} is not supported, only 'none'")
    hf_to_ours = {v: k for k, v in HF_TARGETS.items()}
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or any(t not in hf_to_ours for t in targets):
        raise UserError(f"{file}: target_modules {targets!r} must be a list drawn from "
                        f"{', '.join(HF_TARGETS.values())}")
    modules_to_ours = {v: k for k, v in HF_MODULES.items()}
    saved = raw.get("modules_to_save") or []
    if any(m not in modules_to_ours for m in saved):
        raise UserError(f"{file}: modules_to_save {saved!r} must be drawn from {', '.join(HF_MODULES.values())}")
    try:
        return LoraConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                          dropout=float(raw.get("lora_dropout", 0.0)),
                          target_modules=tuple(t for t in HF_TARGETS if HF_TARGETS[t] in targets),
                          modules_to_save=tuple(m for m in HF_MODULES if HF_MODULES[m] in saved))
    except KeyError as e:
        raise UserError(f"{file}: missing key {e}") from None
    except ValueError as e:
        raise UserError(f"{file}: {e}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).is_file():
        return load_file(str(path / WEIGHTS_FILE))
    if (path / LEGACY_WEIGHTS_FILE).is_file():
        # Older PEFT (e.g. the Chinese-LLaMA-Alpaca releases) pickled a state dict; weights_only
        # refuses anything but tensors.
        return torch.load(path / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise UserError(f"{path} has neither {WEIGHTS_FILE} nor {LEGACY_WEIGHTS_FILE}")


def load(path: str | Path, dtype: torch.dtype | None = None
         ) -> tuple[LoraConfig, Adapters, dict[str, torch.Tensor]]:
    """(lora_cfg, adapters, modules) from a PEFT adapter directory, in our layouts."""
    path = Path(path)
    lora_cfg = read_config(path)
    tensors = _read_tensors(path)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)

    pairs: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    hf_to_ours = {v: k for k, v in HF_TARGETS.items()}
    module_of_key = {v: k for k, v in _MODULE_KEYS.items()}
    for key, t in tensors.items():
        if key in module_of_key:
            continue
        m = _LORA_KEY.fullmatch(key)
        if m is None or m.group(3) not in hf_to_ours:
            raise UserError(f"{path}: unexpected tensor {key!r} in the adapter weights")
        layer, target, which = int(m.group(1)), hf_to_ours[m.group(3)], m.group(4)
        if target not in lora_cfg.target_modules:
            raise UserError(f"{path}: tensor {key!r} is for a module not in target_modules")
        pairs.setdefault(layer, {}).setdefault(TARGETS[target], {})[which.lower()] = cast(t.T)
    n_layers = max(pairs) + 1 if pairs else 0
    layers = []
    for i in range(n_layers):
        for target in lora_cfg.target_modules:
            for which in ("A", "B"):
                if which.lower() not in pairs.get(i, {}).get(TARGETS[target], {}):
                    raise UserError(f"{path}: missing tensor {_lora_key(i, target, which)!r}")
        layers.append(pairs[i])
    for i, layer in enumerate(layers):
        for name, ab in layer.items():
            if ab["a"].shape[1] != lora_cfg.r or ab["b"].shape[0] != lora_cfg.r:
                raise UserError(f"{path}: layer {i} {name} has rank {tuple(ab['a'].shape)}/"
                                f"{tuple(ab['b'].shape)}, config says r={lora_cfg.r}")

    modules = {}
    for name in lora_cfg.modules_to_save:
        key = _MODULE_KEYS[name]
        if key not in tensors:
            raise UserError(f"{path}: modules_to_save has {HF_MODULES[name]!r} but {key!r} is missing")
        modules[name] = cast(tensors[key] if name == "embed" else tensors[key].T)
    return lora_cfg, {"layers": layers}, modules


def resize_vocab(params: Params, vocab_size: int) -> Params:
    """Params with `vocab_size` embedding rows (and lm_head columns).

    New rows are the mean of the old ones (a neutral start, deterministic); surplus rows are cut.
    """
    def fit(w: torch.Tensor, dim: int) -> torch.Tensor:
        old = w.shape[dim]
        if old >= vocab_size:
            return w.narrow(dim, 0, vocab_size)
        extra = w.float().mean(dim, keepdim=True).to(w.dtype)
        shape = list(w.shape)
        shape[dim] = vocab_size - old
        return torch.cat([w, extra.expand(shape)], dim=dim)

    out = dict(params, embed=fit(params["embed"], 0))
    if "lm_head" in params:
        out["lm_head"] = fit(params["lm_head"], 1)
    return out


def _check_fits(path: Path, params: Params, adapters: Adapters, lora_cfg: LoraConfig) -> None:
    if len(adapters["layers"]) != len(params["layers"]):
        raise UserError(f"{path}: adapter has {len(adapters['layers'])} layers, "
                        f"the base model {len(params['layers'])}: it was made for another model")
    param_to_target = {p: t for t, p in TARGETS.items()}
    for i, (p, ad) in enumerate(zip(params["layers"], adapters["layers"])):
        for name in lora_cfg.param_names:
            ab = ad[name]
            fan_in, fan_out = p[name].shape
            if ab["a"].shape[0] != fan_in or ab["b"].shape[1] != fan_out:
                key = _lora_key(i, param_to_target[name], "A")
                raise UserError(f"{path}: {key}: layer {i} {name} adapter maps {ab['a'].shape[0]}->"
                                f"{ab['b'].shape[1]}, the base weight is {fan_in}->{fan_out}: "
                                "the adapter was made for another model")


def attach(config: llama.Config, params: Params, path: str | Path
           ) -> tuple[llama.Config, Params, LoraConfig, Adapters]:
    """Put the PEFT adapter at `path` on `params`, unmerged: (config, params, lora_cfg, adapters).

    The vocabulary is first resized to the adapter's own (the row count of its saved embeddings
    or lm_head, Chinese-LLaMA-Alpaca style), its modules_to_save replace embed/lm_head, and its
    low-rank pairs are checked against the base weights (a mismatch names the tensor). Adapters
    come back in the dtype and on the device of the base params.
    """
    path = Path(path)
    lora_cfg, adapters, modules = load(path)
    if config.tie_embeddings and "lm_head" in modules:
        raise UserError(f"{path}: saves lm_head but the base model ties it to the embeddings")
    vocab = (modules["embed"].shape[0] if "embed" in modules
             else modules["lm_head"].shape[1] if "lm_head" in modules else config.vocab_size)
    if vocab != config.vocab_size:
        params = resize_vocab(params, vocab)
        config = dataclasses.replace(config, vocab_size=vocab)
    for name, w in modules.items():
        key = _MODULE_KEYS[name]
        if w.shape != params[name].shape:
            raise UserError(f"{path}: {key} (saved {name}) has shape {tuple(w.shape)}, "
                            f"the model expects {tuple(params[name].shape)}")
        params = dict(params, **{name: w.to(dtype=params[name].dtype, device=params[name].device)})
    _check_fits(path, params, adapters, lora_cfg)
    like = params["embed"]
    adapters = {"layers": [{name: {k: t.to(dtype=like.dtype, device=like.device) for k, t in ab.items()}
                            for name, ab in layer.items()} for layer in adapters["layers"]]}
    return config, params, lora_cfg, adapters


def merge_adapters(config: llama.Config, params: Params, adapter_dirs: list[str | Path]
                   ) -> tuple[llama.Config, Params]:
    """Fold a chain of PEFT adapters into base params, in order (Chinese-LLaMA-Alpaca style).

    Before each adapter the vocabulary is resized to the adapter's own (see `attach`); its
    modules_to_save then replace embed/lm_head, and its low-rank updates are added to the weights.
    """
    for path in adapter_dirs:
        config, params, lora_cfg, adapters = attach(config, params, path)
        params = merge(params, adapters, lora_cfg)
    return config, params
