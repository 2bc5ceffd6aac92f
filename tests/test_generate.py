"""runners.generate, runners.chat and the Python API (runners.inference), eagerly on a tiny model.

References: each batched, sorted, streamed or chat-cached result is compared with the same
prompt generated alone by `lib.decoding.generate` (itself tested against transformers), so the
runners' batching, ordering and KV-cache reuse are what is checked here.
"""
from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import pytest
import torch

from lib import checkpoint as ckpt_lib
from lib import config as config_lib
from lib.data.corpus import procedural_documents
from lib.decoding import GenerateConfig, generate
from lib.errors import UserError
from lib.tokenizer import train_sentencepiece
from models import hf, llama, lora, peft
from parallel.decode import Decoder
from runners import chat as chat_runner
from runners import generate as gen_runner
from runners import inference

CONFIG = llama.PRESETS["tiny"]
EAGER = ["generate.compile=false", "device=cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF directory of the tiny model with a sentencepiece tokenizer trained here."""
    root = tmp_path_factory.mktemp("gen")
    hf.save(root / "hf", CONFIG, llama.init(CONFIG, seed=0))
    train_sentencepiece(list(procedural_documents(60_000)), CONFIG.vocab_size, root / "hf" / "tokenizer.model")
    return root / "hf"


@pytest.fixture(scope="module")
def api(model_dir):
    return inference.load(model_dir, compile=False)


def alone(api, ids: list[int], cfg: GenerateConfig):
    """The reference: one prompt, generated on its own by the decoding loop."""
    return generate(Decoder(api.params, api.config, backend=None), [ids], cfg,
                    eos_ids=api.eos_ids, decode_text=api.tokenizer.decode)[0]


def test_python_api_on_text_and_token_ids(api):
    seqs = api.generate("The data", max_new_tokens=6)
    assert len(seqs) == 1 and len(seqs[0].output_ids) <= 6 and isinstance(seqs[0].text, str)
    ids = api.encode("The data")
    assert ids[0] == api.tokenizer.bos_id
    both = api.generate(["The data", ids], max_new_tokens=6)
    assert [s[0].output_ids for s in both] == [seqs[0].output_ids] * 2
    assert seqs[0].output_ids == alone(api, ids, api.settings(max_new_tokens=6))[0].output_ids


def test_jsonl_out_one_line_per_input_in_order(model_dir, api, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Short"}, {"input_ids": [1, 7, 9, 11, 13, 200, 300, 17, 19]},
            {"prompt": "A somewhat longer prompt than the others"}, {"prompt": "Mid length one"}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out.jsonl"
    settings = ["generate.max_new_tokens=7", "generate.batch_size=3", "generate.do_sample=true",
                "generate.num_return_sequences=2", "generate.return_logprobs=true", "generate.seed=5"]
    assert gen_runner.main([f"checkpoint.load={model_dir}", f"prompts={prompts}", f"out={out}",
                            *settings, *EAGER]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert lines[1]["input_ids"] == rows[1]["input_ids"]
    assert lines[0]["input_ids"] == api.encode("Short")
    for line in lines:
        assert len(line["sequences"]) == 2
        for s in line["sequences"]:
            assert set(s) == {"output_ids", "text", "finish_reason", "score", "logprobs"}
            assert len(s["logprobs"]) == len(s["output_ids"]) and s["finish_reason"] in ("eos", "length")
            assert s["score"] == pytest.approx(sum(s["logprobs"]), abs=1e-4)
    # greedy: each line is what its prompt gives alone, whatever the batching and sorting
    greedy = ["generate.max_new_tokens=7", "generate.batch_size=3"]
    assert gen_runner.main([f"checkpoint.load={model_dir}", f"prompts={prompts}", f"out={out}",
                            *greedy, *EAGER]) == 0
    cfg = GenerateConfig(max_new_tokens=7)
    for line in map(json.loads, out.read_text().splitlines()):
        expected = alone(api, line["input_ids"], cfg)[0]
        assert line["sequences"][0]["output_ids"] == expected.output_ids
        assert line["sequences"][0]["text"] == expected.text
        assert "logprobs" not in line["sequences"][0]


def test_single_prompt_streams_and_a_txt_file_prints(model_dir, api, tmp_path, capsys):
    gen_runner.main([f"checkpoint.load={model_dir}", "prompt=The data", "generate.max_new_tokens=8", *EAGER])
    out, err = capsys.readouterr()
    expected = alone(api, api.encode("The data"), GenerateConfig(max_new_tokens=8))[0]
    assert out == "The data" + expected.text + "\n"
    assert "prompt tokens at" in err and "new tokens at" in err and "time to first token" in err
    txt = tmp_path / "p.txt"
    txt.write_text("One\n\nTwo\n")
    gen_runner.main([f"checkpoint.load={model_dir}", f"prompts={txt}", "generate.max_new_tokens=3", *EAGER])
    out, _ = capsys.readouterr()
    assert f"=== {txt}:1" in out and f"=== {txt}:3" in out


def test_speculative_decoding_from_the_command_line(model_dir, api, tmp_path, capsys):
    draft_cfg = dataclasses.replace(CONFIG, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    hf.save(tmp_path / "draft", draft_cfg, llama.init(draft_cfg, seed=1))
    out = tmp_path / "o.jsonl"
    gen_runner.main([f"checkpoint.load={model_dir}", "prompt=[The data, Other]", f"out={out}",
                     "generate.max_new_tokens=9", f"generate.draft={tmp_path / 'draft'}",
                     "generate.draft_tokens=3", *EAGER])
    assert "tokens per target step" in capsys.readouterr().err
    for line in map(json.loads, out.read_text().splitlines()):
        assert line["sequences"][0]["output_ids"] == alone(api, line["input_ids"],
                                                           GenerateConfig(max_new_tokens=9))[0].output_ids


def test_native_checkpoint_of_a_pretraining_run_with_its_recorded_tokenizer(model_dir, tmp_path, capsys):
    """The README's default flow: a training run's checkpoint names its tokenizer in its config."""
    params = llama.init(CONFIG, seed=0)
    run = {"model": config_lib.to_dict(CONFIG), "data": {"tokenizer": str(model_dir / "tokenizer.model")}}
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(dir=str(tmp_path / "ckpts"), async_save=False))
    ckpt.save(300, {"params": params, "step": torch.tensor(300)}, {"config": run}, force=True)
    ckpt.close()
    gen_runner.main([f"checkpoint.load={tmp_path / 'ckpts'}", "prompt=The data",
                     "generate.max_new_tokens=5", *EAGER])
    hf_out = capsys.readouterr().out
    gen_runner.main([f"checkpoint.load={model_dir}", "prompt=The data", "generate.max_new_tokens=5", *EAGER])
    assert capsys.readouterr().out == hf_out  # same weights, same tokenizer


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the culprit


def _bad(model_dir, tmp_path, case):
    jsonl = tmp_path / "p.jsonl"
    if case == "empty file":
        (tmp_path / "empty.txt").write_text("\n  \n")
        return [f"prompts={tmp_path / 'empty.txt'}"], r"empty\.txt: the file holds no prompt"
    if case == "malformed jsonl":
        jsonl.write_text('{"prompt": "ok"}\n{"prompt": "unterminated\n')
        return [f"prompts={jsonl}"], r"p\.jsonl:2: not valid JSON"
    if case == "jsonl without prompt":
        jsonl.write_text('{"prompt": "ok"}\n\n{"text": "x"}\n')
        return [f"prompts={jsonl}"], r"p\.jsonl:3: expected an object with \"prompt\""
    if case == "ids outside the vocabulary":
        jsonl.write_text('{"input_ids": [1, 2, 600]}\n')
        return [f"prompts={jsonl}"], r"p\.jsonl:1: token id 600 is outside the vocabulary \[0, 512\)"
    if case == "prompt longer than the context":
        jsonl.write_text(json.dumps({"input_ids": [5] * 300}) + "\n")
        return [f"prompts={jsonl}"], r"p\.jsonl:1 has 300 tokens, 44 more than the model's context"
    if case == "prompt + max_new_tokens longer than the context":
        jsonl.write_text(json.dumps({"input_ids": [5] * 200}) + "\n")
        return [f"prompts={jsonl}", "generate.max_new_tokens=100"], \
            r"p\.jsonl:1 has 200 tokens: with generate.max_new_tokens=100 it needs 300 positions, 44 more"
    if case == "eos outside the vocabulary":
        return ["prompt=Hi", "generate.eos_token_id=[2, 9999]"], r"eos token id\(s\) \[9999\] outside"
    if case == "no tokenizer for text":
        bare = tmp_path / "bare"
        hf.save(bare, CONFIG, llama.init(CONFIG, seed=0))
        return ["prompt=Hi", f"checkpoint.load={bare}"], r"prompt is text, but the model has no tokenizer"
    if case == "adapter of another base model":
        other = dataclasses.replace(CONFIG, dim=32, n_heads=2, n_kv_heads=1)
        lcfg = lora.LoraConfig(r=2, alpha=4, target_modules=("q",))
        peft.save(tmp_path / "adapter", lcfg, lora.init_adapters(other, lcfg, seed=0))
        return ["prompt=Hi", f"lora.adapter={tmp_path / 'adapter'}"], r"adapter.* layer 0 wq adapter maps 32->32"
    raise AssertionError(case)


BAD = ["empty file", "malformed jsonl", "jsonl without prompt", "ids outside the vocabulary",
       "prompt longer than the context", "prompt + max_new_tokens longer than the context",
       "eos outside the vocabulary", "no tokenizer for text", "adapter of another base model"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_clear_error(model_dir, tmp_path, case):
    args, message = _bad(model_dir, tmp_path, case)
    with pytest.raises(UserError, match=message):
        gen_runner.main([f"checkpoint.load={model_dir}", "generate.max_new_tokens=4", *args, *EAGER])


def test_bad_input_exits_2_without_a_traceback(model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    p = subprocess.run([sys.executable, "-m", "runners.generate", f"checkpoint.load={model_dir}",
                        f"prompts={tmp_path / 'empty.txt'}", *EAGER], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "empty.txt: the file holds no prompt" in p.stderr


# ---------------------------------------------------------------------------------------------
# Chat


class CountingDecoder(Decoder):
    """Records how many tokens each forward feeds."""
    fed: list[int]

    def forward(self, tokens, cache, *, last_only):
        self.fed.append(tokens.shape[1])
        return super().forward(tokens, cache, last_only=last_only)


def make_chat(api, template="llama2-chat", max_new=6, **kw):
    cfg = GenerateConfig(max_new_tokens=max_new, compile=False)
    chat = chat_runner.Chat(api, template, "Be brief.", cfg, **kw)
    counting = CountingDecoder(api.params, chat.decoder.config, backend=None)
    counting.fed = []
    chat.decoder = counting
    chat.cache = counting.init_cache(1, chat.context, torch.zeros(1, dtype=torch.int64))
    return chat, counting


def reply_prompt(chat, reply) -> list[int]:
    """The conversation's ids before `reply` (chat.ids ends with it, and with the closing token
    the chat adds when the reply did not end on one)."""
    closed = 0 if reply.output_ids and reply.output_ids[-1] in chat.end_of_turn else 1
    return chat.ids[:len(chat.ids) - len(reply.output_ids) - closed]


def test_chat_keeps_the_history_in_the_cache_and_replies_as_from_scratch(api):
    chat, counting = make_chat(api)
    first = chat.reply("Hello there")
    assert counting.fed[0] == len(reply_prompt(chat, first))
    counting.fed.clear()
    before, held = list(chat.ids), chat.decoder.written(chat.cache)
    assert len(before) - 2 <= held < len(before)  # the reply's last token (and a closing eos) wait
    second = chat.reply("And then?")
    prompt = reply_prompt(chat, second)
    # the second turn prefills what the cache did not hold: never the history again
    assert prompt[:len(before)] == before and counting.fed[0] == len(prompt) - held
    assert counting.fed[1:] == [1] * (len(counting.fed) - 1)
    # the reply is the one the whole conversation gives when encoded from scratch
    expected = generate(Decoder(api.params, api.config, backend=None), [prompt],
                        GenerateConfig(max_new_tokens=6), eos_ids=chat.eos_ids,
                        decode_text=api.tokenizer.decode)[0][0]
    assert second.output_ids == expected.output_ids


def test_chat_drops_the_oldest_exchanges_when_the_context_is_full(api):
    notices = []
    chat, _ = make_chat(api, template="plain", max_new=40, notice=notices.append)
    for i in range(6):
        chat.reply(f"Tell me about item number {i} in some detail please")
        assert chat.decoder.written(chat.cache) <= len(chat.ids) <= chat.context
    assert any("dropped the oldest" in n for n in notices)
    assert chat.turns[0].content != "Tell me about item number 0 in some detail please"
    assert chat.turns[-1].role == "assistant" and len(chat.turns) < 16
    assert chat.reply("word " * 300) is None and "does not fit the model's context" in notices[-1]


def test_chat_ctrl_c_stops_the_reply_only(api):
    chat, _ = make_chat(api, max_new=12)
    seen = []

    def interrupt(text):
        seen.append(text)
        if len(seen) == 3:
            raise KeyboardInterrupt
    assert chat.reply("Hello there", on_text=interrupt) is None
    assert "[stopped]" in seen[-1] and chat.ids[-1] == api.tokenizer.eos_id
    second = chat.reply("Go on")  # the conversation goes on from a consistent cache
    prompt = reply_prompt(chat, second)
    expected = generate(Decoder(api.params, api.config, backend=None), [prompt],
                        GenerateConfig(max_new_tokens=12), eos_ids=chat.eos_ids,
                        decode_text=api.tokenizer.decode)[0][0]
    assert second.output_ids == expected.output_ids


def test_chat_runner_with_piped_stdin(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nclear\nAgain\nq\nnever read\n"))
    assert chat_runner.main([f"checkpoint.load={model_dir}", "chat.template=llama2-chat",
                             "generate.max_new_tokens=5", *EAGER]) == 0
    out = capsys.readouterr().out
    assert out.count("You >> ") == 4 and out.count("Model >> ") == 2 and "[new conversation]" in out
    assert "never read" not in out


def test_chat_refuses_beams(api):
    with pytest.raises(UserError, match="one reply at a time"):
        chat_runner.Chat(api, "plain", None, GenerateConfig(num_beams=2))
