"""Kernels and compiler backend per device: Ascend fused ops on NPU, pure torch elsewhere.

    kernels = kernels_for(dev, attention="auto")    # a models.llama.Kernels
    logits = llama.forward(params, tokens, config, kernels=kernels)
    step = torch.compile(step_fn, backend=compile_backend(dev))

Each Ascend wrapper has the signature of the pure-torch function it replaces (models/llama.py,
models/attention.py) and is written against torch_npu's documented API (op-plugin docs,
torch_npu 2.x: npu_fusion_attention, npu_rms_norm, npu_rotary_mul, npu_swiglu). torch_npu is
imported on first call, so this module loads on machines without it.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.distributed.tensor.experimental import local_map

from lib.device import Device, import_torch_npu
from lib.errors import UserError
from models import attention as attention_lib
from models import llama
from parallel import sharding
from parallel.mesh import Mesh

Params = llama.Params

ATTENTION_CHOICES = ("auto", "reference", "sdpa", "npu_fusion")
BACKEND_CHOICES = ("auto", "inductor", "eager", "torchair")

# npu_fusion_attention's causal modes take a fixed 2048×2048 upper-triangular mask whatever the
# sequence length (the "compressed" mask of sparse_mode 2/3); one per device is enough.
_COMPRESSED_MASK_SIZE = 2048
_LEFT_UP_CAUSAL = 2  # sparse_mode: causal with the diagonal starting top-left (Sq == Skv here)
_DEFAULT_MASK = 0    # sparse_mode: the given mask as is
_compressed_masks: dict[torch.device, torch.Tensor] = {}


def _compressed_causal_mask(device: torch.device) -> torch.Tensor:
    if device not in _compressed_masks:
        ones = torch.ones(_COMPRESSED_MASK_SIZE, _COMPRESSED_MASK_SIZE, dtype=torch.bool,
                          device=device)
        _compressed_masks[device] = torch.triu(ones, diagonal=1)  # True = masked out
    return _compressed_masks[device]


def npu_fusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         segment_ids: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (optionally segment-masked) attention through torch_npu.npu_fusion_attention, or
    attention under an explicit `mask` (decoding against a KV cache: q shorter than k).

    q [b, sq, heads, d], k/v [b, skv, kv_heads, d] are already BSND; GQA is native (heads % kv
    == 0). Its mask convention is the opposite of ours: True means "do not attend".
    """
    torch_npu = import_torch_npu()
    heads, head_dim = q.shape[2], q.shape[3]
    if mask is not None:
        mask, sparse_mode = ~mask, _DEFAULT_MASK
    elif segment_ids is None:
        mask, sparse_mode = _compressed_causal_mask(q.device), _LEFT_UP_CAUSAL
    else:
        # Packed documents: a full [b, 1, s, s] mask. (The TND layout with actual_seq_qlen would
        # skip the masked blocks, but needs documents laid end to end across the batch.)
        mask = ~attention_lib.causal_mask(q.shape[1], segment_ids, q.device)
        sparse_mode = _DEFAULT_MASK
    out = torch_npu.npu_fusion_attention(
        q, k, v, heads, "BSND", atten_mask=mask, scale=1.0 / math.sqrt(head_dim),
        keep_prob=1.0, sparse_mode=sparse_mode)
    return out[0]


def npu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch_npu.npu_rms_norm (returns (out, rstd)); it wants gamma in x's dtype."""
    torch_npu = import_torch_npu()
    return torch_npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


