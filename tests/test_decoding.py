"""lib.decoding against Hugging Face transformers' `generate` (the reference), in fp32.

An eager `DecodeModel` over `models.llama.hidden_states_with_cache` drives the decoding loop on
random-weight models of every family; transformers' LlamaForCausalLM with the same weights
generates the expected tokens, beams and scores, and its logits processors give the expected
sampling distributions.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lib import config as config_lib
from lib.config import ConfigError
from lib.decoding import GenerateConfig, generate, processors
from lib.errors import UserError
from models import hf, llama
from tests.helpers_hf import random_hf_model

transformers = pytest.importorskip("transformers")

TINY = llama.PRESETS["tiny"]
FAMILIES = {
    "llama1-mha": llama.PRESETS["tiny-mha"],
    "llama2-gqa": TINY,
    "llama3": dataclasses.replace(llama.PRESETS["tiny-llama3"], rope_scaling=None),
    "llama3.1-rope-scaling": llama.PRESETS["tiny-llama3"],  # original context 64
    "tied-embeddings": dataclasses.replace(TINY, tie_embeddings=True),
    "extended-vocab": dataclasses.replace(TINY, vocab_size=523),
}
PAD = 0


class EagerModel:
    """The DecodeModel protocol in a few lines, eagerly, over the pure cached forward."""

    def __init__(self, params, config: llama.Config):
        self.params, self.config = params, config
        self.vocab_size, self.max_len = config.vocab_size, config.max_seq_len

    def init_cache(self, batch, max_len, start):
        return llama.init_cache(self.config, batch, max_len, start=start)

    def forward(self, tokens, cache, *, last_only):
        with torch.no_grad():
            hidden, cache = llama.hidden_states_with_cache(self.params, tokens, cache, self.config)
            return llama.logits(self.params, hidden[:, -1] if last_only else hidden, self.config), cache

    def reorder(self, cache, rows):
        return llama.reorder_cache(cache, rows)

    def rewind(self, cache, n):
        cache["index"].sub_(n)
        return cache


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a contended 2-core machine run far faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict[str, tuple] = {}


def family(name: str, tmp_path_factory) -> tuple:
    """(transformers model, our EagerModel) with the same random weights, built once."""
    if name not in _MODELS:
        reference = random_hf_model(FAMILIES[name])
        path = tmp_path_factory.mktemp(name)
        reference.save_pretrained(path)
        config, params = hf.load(path)
        _MODELS[name] = reference, EagerModel(params, config)
    return _MODELS[name]


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # ids >= 1 so that PAD never appears inside a prompt
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_generate(model, prompts, **kwargs):
    """transformers' generate on a left-padded batch; returns its output object."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), PAD)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p)
        mask[r, longest - len(p):] = 1
    kwargs.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD,
                             return_dict_in_generate=True, **kwargs)
    out.new_tokens = out.sequences[:, longest:]
    return out


def until_eos(tokens: torch.Tensor, eos: list[int]) -> list[int]:
    """HF's generated tokens of one row up to its first eos (included)."""
    out = []
    for t in tokens.tolist():
        out.append(t)
        if t in eos:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_left_padded_batch_equals_transformers(name, tmp_path_factory):
    reference, model = family(name, tmp_path_factory)
    # LLaMA-3.1's case runs prompt + generation past the original context of 64
    lengths, new = ((40, 52, 33), 30) if "3.1" in name else ((5, 11, 3), 16)
    prompts = random_prompts(model.vocab_size, lengths)
    cfg = GenerateConfig(max_new_tokens=new, eos_token_id=[])
    ours = generate(model, prompts, cfg, pad_id=PAD)
    expected = hf_generate(reference, prompts, do_sample=False, max_new_tokens=new).new_tokens
    for r, (seqs, row) in enumerate(zip(ours, expected)):
        assert [s.output_ids for s in seqs] == [row.tolist()], f"row {r}"
        assert seqs[0].finish_reason == "length"


