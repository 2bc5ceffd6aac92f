"""Records -> token arrays, the per-worker half of `runners.preprocess`.

A worker process loads the tokenizer once (`init_worker`), then turns chunks of raw input lines
into results in order. Each result is `("ok", arrays)`, `("empty", None)` or `("bad", message)`;
the parent writes them, so 1 and N workers produce identical files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from lib.data.instruction import HANDLERS
from lib.data.indexed import token_dtype
from lib.errors import UserError
from lib.tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class EncodeSpec:
    tokenizer: str
    handler: str  # "pretrain" or a key of instruction.HANDLERS
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    template: str = "alpaca"
    seq_length: int | None = None  # instruction examples are truncated to this
    key_map: tuple[tuple[str, str], ...] = ()  # (handler key, record field): read the key from that field


_STATE: dict = {}


def init_worker(spec: EncodeSpec) -> None:
    _STATE["spec"] = spec
    _STATE["tok"] = load_tokenizer(spec.tokenizer)
    # Arrays leave the worker in the file's dtype: 2-4x less to pickle than int64.
    _STATE["dtype"] = token_dtype(_STATE["tok"].vocab_size)


def parse_line(raw: bytes | str | dict) -> dict:
    """A record from one input line: raw JSON bytes, plain text, or an already-parsed row."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        return {"text": raw}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg} at column {e.colno})") from None


def encode_record(record: dict, spec: EncodeSpec, tok: Tokenizer, dtype: np.dtype = np.dtype(np.int64)):
    if spec.key_map and isinstance(record, dict):
        record = {**record, **{key: record[field] for key, field in spec.key_map if field in record}}
    if spec.handler == "pretrain":
        if not isinstance(record, dict):
            raise UserError(f"expected a JSON object, got {type(record).__name__}")
        out = []
        for key in spec.json_keys:
            if key not in record:
                raise UserError(f"missing key {key!r} (have: {', '.join(map(str, record)) or 'none'})")
            if not isinstance(record[key], str):
                raise UserError(f"key {key!r}: expected a string, got {type(record[key]).__name__}")
            ids = tok.encode(record[key], bos=True, eos=spec.append_eod) if record[key].strip() else []
            out.append(np.asarray(ids, dtype=dtype))
        if all(len(a) == 0 for a in out):
            return None
        return out
    ids, mask = HANDLERS[spec.handler](record, tok, spec.template)
    truncated = spec.seq_length is not None and len(ids) > spec.seq_length
    if truncated:
        ids, mask = ids[: spec.seq_length], mask[: spec.seq_length]
    if not any(mask):
        if truncated:
            raise UserError(f"the prompt alone fills --seq-length {spec.seq_length}: no response token left to train on")
        return None  # nothing to train on
    return np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8), truncated


def encode_chunk(chunk: list) -> list:
    """chunk: [(raw, where)] -> [(kind, payload, where)] in the same order."""
    spec, tok = _STATE["spec"], _STATE["tok"]
    results = []
    for raw, where in chunk:
        try:
            arrays = encode_record(parse_line(raw), spec, tok, _STATE["dtype"])
            results.append(("empty", None, where) if arrays is None else ("ok", arrays, where))
        except UserError as e:
            results.append(("bad", str(e), where))
    return results
