"""Megatron's `MMIDIDX` indexed dataset: a flat token file (.bin) and its index (.idx).

The layout is Megatron-LM's (megatron/core/datasets/indexed_dataset.py), so files written here
load in Megatron/ModelLink and theirs load here. All integers little-endian:

    .idx: b"MMIDIDX\\x00\\x00"             9-byte magic
          <Q version = 1
          <B dtype code                   1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                          6 float64, 7 float32, 8 uint16
          <Q sequence count  S
          <Q document count  D + 1        (document_indices has a leading 0)
          int32[S] sequence lengths       in tokens
          int64[S] sequence pointers      byte offset of each sequence in .bin
          int64[D+1] document indices     document d = sequences [doc[d], doc[d+1])
    .bin: the sequences' tokens, back to back, in the dtype above.

A document usually holds one sequence; packed instruction data stores one packed sample per
document and each example in it as a sequence, which is how segment boundaries are kept.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lib.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype for token ids, with Megatron's threshold (uint16 below 65500)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def exists(prefix: str | os.PathLike) -> bool:
    return Path(f"{prefix}.idx").exists() and Path(f"{prefix}.bin").exists()


class IndexedDataset:
    """Read-only, memory-mapped view of `<prefix>.bin/.idx`; `ds[i]` is sequence i (no copy)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise UserError(f"{p}: indexed dataset file not found")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
            raise UserError(f"{idx_path}: not a Megatron MMIDIDX index (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION or code not in CODE_DTYPES:
            raise UserError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
        expected = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        # Megatron's multimodal variant appends int8 modes; accept them, reject anything else.
        if idx_size not in (expected, expected + n_seq):
            raise UserError(f"{idx_path}: {idx_size} bytes, but its header announces {expected} "
                            "(truncated or corrupt index)")
        self.dtype = CODE_DTYPES[code]
        idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(idx, np.int32, n_seq, off)
        self.sequence_pointers = np.frombuffer(idx, np.int64, n_seq, off + 4 * n_seq)
        self.document_indices = np.frombuffer(idx, np.int64, n_doc, off + 12 * n_seq)
        if n_doc == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise UserError(f"{idx_path}: document indices do not cover the {n_seq} sequences")
        n_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tokens * self.dtype.itemsize:
            raise UserError(f"{bin_path}: {bin_size} bytes, but {idx_path} indexes {n_tokens} tokens "
                            f"({n_tokens * self.dtype.itemsize} bytes): the .bin and .idx disagree "
                            "(truncated or mismatched file)")
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.empty(0, self.dtype)
        self.num_tokens = n_tokens

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin, back to back (memory-mapped, read-only)."""
        return self._bin

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence i, from token `offset`, `length` of them (default: to its end)."""
        n = int(self.sequence_lengths[i])
        length = n - offset if length is None else length
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start: start + length]

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document d."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self.get(i) for i in range(lo, hi)]

    def document_span(self, d: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of document d as one array (its sequences are contiguous in .bin)."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if lo == hi:
            return self._bin[:0]
        n = int(self.sequence_lengths[lo:hi].sum(dtype=np.int64))
        length = n - offset if length is None else length
        start = int(self.sequence_pointers[lo]) // self.dtype.itemsize + offset
        return self._bin[start: start + length]


class IndexedDatasetWriter:
    """Streams sequences into `<prefix>.bin`; `finish()` writes the index, then renames both into place.

    Until `finish()` the files live under temporary names (`<prefix>.tmp<pid>.bin/.idx`), so an
    interrupted run leaves nothing that could be mistaken for a complete dataset. The writer holds
    an exclusive lock on its temporary .bin for its whole life: the next writer of the same prefix
    removes a killed run's temporaries (unlocked) and leaves a running one's alone (locked).
    A failed write (a full disk) is a UserError naming the file, and removes the temporaries.
    Use as a context manager: an exception aborts.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        with self._reporting("create"):
            Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(self.prefix)
            if removed:
                print(f"removed {len(removed)} temporary file(s) of an interrupted run: {', '.join(removed)}",
                      file=sys.stderr)
            self._tmp = f"{self.prefix}.tmp{os.getpid()}"
            self._bin = open(f"{self._tmp}.bin", "wb")
        fcntl.flock(self._bin, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file just created: never contended
        self._lengths: list[int] = []
        self._doc_ends: list[int] = [0]

    @contextlib.contextmanager
    def _reporting(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if hasattr(self, "_bin"):
                self.abort()
            raise UserError(f"{self.prefix}.bin: cannot {action} it ({e.strerror or e}); "
                            "no partial file is left") from None

    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype and arr.size:
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"value out of range for {self.dtype}")
        with self._reporting("write"):
            self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(arr.size)

    def end_document(self) -> None:
        self._doc_ends.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        self.add_sequence(tokens)
        self.end_document()

    def finish(self) -> None:
        self.write_index()
        self.publish()

    def write_index(self) -> None:
        """Everything that can fail on a full disk, still under the temporary names.

        A run writing several datasets calls this on each before publishing any, so a failure
        publishes none of them.
        """
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with self._reporting("write"):
            self._bin.flush()
            with open(f"{self._tmp}.idx", "wb") as f:
                f.write(MAGIC)
                f.write(struct.pack("<QBQQ", VERSION, DTYPE_CODES[self.dtype], len(lengths), len(self._doc_ends)))
                f.write(lengths.tobytes())
                f.write(pointers.tobytes())
                f.write(np.asarray(self._doc_ends, dtype=np.int64).tobytes())

    def publish(self) -> None:
        """Rename the complete files into place (after `write_index`)."""
        # .bin first: a reader checks the .idx exists only once the .bin it describes is complete.
        os.replace(f"{self._tmp}.bin", f"{self.prefix}.bin")
        os.replace(f"{self._tmp}.idx", f"{self.prefix}.idx")
        self._bin.close()  # releases the lock, once nothing is left under the temporary names

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # on a full disk, closing fails to flush too
            self._bin.close()
        for ext in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tmp + ext)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def remove_stale_temporaries(prefix: str | os.PathLike) -> list[str]:
    """Remove the `<prefix>.tmp<pid>.bin/.idx` files of writers of `prefix` that were killed.

    A running writer holds a lock on its .bin (released by the kernel however the process
    ends), so only files nobody is writing are removed; other prefixes' files are never touched.
    Returns the removed paths.
    """
    folder, name = os.path.split(str(prefix))
    folder = folder or "."
    pattern = re.compile(re.escape(name) + r"\.tmp(\d+)\.(bin|idx)")
    stems = sorted({m.group(1) for f in os.listdir(folder) if (m := pattern.fullmatch(f))}, key=int)
    removed = []
    for pid in stems:
        stem = os.path.join(folder, f"{name}.tmp{pid}")
        # An .idx without its .bin is left by a writer killed between its two renames.
        if _locked(f"{stem}.bin"):
            continue
        for ext in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stem + ext)
                removed.append(stem + ext)
    return removed


def _locked(path: str) -> bool:
    """Whether a live writer holds the lock on `path` (False when there is no such file)."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False