def test_greedy_eos_in_the_middle_with_several_eos_ids(tmp_path_factory):
    reference, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (6, 10, 4), seed=1)
    new = 20
    free = generate(model, prompts, GenerateConfig(max_new_tokens=new, eos_token_id=[]))
    # eos ids the model does emit: row 0's 5th token and row 1's 9th
    eos = [free[0][0].output_ids[4], free[1][0].output_ids[8]]
    # min_new_tokens=4 still lets row 0 end on its 5th token, but not one token earlier
    cfg = GenerateConfig(max_new_tokens=new, eos_token_id=eos, min_new_tokens=4,
                         return_logprobs=True)
    ours = generate(model, prompts, cfg, pad_id=PAD)
    out = hf_generate(reference, prompts, do_sample=False, max_new_tokens=new, eos_token_id=eos,
                      min_new_tokens=4, output_logits=True)
    reasons = []
    for r, seqs in enumerate(ours):
        (seq,) = seqs
        assert seq.output_ids == until_eos(out.new_tokens[r], eos), f"row {r}"
        reasons.append(seq.finish_reason)
        # logprobs: log_softmax of HF's raw logits at the chosen tokens; the score is their sum
        expected = [torch.log_softmax(out.logits[i][r], -1)[t].item()
                    for i, t in enumerate(seq.output_ids)]
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(expected),
                                   atol=1e-4, rtol=0)
        assert seq.score == pytest.approx(sum(seq.logprobs))
    assert reasons[0] == reasons[1] == "eos" and len(ours[0][0].output_ids) == 5
    # a single prompt gives what it gives inside the batch
    (alone,), = generate(model, prompts[1:2], cfg, pad_id=PAD)
    assert alone == ours[1][0]
    # the tokenizer's eos is used when the config names none
    assert generate(model, prompts, dataclasses.replace(cfg, eos_token_id=None), eos_ids=eos,
                    pad_id=PAD) == ours


def test_greedy_and_beam_search_through_parallel_decode_eager(tmp_path_factory):
    # the compiled path's DecodeModel, run eagerly (generate.compile=false)
    from parallel.decode import Decoder

    reference, model = family("llama3", tmp_path_factory)
    decoder = Decoder(model.params, model.config, backend=None)
    prompts = random_prompts(model.vocab_size, (6, 13, 2), seed=12)
    free = generate(decoder, prompts, GenerateConfig(max_new_tokens=14, eos_token_id=[]))
    eos = [free[0][0].output_ids[5], free[2][0].output_ids[9]]
    for settings in (dict(), dict(num_beams=3, num_return_sequences=2)):
        cfg = GenerateConfig(max_new_tokens=14, eos_token_id=eos, **settings)
        ours = generate(decoder, prompts, cfg, pad_id=PAD)
        out = hf_generate(reference, prompts, do_sample=False, max_new_tokens=14,
                          eos_token_id=eos, output_scores=True, **settings)
        n = cfg.num_return_sequences
        assert [[s.output_ids for s in seqs] for seqs in ours] == \
            [[until_eos(out.new_tokens[i * n + j], eos) for j in range(n)] for i in range(len(prompts))]
    assert any(s.finish_reason == "eos" for seqs in ours for s in seqs)


# ---------------------------------------------------------------------------------------------
# Beam search


# With these prompts and eos ids, early_stopping=True and "never" each change the result
# compared with False, so every rule is exercised.
BEAM_CASES = {
    "2-beams": dict(num_beams=2, length_penalty=1.0, early_stopping=False, num_return_sequences=1),
    "3-beams-early": dict(num_beams=3, length_penalty=1.0, early_stopping=True, num_return_sequences=2),
    "3-beams-never": dict(num_beams=3, length_penalty=1.0, early_stopping="never", num_return_sequences=3),
    "4-beams-long": dict(num_beams=4, length_penalty=2.0, early_stopping=False, num_return_sequences=4),
    "4-beams-short": dict(num_beams=4, length_penalty=-0.5, early_stopping=False, num_return_sequences=3),
}


