"""parallel/kernels.py: per-device kernel choice, and the Ascend wrappers run against a fake
torch_npu whose ops follow the op-plugin documentation (signature, layout, mask convention)."""
from __future__ import annotations

import dataclasses
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lib import pytree
from lib.device import Device
from lib.errors import UserError
from models import attention as attention_lib
from models import llama
from parallel import kernels

CPU = Device("cpu", torch.device("cpu"), "gloo", "test CPU")
# An "NPU" whose tensors live on the CPU: the fake torch_npu below computes on whatever it gets.
NPU = Device("npu", torch.device("cpu"), "hccl", "Ascend910B2")


class FakeTorchNpu(types.ModuleType):
    """The documented math of each op, written from the docs rather than from our model code.

    Signatures copy torch_npu's (keyword names included), so a misspelled argument fails.
    """

    def __init__(self):
        super().__init__("torch_npu")
        self.calls: list[tuple[str, dict]] = []

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, pse=None,
                             padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0,
                             pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                             prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                             sparse_mode=0, gen_mask_parallel=True, sync=False):
        self.calls.append(("npu_fusion_attention", dict(
            head_num=head_num, input_layout=input_layout, atten_mask=atten_mask, scale=scale,
            keep_prob=keep_prob, sparse_mode=sparse_mode)))
        assert input_layout == "BSND" and pse is None and padding_mask is None
        b, sq, n, d = query.shape
        skv, nkv = key.shape[1], key.shape[2]
        assert n == head_num and n % nkv == 0
        q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # BNSD
        k = k.repeat_interleave(n // nkv, dim=1)  # query head h reads kv head h // (n / nkv)
        v = v.repeat_interleave(n // nkv, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        if atten_mask is not None:
            assert atten_mask.dtype == torch.bool
            if sparse_mode == 2:  # leftUpCausal: a 2048x2048 compressed upper-triangular mask
                assert atten_mask.shape == (2048, 2048)
                assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
                atten_mask = torch.ones(sq, skv, dtype=torch.bool).triu(1)
            else:
                assert sparse_mode == 0
            scores = scores.masked_fill(atten_mask, float("-inf"))  # True = not attended
        out = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3)
        return out, None, None, None, 0, 0, 0

    def npu_rms_norm(self, input, gamma, epsilon=1e-6):
        assert gamma.dtype == input.dtype
        self.calls.append(("npu_rms_norm", dict(epsilon=epsilon)))
        rstd = torch.rsqrt(input.pow(2).mean(-1, keepdim=True) + epsilon)
        return input * rstd * gamma, rstd

    def npu_rotary_mul(self, input, r1, r2, rotary_mode="half"):
        assert rotary_mode == "half"
        self.calls.append(("npu_rotary_mul", {}))
        x1, x2 = torch.chunk(input, 2, -1)
        return r1 * input + r2 * torch.cat((-x2, x1), dim=-1)

    def npu_swiglu(self, input, dim=-1):
        self.calls.append(("npu_swiglu", dict(dim=dim)))
        a, b = torch.chunk(input, 2, dim=dim)
        return a * torch.sigmoid(a) * b


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake


def qkv(batch=2, seq=12, heads=4, kv_heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=g)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=g)
    return q, k, v


SEGMENTS = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])


def test_attention_choice_per_device():
    assert kernels.attention_kernel(CPU) is attention_lib.sdpa
    assert kernels.attention_kernel(CPU, "reference") is attention_lib.reference
    assert kernels.attention_kernel(NPU) is kernels.npu_fusion_attention
    with pytest.raises(UserError, match="needs an Ascend NPU"):
        kernels.attention_kernel(CPU, "npu_fusion")
    with pytest.raises(UserError, match="flash"):
        kernels.attention_kernel(CPU, "flash")


@pytest.mark.parametrize("segment_ids", [None, SEGMENTS])
def test_sdpa_matches_reference(segment_ids):
    q, k, v = qkv()
    torch.testing.assert_close(attention_lib.sdpa(q, k, v, segment_ids),
                               attention_lib.reference(q, k, v, segment_ids))


def test_npu_fusion_attention_causal_arguments(fake_npu):
    q, k, v = qkv()
    out = kernels.npu_fusion_attention(q, k, v)
    torch.testing.assert_close(out, attention_lib.reference(q, k, v))
    (name, kw), = fake_npu.calls
    assert kw["head_num"] == 4 and kw["input_layout"] == "BSND" and kw["keep_prob"] == 1.0
    assert kw["scale"] == pytest.approx(1 / math.sqrt(8))
    assert kw["sparse_mode"] == 2


def test_npu_fusion_attention_segments_mask_convention(fake_npu):
    q, k, v = qkv()
    out = kernels.npu_fusion_attention(q, k, v, segment_ids=SEGMENTS)
    torch.testing.assert_close(out, attention_lib.reference(q, k, v, SEGMENTS))
    kw = fake_npu.calls[0][1]
    mask = kw["atten_mask"]
    assert kw["sparse_mode"] == 0 and mask.shape == (2, 1, 12, 12)
    assert mask[0, 0, 0, 1]          # the future is masked (True = do not attend)
    assert not mask[0, 0, 4, 0]      # earlier token, same document: attended
    assert mask[0, 0, 5, 4]          # earlier token, previous document: masked


