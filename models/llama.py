"""The LLaMA family as pure functions over a parameter pytree.

    params = init(config, seed)                      # nested dicts/lists of tensors
    logits = forward(params, tokens, config)         # [batch, seq, vocab]
    axes   = param_axes(config)                      # same tree, leaves = logical axis names

Nothing here knows about devices, meshes or compilers: `parallel/` maps the logical axes to a
mesh and compiles these functions. Weights are stored [in, out] (x @ w), as JAX code does;
`models/hf.py` transposes at the HF boundary.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from lib import config as config_lib
from lib import rng
from lib.constraints import constrain
from lib.labels import IGNORE_INDEX
from models import attention as attention_kernels

Params = dict[str, Any]


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's "llama3" frequency scaling (long-context extension)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        config_lib.check_finite(self)
        if self.factor < 1:
            raise ValueError(f"factor={self.factor} must be >= 1 (it stretches the context)")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            # The smoothing between the two wavelengths divides by their difference.
            raise ValueError(f"low_freq_factor={self.low_freq_factor} must be > 0 and below "
                             f"high_freq_factor={self.high_freq_factor}")
        if self.original_max_position < 1:
            raise ValueError(f"original_max_position={self.original_max_position} must be >= 1")


@dataclass(frozen=True)
class Config:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (kv heads = heads)
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self):
        config_lib.check_finite(self)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be >= 1 (or null: as many as n_heads)")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


_L1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)
_L2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)
_L3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
_L31 = dict(_L3, max_seq_len=131072, rope_scaling=RopeScaling())
_7B = dict(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008)
_13B = dict(dim=5120, n_layers=40, n_heads=40, ffn_dim=13824)
_33B = dict(dim=6656, n_layers=60, n_heads=52, ffn_dim=17920)
_65B = dict(dim=8192, n_layers=80, n_heads=64, ffn_dim=22016)
_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336)

# Shapes from the LLaMA papers / Meta's params.json; Chinese-LLaMA-Alpaca's merged vocabularies
# (49953 for Chinese-LLaMA 7B/13B, 49954 for Chinese-Alpaca and for both 33B models) come from
# that project's model cards.
PRESETS: dict[str, Config] = {
    "llama1-7b": Config(**_L1, **_7B),
    "llama1-13b": Config(**_L1, **_13B),
    "llama1-33b": Config(**_L1, **_33B),
    "llama1-65b": Config(**_L1, **_65B),
    "llama2-7b": Config(**_L2, **_7B),
    "llama2-13b": Config(**_L2, **_13B),
    "llama2-70b": Config(**_L2, **_70B),
    "llama3-8b": Config(**_L3, **_8B),
    "llama3-70b": Config(**_L3, **_70B),
    "llama3.1-8b": Config(**_L31, **_8B),
    "llama3.1-70b": Config(**_L31, **_70B),
    "chinese-llama-7b": Config(**dict(_L1, vocab_size=49953), **_7B),
    "chinese-llama-13b": Config(**dict(_L1, vocab_size=49953), **_13B),
    "chinese-llama-33b": Config(**dict(_L1, vocab_size=49954), **_33B),
    "chinese-alpaca-7b": Config(**dict(_L1, vocab_size=49954), **_7B),
    "chinese-alpaca-13b": Config(**dict(_L1, vocab_size=49954), **_13B),
    "chinese-alpaca-33b": Config(**dict(_L1, vocab_size=49954), **_33B),
    # Tiny shapes for tests and the embedded default run.
    "tiny": Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                   max_seq_len=256),
    "tiny-mha": Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=176, norm_eps=1e-6,
                       max_seq_len=256),
    "tiny-llama3": Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=192,
                          rope_theta=500000.0, max_seq_len=256,
                          rope_scaling=RopeScaling(factor=8.0, original_max_position=64)),
    "small": Config(vocab_size=8000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408,
                    max_seq_len=1024),
}
config_lib.register_presets(Config, PRESETS)


# ---------------------------------------------------------------------------------------------
# Parameters


def param_shapes(config: Config) -> Params:
    d, hd = config.dim, config.head_dim
    layer = {
        "attn_norm": (d,),
        "wq": (d, config.n_heads * hd),
        "wk": (d, config.kv_heads * hd),
        "wv": (d, config.kv_heads * hd),
        "wo": (config.n_heads * hd, d),
        "mlp_norm": (d,),
        "w_gate": (d, config.ffn_dim),
        "w_up": (d, config.ffn_dim),
        "w_down": (config.ffn_dim, d),
    }
    shapes: Params = {
        "embed": (config.vocab_size, d),
        "layers": [dict(layer) for _ in range(config.n_layers)],
        "final_norm": (d,),
    }
    if not config.tie_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    return shapes


def param_axes(config: Config) -> Params:
    """Logical axis names of every parameter; `parallel/` maps them to mesh axes by rules."""
    layer = {
        "attn_norm": ("norm",),
        "wq": ("embed", "heads"),
        "wk": ("embed", "kv_heads"),
        "wv": ("embed", "kv_heads"),
        "wo": ("heads", "embed"),
        "mlp_norm": ("norm",),
        "w_gate": ("embed", "mlp"),
        "w_up": ("embed", "mlp"),
        "w_down": ("mlp", "embed"),
    }
    axes: Params = {
        "embed": ("vocab", "embed"),
        "layers": [dict(layer) for _ in range(config.n_layers)],
        "final_norm": ("norm",),
    }
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


INIT_STD = 0.02  # normal(0, 0.02) for every weight but the norm scales


def init_param(path: str, shape: tuple[int, ...], seed: int, region: rng.Region | None = None,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Initial values of parameter `path` ("layers.3.wq") of `shape`, or of its `region` only.

    Norm scales are ones; every other weight is normal(0, INIT_STD) drawn by `lib.rng.normal`
    from a seed folded from (seed, path): any region is computed without the rest of the tensor,
    and the full values do not depend on how a mesh cuts it (`parallel.sharded.init` creates
    each rank's shards this way; `init` below is the same function over whole tensors).
    """
    region = rng.normalize_region(shape, region)
    if path.rsplit(".", 1)[-1].endswith("norm"):
        return torch.ones(tuple(s.stop - s.start for s in region), dtype=dtype, device=device)
    return rng.normal(shape, rng.fold_in(seed, path), INIT_STD, region, dtype=dtype, device=device)