@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_equals_transformers(case, tmp_path_factory):
    reference, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (7, 4), seed=2)
    new = 12
    free = generate(model, prompts, GenerateConfig(max_new_tokens=new, eos_token_id=[]))
    eos = [free[0][0].output_ids[2], free[1][0].output_ids[5]]  # tokens the beams meet early
    settings = BEAM_CASES[case]
    cfg = GenerateConfig(max_new_tokens=new, eos_token_id=eos, **settings)
    ours = generate(model, prompts, cfg, pad_id=PAD)
    out = hf_generate(reference, prompts, do_sample=False, max_new_tokens=new, eos_token_id=eos,
                      output_scores=True, **settings)
    n = settings["num_return_sequences"]
    assert [len(seqs) for seqs in ours] == [n, n]
    for i, seqs in enumerate(ours):
        for j, seq in enumerate(seqs):
            row = i * n + j
            assert seq.output_ids == until_eos(out.new_tokens[row], eos), f"prompt {i}, beam {j}"
            assert seq.score == pytest.approx(out.sequences_scores[row].item(), abs=1e-4)
            assert seq.finish_reason == ("eos" if seq.output_ids[-1] in eos else "length")
    assert any(s.finish_reason == "eos" for seqs in ours for s in seqs)


# ---------------------------------------------------------------------------------------------
# Sampling: the distribution each processor chain samples from


SAMPLING_CASES = {
    "temperature": dict(temperature=0.7, top_k=0),
    "top-k": dict(top_k=5),
    "top-p": dict(top_k=0, top_p=0.8, temperature=1.3),
    "min-p": dict(top_k=0, min_p=0.1),
    "repetition-penalty": dict(repetition_penalty=1.3, top_k=20),
    "no-repeat-ngram": dict(no_repeat_ngram_size=2, top_k=0, top_p=0.9),
    "everything": dict(repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=9,
                       temperature=0.8, top_k=30, top_p=0.95, min_p=0.05),
    "beam-sample": dict(num_beams=3, top_k=1, top_p=0.1, min_new_tokens=9),
    "beam-sample-no-eos": dict(num_beams=2, top_k=1, eos_token_id=[]),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_distribution_equals_transformers_processors(case, tmp_path_factory):
    reference, _ = family("llama2-gqa", tmp_path_factory)
    settings = dict(SAMPLING_CASES[case])
    beam = settings.get("num_beams", 1) > 1
    eos = settings.pop("eos_token_id", [3, 7])
    cfg = GenerateConfig(do_sample=True, eos_token_id=eos, **settings)
    vocab, generated = TINY.vocab_size, 6
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, vocab, generator=g) * 3
    logits[:, :13] += 10  # the padding id and the previous tokens are likely: bans show
    if beam:  # beam search processes log-probabilities
        logits = logits.log_softmax(-1)
    # rows of different prompt lengths (left-padded), with repeated tokens and n-grams
    lengths = [14, 9, 20, 12]
    rows = []
    for n in lengths:
        t = torch.randint(1, 13, (n + generated,), generator=g)  # never PAD
        t[-2:] = t[3:5]  # the last bigram occurred before: an n-gram ban applies
        t[0] = 3         # penalised tokens include an eos id (3)
        rows.append(t)
    width = max(lengths) + generated
    tokens = torch.full((4, width), PAD)
    start = torch.tensor([width - len(r) for r in rows])
    for r, t in enumerate(rows):
        tokens[r, start[r]:] = t
    ours = processors.process(logits, tokens, start, generated, cfg,
                              torch.tensor(eos, dtype=torch.int64))

    hf_config = transformers.GenerationConfig(
        do_sample=True, num_beams=cfg.num_beams, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, min_p=cfg.min_p or None, repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size, min_new_tokens=cfg.min_new_tokens,
        eos_token_id=eos or None, pad_token_id=PAD)
    reference._prepare_special_tokens(hf_config, kwargs_has_attention_mask=True, device="cpu")
    for r, t in enumerate(rows):  # each row alone, as transformers would see it
        prompt = t[None, :lengths[r]]
        chain = reference._get_logits_processor(
            hf_config, input_ids_seq_length=prompt.shape[1], device="cpu",
            model_kwargs={"attention_mask": torch.ones_like(prompt)})
        expected = chain(t[None], logits[r:r + 1].clone())[0]
        assert torch.equal(torch.isfinite(ours[r]), torch.isfinite(expected)), f"row {r}: support"
        torch.testing.assert_close(ours[r].softmax(-1), expected.softmax(-1), atol=1e-5, rtol=0)
    if "min_new_tokens" in settings:
        assert torch.isinf(ours[:, eos]).all()
    # the chain did change the distribution: the comparison above can fail
    assert (ours.softmax(-1) - logits.softmax(-1)).abs().max() > 1e-2


