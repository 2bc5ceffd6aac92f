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

Outputs appear only when every one of them is complete; a failed write (a full disk) removes
them, and a killed run's temporary files are removed by the next run of the same prefix.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import multiprocessing as mp
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------
# Reading


def input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--input {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in EXTENSIONS)
    if not files:
        raise UserError(f"--input {path}: no {'/'.join(EXTENSIONS)} files in this folder")
    return files


def read_records(path: Path) -> Iterator[tuple[object, str]]:
    """(raw record, "file:line") pairs; raw is bytes (a JSON line), str (text) or a dict (a row)."""
    if path.suffix == ".parquet":
        reader = _parquet_rows
    elif path.suffix == ".csv":
        reader = _csv_rows
    elif path.suffix == ".txt":
        reader = _text_blocks
    elif path.suffix == ".json" and _json_array(path):
        reader = _json_array_items
    else:  # .jsonl, or .json holding one object per line
        reader = _json_lines
    try:
        yield from reader(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[object, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield rec, f"{path}:row {row}"
    except pa.ArrowException as e:
        after = f" after row {row}" if row else ""
        raise UserError(f"{path}: not a readable parquet file{after} ({e})") from None


def _csv_rows(path: Path) -> Iterator[tuple[object, str]]:
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        reader = csv.DictReader(f)
        try:
            for rec in reader:
                yield rec, f"{path}:{reader.line_num}"
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 ({e.reason})") from None


def _text_blocks(path: Path) -> Iterator[tuple[object, str]]:
    """One document per blank-line-separated block."""
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


def _json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _json_array_items(path: Path) -> Iterator[tuple[object, str]]:
    # A JSON array (alpaca_data.json) cannot be streamed line by line; it is read whole.
    try:
        records = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON array ({e})") from None
    for i, rec in enumerate(records):
        yield rec if isinstance(rec, dict) else json.dumps(rec).encode(), f"{path}:item {i}"


def _json_lines(path: Path) -> Iterator[tuple[object, str]]:
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


@contextlib.contextmanager
def encoded_chunks(files: Sequence[Path], spec: EncodeSpec, workers: int) -> Iterator[Iterator[list]]:
    """`encode_chunk` results for the input's chunks, in input order, from 1 or N processes."""
    if workers == 1:
        init_worker(spec)
        yield map(encode_chunk, chunks(files))
        return
    pool = mp.get_context("spawn").Pool(workers, init_worker, (spec,))
    try:
        yield ordered_map(pool, encode_chunk, chunks(files), ahead=4 * workers)
    finally:
        pool.terminate()


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class Counts:
    documents: int = 0
    tokens: int = 0
    bad: int = 0
    empty: int = 0
    truncated: int = 0


class Output:
    """The indexed datasets of one run, published together once all are complete."""

    def __init__(self, targets: Sequence[tuple[str, np.dtype]]):
        self.writers: list[IndexedDatasetWriter] = []
        try:
            for prefix, dtype in targets:
                self.writers.append(IndexedDatasetWriter(prefix, dtype))
        except BaseException:
            self.abort()
            raise

    def add(self, payload, counts: Counts) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write what is still buffered."""

    def publish(self) -> None:
        for w in self.writers:  # a full disk fails here, before any output is in place
            w.write_index()
        for w in self.writers:
            w.publish()

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


class TextOutput(Output):
    """Pretraining text: one dataset per JSON key; each record is a document in every one."""

    def __init__(self, prefix: str, keys: Sequence[str], dtype: np.dtype):
        super().__init__([(f"{prefix}_{k}_document", dtype) for k in keys])

    def add(self, arrays, counts: Counts) -> None:
        for w, ids in zip(self.writers, arrays):
            w.add_document(ids)
            counts.tokens += len(ids)


class InstructionOutput(Output):
    """Instruction data: token ids and loss mask, one example per document, or packed."""

    def __init__(self, prefix: str, dtype: np.dtype, pack_length: int | None):
        super().__init__([(prefix + IDS_SUFFIX, dtype), (prefix + MASK_SUFFIX, np.dtype(np.uint8))])
        self.pack_length = pack_length
        self.pending: list = []  # examples waiting to be packed

    def add(self, payload, counts: Counts) -> None:
        ids, mask, truncated = payload
        counts.truncated += truncated
        counts.tokens += len(ids)
        if self.pack_length is None:
            self._write_document([(ids, mask)])
            return
        self.pending.append((ids, mask))
        if len(self.pending) > 4 * CHUNK:
            self._write_packs(final=False)

    def close(self) -> None:
        if self.pack_length is not None:
            self._write_packs(final=True)

    def _write_packs(self, final: bool) -> None:
        # Greedy packing in order: every pack but the last is final whatever comes next.
        ready = list(pack(self.pending, self.pack_length))
        for group in (ready if final else ready[:-1]):
            self._write_document(group)
        self.pending = [] if final or not ready else ready[-1]

    def _write_document(self, examples: list) -> None:
        ids_writer, mask_writer = self.writers
        for ids, mask in examples:
            ids_writer.add_sequence(ids)
            mask_writer.add_sequence(mask)
        ids_writer.end_document()
        mask_writer.end_document()


def open_output(args: argparse.Namespace, dtype: np.dtype) -> Output:
    if args.handler == "pretrain":
        return TextOutput(args.output_prefix, args.json_keys, dtype)
    return InstructionOutput(args.output_prefix, dtype, args.seq_length if args.pack else None)


def take(result: tuple, output: Output, counts: Counts, on_bad_line: str) -> None:
    """Write one encoded record, or count (and report, or fail on) a bad or empty one."""
    kind, payload, where = result
    if kind == "bad":
        if on_bad_line == "fail":
            raise UserError(f"{where}: {payload} (pass --on-bad-line skip to skip such lines)")
        counts.bad += 1
        if counts.bad <= MAX_REPORTED:
            tqdm.write(f"skipped {where}: {payload}", file=sys.stderr)
    elif kind == "empty":
        counts.empty += 1
    else:
        counts.documents += 1
        output.add(payload, counts)


def write_all(results: Iterator[list], output: Output, on_bad_line: str) -> Counts:
    counts = Counts()
    start = time.perf_counter()
    with tqdm(desc="preprocess", unit="doc", dynamic_ncols=True, file=sys.stderr) as bar:
        for chunk_results in results:
            for result in chunk_results:
                take(result, output, counts, on_bad_line)
            bar.update(len(chunk_results))
            bar.set_postfix(tok_s=f"{counts.tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
    output.close()
    return counts


# ---------------------------------------------------------------------------------------------
# The command


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


def encode_spec(args: argparse.Namespace) -> EncodeSpec:
    return EncodeSpec(tokenizer=args.tokenizer, handler=args.handler, json_keys=tuple(args.json_keys),
                      append_eod=args.append_eod, template=args.template, seq_length=args.seq_length,
                      key_map=tuple(tuple(m.split("=")) for m in args.map))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    files = input_files(args.input)
    tok = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    output = open_output(args, token_dtype(tok.vocab_size))
    try:
        with encoded_chunks(files, encode_spec(args), args.workers) as results:
            counts = write_all(results, output, args.on_bad_line)
        if counts.documents == 0:
            raise UserError(f"--input {args.input}: no documents to write (bad lines: {counts.bad}, "
                            f"empty: {counts.empty})")
        output.publish()
    except BaseException:
        output.abort()
        raise
    elapsed = time.perf_counter() - start
    print(f"wrote {counts.documents} documents, {counts.tokens} tokens in {elapsed:.1f} s "
          f"({counts.tokens / elapsed:,.0f} tokens/s); skipped {counts.bad} bad lines, "
          f"{counts.empty} empty documents; truncated {counts.truncated} examples")
    for w in output.writers:
        print(f"  {w.prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    cli.run(main)
