"""Context and continuation as token ids, split the way lm-eval 0.4's HFLM splits them
(`LM._encode_pair`, `LM.loglikelihood`):

- trailing whitespace of the context moves to the front of the continuation;
- context + continuation is encoded as one string and the continuation is what follows the
  tokens of the context encoded alone (so a word boundary tokenizes as in running text);
- both are encoded with the special tokens the model's tokenizer adds by default (LLaMA's BOS);
- an empty context becomes the BOS token alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lib.evals.doc import Doc, Scored
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


def doc_requests(tok: Tokenizer, docs: Sequence[Doc]) -> tuple[list[Request], list[int]]:
    """One request per choice of every document, and the index of the document each belongs to."""
    requests, owner = [], []
    for d, doc in enumerate(docs):
        for continuation in doc.continuations:
            requests.append(encode_pair(tok, doc.context, continuation))
            owner.append(d)
    return requests, owner


def scored_docs(docs: Sequence[Doc], owner: Sequence[int], loglikelihoods: Sequence[float]) -> list[Scored]:
    """The documents with their choices' log-likelihoods (requests in `doc_requests` order)."""
    per_doc: list[list[float]] = [[] for _ in docs]
    for d, ll in zip(owner, loglikelihoods, strict=True):
        per_doc[d].append(ll)
    return [Scored(doc, tuple(lls)) for doc, lls in zip(docs, per_doc)]