def test_top_k_keeps_ties_with_the_kth_score_like_transformers():
    # top-p after top-k runs on the k best scores alone, unless a tie at the k-th keeps more
    scores = torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
    scores[0, 5:9] = scores[0].max() + 1      # four-way tie for the top: k=2 keeps all four
    cfg = GenerateConfig(do_sample=True, top_k=2, top_p=0.8)
    chain = transformers.LogitsProcessorList([transformers.TopKLogitsWarper(2),
                                              transformers.TopPLogitsWarper(0.8)])
    ours = processors.warp(scores, cfg)
    expected = chain(None, scores.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    assert torch.isfinite(ours[0]).sum() == 4
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1), atol=1e-6, rtol=0)


def test_sampling_equals_transformers_with_the_same_seed_and_reproduces(tmp_path_factory):
    reference, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (5, 8), seed=5)
    cfg = GenerateConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95,
                         top_k=0, seed=11, eos_token_id=[])
    ours = generate(model, prompts, cfg, pad_id=PAD)
    assert generate(model, prompts, cfg, pad_id=PAD) == ours  # the seed reproduces the tokens
    other = generate(model, prompts, dataclasses.replace(cfg, seed=12), pad_id=PAD)
    assert other != ours
    # transformers draws with torch.multinomial from the global generator: seeded the same,
    # it draws the same tokens from (numerically) the same distributions
    torch.manual_seed(11)
    out = hf_generate(reference, prompts, do_sample=True, temperature=1.5, top_p=0.95, top_k=0,
                      max_new_tokens=16)
    assert [s[0].output_ids for s in ours] == out.new_tokens.tolist()


def test_beam_sampling_equals_transformers_with_the_same_seed(tmp_path_factory):
    reference, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (6,), seed=6)
    settings = dict(num_beams=3, num_return_sequences=2, temperature=0.8, top_k=40)
    cfg = GenerateConfig(max_new_tokens=10, do_sample=True, seed=3, eos_token_id=[9],
                         **settings)
    ours = generate(model, prompts, cfg, pad_id=PAD)
    torch.manual_seed(3)
    out = hf_generate(reference, prompts, do_sample=True, max_new_tokens=10, eos_token_id=[9],
                      output_scores=True, **settings)
    for j, seq in enumerate(ours[0]):
        assert seq.output_ids == until_eos(out.new_tokens[j], [9])
        assert seq.score == pytest.approx(out.sequences_scores[j].item(), abs=1e-4)


def test_num_return_sequences_sampling(tmp_path_factory):
    _, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (3, 7), seed=7)
    cfg = GenerateConfig(max_new_tokens=8, do_sample=True, num_return_sequences=3,
                         eos_token_id=[], return_logprobs=True)
    out = generate(model, prompts, cfg, pad_id=PAD)
    assert [len(s) for s in out] == [3, 3]
    for seqs in out:
        assert len({tuple(s.output_ids) for s in seqs}) > 1  # independent draws
        for s in seqs:
            assert len(s.output_ids) == len(s.logprobs) == 8 and s.finish_reason == "length"
            assert all(lp <= 0 for lp in s.logprobs)


# ---------------------------------------------------------------------------------------------
# Stop strings and streaming


