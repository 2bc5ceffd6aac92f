"""parallel.decode.Decoder: compiled prefill per bucket and one decode step, against transformers.

The reference is HF `LlamaForCausalLM.generate(do_sample=False)` run on each prompt alone;
compilations are counted with dynamo's CompileCounter backend (it captures graphs as inductor
would, without generating code), so the counts are checked cheaply.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from lib import pytree
from models import hf, llama
from parallel import decode
from parallel.decode import Decoder
from tests.helpers_decode import greedy, left_pad
from tests.helpers_hf import random_hf_model

transformers = pytest.importorskip("transformers")

# A context long enough for two cache sizes (128 and 384 slots).
CONFIG = dataclasses.replace(llama.PRESETS["tiny"], max_seq_len=512)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, our params of the same weights)."""
    model = random_hf_model(CONFIG)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, hf.load(path)[1]


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_buckets_and_cache_sizes():
    assert [decode.prefill_bucket(n) for n in (1, 8, 9, 16, 17, 100, 129)] == [8, 8, 16, 16, 32, 128, 256]
    assert [decode.cache_length(n, 4096) for n in (20, 112, 113, 176, 177)] == [128, 128, 192, 192, 256]
    assert decode.cache_length(240, 4096) == 256          # 240 + 16 headroom
    assert decode.cache_length(241, 4096) == 384
    assert [decode.cache_length(n, 8192) for n in (400, 600, 1000, 1500)] == [512, 768, 1024, 1536]
    assert decode.cache_length(256, 256) == 272           # the context + the headroom at most


def test_greedy_equals_transformers_and_compiles_once_per_shape(reference):
    model, params = reference
    counter = CompileCounter()
    decoder = Decoder(params, CONFIG, backend=counter)
    prompts = prompts_of([5, 11, 3])  # left-padded to 11, prefilled as one 16-token bucket
    ours = greedy(decoder, prompts, 20)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(model, prompt, 20)
    assert counter.frame_count == 2  # one prefill graph, one decode step for all 20 tokens

    # Other prompt lengths in the same bucket and another max_new_tokens in the same cache size:
    # nothing recompiles.
    greedy(decoder, prompts_of([9, 14, 2], seed=1), 40)
    assert counter.frame_count == 2
    # A longer bucket compiles one prefill; a larger cache size one prefill and one decode step.
    prompts = prompts_of([20, 30, 17], seed=2)
    ours = greedy(decoder, prompts, 10)
    assert counter.frame_count == 3
    tokens, pads = left_pad(prompts)
    cache = decoder.init_cache(3, 300, pads)  # 300 + 16 slots: the 384-slot size
    logits, cache = decoder.forward(tokens, cache, last_only=True)
    for i in range(10):
        assert logits.argmax(-1).tolist() == [row[i] for row in ours]
        logits, cache = decoder.forward(logits.argmax(-1)[:, None], cache, last_only=True)
    assert counter.frame_count == 5
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(model, prompt, 10)


def test_prefill_that_does_not_fit_its_bucket_is_chunked(reference):
    _, params = reference
    config = llama.PRESETS["tiny"]  # 256 slots at most
    decoder = Decoder(params, config, backend=None)
    assert Decoder._chunks(140, 100, 256) == [slice(0, 128), slice(128, 140)]
    assert Decoder._chunks(100, 0, 256) == [slice(0, 100)]
    assert Decoder._bucket_for(8, 245, 256) == 8  # the cache's last slots: exact size
    tokens = torch.randint(0, config.vocab_size, (1, 240), generator=torch.Generator().manual_seed(0))
    cache = decoder.init_cache(1, 240, torch.zeros(1, dtype=torch.long))
    first, cache = decoder.forward(tokens[:, :100], cache, last_only=False)
    second, cache = decoder.forward(tokens[:, 100:], cache, last_only=False)  # 128 + 12 chunks
    assert decoder.written(cache) == 240
    with torch.no_grad():
        expected = llama.forward(params, tokens, config)
    torch.testing.assert_close(torch.cat([first, second], 1), expected, atol=1e-4, rtol=0)


def test_reorder_copies_written_slots_and_rewind_forgets(reference):
    _, params = reference
    decoder = Decoder(params, CONFIG, backend=None)
    tokens, pads = left_pad(prompts_of([6, 4, 2]))
    cache = decoder.init_cache(3, 20, pads)
    _, cache = decoder.forward(tokens, cache, last_only=True)
    expected = llama.reorder_cache(pytree.tree_map(torch.clone, cache), torch.tensor([2, 0, 0]))
    decoder.reorder(cache, torch.tensor([2, 0, 0]))
    for path, t in pytree.flatten_by_path(cache).items():
        want = pytree.flatten_by_path(expected)[path]
        torch.testing.assert_close(t[:, :6] if t.dim() == 4 else t, want[:, :6] if t.dim() == 4 else want)

    step = torch.tensor([[7], [8], [9]])
    logits, cache = decoder.forward(step, cache, last_only=True)
    decoder.rewind(cache, 1)
    again, cache = decoder.forward(step, cache, last_only=True)
    torch.testing.assert_close(again, logits, atol=0, rtol=0)
    assert decoder.written(cache) == 7
    with pytest.raises(ValueError, match="only 7"):
        decoder.rewind(cache, 8)


@pytest.mark.compiled
def test_inductor_decoder_equals_eager_and_updates_the_cache_in_place(tmp_path):
    config = dataclasses.replace(llama.PRESETS["tiny"], n_layers=1)  # one layer: compiles faster
    params = llama.init(config, seed=0)
    compiled = Decoder(params, config, backend="inductor", cache_dir=str(tmp_path))
    prompts = prompts_of([7, 3])
    assert greedy(compiled, prompts, 8) == greedy(Decoder(params, config, backend=None), prompts, 8)
    tokens, pads = left_pad(prompts)
    caches = []
    for decoder in (compiled, Decoder(params, config, backend=None)):
        cache = decoder.init_cache(2, 12, pads)
        k = cache["layers"][0]["k"]
        _, cache = decoder.forward(tokens, cache, last_only=True)
        _, cache = decoder.forward(tokens[:, :1], cache, last_only=True)
        assert cache["layers"][0]["k"] is k and decoder.written(cache) == 8
        caches.append(cache)
    for compiled_kv, eager_kv in zip(caches[0]["layers"], caches[1]["layers"]):
        torch.testing.assert_close(compiled_kv["k"][:, :8], eager_kv["k"][:, :8], atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled_kv["v"][:, :8], eager_kv["v"][:, :8], atol=1e-5, rtol=0)
