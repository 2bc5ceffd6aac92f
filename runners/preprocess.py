"""Tokenize raw text or instruction data into Megatron-compatible indexed datasets.

    python -m runners.preprocess --input data/raw --output-prefix data/corpus \\
        --tokenizer tokenizer.model --handler pretrain --json-keys text --append-eod --workers 2

Pretraining text becomes `<prefix>_<key>_document.bin/.idx` per JSON key (each document starts
with bos; `--append-eod` adds eos). Instruction data (`--handler alpaca|sharegpt|moss`) becomes
`<prefix>_input_ids_document` and `<prefix>_loss_mask_document` (uint8, 1 = trained token), two
indexed datasets with one layout; with `--pack`, a document is a packed sample of up to
`--seq-length` tokens and each example in it one sequence.

Input: a file or a folder (its jsonl/json/parquet/txt/csv files, sorted by name), read as a
stream. Lines that are not UTF-8 or valid JSON, or lack a key, are reported as file:line and
either stop the run (`--on-bad-line fail`, the default) or are skipped and counted.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import multiprocessing as mp
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lib import cli
from lib.data.encode import EncodeSpec, encode_chunk, init_worker
from lib.data.indexed import IndexedDatasetWriter, token_dtype
from lib.data.instruction import HANDLERS, pack
from lib.data.sft_dataset import IDS_SUFFIX, MASK_SUFFIX
from lib.errors import UserError
from lib.tokenizer import TEMPLATES, load_tokenizer

EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt", ".csv")
CHUNK = 128  # records per task sent to a worker: big enough to amortise pickling
MAX_REPORTED = 20


def input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--input {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in EXTENSIONS)
    if not files:
        raise UserError(f"--input {path}: no {'/'.join(EXTENSIONS)} files in this folder")
    return files


def _json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def read_records(path: Path) -> Iterator[tuple[object, str]]:
    """(raw record, "file:line") pairs; raw is bytes (a JSON line), str (text) or a dict (a row)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield rec, f"{path}:row {row}"
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="strict") as f:
            reader = csv.DictReader(f)
            try:
                for rec in reader:
                    yield rec, f"{path}:{reader.line_num}"
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 ({e.reason})") from None
    elif path.suffix == ".txt":
        # One document per blank-line-separated block.
        block: list[bytes] = []
        start = 1
        with open(path, "rb") as f:
            for lineno, line in enumerate(itertools.chain(f, [b"\n"]), 1):
                if line.strip():
                    if not block:
                        start = lineno
                    block.append(line)
                elif block:
                    raw = b"".join(block)
                    try:
                        yield raw.decode("utf-8").rstrip("\n"), f"{path}:{start}"
                    except UnicodeDecodeError:
                        yield raw, f"{path}:{start}"  # parse_line reports the UTF-8 error
                    block = []
    elif path.suffix == ".json" and _json_array(path):
        # A JSON array (alpaca_data.json) cannot be streamed line by line; it is read whole.
        try:
            records = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: invalid JSON array ({e})") from None
        for i, rec in enumerate(records):
            yield rec if isinstance(rec, dict) else json.dumps(rec).encode(), f"{path}:item {i}"
    else:  # .jsonl, or .json holding one object per line
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield line, f"{path}:{lineno}"


def chunks(files: Sequence[Path]) -> Iterator[list]:
    it = (rec for p in files for rec in read_records(p))
    while chunk := list(itertools.islice(it, CHUNK)):
        yield chunk