def two_letter_text(ids) -> str:
    """A stand-in tokenizer: every id is two letters, so strings can straddle tokens."""
    return "".join(chr(97 + t % 26) + chr(97 + t // 26 % 26) for t in ids)


def test_stop_string_spanning_tokens_cuts_the_output_and_holds_back_the_stream(tmp_path_factory):
    _, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (5,), seed=8)
    free = generate(model, prompts, GenerateConfig(max_new_tokens=12, eos_token_id=[]),
                    decode_text=two_letter_text)[0][0]
    text = free.text
    assert text == two_letter_text(free.output_ids)
    stop = text[7:10]  # from token 3's second letter to token 4's second letter
    cut = text.find(stop)
    streamed = []
    cfg = GenerateConfig(max_new_tokens=12, eos_token_id=[], stop=stop)
    (seq,), = generate(model, prompts, cfg, decode_text=two_letter_text,
                       on_token=lambda row, t: streamed.append((row, t)))
    assert seq.finish_reason == "stop"
    assert seq.text == text[:cut]
    assert seq.output_ids == free.output_ids[:cut // 2]  # whole tokens before the stop string
    assert streamed == [(0, t) for t in seq.output_ids]
    # without a stop string every token streams, the eos token included
    eos = free.output_ids[6]
    streamed.clear()
    cfg = GenerateConfig(max_new_tokens=12, eos_token_id=eos)
    (seq,), = generate(model, prompts, cfg, on_token=lambda row, t: streamed.append(t))
    assert seq.output_ids == free.output_ids[:free.output_ids.index(eos) + 1] == streamed


def test_beam_search_with_a_stop_string_equals_transformers_stopping_criteria(tmp_path_factory):
    reference, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (7,), seed=10)
    new = 12
    settings = dict(num_beams=3, num_return_sequences=3)
    free = generate(model, prompts, GenerateConfig(max_new_tokens=new, eos_token_id=[], **settings),
                    decode_text=two_letter_text)[0]
    stop = free[0].text[9:12]  # straddles tokens 4 and 5 of the best beam

    class StopString(transformers.StoppingCriteria):  # what HF's stop_strings does, on our "tokenizer"
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([stop in two_letter_text(row[7:].tolist()) for row in input_ids])

    cfg = GenerateConfig(max_new_tokens=new, eos_token_id=[], stop=stop, **settings)
    ours = generate(model, prompts, cfg, decode_text=two_letter_text)[0]
    out = hf_generate(reference, prompts, do_sample=False, max_new_tokens=new, output_scores=True,
                      stopping_criteria=transformers.StoppingCriteriaList([StopString()]), **settings)
    assert any(s.finish_reason == "stop" for s in ours)
    for j, seq in enumerate(ours):
        tokens = out.new_tokens[j].tolist()
        # HF keeps the tokens that complete the stop string (then padding); ours end before it
        end = next((k for k in range(1, new + 1) if stop in two_letter_text(tokens[:k])), new)
        text = two_letter_text(tokens[:end])
        if seq.finish_reason == "stop":
            assert seq.text == text[:text.find(stop)]
            assert seq.output_ids == tokens[:text.find(stop) // 2]
        else:
            assert seq.output_ids == tokens and stop not in text
        assert seq.score == pytest.approx(out.sequences_scores[j].item(), abs=1e-4)


def test_streaming_rows_of_several_sequences_per_prompt(tmp_path_factory):
    _, model = family("llama2-gqa", tmp_path_factory)
    prompts = random_prompts(model.vocab_size, (4, 6), seed=11)
    cfg = GenerateConfig(max_new_tokens=10, do_sample=True, num_return_sequences=2,
                         eos_token_id=[5, 9, 17, 33, 65, 129, 257])  # some rows end early
    streamed: dict[int, list[int]] = {}
    out = generate(model, prompts, cfg, on_token=lambda row, t: streamed.setdefault(row, []).append(t))
    assert streamed == {i * 2 + j: s.output_ids for i, seqs in enumerate(out) for j, s in enumerate(seqs)}
    # beam search hands on its sequences once they are final, at the end
    streamed.clear()
    cfg = GenerateConfig(max_new_tokens=6, num_beams=2, num_return_sequences=2, eos_token_id=[])
    out = generate(model, prompts, cfg, on_token=lambda row, t: streamed.setdefault(row, []).append(t))
    assert streamed == {i * 2 + j: s.output_ids for i, seqs in enumerate(out) for j, s in enumerate(seqs)}


# ---------------------------------------------------------------------------------------------
# Errors


@dataclasses.dataclass(frozen=True)
class Runner:
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)


@pytest.mark.parametrize("overrides, message", [
    (["generate.top_p=1.5"], r"^generate.top_p=1.5 must be in \(0, 1\]"),
    (["generate.top_p=0"], r"top_p=0.0 must be in \(0, 1\].*ModelLink"),
    (["generate.do_sample=true", "generate.temperature=0"],
     r"temperature=0.0 must be a positive number \(for greedy decoding set do_sample=false\)"),
    (["generate.num_beams=2", "generate.num_return_sequences=3"],
     r"num_return_sequences=3 must be <= num_beams=2"),
    (["generate.num_return_sequences=2"], r"num_return_sequences=2 needs do_sample=true"),
    (["generate.top_k=-1"], r"top_k=-1 must be >= 0"),
    (["generate.max_new_tokens=0"], r"max_new_tokens=0 must be >= 1"),
    (["generate.min_new_tokens=-2"], r"min_new_tokens=-2 must be >= 0"),
    (["generate.min_p=2"], r"min_p=2.0 must be in \[0, 1\]"),
    (["generate.repetition_penalty=0"], r"repetition_penalty=0.0 must be > 0"),
    (["generate.no_repeat_ngram_size=-1"], r"no_repeat_ngram_size=-1 must be >= 0"),
    (["generate.num_beams=0"], r"num_beams=0 must be >= 1"),
    (["generate.eos_token_id=[2, -1]"], r"eos_token_id=\(2, -1\) must hold token ids >= 0"),
    (["generate.early_stopping=sometimes"], r"generate.early_stopping: expected"),
    (["generate.stop=['']"], r"stop=\[''\] holds an empty string"),
    (["generate.length_penalty=.nan"], r"^generate.length_penalty=nan must be a finite number"),
    (["generate.temperature=-inf"], r"^generate.temperature=-inf must be a finite number"),
    (["generate.top_pp=0.5"], r"unknown config key 'generate.top_pp'; did you mean 'top_p'\?"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(Runner, None, overrides)


def test_config_reads_hf_values_and_reports_ignored_settings():
    cfg = config_lib.load(Runner, None, ["generate.eos_token_id=[2, 7]", "generate.stop=END",
                                         "generate.early_stopping=never", "generate.num_beams=2"]).generate
    assert cfg.eos_ids == (2, 7) and cfg.stop == ("END",) and cfg.early_stopping == "never"
    assert cfg.strategy == "beam"
    assert config_lib.load(Runner, None, ["generate.eos_token_id=5"]).generate.eos_ids == (5,)
    with pytest.warns(UserWarning, match="temperature=0.5 only apply with do_sample=true"):
        GenerateConfig(temperature=0.5)


def test_bad_inputs_are_named(tmp_path_factory):
    _, model = family("llama2-gqa", tmp_path_factory)
    cfg = GenerateConfig(max_new_tokens=200)
    with pytest.raises(UserError, match=r"prompt 1 has 60 tokens: with max_new_tokens=200 it "
                                         r"needs 260 positions, 4 more than the model's 256"):
        generate(model, [[1, 2], [1] * 60], cfg)
    with pytest.raises(UserError, match=r"prompt 0: token id 512 is outside the vocabulary \[0, 512\)"):
        generate(model, [[1, 512]], GenerateConfig())
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, [[1], []], GenerateConfig())
    with pytest.raises(UserError, match=r"eos token id\(s\) \[600\] outside the vocabulary"):
        generate(model, [[1]], GenerateConfig(eos_token_id=600))
    with pytest.raises(UserError, match="need a tokenizer"):
        generate(model, [[1]], GenerateConfig(stop="x"))
