"""models/llama.py: shapes, parameter counts, determinism, packing, loss and attention kernels."""
from __future__ import annotations

import dataclasses

import optree
import pytest
import torch
import torch.nn.functional as F

from models import attention, llama

# Published parameter counts: the LLaMA-1 paper's model card / HF model sizes for Meta's
# checkpoints (LLaMA-2 7B/13B share LLaMA-1's shapes, so their counts are the same).
# Chinese-LLaMA-7B extends the vocab from 32000 to 49953 (Chinese-LLaMA-Alpaca README), adding
# (49953 - 32000) rows to both the embedding and the untied output: 6,738,415,616 +
# 2 * 17953 * 4096 = 6,885,486,592.
PUBLISHED = {
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "chinese-llama-7b": 6_738_415_616 + 2 * (49953 - 32000) * 4096,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_published(name):
    config = llama.PRESETS[name]
    assert llama.num_params(config) == PUBLISHED[name]
    shapes = llama.init(config, device="meta")
    assert sum(t.numel() for t in optree.tree_leaves(shapes)) == PUBLISHED[name]


def test_num_params_without_embeddings():
    config = llama.PRESETS["llama2-7b"]
    assert llama.num_params(config, embeddings=False) == PUBLISHED["llama2-7b"] - 2 * 32000 * 4096


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "llama2-70b"])
@pytest.mark.parametrize("tied", [False, True])
def test_param_axes_mirror_init(name, tied):
    config = dataclasses.replace(llama.PRESETS[name], tie_embeddings=tied)
    params = llama.init(config, device="meta")
    axes = llama.param_axes(config)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert optree.tree_structure(axes, is_leaf=is_axes) == optree.tree_structure(params)
    for leaf, names in zip(optree.tree_leaves(params), optree.tree_leaves(axes, is_leaf=is_axes)):
        assert len(names) == leaf.dim()
    assert ("lm_head" in params) is (not tied)


def test_init_is_deterministic_per_seed():
    config = llama.PRESETS["tiny"]
    a, b, c = (llama.init(config, seed=s) for s in (0, 0, 1))
    for x, y, z in zip(optree.tree_leaves(a), optree.tree_leaves(b), optree.tree_leaves(c)):
        assert torch.equal(x, y)
        if x.dim() == 2:
            assert not torch.equal(x, z)


def test_segment_ids_block_cross_document_attention():
    config = llama.PRESETS["tiny"]
    params = llama.init(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    doc_a = torch.randint(0, config.vocab_size, (1, 20), generator=gen)
    doc_b = torch.randint(0, config.vocab_size, (1, 12), generator=gen)
    packed = torch.cat([doc_a, doc_b], dim=1)
    segments = torch.cat([torch.zeros(1, 20), torch.ones(1, 12)], dim=1).long()
    positions = torch.cat([torch.arange(20), torch.arange(12)])[None]
    with torch.no_grad():
        alone_a = llama.forward(params, doc_a, config)
        alone_b = llama.forward(params, doc_b, config)
        for kernel in (attention.reference, attention.sdpa):
            out = llama.forward(params, packed, config, positions=positions, segment_ids=segments,
                                kernels=llama.Kernels(attention=kernel))
            torch.testing.assert_close(out[:, :20], alone_a, atol=1e-5, rtol=0)
            torch.testing.assert_close(out[:, 20:], alone_b, atol=1e-5, rtol=0)
        # Without segment ids the second document sees the first: the check above has teeth.
        leaky = llama.forward(params, packed, config, positions=positions)
        assert (leaky[:, 20:] - alone_b).abs().max() > 1e-3


def test_positions_argument_shifts_rope():
    config = llama.PRESETS["tiny"]
    params = llama.init(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = llama.forward(params, tokens, config)
        explicit = llama.forward(params, tokens, config, positions=torch.arange(16).expand(2, 16))
        # RoPE depends on relative offsets only: shifting every position changes nothing...
        shifted = llama.forward(params, tokens, config, positions=torch.arange(16).expand(2, 16) + 7)
        # ...while a different spacing does.
        spread = llama.forward(params, tokens, config, positions=2 * torch.arange(16).expand(2, 16))
    torch.testing.assert_close(explicit, default, atol=0, rtol=0)
    torch.testing.assert_close(shifted, default, atol=1e-4, rtol=0)
    assert (spread - default).abs().max() > 1e-3


def test_cross_entropy_ignores_masked_labels_like_torch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 32, generator=gen)
    labels = torch.randint(0, 32, (2, 8), generator=gen)
    labels[0, :3] = llama.IGNORE_INDEX
    labels[1, -1] = llama.IGNORE_INDEX
    valid = labels != llama.IGNORE_INDEX
    expected = F.cross_entropy(logits[valid], labels[valid])  # mean over the 12 valid tokens
    torch.testing.assert_close(llama.cross_entropy(logits, labels), expected)
    torch.testing.assert_close(llama.cross_entropy(logits, labels, reduction="sum"),
                               expected * valid.sum())
    # bf16 logits are upcast before the softmax.
    torch.testing.assert_close(llama.cross_entropy(logits.bfloat16(), labels),
                               F.cross_entropy(logits.bfloat16().float()[valid], labels[valid]))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("with_segments", [False, True])
def test_reference_and_sdpa_attention_agree(kv_heads, with_segments):
    gen = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(2, 24, 4, 16, generator=gen)
    k = torch.randn(2, 24, kv_heads, 16, generator=gen)
    v = torch.randn(2, 24, kv_heads, 16, generator=gen)
    segments = None
    if with_segments:
        segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 5 + [2] * 14])
    ref = attention.reference(q, k, v, segment_ids=segments)
    torch.testing.assert_close(attention.sdpa(q, k, v, segment_ids=segments), ref, atol=1e-5, rtol=0)
    # Independent check of the first query of each segment: it can only see itself.
    starts = [0, 10] if with_segments else [0]
    for s in starts:
        torch.testing.assert_close(ref[0, s], v[0, s].repeat_interleave(4 // kv_heads, dim=0))


def test_flops_per_token_matches_torchtitan_formula():
    config = llama.PRESETS["llama2-7b"]
    seq = 4096
    # torchtitan: 6 * (params - embedding table) + 12 * layers * heads * head_dim * seq,
    # with the output projection counted (it is a matmul). By hand for LLaMA-2-7B:
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    n = 32 * per_layer + 4096 + 4096 * 32000  # layers + final norm + lm_head
    assert n == 6_607_343_616
    expected = 6 * n + 12 * 32 * 32 * 128 * seq
    assert llama.flops_per_token(config, seq) == expected
    assert expected == 46_086_512_640
