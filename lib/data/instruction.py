"""Instruction-data handlers: one JSON record -> (token ids, loss mask), and packing into sequences.

Record shapes (one per handler):

- alpaca (GeneralInstruction): {"instruction": str, "input": str (optional), "output": str}
- sharegpt: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "system"?: str}
- moss (moss-003-sft): {"meta_instruction": str, "chat": {"turn_1": {"Human": str, "MOSS": str}, ...}}

The loss mask is 1 on response tokens (trained) and 0 on prompt tokens.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

from lib.errors import UserError
from lib.tokenizer import Tokenizer, Turn, apply_template

Example = tuple[list[int], list[int]]  # (token ids, loss mask)


def _field(record: dict, key: str) -> str:
    if not isinstance(record, dict) or key not in record:
        raise UserError(f"missing key {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"key {key!r}: expected a string, got {type(value).__name__}")
    return value


def alpaca(record: dict, tok: Tokenizer, template: str) -> Example:
    instruction, output = _field(record, "instruction"), _field(record, "output")
    extra = record.get("input") or ""
    if template == "alpaca":
        # The alpaca template has its own "### Input:" section; it reads the input from the system slot.
        turns = ([Turn("system", extra)] if extra else []) + [Turn("user", instruction)]
    else:
        turns = [Turn("user", f"{instruction}\n\n{extra}" if extra else instruction)]
    return apply_template(tok, template, turns + [Turn("assistant", output)])


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def sharegpt(record: dict, tok: Tokenizer, template: str) -> Example:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise UserError("missing key 'conversations' (a list of {from, value})")
    turns = [Turn("system", record["system"])] if isinstance(record.get("system"), str) and record["system"] else []
    for i, msg in enumerate(record["conversations"]):
        role = SHAREGPT_ROLES.get(str(msg.get("from", "")).lower()) if isinstance(msg, dict) else None
        if role is None or not isinstance(msg.get("value"), str):
            raise UserError(f"conversations[{i}]: expected {{from: human|gpt|system, value: str}}, got {msg!r:.80}")
        turns.append(Turn(role, msg["value"]))
    # A conversation ending on the user's turn has nothing to train on for that turn: drop it.
    if turns and turns[-1].role == "user":
        turns = turns[:-1]
    return apply_template(tok, template, turns)


def moss(record: dict, tok: Tokenizer, template: str) -> Example:
    """MOSS text already carries its role markers (<|Human|>: ... <eoh>), so it is used verbatim
    and `template` is ignored: the meta instruction and Human turns are masked, MOSS turns trained."""
    meta = _field(record, "meta_instruction")
    chat = record.get("chat")
    if not isinstance(chat, dict) or not chat:
        raise UserError("missing key 'chat' (turn_1, turn_2, ... each with Human and MOSS)")
    ids, mask = [tok.bos_id] + tok.encode(meta), [0] * (1 + len(tok.encode(meta)))
    turns = sorted(chat, key=lambda k: int(re.sub(r"\D", "", k) or 0))
    for name in turns:
        turn = chat[name]
        if not isinstance(turn, dict):
            raise UserError(f"chat.{name}: expected an object with Human and MOSS")
        human, answer = _field(turn, "Human"), _field(turn, "MOSS")
        h = tok.encode(human)
        a = tok.encode(answer)
        ids += h + a
        mask += [0] * len(h) + [1] * len(a)
    ids.append(tok.eos_id)
    mask.append(1)
    return ids, mask


HANDLERS: dict[str, Callable[[dict, Tokenizer, str], Example]] = {
    "alpaca": alpaca, "sharegpt": sharegpt, "moss": moss,
}


def pack(examples: Sequence[Example] | Iterator[Example], seq_length: int) -> Iterator[list[Example]]:
    """Group consecutive examples, in order, into packs of at most `seq_length` tokens.

    Greedy and order-preserving (so 1 and N workers give identical output); an example longer
    than `seq_length` must be truncated by the caller first.
    """
    current: list[Example] = []
    used = 0
    for ex in examples:
        n = len(ex[0])
        if current and used + n > seq_length:
            yield current
            current, used = [], 0
        current.append(ex)
        used += n
    if current:
        yield current
