"""Speculative decoding (lib.decoding.speculative): greedy output equals plain greedy decoding of
the target; the acceptance rule leaves every token distributed as the target's distribution."""
from __future__ import annotations

import pytest
import torch

from lib import pytree
from lib.decoding import GenerateConfig, generate, speculative
from lib.errors import UserError
from models import llama
from parallel.decode import Decoder

TARGET = llama.PRESETS["tiny"]
DRAFT = llama.Config(vocab_size=512, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=256)


@pytest.fixture(scope="module")
def models():
    params = llama.init(TARGET, seed=0)
    target = Decoder(params, TARGET, backend=None)
    draft = Decoder(llama.init(DRAFT, seed=1), DRAFT, backend=None)
    # the target slightly perturbed: accepts most proposals, rows accept different numbers
    g = torch.Generator().manual_seed(2)
    noisy = pytree.tree_map(lambda t: t + 0.0005 * torch.randn(t.shape, generator=g), params)
    return target, draft, Decoder(noisy, TARGET, backend=None)


def prompts(lengths=(5, 9, 2)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, TARGET.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("draft_kind", ["other", "close"])
def test_greedy_equals_plain_greedy_of_the_target(models, draft_kind):
    target, other, close = models
    draft = other if draft_kind == "other" else close
    cfg = GenerateConfig(max_new_tokens=16, repetition_penalty=1.3)
    plain = generate(target, prompts(), cfg)
    # an eos that plain decoding produces mid-way ends that row early in both
    eos = plain[1][0].output_ids[7]
    plain = generate(target, prompts(), cfg, eos_ids=[eos])
    ours, stats = speculative.generate(target, draft, prompts(), cfg, draft_tokens=4, eos_ids=[eos])
    assert [[s.output_ids for s in p] for p in ours] == [[s.output_ids for s in p] for p in plain]
    assert [p[0].finish_reason for p in ours] == [p[0].finish_reason for p in plain]
    for a, b in zip(ours, plain):
        assert a[0].score == pytest.approx(b[0].score, abs=1e-4)
    print(draft_kind, stats)
    if draft_kind == "close":
        assert stats.acceptance_rate > 0.5 and stats.tokens_per_step > 2
    else:
        assert stats.acceptance_rate < 0.5


def test_acceptance_rule_samples_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    vocab, k, n = 5, 2, 400_000
    p = torch.rand(k + 1, vocab, generator=g) ** 3
    p[0, 3] = 0.0  # a token the target never picks but the draft likes
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(k, vocab, generator=g)
    q[0, 3] = 2.0
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1)
    accepted, nxt = speculative.verify(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, g)
    first = torch.where(accepted >= 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=vocab).double() / n
    torch.testing.assert_close(freq, p[0].double(), atol=4e-3, rtol=0)
    # the second token, where the first was an accepted proposal: the target's p[1] (the toy's
    # positions are independent)
    kept = accepted >= 1
    second = torch.where(accepted[kept] >= 2, drafts[kept, 1], nxt[kept])
    freq = torch.bincount(second, minlength=vocab).double() / int(kept.sum())
    torch.testing.assert_close(freq, p[1].double(), atol=6e-3, rtol=0)
    assert 0 < float(kept.double().mean()) < 1


def test_greedy_rule_is_deterministic():
    p = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3]]), 4).float()
    q = torch.nn.functional.one_hot(torch.tensor([[1, 0]]), 4).float()
    accepted, nxt = speculative.verify(p, q, torch.tensor([[1, 0]]), None)
    assert accepted.tolist() == [1] and nxt.tolist() == [2]


def test_sampling_is_seeded_and_beam_search_refused(models):
    target, draft, _ = models
    cfg = GenerateConfig(max_new_tokens=12, do_sample=True, top_p=0.9, seed=3)
    a, _ = speculative.generate(target, draft, prompts(), cfg, draft_tokens=3)
    b, _ = speculative.generate(target, draft, prompts(), cfg, draft_tokens=3)
    assert [s[0].output_ids for s in a] == [s[0].output_ids for s in b]
    assert all(len(s[0].output_ids) == 12 for s in a)
    with pytest.raises(UserError, match="not beam search"):
        speculative.generate(target, draft, prompts(), GenerateConfig(num_beams=2), draft_tokens=2)