def test_npu_pointwise_kernels_match_reference(fake_npu):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, 16, generator=g)
    w = torch.randn(16, generator=g)
    torch.testing.assert_close(kernels.npu_rms_norm(x, w, 1e-5), llama.rms_norm(x, w, 1e-5))
    cos, sin = llama.rope_cos_sin(llama.PRESETS["tiny"], torch.arange(6).expand(2, 6), x.dtype)
    x16 = torch.randn(2, 6, 4, llama.PRESETS["tiny"].head_dim, generator=g)
    torch.testing.assert_close(kernels.npu_rope(x16, cos, sin), llama.apply_rope(x16, cos, sin))
    gate, up = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    torch.testing.assert_close(kernels.npu_swiglu(gate, up), F.silu(gate) * up)
    assert [c[0] for c in fake_npu.calls] == ["npu_rms_norm", "npu_rotary_mul", "npu_swiglu"]


def test_model_with_npu_kernels_matches_default(fake_npu):
    config = llama.PRESETS["tiny"]
    params = llama.init(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = llama.forward(params, tokens, config)
    got = llama.forward(params, tokens, config, kernels=kernels.kernels_for(NPU))
    torch.testing.assert_close(got, expected)
    names = {c[0] for c in fake_npu.calls}
    assert names == {"npu_fusion_attention", "npu_rms_norm", "npu_rotary_mul", "npu_swiglu"}


def test_kernels_reach_every_layer():
    config = llama.PRESETS["tiny"]
    params = llama.init(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (1, 8))
    norms = []

    def counting_rms_norm(x, w, eps):
        norms.append(eps)
        return llama.rms_norm(x, w, eps)

    ks = llama.Kernels(attention=attention_lib.reference, rms_norm=counting_rms_norm)
    out = llama.forward(params, tokens, config, kernels=ks)
    assert len(norms) == 2 * config.n_layers + 1
    torch.testing.assert_close(out, llama.forward(params, tokens, config,
                                                  kernels=llama.Kernels(attention=attention_lib.reference)))


def test_cpu_kernels_are_pure_torch():
    assert kernels.kernels_for(CPU) == llama.Kernels()
    assert kernels.kernels_for(NPU, fused=False) == llama.Kernels(attention=kernels.npu_fusion_attention)


def test_compile_backend(monkeypatch, fake_npu):
    assert kernels.compile_backend(CPU) == "inductor"
    assert kernels.compile_backend(CPU, "eager") == "eager"
    with pytest.raises(UserError, match="torchair needs an Ascend NPU"):
        kernels.compile_backend(CPU, "torchair")
    torchair = types.ModuleType("torchair")
    torchair.CompilerConfig = lambda: "config"
    torchair.get_npu_backend = lambda *, compiler_config: ("npu_backend", compiler_config)
    monkeypatch.setitem(sys.modules, "torchair", torchair)
    assert kernels.compile_backend(NPU) == ("npu_backend", "config")


def _decode_mask(batch=2, q_len=3, kv_len=12):
    """Queries at the last q_len of kv_len slots; row 1 has two padding slots at the front."""
    slots = torch.arange(kv_len - q_len, kv_len)
    keys = torch.arange(kv_len)
    start = torch.tensor([0, 2])[:batch]
    return ((keys <= slots[:, None]) & (keys >= start[:, None, None]))[:, None]


def test_sdpa_matches_reference_with_a_decode_mask():
    q, k, v = qkv()
    q, mask = q[:, -3:], _decode_mask()
    torch.testing.assert_close(attention_lib.sdpa(q, k, v, mask=mask),
                               attention_lib.reference(q, k, v, mask=mask))


def test_npu_fusion_attention_decode_mask_convention(fake_npu):
    q, k, v = qkv()
    q, mask = q[:, -3:], _decode_mask()
    out = kernels.npu_fusion_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, attention_lib.reference(q, k, v, mask=mask))
    kw = fake_npu.calls[0][1]
    assert kw["sparse_mode"] == 0 and torch.equal(kw["atten_mask"], ~mask)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_prepacked_projections_equal_plain_matmuls(dtype, atol):
    """oneDNN's packed matmul (CPU) against torch's own, on odd sizes (vocab 523, ffn 176)."""
    config = dataclasses.replace(llama.PRESETS["tiny"], vocab_size=523)
    params = pytree.tree_map(lambda t: t.to(dtype), llama.init(config, seed=0))
    assert kernels.can_prepack(params)
    packed = kernels.prepack_projections(params)
    assert isinstance(packed["layers"][1]["w_up"], kernels.PackedWeight)
    assert not kernels.can_prepack(packed)  # packing twice is a no-op
    tokens = torch.randint(0, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = llama.forward(params, tokens, config).float()
        got = llama.forward(packed, tokens, config).float()
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