def ordered_map(pool, fn, items: Iterator, ahead: int) -> Iterator:
    """fn over items in the pool, results in input order, at most `ahead` chunks in flight.

    (Pool.imap would read the whole input into its task queue; this keeps memory flat.)
    """
    in_flight: deque = deque()
    for item in items:
        in_flight.append(pool.apply_async(fn, (item,)))
        if len(in_flight) >= ahead:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m runners.preprocess", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, type=Path, help="file or folder of jsonl/json/parquet/txt/csv")
    ap.add_argument("--output-prefix", required=True, help="output path prefix")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.model (sentencepiece or tiktoken) or tokenizer.json")
    ap.add_argument("--handler", default="pretrain", choices=["pretrain", *HANDLERS])
    ap.add_argument("--json-keys", nargs="+", default=["text"], help="pretrain: keys holding the text")
    ap.add_argument("--map", nargs="+", default=[], metavar="KEY=FIELD",
                    help="instruction data: read the handler's KEY from the record's FIELD (instruction=question)")
    ap.add_argument("--template", default="alpaca", choices=TEMPLATES, help="instruction data: prompt template")
    ap.add_argument("--append-eod", action="store_true", help="pretrain: end each document with eos")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seq-length", type=int, help="instruction data: truncate examples to (and pack into) this")
    ap.add_argument("--pack", action="store_true", help="instruction data: pack examples into --seq-length samples")
    ap.add_argument("--on-bad-line", choices=["fail", "skip"], default="fail")
    args = ap.parse_args(argv)
    for item in args.map:
        if item.count("=") != 1 or not all(item.split("=")):
            raise UserError(f"--map {item!r}: expected KEY=FIELD, e.g. instruction=question")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    if args.handler == "pretrain" and (args.pack or args.seq_length):
        raise UserError("--pack and --seq-length apply to instruction data (--handler alpaca|sharegpt|moss)")
    if args.pack and not args.seq_length:
        raise UserError("--pack needs --seq-length")
    if args.seq_length is not None and args.seq_length < 2:
        raise UserError(f"--seq-length {args.seq_length}: must be at least 2")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    files = input_files(args.input)
    tok = load_tokenizer(args.tokenizer)
    spec = EncodeSpec(tokenizer=args.tokenizer, handler=args.handler, json_keys=tuple(args.json_keys),
                      append_eod=args.append_eod, template=args.template, seq_length=args.seq_length,
                      key_map=tuple(tuple(m.split("=")) for m in args.map))
    instruction = args.handler != "pretrain"
    if instruction:
        writers = [IndexedDatasetWriter(args.output_prefix + IDS_SUFFIX, token_dtype(tok.vocab_size)),
                   IndexedDatasetWriter(args.output_prefix + MASK_SUFFIX, np.uint8)]
    else:
        writers = [IndexedDatasetWriter(f"{args.output_prefix}_{k}_document", token_dtype(tok.vocab_size))
                   for k in args.json_keys]
    counts = dict(documents=0, tokens=0, bad=0, empty=0, truncated=0)
    pending: list = []  # instruction examples waiting to be packed

    def flush_packs(final: bool) -> None:
        ready = list(pack(pending, args.seq_length))
        keep = ready if final else ready[:-1]  # the last pack may still grow
        for group in keep:
            for ids, mask in group:
                writers[0].add_sequence(ids)
                writers[1].add_sequence(mask)
            writers[0].end_document()
            writers[1].end_document()
        pending[:] = [] if final or not ready else ready[-1]

    start = time.perf_counter()
    pool = mp.get_context("spawn").Pool(args.workers, init_worker, (spec,)) if args.workers > 1 else None
    try:
        if pool is None:
            init_worker(spec)
            results = map(encode_chunk, chunks(files))
        else:
            results = ordered_map(pool, encode_chunk, chunks(files), ahead=4 * args.workers)
        with tqdm(desc="preprocess", unit="doc", dynamic_ncols=True, file=sys.stderr) as bar:
            for chunk_results in results:
                for kind, payload, where in chunk_results:
                    if kind == "bad":
                        if args.on_bad_line == "fail":
                            raise UserError(f"{where}: {payload} (pass --on-bad-line skip to skip such lines)")
                        counts["bad"] += 1
                        if counts["bad"] <= MAX_REPORTED:
                            tqdm.write(f"skipped {where}: {payload}", file=sys.stderr)
                        continue
                    if kind == "empty":
                        counts["empty"] += 1
                        continue
                    counts["documents"] += 1
                    if instruction:
                        ids, mask, truncated = payload
                        counts["truncated"] += truncated
                        counts["tokens"] += len(ids)
                        if args.pack:
                            pending.append((ids, mask))
                        else:
                            writers[0].add_document(ids)
                            writers[1].add_document(mask)
                    else:
                        for w, ids in zip(writers, payload):
                            w.add_document(ids)
                            counts["tokens"] += len(ids)
                if args.pack and len(pending) > 4 * CHUNK:
                    flush_packs(final=False)
                bar.update(len(chunk_results))
                bar.set_postfix(tok_s=f"{counts['tokens'] / max(time.perf_counter() - start, 1e-9):,.0f}")
        if args.pack:
            flush_packs(final=True)
        if counts["documents"] == 0:
            raise UserError(f"--input {args.input}: no documents to write (bad lines: {counts['bad']}, "
                            f"empty: {counts['empty']})")
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    elapsed = time.perf_counter() - start
    print(f"wrote {counts['documents']} documents, {counts['tokens']} tokens in {elapsed:.1f} s "
          f"({counts['tokens'] / elapsed:,.0f} tokens/s); skipped {counts['bad']} bad lines, "
          f"{counts['empty']} empty documents; truncated {counts['truncated']} examples")
    for w in writers:
        print(f"  {w.prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    cli.run(main)
