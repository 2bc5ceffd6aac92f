"""Context and continuation as token ids, split the way lm-eval 0.4's HFLM splits them
(`LM._encode_pair`, `LM.loglikelihood`):

- trailing whitespace of the context moves to the front of the continuation;
- context + continuation is encoded as one string and the continuation is what follows the
  tokens of the context encoded alone (so a word boundary tokenizes as in running text);
- both are encoded with the special tokens the model's tokenizer adds by default (LLaMA's BOS);
- an empty context becomes the BOS token alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from lib.tokenizer import Tokenizer


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> Request:
    bos = tok.adds_bos
    if not context:
        cont = tok.encode(continuation)
        prefix = tok.bos_id if bos else tok.eos_id
        if cont and cont[0] == prefix:
            return Request(tuple(cont[:1]), tuple(cont[1:]))
        return Request((prefix,), tuple(cont))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, bos=bos)
    ctx = tok.encode(context, bos=bos)
    return Request(tuple(ctx), tuple(whole[len(ctx):]))
