"""Tokenizers behind one interface, plus the chat/prompt templates the LLaMA families were tuned on.

Three file formats, picked by `load_tokenizer(path)`:

- a sentencepiece `.model` (LLaMA-1/2, Chinese-LLaMA/Alpaca),
- LLaMA-3's `tokenizer.model`: a tiktoken BPE file (one `base64(token) rank` per line) plus the
  256 special tokens Meta appends after the ranks,
- a Hugging Face `tokenizer.json` (or a folder holding one).

Templates return token ids together with a loss mask (1 = trained, 0 = prompt), so instruction
tuning trains on responses only.
"""
from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lib.config import read_json
from lib.errors import UserError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    adds_bos: bool  # whether the model's own (HF) tokenizer puts BOS before text by default

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids past the tokenizer's vocabulary (a model's padded vocabulary can
        produce them) have no text and are skipped."""
        ...

    def token_id(self, piece: str) -> int: ...


def _known(ids: Sequence[int], vocab_size: int) -> list[int]:
    return [int(i) for i in ids if 0 <= int(i) < vocab_size]


def _wrap(ids: list[int], bos_id: int, eos_id: int, bos: bool, eos: bool) -> list[int]:
    return ([bos_id] if bos else []) + ids + ([eos_id] if eos else [])


class SentencePieceTokenizer:
    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        # LLaMA's model defines no pad piece (pad_id = -1); padded positions are never trained,
        # so any real id works, and eos is what HF's LLaMA recipes use.
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id
        self.adds_bos = True  # HF's LlamaTokenizer: add_bos_token=True

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return _wrap(self._sp.encode(text), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_known(ids, self.vocab_size))

    def token_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise UserError(f"{self.path}: no token {piece!r}")
        return i


# The split regex and special-token layout of Meta's LLaMA-3 tokenizer (llama/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256


def llama3_special_tokens() -> list[str]:
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + LLAMA3_NUM_SPECIAL - len(named))]
    return named + reserved


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: not a tiktoken rank line (base64 token, rank): {e}") from e
    return ranks


class TiktokenTokenizer:
    def __init__(self, path: str | os.PathLike):
        import tiktoken

        self.path = str(path)
        ranks = read_tiktoken_ranks(path)
        specials = {tok: len(ranks) + i for i, tok in enumerate(llama3_special_tokens())}
        self._enc = tiktoken.Encoding(
            name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self._specials = specials
        self.vocab_size = len(ranks) + len(specials)
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        self.pad_id = specials["<|finetune_right_pad_id|>"]
        self.adds_bos = True  # Meta's and HF's LLaMA-3 tokenizers start text with <|begin_of_text|>

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # Text is data: special-token strings inside it are encoded as plain text, never as controls.
        ids = self._enc.encode(text, allowed_special=set(), disallowed_special=())
        return _wrap(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(_known(ids, self.vocab_size))

    def token_id(self, piece: str) -> int:
        if piece in self._specials:
            return self._specials[piece]
        ids = self._enc.encode(piece, allowed_special=set(), disallowed_special=())
        if len(ids) != 1:
            raise UserError(f"{self.path}: {piece!r} is not a single token")
        return ids[0]


class HFTokenizer:
    """A `tokenizer.json`; bos/eos come from tokenizer_config.json beside it when present."""

    BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>")
    EOS_GUESSES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok

        self.path = str(path)
        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
            raise UserError(f"{self.path}: not a valid tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = Path(path).with_name("tokenizer_config.json")
        config = read_json(config_path) if config_path.exists() else {}
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: expected a JSON object")

        def special(key: str, guesses: tuple[str, ...]) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            for piece in ([value] if value else []) + list(guesses):
                i = self._tok.token_to_id(piece)
                if i is not None:
                    return i
            return None

        bos, eos = special("bos_token", self.BOS_GUESSES), special("eos_token", self.EOS_GUESSES)
        if bos is None or eos is None:
            raise UserError(f"{self.path}: cannot find the bos/eos tokens (set bos_token/eos_token "
                            f"in {config_path.name})")
        self.bos_id, self.eos_id = bos, eos
        pad = special("pad_token", ())
        self.pad_id = pad if pad is not None else eos
        # The post-processor in tokenizer.json decides (LLaMA-2/3 files add BOS, others may not).
        self.adds_bos = self._tok.encode("a").ids[:1] == [bos]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # add_special_tokens=False: bos/eos are placed by us, the same way for every backend.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _wrap(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_known(ids, self.vocab_size), skip_special_tokens=False)

    def token_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        if i is None:
            raise UserError(f"{self.path}: no token {piece!r}")
        return i


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Open a tokenizer file, or a model folder holding tokenizer.json / tokenizer.model."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).exists():
                return load_tokenizer(p / name)
        raise UserError(f"{p}: no tokenizer.json or tokenizer.model in this folder")
    if not p.exists():
        raise UserError(f"{p}: tokenizer file not found")
    if p.suffix == ".json":
        return HFTokenizer(p)
    with open(p, "rb") as f:
        head = f.read(64)
    # A tiktoken file is text lines of base64 + rank; a sentencepiece model is a binary protobuf.
    first = head.split(b"\n", 1)[0].split()
    if len(first) == 2 and first[1].isdigit():
        return TiktokenTokenizer(p)
    try:
        return SentencePieceTokenizer(p)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{p}: not a sentencepiece, tiktoken or tokenizer.json file, or a truncated "
                        f"one ({e})") from None


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> str:
    """Train a LLaMA-style BPE model (byte fallback, unk/bos/eos = 0/1/2) and write it to `path`."""
    import sentencepiece as spm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=f"{tmp}/sp", vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
        )
        os.replace(f"{tmp}/sp.model", path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Templates. Each turns a conversation into (ids, loss_mask); mask 1 marks the assistant's tokens
# (including the end-of-turn token, so the model learns to stop).


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "llama2-chat", "llama3-instruct", "plain")


class _Builder:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[int] = []

    def add(self, ids: list[int], trained: bool) -> None:
        self.ids += ids
        self.mask += [int(trained)] * len(ids)

    def add_round(self, tok: Tokenizer, prompt: str, answer: str | None, bos: bool) -> None:
        """Encode prompt + answer as one string, as Meta's reference code does (a separately
        encoded answer can tokenize differently at the seam), and train on what follows the prompt."""
        prompt_ids = tok.encode(prompt, bos=bos)
        if answer is None:
            self.add(prompt_ids, False)
            return
        full = tok.encode(prompt + answer, bos=bos, eos=True)
        n = 0
        while n < min(len(full), len(prompt_ids)) and full[n] == prompt_ids[n]:
            n += 1
        self.add(full[:n], False)
        self.add(full[n:], True)


def _check_turns(turns: Sequence[Turn]) -> list[Turn]:
    turns = list(turns)
    body = turns[1:] if turns and turns[0].role == "system" else turns
    for i, t in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if t.role != expected:
            raise UserError(f"conversation turn {i}: expected a {expected} turn, got {t.role!r}")
    if not body:
        raise UserError("conversation has no user turn")
    return turns


def apply_template(tok: Tokenizer, template: str, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a conversation (system?, user, assistant, user, assistant...)."""
    turns = _check_turns(turns)
    system = turns[0].content if turns[0].role == "system" else None
    body = turns[1:] if system is not None else turns
    b = _Builder()
    if template == "alpaca":
        # Alpaca has no multi-turn form: each user turn is an instruction, the system text its input.
        for i in range(0, len(body), 2):
            fmt = ALPACA_PROMPT_WITH_INPUT if system and i == 0 else ALPACA_PROMPT
            answer = body[i + 1].content if i + 1 < len(body) else None
            b.add_round(tok, fmt.format(instruction=body[i].content, input=system or ""), answer, bos=i == 0)
    elif template == "llama2-chat":
        # Meta's format: <s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
        for i in range(0, len(body), 2):
            user = body[i].content.strip()
            if i == 0 and system is not None:
                user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}"
            answer = f" {body[i + 1].content.strip()} " if i + 1 < len(body) else None
            b.add_round(tok, f"[INST] {user} [/INST]", answer, bos=True)
    elif template == "llama3-instruct":
        start, end, eot = (tok.token_id(p) for p in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
        b.add([tok.bos_id], False)
        for t in turns:
            trained = t.role == "assistant"
            b.add([start] + tok.encode(t.role) + [end] + tok.encode("\n\n"), False)
            b.add(tok.encode(t.content.strip()) + [eot], trained)
        if turns[-1].role != "assistant":  # a prompt for generation: open the assistant header
            b.add([start] + tok.encode("assistant") + [end] + tok.encode("\n\n"), False)
    elif template == "plain":
        # No markup: each user text is followed by the answer and eos; a system text opens the first.
        for i in range(0, len(body), 2):
            user = body[i].content
            if i == 0 and system is not None:
                user = f"{system}\n\n{user}"
            answer = body[i + 1].content if i + 1 < len(body) else None
            b.add_round(tok, user, answer, bos=i == 0)
    else:
        raise UserError(f"unknown chat template {template!r}; valid: {', '.join(TEMPLATES)}")
    return b.ids, b.mask


def end_of_turn_ids(tok: Tokenizer, template: str) -> list[int]:
    """The tokens that end an assistant turn in `template`, the one that closes a turn first:
    LLaMA-3's <|eot_id|> (then end-of-text), eos for the others. Generation stops on any of them."""
    if template not in TEMPLATES:
        raise UserError(f"unknown chat template {template!r}; valid: {', '.join(TEMPLATES)}")
    if template == "llama3-instruct":
        return [tok.token_id("<|eot_id|>"), tok.eos_id]
    return [tok.eos_id]
