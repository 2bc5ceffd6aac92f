"""LoRA as a pure transformation of the parameter tree and the forward pass.

    adapters = init_adapters(config, lora_cfg, seed)            # {"layers": [{"wq": {"a", "b"}}, ...]}
    logits   = lora_forward(params, adapters, tokens, config, lora_cfg)
    train, frozen = trainable(params, adapters, lora_cfg)      # differentiate `train` only
    merged   = merge(params, adapters, lora_cfg)               # plain params again

A targeted weight w [in, out] gains A [in, r] and B [r, out]; the layer computes
x @ w + dropout(x) @ A @ B * (alpha / r), as PEFT does. Nothing is patched: `lora_forward` hands
`models.llama.forward` a parameter tree whose targeted leaves are `LoraWeight`s, and the model's
own `project(x, p["wq"])` lands in `LoraWeight.__rmatmul__`. The low-rank path stays a separate
pair of skinny matmuls, so w + A@B is never materialised and dropout acts on the activations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lib import config as config_lib
from lib import prng, pytree
from models import llama

Params = dict[str, Any]
Adapters = dict[str, Any]

# Short target names (as users write them) -> our layer parameter names.
TARGETS: dict[str, str] = {
    "q": "wq", "k": "wk", "v": "wv", "o": "wo",
    "gate": "w_gate", "up": "w_up", "down": "w_down",
}
SAVABLE_MODULES = ("embed", "lm_head")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    modules_to_save: tuple[str, ...] = ()  # subset of ("embed", "lm_head"): trained in full

    def __post_init__(self):
        config_lib.check_finite(self)
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be positive")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be positive (the adapters' scale is alpha / r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules is empty; choose from " + ", ".join(TARGETS))
        for name in self.target_modules:
            if name not in TARGETS:
                raise ValueError(f"unknown target module {name!r}; choose from {', '.join(TARGETS)}")
        for name in self.modules_to_save:
            if name not in SAVABLE_MODULES:
                raise ValueError(f"unknown module to save {name!r}; choose from {', '.join(SAVABLE_MODULES)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules has duplicates: {list(self.target_modules)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def param_names(self) -> tuple[str, ...]:
        """The layer parameters that carry an adapter, in `TARGETS` order."""
        return tuple(p for t, p in TARGETS.items() if t in self.target_modules)


def _check_saved_modules(config: llama.Config, lora_cfg: LoraConfig) -> None:
    if config.tie_embeddings and "lm_head" in lora_cfg.modules_to_save:
        raise ValueError("modules_to_save has 'lm_head' but the model ties it to 'embed'; save 'embed'")


def adapter_shapes(config: llama.Config, lora_cfg: LoraConfig) -> Adapters:
    """Shapes of the adapter tree: A [in, r] and B [r, out] per targeted weight."""
    shapes = llama.param_shapes(config)["layers"]
    return {"layers": [{name: {"a": (layer[name][0], lora_cfg.r), "b": (lora_cfg.r, layer[name][1])}
                        for name in lora_cfg.param_names} for layer in shapes]}


def init_adapters(config: llama.Config, lora_cfg: LoraConfig, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Adapters:
    """Fresh adapters: A uniform in ±1/sqrt(in) (PEFT's kaiming-uniform, a=sqrt(5)), B zero.

    B = 0 makes the adapted model start exactly at the base model.
    """
    _check_saved_modules(config, lora_cfg)
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for layer_shapes in adapter_shapes(config, lora_cfg)["layers"]:
        layer = {}
        for name, ab in layer_shapes.items():
            fan_in = ab["a"][0]
            bound = 1.0 / math.sqrt(fan_in)
            a = torch.empty(ab["a"]).uniform_(-bound, bound, generator=generator)
            layer[name] = {"a": a.to(device=device, dtype=dtype),
                           "b": torch.zeros(ab["b"], dtype=dtype, device=device)}
        layers.append(layer)
    return {"layers": layers}


def adapter_axes(config: llama.Config, lora_cfg: LoraConfig) -> Adapters:
    """Logical axes of the adapter tree (the rank axis is never sharded)."""
    axes = llama.param_axes(config)["layers"]
    return {"layers": [{name: {"a": (layer[name][0], None), "b": (None, layer[name][1])}
                        for name in lora_cfg.param_names} for layer in axes]}


class LoraWeight:
    """A weight that, right-multiplied by activations, adds the low-rank update.

    `x @ LoraWeight(...)` works in plain Python (Tensor.__matmul__ gives up on a non-tensor and
    Python falls back to `__rmatmul__`); the model's `project` calls `__rmatmul__` directly, which
    torch.compile can trace. models/llama.py needs no LoRA hook.

    A pytree node (`lib.pytree.register_node`): its children are the tensors w, a, b and the
    dropout key, the rest is static. So tree utilities, torch.func and activation recompute
    (`parallel.train_step.recompute_in_backward`) see the adapters inside a layer's params and
    their gradients flow. Dropout draws from `key` (`lib.prng`): the recomputed forward draws
    the masks the first one did.
    """

    def __init__(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                 dropout: float, training: bool, key: torch.Tensor | None = None):
        if training and dropout > 0 and key is None:
            raise ValueError("LoRA dropout in training needs a random key (lib.prng)")
        self.w, self.a, self.b, self.key = w, a, b, key
        self.scale, self.dropout, self.training = scale, dropout, training

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        h = prng.dropout(x, self.dropout, self.key) if self.training and self.dropout > 0 else x
        return x @ self.w + (h @ self.a @ self.b) * self.scale


pytree.register_node(
    LoraWeight,
    lambda w: ([w.w, w.a, w.b, w.key], (w.scale, w.dropout, w.training)),
    lambda aux, children: LoraWeight(*children[:3], *aux, key=children[3]))


def adapt(params: Params, adapters: Adapters, lora_cfg: LoraConfig, *, training: bool = False,
          key: torch.Tensor | None = None) -> Params:
    """`params` whose targeted weights are `LoraWeight`s (base weight + adapter): what
    `models.llama.forward` runs as the adapted model, w + A@B never materialised.

    training: apply LoRA dropout, with masks drawn from `key` (each adapted weight folds in its
    own layer and target, so no two share a mask).
    """
    if len(adapters["layers"]) != len(params["layers"]):
        raise ValueError(f"adapters have {len(adapters['layers'])} layers, params {len(params['layers'])}")
    dropping = training and lora_cfg.dropout > 0
    if dropping and key is None:
        raise ValueError("LoRA dropout in training needs a random key (lib.prng)")
    targets = list(TARGETS.values())
    layers = []
    for i, (p, ad) in enumerate(zip(params["layers"], adapters["layers"])):
        layer = dict(p)
        for name, ab in ad.items():
            weight_key = prng.fold_in(key, i * len(targets) + targets.index(name)) if dropping else None
            layer[name] = LoraWeight(p[name], ab["a"], ab["b"], lora_cfg.scale, lora_cfg.dropout,
                                     training, weight_key)
        layers.append(layer)
    return {**params, "layers": layers}


def lora_forward(params: Params, adapters: Adapters, tokens: torch.Tensor, config: llama.Config,
                 lora_cfg: LoraConfig, *, training: bool = False, key: torch.Tensor | None = None,
                 **forward_kw) -> torch.Tensor:
    """Logits of the adapted model; `forward_kw` goes to `models.llama.forward`.

    training: apply LoRA dropout, masks drawn from `key` (the train step makes it from the run's
    seed and the step, so a resumed run draws the same masks).
    """
    return llama.forward(adapt(params, adapters, lora_cfg, training=training, key=key), tokens,
                         config, **forward_kw)


def forward_fn(config: llama.Config, lora_cfg: LoraConfig, frozen: Params) -> llama.ForwardFn:
    """The adapted model as a function of the trainable tree (`trainable`'s first half); the
    base stays frozen. What the train step differentiates."""
    def forward(train: Params, tokens: torch.Tensor, *, training: bool = False,
                key: torch.Tensor | None = None, **forward_kw) -> torch.Tensor:
        params, adapters = combine(train, frozen)
        return lora_forward(params, adapters, tokens, config, lora_cfg, training=training, key=key,
                            **forward_kw)
    return forward


def lora_loss_fn(train: Params, frozen: Params, batch: dict[str, torch.Tensor],
                 config: llama.Config, lora_cfg: LoraConfig, **forward_kw) -> torch.Tensor:
    """Mean token loss as a function of the trainable tree, for `torch.func.grad(argnums=0)`."""
    return llama.batch_loss(forward_fn(config, lora_cfg, frozen), train, batch, **forward_kw)


def trainable(params: Params, adapters: Adapters, lora_cfg: LoraConfig) -> tuple[Params, Params]:
    """Split into (trainable, frozen): adapters plus modules_to_save train, the rest is frozen.

    trainable = {"adapters": adapters, "modules": {"embed": ..., "lm_head": ...}}
                ("modules" only when there are modules to save: torch.compile cannot flatten
                an empty dict inside the step)
    frozen    = params without the modules to save.
    """
    missing = [m for m in lora_cfg.modules_to_save if m not in params]
    if missing:
        raise ValueError(f"modules_to_save {missing} not in params (tied embeddings have no lm_head)")
    modules = {m: params[m] for m in lora_cfg.modules_to_save}
    frozen = {k: v for k, v in params.items() if k not in modules}
    train = {"adapters": adapters, "modules": modules} if modules else {"adapters": adapters}
    return train, frozen


def combine(train: Params, frozen: Params) -> tuple[Params, Adapters]:
    """Inverse of `trainable`: (params, adapters)."""
    return {**frozen, **train.get("modules", {})}, train["adapters"]


def merge(params: Params, adapters: Adapters, lora_cfg: LoraConfig) -> Params:
    """Plain params with every adapter folded in: w + (alpha / r) * A @ B (computed in fp32)."""
    layers = []
    for p, ad in zip(params["layers"], adapters["layers"], strict=True):
        layer = dict(p)
        for name, ab in ad.items():
            delta = (ab["a"].float() @ ab["b"].float()) * lora_cfg.scale
            layer[name] = (p[name].float() + delta).to(p[name].dtype)
        layers.append(layer)
    return {**params, "layers": layers}
