"""Interactive chat: `python -m runners.chat checkpoint.load=... chat.template=llama2-chat`.

    You >> Hello
    Model >> Hi! How can I help?
    You >> clear          # new conversation (also: new)
    You >> q              # leave (also: quit, exit, Ctrl-D)

The conversation is formatted with the template the model was tuned with (`chat.template`:
llama2-chat, llama3-instruct, alpaca or plain: those of `runners.preprocess`, from
lib/tokenizer.py) and an optional `chat.system` prompt. Its tokens stay in the KV cache between
turns: each turn prefills only the new user message (and the end of the previous reply), never
the history again. When the history no longer fits the model's context, the oldest exchanges
are dropped with a notice and what remains is encoded anew. Replies stream as they are
generated; Ctrl-C stops the current reply only. Piped stdin works too (one message per line).
Settings: the `generate.` section (sampling, max_new_tokens...; one reply: no beams).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lib import cli
from lib import config as config_lib
from lib.decoding import GenerateConfig, generate as decode_prompts
from lib.decoding.generate import Sequence as Reply
from lib.errors import UserError
from lib.tokenizer import Turn, apply_template, end_of_turn_ids
from parallel.decode import Decoder
from runners import inference

QUIT = ("q", "quit", "exit")
RESET = ("clear", "new")


@dataclass(frozen=True)
class ChatSettings:
    template: Literal["llama2-chat", "llama3-instruct", "alpaca", "plain"] = "plain"
    system: str | None = None   # a system prompt (alpaca: the instruction's input)


@dataclass(frozen=True)
class ChatRunConfig:
    checkpoint: inference.ModelSource = inference.ModelSource()
    lora: inference.AdapterSource = inference.AdapterSource()
    data: inference.TokenizerSource = inference.TokenizerSource()
    chat: ChatSettings = ChatSettings()
    generate: GenerateConfig = GenerateConfig(max_new_tokens=256)
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    attention: Literal["auto", "reference", "sdpa", "npu_fusion"] = "auto"


class _Continuing:
    """The DecodeModel the decoding loop drives during one reply. Its "new" cache is the
    conversation's, and its prefill computes only the tokens that cache does not hold yet, so
    the loop sees the whole conversation (the repetition penalty reads all of it) while the
    model computes the new turn only."""

    def __init__(self, decoder: Decoder, cache, context: int):
        self.decoder, self.cache = decoder, cache
        self.vocab_size, self.max_len = decoder.vocab_size, context
        self.prefilled = False

    def init_cache(self, batch: int, max_len: int, start: torch.Tensor):
        assert batch == 1 and int(start[0]) == 0, "a chat decodes one row"
        return self.cache

    def forward(self, tokens: torch.Tensor, cache, *, last_only: bool):
        if not self.prefilled:
            self.prefilled = True
            tokens = tokens[:, self.decoder.written(cache):]
        return self.decoder.forward(tokens, cache, last_only=last_only)

    def reorder(self, cache, rows):
        return self.decoder.reorder(cache, rows)

    def rewind(self, cache, n: int):
        return self.decoder.rewind(cache, n)


class Chat:
    """A conversation with a model; its tokens live in the KV cache between turns.

    `ids` are the conversation's tokens as the model sees them (its own reply tokens, not a
    re-encoding of their text); the cache holds a prefix of them (the last reply token is fed
    with the next turn).
    """

    def __init__(self, model: inference.Generator, template: str, system: str | None,
                 cfg: GenerateConfig, notice: Callable[[str], None] = print):
        if cfg.num_beams != 1 or cfg.num_return_sequences != 1 or cfg.draft is not None:
            raise UserError("chat streams one reply at a time: generate.num_beams and "
                            "generate.num_return_sequences must be 1, without generate.draft")
        if model.tokenizer is None:
            raise UserError("chat needs the model's tokenizer: give data.tokenizer=<tokenizer.model "
                            "or tokenizer.json>")
        self.model, self.template, self.cfg, self.notice = model, template, cfg, notice
        self.tok = model.tokenizer
        self.system = [Turn("system", system)] if system else []
        self.end_of_turn = end_of_turn_ids(self.tok, template)
        self.eos_ids = list(dict.fromkeys(self.end_of_turn + model.eos_ids))
        self.context = model.config.max_seq_len
        self.decoder = model.decoder(cfg.compile)
        self.cache = self.decoder.init_cache(1, self.context, torch.zeros(1, dtype=torch.int64))
        self.reset()

    def reset(self) -> None:
        self.turns: list[Turn] = []     # finished exchanges: user, assistant, user, assistant...
        self.ids: list[int] = []
        self.decoder.rewind(self.cache, self.decoder.written(self.cache))

    def _encode(self, turns: list[Turn]) -> list[int]:
        return apply_template(self.tok, self.template, self.system + turns)[0]

    def _prompt(self, message: str) -> list[int] | None:
        """The conversation's ids with the new user turn, dropping the oldest exchanges (and
        re-encoding what remains) when it would not fit with max_new_tokens."""
        budget = self.context - self.cfg.max_new_tokens - 1  # and a token closing the reply
        turns = self.turns + [Turn("user", message)]
        if self.turns:
            # The new turn's tokens are what the template adds to the finished conversation.
            before, after = self._encode(self.turns), self._encode(turns)
            if after[:len(before)] == before and len(self.ids) + len(after) - len(before) <= budget:
                return self.ids + after[len(before):]
        else:
            after = self._encode(turns)
            if len(after) <= budget:
                return after
        dropped = 0
        while len(self._encode(turns)) > budget and len(turns) > 1:
            turns, dropped = turns[2:], dropped + 1
        ids = self._encode(turns)
        if len(ids) > budget:
            self.notice(f"[this message takes {len(ids)} tokens: with generate.max_new_tokens="
                        f"{self.cfg.max_new_tokens} it does not fit the model's context of "
                        f"{self.context} tokens; not sent]")
            return None
        if dropped:
            self.notice(f"[the conversation no longer fits the model's context of {self.context} "
                        f"tokens: dropped the oldest {dropped} exchange(s)]")
        self.turns = turns[:-1]
        self.ids = []
        self.decoder.rewind(self.cache, self.decoder.written(self.cache))
        return ids

    def reply(self, message: str, on_text: Callable[[str], None] = lambda s: None) -> Reply | None:
        """Generate the reply to `message`, handing its text to `on_text` as it comes. Ctrl-C
        (KeyboardInterrupt) ends the reply early; the conversation keeps what was said."""
        prompt = self._prompt(message)
        if prompt is None:
            return None
        written = self.decoder.written(self.cache)
        if written > len(self.ids) or self.ids != prompt[:len(self.ids)]:
            raise AssertionError("the KV cache and the conversation disagree")
        stream = inference.TextStream(self.tok.decode, skip=self.eos_ids)
        said: list[int] = []

        def on_token(row: int, token: int) -> None:
            said.append(token)
            on_text(stream.push(token))

        model = _Continuing(self.decoder, self.cache, self.context)
        reply = None
        try:
            (reply,), = decode_prompts(model, [prompt], self.cfg, eos_ids=self.eos_ids, pad_id=0,
                                       decode_text=self.tok.decode, on_token=on_token)
            said = reply.output_ids
        except KeyboardInterrupt:
            on_text(" [stopped]")
        if not said or said[-1] not in self.end_of_turn:
            said = said + self.end_of_turn[:1]   # close the turn as the template would
        self.ids = prompt + said
        # The cache holds the prompt and the reply but its last token; a stop string or Ctrl-C
        # may have left tokens beyond what the conversation keeps: forget them.
        extra = self.decoder.written(self.cache) - len(self.ids)
        if extra > 0:
            self.decoder.rewind(self.cache, extra)
        text = reply.text if reply is not None else stream.decode(stream.ids)
        self.turns = self.turns + [Turn("user", message), Turn("assistant", text)]
        return reply


def main(argv: Sequence[str]) -> int:
    cfg = config_lib.parse_argv(ChatRunConfig, argv)
    if not cfg.checkpoint.load:
        raise UserError("set checkpoint.load=<HF model directory or native checkpoint>")
    runtime = inference.RuntimeConfig(cfg.device, cfg.dtype, cfg.attention)
    model = inference.load(cfg.checkpoint.load, adapter=cfg.lora.adapter, tokenizer=cfg.data.tokenizer,
                           runtime=runtime)
    if model.mesh.world_size > 1:
        raise UserError("runners.chat runs in one process; use runners.generate under torchrun")
    chat = Chat(model, cfg.chat.template, cfg.chat.system, cfg.generate)
    piped = not sys.stdin.isatty()
    print(f"chatting with {cfg.checkpoint.load} (template {cfg.chat.template}); "
          f"'clear' starts over, 'q' leaves", file=sys.stderr)
    while True:
        try:
            line = input("You >> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        message = line.strip()
        if piped:
            print(message)
        if not message:
            continue
        if message in QUIT:
            break
        if message in RESET:
            chat.reset()
            print("[new conversation]")
            continue
        print("Model >> ", end="", flush=True)
        chat.reply(message, on_text=lambda s: print(s, end="", flush=True))
        print(flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
