"""The embedded default corpus, made at run time so no text is copied into the repository.

Documents are the docstrings of the installed Python standard library, read with `ast` (no module
is imported, so none runs), one document per module file, in sorted path order: real English
prose with code in it, deterministic for a given Python version. Where the sources are missing
(a stripped install), a seeded procedural generator stands in.
"""
from __future__ import annotations

import ast
import os
import random
import sysconfig
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lib.data.cache import distributed_rank
from lib.data.indexed import IndexedDatasetWriter, token_dtype
from lib.errors import UserError

DEFAULT_BYTES = 1_000_000
DEFAULT_VOCAB = 1000
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def _module_text(path: Path) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))  # Module is walked twice; keep first occurrences


def stdlib_documents(max_bytes: int = DEFAULT_BYTES) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            text = _module_text(Path(dirpath) / name)
            if text:
                yield text
                total += len(text)
                if total >= max_bytes:
                    return


_WORDS = ("the data model layer token batch sample index shard mesh rank tensor value graph step loss "
          "gradient weight bias norm head query key cache file reader writer number string list").split()


def procedural_documents(max_bytes: int = DEFAULT_BYTES, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    total = 0
    while total < max_bytes:
        sentences = []
        for _ in range(rng.randint(3, 30)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        text = " ".join(sentences)
        total += len(text)
        yield text


def corpus_documents(max_bytes: int = DEFAULT_BYTES) -> list[str]:
    docs = list(stdlib_documents(max_bytes))
    if sum(map(len, docs)) < max_bytes // 10:
        docs = list(procedural_documents(max_bytes))
    return docs


def _wait_for_rank0(path: Path) -> None:
    waiting = distributed_rank() != 0
    deadline = time.monotonic() + 600
    while waiting and not path.exists():
        if time.monotonic() > deadline:
            raise UserError(f"{path}: rank 0 did not build the default corpus within 600 s")
        time.sleep(0.1)


def default_dataset(workdir: str | os.PathLike, max_bytes: int = DEFAULT_BYTES,
                    vocab_size: int = DEFAULT_VOCAB) -> tuple[str, str]:
    """(data prefix, tokenizer path) of the default corpus under `workdir`, built on first use.

    Each tokenizer size gets its own folder, so models of different vocabularies can share a workdir.
    """
    from lib.tokenizer import load_tokenizer, train_sentencepiece

    out = Path(workdir) / f"default_corpus_v{vocab_size}"
    prefix, tok_path = out / "corpus_text_document", out / "tokenizer.model"
    _wait_for_rank0(Path(f"{prefix}.idx"))
    if Path(f"{prefix}.idx").exists() and tok_path.exists():
        return str(prefix), str(tok_path)
    docs = corpus_documents(max_bytes)
    # Paragraphs, not whole modules, are sentencepiece's "sentences": it caps sentence length.
    paragraphs = [p for d in docs for p in d.split("\n\n") if p.strip()]
    train_sentencepiece(paragraphs, vocab_size, tok_path)
    tok = load_tokenizer(tok_path)
    with IndexedDatasetWriter(prefix, token_dtype(tok.vocab_size)) as w:
        for doc in docs:
            w.add_document(np.asarray(tok.encode(doc, bos=True, eos=True)))
    return str(prefix), str(tok_path)
