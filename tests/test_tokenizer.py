"""Tokenizer backends and chat templates, checked against hand-derived ids and Meta's documented formats."""
import base64
import json

import pytest

from lib.data.corpus import procedural_documents
from lib.errors import USER_ERRORS, UserError
from lib.tokenizer import (ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, Turn, apply_template, end_of_turn_ids, load_tokenizer,
                           train_sentencepiece)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    texts = list(procedural_documents(60_000)) + ["[INST] <<SYS>> <</SYS>> [/INST] ### Instruction: Response: Input:"] * 5
    path = train_sentencepiece(texts, 400, tmp_path_factory.mktemp("sp") / "tokenizer.model")
    return load_tokenizer(path)


def test_sentencepiece_llama_layout(sp):
    assert (sp.bos_id, sp.eos_id, sp._sp.unk_id()) == (1, 2, 0)
    assert sp.vocab_size == 400
    ids = sp.encode("The data model. Ünïcödé 字", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    # byte fallback: characters never seen in training still round-trip exactly
    assert sp.decode(ids[1:-1]) == "The data model. Ünïcödé 字"


def _tiny_tiktoken(path):
    ranks = {bytes([b]): b for b in range(256)}
    for piece in (b"th", b"the", b" t", b" the"):
        ranks[piece] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tiktoken_llama3_format(tmp_path):
    ranks = _tiny_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    n = len(ranks)
    assert tok.vocab_size == n + 256
    # Meta's layout: <|begin_of_text|> = first id after the ranks, <|end_of_text|> next, <|eot_id|> = +9
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.token_id("<|start_header_id|>") == n + 6 and tok.token_id("<|eot_id|>") == n + 9
    # "the the": the split regex gives "the", " the"; BPE merges t+h -> th, th+e -> the
    assert tok.encode("the the", bos=True) == [n, ranks[b"the"], ranks[b" the"]]
    # digits split in groups of at most three, bytes of unknown text fall back to single bytes
    assert tok.encode("12345") == [ord("1"), ord("2"), ord("3"), ord("4"), ord("5")]
    # special-token text inside data is plain text, never a control token
    assert tok.token_id("<|eot_id|>") not in tok.encode("<|eot_id|>")
    assert tok.decode(tok.encode("héllo <|eot_id|>")) == "héllo <|eot_id|>"


def test_tiktoken_bad_line_names_file(tmp_path):
    (tmp_path / "tokenizer.model").write_text("dGg= 1\nnot-base64!! 2\n")
    with pytest.raises(UserError, match=r"tokenizer.model:2"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_hf_tokenizer_json_matches_transformers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(list(procedural_documents(30_000)),
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours = load_tokenizer(tmp_path)  # a folder resolves to its tokenizer.json
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    text = "The data model shards the tensor. Ünï 42"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert ours.decode(ours.encode(text)) == text


def test_unknown_file_is_a_user_error(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(UserError, match="junk.model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")


def _trained(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_llama2_chat_matches_meta_format(sp):
    turns = [Turn("system", "Be brief."), Turn("user", "Hi there"), Turn("assistant", "Hello."),
             Turn("user", "Bye"), Turn("assistant", "Bye.")]
    ids, mask = apply_template(sp, "llama2-chat", turns)
    # Meta's llama-2 chat format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s> per round
    rounds = [[i for i in r] for r in _split_on(ids, sp.bos_id)]
    assert len(rounds) == 2
    assert sp.decode(rounds[0]) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello. "
    assert sp.decode(rounds[1]) == "[INST] Bye [/INST] Bye. "
    assert ids.count(sp.eos_id) == 2 and ids[-1] == sp.eos_id
    # only the answers (and their </s>) are trained
    assert [i for i, m in zip(ids, mask) if m].count(sp.eos_id) == 2
    assert _trained(sp, ids, mask).replace(" ", "") == "Hello.Bye."


def _split_on(ids, sep):
    out = []
    for i in ids:
        if i == sep:
            out.append([])
        elif out:
            out[-1].append(i)
    return out


def test_alpaca_prompt_masked(sp):
    ids, mask = apply_template(sp, "alpaca", [Turn("system", "some input"), Turn("user", "Do it"),
                                              Turn("assistant", "Done.")])
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id and mask[-1] == 1
    prompt = [i for i, m in zip(ids, mask) if not m][1:]
    assert sp.decode(prompt) == ALPACA_PROMPT_WITH_INPUT.format(instruction="Do it", input="some input")
    assert _trained(sp, ids, mask).strip() == "Done."
    ids, mask = apply_template(sp, "alpaca", [Turn("user", "Do it"), Turn("assistant", "Done.")])
    assert sp.decode([i for i, m in zip(ids, mask) if not m][1:]) == ALPACA_PROMPT.format(instruction="Do it")


def test_llama3_instruct_matches_meta_format(tmp_path):
    _tiny_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    ids, mask = apply_template(tok, "llama3-instruct", [Turn("system", "S"), Turn("user", "Hi"),
                                                        Turn("assistant", "Yo")])
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>")
    assert _trained(tok, ids, mask) == "Yo<|eot_id|>"
    # a prompt (ending on the user) opens the assistant header for generation
    ids, _ = apply_template(tok, "llama3-instruct", [Turn("user", "Hi")])
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_errors(sp):
    with pytest.raises(UserError, match="unknown chat template"):
        apply_template(sp, "vicuna", [Turn("user", "x")])
    with pytest.raises(UserError, match="expected a user turn"):
        apply_template(sp, "alpaca", [Turn("assistant", "x")])


@pytest.mark.parametrize("content, reason", [
    (b'{"version": "1.0", "model": {', "EOF while parsing"),          # cut short
    (b'{"version": "1.0"}', "Model missing"),                         # JSON, but not a tokenizer
    (b"\xff\xfe\x00 binary", "valid UTF-8"),
])
def test_invalid_tokenizer_json_names_the_file(tmp_path, content, reason):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(UserError, match=rf"^{tmp_path}/tokenizer.json: not a valid tokenizer.json \(.*{reason}"):
        load_tokenizer(tmp_path)  # the folder resolves to it


def test_invalid_tokenizer_config_names_the_file(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    for broken in (b'{"bos_token": "<s>",', b"\xff\xfe binary"):
        (tmp_path / "tokenizer_config.json").write_bytes(broken)
        with pytest.raises(USER_ERRORS, match=rf"^{tmp_path}/tokenizer_config.json: not valid JSON"):
            load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_sentencepiece_model_names_the_file(tmp_path, sp, keep):
    whole = open(sp.path, "rb").read()
    cut = tmp_path / "tokenizer.model"
    cut.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(UserError, match=rf"^{cut}: not a sentencepiece, tiktoken or tokenizer.json file, "
                                        r"or a truncated one \(.*could not parse ModelProto"):
        load_tokenizer(cut)


def test_plain_template_and_end_of_turn_ids(sp, tmp_path):
    ids, mask = apply_template(sp, "plain", [Turn("system", "S"), Turn("user", "Hi"), Turn("assistant", "Yo"),
                                             Turn("user", "Again")])
    assert ids[0] == sp.bos_id and ids.count(sp.bos_id) == 1 and ids.count(sp.eos_id) == 1
    eos = ids.index(sp.eos_id)
    assert sp.decode(ids[1:eos]) == "S\n\nHiYo" and sp.decode(ids[eos + 1:]) == "Again"
    assert _trained(sp, ids, mask) == "Yo" and mask[eos] == 1 and not any(mask[eos + 1:])
    assert end_of_turn_ids(sp, "llama2-chat") == [sp.eos_id]
    _tiny_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert end_of_turn_ids(tok, "llama3-instruct") == [tok.token_id("<|eot_id|>"), tok.eos_id]
    with pytest.raises(UserError, match="unknown chat template"):
        end_of_turn_ids(sp, "vicuna")


@pytest.mark.parametrize("template", ["alpaca", "llama2-chat", "plain"])
def test_a_conversation_encodes_as_its_earlier_part_plus_the_new_turn(sp, template):
    """What runners.chat relies on to prefill only the new turn: the encoding of a conversation
    with one more user turn starts with the encoding of the conversation before it."""
    before = [Turn("system", "Be brief."), Turn("user", "Hi there"), Turn("assistant", "Hello.")]
    ids, _ = apply_template(sp, template, before)
    more, _ = apply_template(sp, template, before + [Turn("user", "And now?")])
    assert more[:len(ids)] == ids and len(more) > len(ids)


def test_a_llama3_conversation_encodes_as_its_earlier_part_plus_the_new_turn(tmp_path):
    _tiny_tiktoken(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    before = [Turn("system", "S"), Turn("user", "Hi"), Turn("assistant", "Yo")]
    ids, _ = apply_template(tok, "llama3-instruct", before)
    more, _ = apply_template(tok, "llama3-instruct", before + [Turn("user", "Again")])
    assert more[:len(ids)] == ids and tok.decode(more[len(ids):]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nAgain<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_ids_past_the_vocabulary_decode_to_nothing(sp):
    """A model's padded vocabulary (Megatron pads it) can emit ids the tokenizer has no piece for."""
    ids = sp.encode("hello world")
    assert sp.decode(ids + [sp.vocab_size, sp.vocab_size + 7]) == sp.decode(ids) == "hello world"