def init(config: Config, seed: int = 0, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> Params:
    """Deterministic initialisation (`init_param` on every whole parameter).

    `device="meta"` returns shapes and dtypes without memory, like `jax.eval_shape`.
    """
    def make(path: str, shape: tuple[int, ...]) -> torch.Tensor:
        if str(device) == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return init_param(path, shape, seed, dtype=dtype, device=device)

    shapes = param_shapes(config)
    params: Params = {k: make(k, v) for k, v in shapes.items() if k != "layers"}
    params["layers"] = [{k: make(f"layers.{i}.{k}", v) for k, v in layer.items()}
                        for i, layer in enumerate(shapes["layers"])]
    return params


def num_params(config: Config, embeddings: bool = True) -> int:
    shapes = param_shapes(config)
    total = sum(math.prod(s) for layer in shapes["layers"] for s in layer.values())
    total += config.dim  # final norm
    if embeddings:
        total += config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
    return total


def flops_per_token(config: Config, seq_len: int) -> int:
    """Training FLOPs per token: 6·N (non-embedding matmuls, fwd+bwd) + attention scores.

    The attention term is 12·L·H·d_head·S as torchtitan counts it (causal masking not discounted).
    The lm_head matmul is counted in N: it is a real matmul even though its weight is an embedding.
    """
    n = num_params(config, embeddings=False) + config.dim * config.vocab_size
    return 6 * n + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len


# ---------------------------------------------------------------------------------------------
# The forward pass


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 whatever the activation dtype, cast back before the scale (as HF does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_frequencies(config: Config) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with LLaMA-3.1's scaling when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept,
    # and the band between is blended linearly in 1/wavelength.
    wavelen = 2 * math.pi / inv_freq
    slow = inv_freq / s.factor
    blend = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - blend) * slow + blend * inv_freq
    long = wavelen > s.original_max_position / s.low_freq_factor
    short = wavelen < s.original_max_position / s.high_freq_factor
    return torch.where(long, slow, torch.where(short, inv_freq, mid))


def rope_cos_sin(config: Config, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [batch, seq, 1, head_dim] in the HF layout (two halves, not interleaved)."""
    inv_freq = rope_frequencies(config).to(positions.device)
    angles = positions.float()[..., None] * inv_freq  # [b, s, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class Kernels:
    """The swappable inner functions of the forward pass, pure torch by default.

    `parallel/kernels.py` builds device versions (Ascend fused ops, ...) with the same signatures,
    so the model never imports device code.
    """
    attention: attention_kernels.AttentionFn = attention_kernels.sdpa
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = apply_rope
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = swiglu


def project(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w for a weight tensor; a weight that is not a tensor (a LoRA-adapted one, say)
    applies itself through its `__rmatmul__`. Called explicitly, not via `@`'s fallback,
    because torch.compile cannot trace Tensor.__matmul__ handing over to a Python object."""
    return x @ w if isinstance(w, torch.Tensor) else w.__rmatmul__(x)


def qkv(p: Params, x: torch.Tensor, cos, sin, config: Config, kernels: Kernels):
    """Query, key and value [b, s, heads or kv_heads, head_dim], rotated by RoPE."""
    b, s, _ = x.shape
    hd = config.head_dim
    q = project(x, p["wq"]).view(b, s, config.n_heads, hd)
    k = project(x, p["wk"]).view(b, s, config.kv_heads, hd)
    v = project(x, p["wv"]).view(b, s, config.kv_heads, hd)
    q = constrain(kernels.rope(q, cos, sin), ("batch", "seq", "heads", None))
    k = constrain(kernels.rope(k, cos, sin), ("batch", "seq", "kv_heads", None))
    return q, k, v


def attention_out(p: Params, out: torch.Tensor) -> torch.Tensor:
    b, s, heads, hd = out.shape
    return project(out.reshape(b, s, heads * hd), p["wo"])


def mlp_block(p: Params, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    hidden = kernels.swiglu(project(x, p["w_gate"]), project(x, p["w_up"]))
    return project(constrain(hidden, ("batch", "seq", "mlp")), p["w_down"])


def transformer_layer(p: Params, x: torch.Tensor, cos, sin, segment_ids, config: Config,
                      kernels: Kernels) -> torch.Tensor:
    q, k, v = qkv(p, kernels.rms_norm(x, p["attn_norm"], config.norm_eps), cos, sin, config, kernels)
    h = x + attention_out(p, kernels.attention(q, k, v, segment_ids=segment_ids))
    # Pinned like the layer's input: the residual stream stays split by batch only (without it,
    # DTensor carried the attention output's partial sums into the MLP's matmuls).
    h = constrain(h, ("batch", "seq", "embed"))
    out = h + mlp_block(p, kernels.rms_norm(h, p["mlp_norm"], config.norm_eps), kernels)
    return constrain(out, ("batch", "seq", "embed"))


def embed(params: Params, tokens: torch.Tensor) -> torch.Tensor:
    """Token embeddings [batch, seq, dim] of token ids [batch, seq]."""
    return constrain(params["embed"][tokens], ("batch", "seq", "embed"))


def decoder_layers(layers: Sequence[Params], x: torch.Tensor, config: Config, *,
                   positions: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None,
                   kernels: Kernels = Kernels(),
                   remat: Callable[[Callable], Callable] | None = None) -> torch.Tensor:
    """Run the transformer layers `layers` (a slice of `params["layers"]`) over hidden states
    x [batch, seq, dim]. `hidden_states` runs all of them; a pipeline stage runs its slice."""
    if positions is None:
        b, s = x.shape[:2]
        positions = torch.arange(s, device=x.device).expand(b, s)
    cos, sin = rope_cos_sin(config, positions, x.dtype)
    layer_fn = remat(transformer_layer) if remat is not None else transformer_layer
    for p in layers:
        x = layer_fn(p, x, cos, sin, segment_ids, config, kernels)
    return x


def hidden_states(params: Params, tokens: torch.Tensor, config: Config, *,
                  positions: torch.Tensor | None = None,
                  segment_ids: torch.Tensor | None = None,
                  kernels: Kernels = Kernels(),
                  remat: Callable[[Callable], Callable] | None = None) -> torch.Tensor:
    """Final (normalised) hidden states [batch, seq, dim] for token ids [batch, seq].

    positions:   [batch, seq] rotary positions (default 0..seq-1; packed data restarts them).
    segment_ids: [batch, seq] document ids; attention never crosses a segment boundary.
    kernels:     attention / norm / rope / swiglu functions (default `Kernels()`: pure torch, sdpa).
    remat:       wraps the per-layer function, e.g. activation checkpointing from `parallel/`.
    """
    x = decoder_layers(params["layers"], embed(params, tokens), config, positions=positions,
                       segment_ids=segment_ids, kernels=kernels, remat=remat)
    return kernels.rms_norm(x, params["final_norm"], config.norm_eps)


def logits(params: Params, hidden: torch.Tensor, config: Config) -> torch.Tensor:
    """The lm_head: [..., dim] -> [..., vocab]. Kept apart from `hidden_states` so a caller
    pays it only for the positions it needs (the last one when generating)."""
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    out = project(hidden, head)
    return constrain(out, ("batch", "seq", "vocab")) if out.dim() == 3 else out


def forward(params: Params, tokens: torch.Tensor, config: Config, *,
            positions: torch.Tensor | None = None,
            segment_ids: torch.Tensor | None = None,
            kernels: Kernels = Kernels(),
            remat: Callable[[Callable], Callable] | None = None) -> torch.Tensor:
    """Logits [batch, seq, vocab] for token ids [batch, seq]; arguments as `hidden_states`."""
    hidden = hidden_states(params, tokens, config, positions=positions, segment_ids=segment_ids,
                           kernels=kernels, remat=remat)
    return logits(params, hidden, config)


# ---------------------------------------------------------------------------------------------
# Inference against a KV cache
#
# The cache is a pytree like the parameters, with logical axes (`cache_axes`) so the same rule
# table shards it (kv heads over `tensor`, batch over the data axes):
#
#     {"layers": [{"k": [b, max_len, kv_heads, hd], "v": ...}, ...],
#      "start": [b]   first slot holding a real token of each row (prompts are left-padded),
#      "index": []    the next slot to write, shared by all rows}
#
# Slot j of row r holds the token at rotary position j - start[r]. A query at slot i attends to
# slots start[r]..i: padding is never seen and every row gets what it would get alone.


def cache_shapes(config: Config, batch: int, max_len: int) -> dict[str, Any]:
    kv = (batch, max_len, config.kv_heads, config.head_dim)
    return {"layers": [{"k": kv, "v": kv} for _ in range(config.n_layers)],
            "start": (batch,), "index": ()}


def cache_axes(config: Config) -> dict[str, Any]:
    kv = ("batch", "seq", "kv_heads", None)
    return {"layers": [{"k": kv, "v": kv} for _ in range(config.n_layers)],
            "start": ("batch",), "index": ()}


def init_cache(config: Config, batch: int, max_len: int, *, start: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated).

    `start`: [batch] left-padding of each row (default 0). `device="meta"` gives shapes only.
    Slots are not positions: with padding a cache may be longer than `config.max_seq_len`; keeping
    each row's tokens within the model's context is the caller's check.
    """
    shapes = cache_shapes(config, batch, max_len)
    kv = lambda shape: torch.zeros(shape, dtype=dtype, device=device)
    first = torch.zeros(batch, dtype=torch.int64, device=device) if start is None else \
        start.to(device=device, dtype=torch.int64)
    return {"layers": [{"k": kv(l["k"]), "v": kv(l["v"])} for l in shapes["layers"]],
            "start": first, "index": torch.zeros((), dtype=torch.int64, device=device)}


def reorder_cache(cache: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """Row i of the result is row `rows[i]` of `cache` (beam search), written in place."""
    for layer in cache["layers"]:
        for t in layer.values():
            t.copy_(t.index_select(0, rows))
    cache["start"].copy_(cache["start"].index_select(0, rows))
    return cache


def cached_transformer_layer(p: Params, kv: dict[str, torch.Tensor], x: torch.Tensor, cos, sin,
                             slots: torch.Tensor, mask: torch.Tensor, config: Config,
                             kernels: Kernels) -> torch.Tensor:
    q, k, v = qkv(p, kernels.rms_norm(x, p["attn_norm"], config.norm_eps), cos, sin, config, kernels)
    # Written in place: the caller donates the cache, as jax.jit(donate_argnums=...) would.
    keys = kv["k"].index_copy_(1, slots, k.to(kv["k"].dtype))
    values = kv["v"].index_copy_(1, slots, v.to(kv["v"].dtype))
    h = constrain(x + attention_out(p, kernels.attention(q, keys.to(q.dtype), values.to(q.dtype), mask=mask)),
                  ("batch", "seq", "embed"))  # as in transformer_layer
    out = h + mlp_block(p, kernels.rms_norm(h, p["mlp_norm"], config.norm_eps), kernels)
    return constrain(out, ("batch", "seq", "embed"))


def hidden_states_with_cache(params: Params, tokens: torch.Tensor, cache: dict[str, Any],
                             config: Config, *, kernels: Kernels = Kernels(),
                             layer_hook: Callable[[Callable], Callable] | None = None,
                             ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states [batch, q, dim] of `tokens` [batch, q] written at the cache's next q slots,
    and the cache (updated in place: the argument is consumed). Prefill, a decode step, a chunk
    of a long prompt and a speculative block are all this one call.

    layer_hook: wraps the per-layer function, as `remat` does in `hidden_states` (`parallel/`
    compiles it once for all layers with it).
    """
    q_len = tokens.shape[1]
    max_len = cache["layers"][0]["k"].shape[1]
    start = cache["start"]
    slots = cache["index"] + torch.arange(q_len, device=tokens.device)           # [q]
    keys = torch.arange(max_len, device=tokens.device)                            # [max_len]
    visible = (keys <= slots[:, None]) & (keys >= start[:, None, None])           # [b, q, max_len]
    visible = visible | (keys == slots[:, None])  # a padding query sees itself: no empty softmax
    positions = (slots - start[:, None]).clamp(min=0)                             # [b, q]
    x = constrain(params["embed"][tokens], ("batch", "seq", "embed"))
    cos, sin = rope_cos_sin(config, positions, x.dtype)
    layer_fn = layer_hook(cached_transformer_layer) if layer_hook is not None else cached_transformer_layer
    for p, kv in zip(params["layers"], cache["layers"], strict=True):
        x = layer_fn(p, kv, x, cos, sin, slots, visible[:, None], config, kernels)
    cache["index"].add_(q_len)
    return kernels.rms_norm(x, params["final_norm"], config.norm_eps), cache


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32; labels equal to IGNORE_INDEX (-100) do not count.

    `labels` are already aligned with `logits` (label t is the token after input t).
    "mean" averages over valid tokens; "sum" lets callers weight micro-batches by token count.
    """
    total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class ForwardFn(Protocol):
    """The model as a function of the tree being trained: `forward`'s keyword arguments plus
    `training` (dropout on) and `key` (the counter-based random key dropout draws from,
    `lib.prng`). `model_forward(config)` is the plain model; LoRA's `lora.forward_fn` runs
    adapters over a frozen base."""

    def __call__(self, params: Any, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
                 segment_ids: torch.Tensor | None = None, kernels: Kernels = Kernels(),
                 remat: Callable[[Callable], Callable] | None = None, training: bool = False,
                 key: torch.Tensor | None = None) -> torch.Tensor: ...


def model_forward(config: Config) -> ForwardFn:
    """`forward` as a ForwardFn (the plain model has no dropout: `training` and `key` are unused)."""
    def run(params: Params, tokens: torch.Tensor, *, training: bool = False,
            key: torch.Tensor | None = None, **forward_kw) -> torch.Tensor:
        return forward(params, tokens, config, **forward_kw)
    return run


def batch_loss(forward_fn: ForwardFn, params: Any, batch: dict[str, torch.Tensor], *,
               reduction: str = "mean", cross_entropy_fn: Callable[..., torch.Tensor] = cross_entropy,
               **forward_kw) -> torch.Tensor:
    """Token loss of a batch {"tokens", "labels", optional "positions", "segment_ids"}: the one
    forward -> loss path of training, evaluation and the tests. `forward_kw` goes to `forward_fn`;
    `cross_entropy_fn` is `cross_entropy` or a compiled version of it (`parallel/`)."""
    logits = forward_fn(params, batch["tokens"], positions=batch.get("positions"),
                        segment_ids=batch.get("segment_ids"), **forward_kw)
    return cross_entropy_fn(logits, batch["labels"], reduction)


def loss_fn(params: Params, batch: dict[str, torch.Tensor], config: Config,
            **forward_kw) -> torch.Tensor:
    """Mean token loss of a batch under the plain model."""
    return batch_loss(model_forward(config), params, batch, **forward_kw)