def npu_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_rotary_mul in "half" mode: x·cos + rotate_half(x)·sin, the HF layout
    llama.apply_rope uses; x is BSND and cos/sin are [b, s, 1, d] (a documented BS1D case)."""
    torch_npu = import_torch_npu()
    return torch_npu.npu_rotary_mul(x, cos, sin)


def npu_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """torch_npu.npu_swiglu splits its input in halves [A, B] along dim and returns silu(A)·B.

    The concatenation costs one copy of the activations; fusing w_gate and w_up into one weight
    would remove it, at the price of a different parameter layout.
    """
    torch_npu = import_torch_npu()
    return torch_npu.npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)


def attention_kernel(dev: Device | None, name: str = "auto", *, sharded: bool = False
                     ) -> attention_lib.AttentionFn:
    """The attention kernel: the one place that chooses it.

    auto = npu_fusion on NPU, sdpa on CUDA and CPU (dev None: pure torch, sdpa); with `sharded`
    params (a multi-device mesh) the reference kernel, because the fused kernels have no DTensor
    sharding strategy (DESIGN.md), and asking for a fused one is an error.
    """
    if name not in ATTENTION_CHOICES:
        raise UserError(f"attention={name!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if sharded and name not in ("auto", "reference"):
        raise UserError(f"train.attention={name} cannot run on DTensor shards yet; use "
                        "train.attention=reference (or auto) with a multi-device mesh")
    if name == "auto":
        name = "reference" if sharded else "npu_fusion" if dev is not None and dev.kind == "npu" else "sdpa"
    if name == "npu_fusion":
        if dev is None or dev.kind != "npu":
            raise UserError(f"attention=npu_fusion needs an Ascend NPU, but the device is "
                            f"{dev.kind if dev else 'unknown'}")
        return npu_fusion_attention
    return attention_lib.KERNELS[name]


def per_shard_attention(attention: attention_lib.AttentionFn, rules: sharding.Rules,
                        mesh: Mesh) -> attention_lib.AttentionFn:
    """`attention` run on each rank's rows and heads (like jax's shard_map around a kernel),
    with its `segment_ids` or `mask` split by rows. DTensor has no sharding strategy for the
    fused kernels, and dynamo (torch 2.13) cannot trace the reference kernel's einsums on
    DTensors of a 2-dim mesh (DESIGN.md); on local shards any kernel runs as on one device."""
    spec = lambda axes: sharding.spec_for(axes, rules, mesh)
    q_spec = spec(("batch", None, "heads", None))
    kv_spec = spec(("batch", None, "kv_heads", None))
    row_specs = {"segment_ids": spec(("batch", None)), "mask": spec(("batch", None, None, None))}
    common = dict(out_placements=list(q_spec), device_mesh=mesh.device_mesh, redistribute_inputs=True)
    plain = local_map(lambda q, k, v: attention(q, k, v),
                      in_placements=(q_spec, kv_spec, kv_spec), **common)
    by_rows = {name: local_map(lambda q, k, v, rows, name=name: attention(q, k, v, **{name: rows}),
                               in_placements=(q_spec, kv_spec, kv_spec, row_spec), **common)
               for name, row_spec in row_specs.items()}

    def attention_per_shard(q, k, v, segment_ids=None, mask=None):
        if segment_ids is not None and mask is not None:
            raise ValueError("attention takes segment_ids or a mask, not both")
        if segment_ids is not None:
            return by_rows["segment_ids"](q, k, v, segment_ids)
        if mask is not None:
            return by_rows["mask"](q, k, v, mask)
        return plain(q, k, v)
    return attention_per_shard


def kernels_for(dev: Device | None, attention: str = "auto", *, mesh: Mesh | None = None,
                fused: bool = True) -> llama.Kernels:
    """The model's kernels on `dev` (None: pure torch) and `mesh`. On NPU, `fused` picks
    torch_npu's fused RMSNorm, RoPE and SwiGLU (fused=False keeps the pure-torch ones, e.g. to
    bisect a numerical difference)."""
    sharded = mesh is not None and mesh.device_mesh is not None
    attn = attention_kernel(dev, attention, sharded=sharded)
    if dev is not None and dev.kind == "npu" and fused:
        return llama.Kernels(attention=attn, rms_norm=npu_rms_norm, rope=npu_rope, swiglu=npu_swiglu)
    return llama.Kernels(attention=attn)


# ---------------------------------------------------------------------------------------------
# CPU projections through oneDNN
#
# On the CPUs measured here (AMD EPYC, AVX-512), MKL's sgemm with a few rows (a decode step of
# beams or a batch, a short prefill) streams the weights 1.5-3x slower than oneDNN's matmul on
# weights prepacked into its blocked layout, and no slower at one row. `prepack_projections`
# replaces the 2-D projection weights by `PackedWeight`s, which `llama.project` applies through
# their `__rmatmul__`: the model is unchanged and compiles (the packed matmul is an opaque op
# for inductor). The packed copy replaces the plain one, so memory does not grow.

PACK_ROWS = 4  # the row count oneDNN picks its blocked layout for (measured best for 1..64 rows)


# An operator of our own, opaque to inductor (which cannot lower oneDNN's op on a packed graph
# input). Defined with torch.library directly: `torch.library.custom_op`'s autograd wrapper cost
# ~15 us per call, a millisecond per decode step of a small model.
_LIBRARY = torch.library.Library("llamax", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor packed, int out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., in] @ w, where `packed` is w [in, out] prepacked by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


_LIBRARY.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")  # packed: MkldnnCPU


@torch.library.register_fake("llamax::packed_linear")
def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


packed_linear = torch.ops.llamax.packed_linear


class PackedWeight:
    """A projection weight [in, out] in oneDNN's prepacked layout; `llama.project(x, w)` applies it."""

    def __init__(self, w: torch.Tensor):
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().t().contiguous(), PACK_ROWS)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.shape[1])


def can_prepack(params: Params) -> bool:
    """True when the projections of `params` can run through oneDNN: plain (not DTensor) CPU
    tensors in fp32 or bf16, on a torch built with oneDNN."""
    w = params["layers"][0]["wq"] if params["layers"] else params["embed"]
    return (torch.backends.mkldnn.is_available() and type(w) is torch.Tensor
            and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16))


def prepack_projections(params: Params) -> Params:
    """`params` with every layer's 2-D weights and the untied lm_head as `PackedWeight`s (norms and
    the embedding stay tensors; weights already packed stay as they are)."""
    pack = lambda w: PackedWeight(w) if isinstance(w, torch.Tensor) and w.dim() == 2 else w
    out = {**params, "layers": [{k: pack(v) for k, v in layer.items()} for layer in params["layers"]]}
    if "lm_head" in params:
        out["lm_head"] = pack(params["lm_head"])
    return out


def compile_backend(dev: Device, name: str = "auto") -> str | Callable:
    """The torch.compile backend: auto = torchair's NPU backend on NPU, inductor elsewhere.

    "eager" traces with dynamo but runs the captured graph as is (no code generation): useful to
    separate tracing problems from compiler ones. Not compiling at all is the caller's choice.
    """
    if name not in BACKEND_CHOICES:
        raise UserError(f"compile backend {name!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if name == "auto":
        name = "torchair" if dev.kind == "npu" else "inductor"
    if name != "torchair":
        return name
    if dev.kind != "npu":
        raise UserError(f"compile backend torchair needs an Ascend NPU, but the device is {dev.kind}")
    import_torch_npu()
    try:
        import torchair
    except ImportError as e:
        raise UserError(f"torchair (shipped with torch_npu) failed to import: {e}; "
                        "use compile backend=eager or compile=false") from e
    return torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
