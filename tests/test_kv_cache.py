"""models/llama.py inference path: the KV cache pytree and the forward against it.

The reference is transformers' LlamaForCausalLM run on each prompt alone, without a cache: a
row of a left-padded batch, decoded token by token, must get exactly those logits.
"""
from __future__ import annotations

import dataclasses

import optree
import pytest
import torch

from lib import pytree
from models import attention, hf, llama, lora
from parallel import sharding
from parallel.mesh import Mesh
from tests.helpers_hf import hf_logits, random_hf_model

transformers = pytest.importorskip("transformers")

TINY = llama.PRESETS["tiny"]
VARIANTS = {
    "llama1-mha": llama.PRESETS["tiny-mha"],
    "llama2-gqa": TINY,
    "llama3": dataclasses.replace(llama.PRESETS["tiny-llama3"], rope_scaling=None),
    # original context 64: prompt + generation below run past it
    "llama3.1-rope-scaling": llama.PRESETS["tiny-llama3"],
    "tied-embeddings": dataclasses.replace(TINY, tie_embeddings=True),
    "extended-vocab": dataclasses.replace(TINY, vocab_size=523),  # Chinese-LLaMA-style odd size
}
KERNELS = {"sdpa": attention.sdpa, "reference": attention.reference}
ATOL = 1e-4


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_left_padded_decode_equals_each_row_alone_in_transformers(name, kernel, tmp_path):
    config = VARIANTS[name]
    model = random_hf_model(config)
    model.save_pretrained(tmp_path)
    _, params = hf.load(tmp_path)
    g = torch.Generator().manual_seed(3)
    full = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in (70, 75, 66)]
    prompt_lens = [7, 12, 3]  # different lengths: rows 0 and 2 are left-padded
    prompts = [f[:n] for f, n in zip(full, prompt_lens)]
    new = 60
    longest = max(prompt_lens)
    pads = torch.tensor([longest - n for n in prompt_lens])
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for r, p in enumerate(prompts):
        tokens[r, pads[r]:] = p
    cache = llama.init_cache(config, len(prompts), longest + new, start=pads)
    kernels = llama.Kernels(attention=KERNELS[kernel])
    with torch.no_grad():
        hidden, cache = llama.hidden_states_with_cache(params, tokens, cache, config, kernels=kernels)
        steps = [llama.logits(params, hidden, config)]
        for i in range(new):  # teacher-forced: row r's token number prompt_len + i
            step = torch.stack([f[n + i] for f, n in zip(full, prompt_lens)])[:, None]
            hidden, cache = llama.hidden_states_with_cache(params, step, cache, config, kernels=kernels)
            steps.append(llama.logits(params, hidden, config))
    ours = torch.cat(steps, dim=1)  # [rows, longest + new, vocab]
    for r, (f, n) in enumerate(zip(full, prompt_lens)):
        expected = hf_logits(model, f[None, : n + new])[0]
        torch.testing.assert_close(ours[r, pads[r]:], expected, atol=ATOL, rtol=0)
    assert int(cache["index"]) == longest + new


def test_chunked_prefill_equals_one_prefill():
    config = TINY
    params = llama.init(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, _ = llama.hidden_states_with_cache(params, tokens, llama.init_cache(config, 2, 32), config)
        cache = llama.init_cache(config, 2, 32)
        parts = []
        for chunk in tokens.split([10, 9, 5], dim=1):
            h, cache = llama.hidden_states_with_cache(params, chunk, cache, config)
            parts.append(h)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=0)


def test_unmerged_lora_equals_merged_under_the_cache():
    config = TINY
    params = llama.init(config, seed=0)
    lcfg = lora.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=("q", "v", "down"))
    adapters = lora.init_adapters(config, lcfg, seed=1)
    # init_adapters makes B zero (the update starts at 0): give it values so the test can fail
    adapters = optree.tree_map(lambda t: torch.randn_like(t) * 0.05, adapters)
    adapted = {**params, "layers": [
        {**p, **{n: lora.LoraWeight(p[n], ab["a"], ab["b"], lcfg.scale, lcfg.dropout, training=False)
                 for n, ab in ad.items()}}
        for p, ad in zip(params["layers"], adapters["layers"])]}
    merged = lora.merge(params, adapters, lcfg)
    tokens = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = llama.hidden_states_with_cache(adapted, tokens, llama.init_cache(config, 1, 16), config)
        b, _ = llama.hidden_states_with_cache(merged, tokens, llama.init_cache(config, 1, 16), config)
        base, _ = llama.hidden_states_with_cache(params, tokens, llama.init_cache(config, 1, 16), config)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - base).abs().max() > 1e-3


def test_reorder_cache_moves_whole_rows():
    config = TINY
    params = llama.init(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    cache = llama.init_cache(config, 3, 8, start=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        _, cache = llama.hidden_states_with_cache(params, tokens, cache, config)
    before = pytree.tree_map(torch.clone, cache)
    llama.reorder_cache(cache, torch.tensor([2, 2, 0]))
    assert cache["start"].tolist() == [2, 2, 0]
    torch.testing.assert_close(cache["layers"][1]["k"][0], before["layers"][1]["k"][2])
    torch.testing.assert_close(cache["layers"][1]["v"][2], before["layers"][1]["v"][0])


def test_cache_on_meta_device_and_its_axes():
    config = llama.PRESETS["llama2-70b"]
    cache = llama.init_cache(config, 8, 4096, dtype=torch.bfloat16, device="meta")
    nbytes = sum(t.numel() * t.element_size() for t in pytree.leaves(cache))
    # 2 (k, v) x 80 layers x 8 rows x 4096 slots x 8 kv heads x 128 dims x 2 bytes, plus start/index
    assert nbytes == 2 * 80 * 8 * 4096 * 8 * 128 * 2 + 8 * 8 + 8
    axes = llama.cache_axes(config)
    flat_axes = pytree.flatten_by_path(axes, is_leaf=pytree.is_axes)
    flat_cache = pytree.flatten_by_path(cache)
    assert flat_axes.keys() == flat_cache.keys()
    assert all(len(flat_axes[k]) == t.dim() for k, t in flat_cache.items())
    # the training rule table shards the cache: kv heads over tensor, batch over data and fsdp
    rules = sharding.load_rules()
    mesh = Mesh(None, {"data": 2, "fsdp": 2, "tensor": 8})
    split = sharding.mesh_axes_for(flat_axes["layers.0.k"], rules, mesh)
    assert split == [("data", "fsdp"), (), ("tensor",), ()]
