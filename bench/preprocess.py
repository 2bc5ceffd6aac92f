"""Preprocessing throughput: runners.preprocess with 1 and 2 workers vs the plain loop a user writes.

    .venv/bin/python bench/preprocess.py [--mb 8]

Input: the generated default corpus (stdlib docstrings) repeated to --mb megabytes of jsonl;
tokenizer: the default corpus's sentencepiece model (vocab 1000). All three produce the same
tokens (checked); tokens/s counts output tokens over wall time, process start-up included for
the runner (its worker pool spawns fresh interpreters).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lib.data.corpus import corpus_documents, default_dataset
from lib.data.indexed import IndexedDataset
from lib.tokenizer import load_tokenizer


def plain_loop(jsonl: Path, tok_path: str, out: Path) -> int:
    """What one writes by hand: read lines, encode, append tokens to a file."""
    tok = load_tokenizer(tok_path)
    n = 0
    with open(jsonl) as f, open(out, "wb") as o:
        for line in f:
            ids = tok.encode(json.loads(line)["text"], bos=True, eos=True)
            o.write(np.asarray(ids, dtype=np.uint16).tobytes())
            n += len(ids)
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    _, tok_path = default_dataset(work)
    docs = corpus_documents()
    jsonl = work / "in.jsonl"
    size = 0
    with open(jsonl, "w") as f:
        while size < args.mb * 1e6:
            for d in docs:
                line = json.dumps({"text": d}) + "\n"
                f.write(line)
                size += len(line)
    print(f"input {size / 1e6:.1f} MB, {sum(1 for _ in open(jsonl)):,} documents")

    t = time.perf_counter()
    n = plain_loop(jsonl, tok_path, work / "plain.bin")
    base = n / (time.perf_counter() - t)
    print(f"plain loop        : {n:,} tokens, {base:,.0f} tokens/s")
    for workers in (1, 2):
        prefix = work / f"w{workers}"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "runners.preprocess", "--input", str(jsonl), "--output-prefix",
                        str(prefix), "--tokenizer", tok_path, "--append-eod", "--workers", str(workers)],
                       check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        rate = IndexedDataset(f"{prefix}_text_document").num_tokens / (time.perf_counter() - t)
        assert (work / "plain.bin").read_bytes() == Path(f"{prefix}_text_document.bin").read_bytes()
        print(f"preprocess -w {workers} : {rate:,.0f} tokens/s = {rate / base:.2f}x the plain loop")


if __name__ == "__main__":
    main()
