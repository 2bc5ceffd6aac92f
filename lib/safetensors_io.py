"""safetensors files read block by block and written tensor by tensor, with bounded memory.

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`
(offsets relative to the end of the header), then the raw row-major data.

    infos = read_header("model-00001-of-00002.safetensors")          # shapes without reading data
    block = read(file, infos["lm_head.weight"], (slice(0, 4096), slice(1024, 2048)))
    write(path, {"w": TensorInfo-like}, iter_of_tensors)             # streamed, one tensor in memory

Why not `safetensors.safe_open(...).get_slice`: it memory-maps the file and slices a view of
the mapping; reading a column block touches (and, with the kernel's fault-around, maps) nearly
every page of the tensor, and those file pages count in the process's resident set while the
file is open (measured: a 512 MB tensor, a 1/8 column block read, RSS +514 MB). Here each
contiguous run of the block is read with `pread` straight into the result: the process holds the
block and nothing else. The written files are plain safetensors (safetensors and transformers
read them; the tests check both ways).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0          # absolute byte offset of the data in the file (read_header fills it)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo of every tensor in the file, in data order; only the header is read.

    A truncated or corrupt file raises UserError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} exceeds the file")
            raw = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{path}: cannot read weights ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: cannot read weights (not a safetensors file: {e})") from None
    data_start = 8 + n
    infos = {}
    try:
        for name, entry in raw.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has unsupported dtype {entry['dtype']!r}")
            begin, end = entry["data_offsets"]
            info = TensorInfo(dtype, tuple(int(d) for d in entry["shape"]), data_start + begin)
            if end - begin != info.nbytes or data_start + end > size:
                raise ValueError(f"tensor {name!r}: bytes {begin}..{end} do not hold shape "
                                 f"{list(info.shape)} of {entry['dtype']} within the file "
                                 f"({size} bytes; truncated?)")
            infos[name] = info
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot read weights (bad header: {e})") from None
    return dict(sorted(infos.items(), key=lambda kv: kv[1].offset))


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    while len(buffer):
        n = os.preadv(fd, [buffer], offset)
        if n == 0:
            raise UserError(f"{path}: cannot read weights (file ends early; truncated?)")
        buffer, offset = buffer[n:], offset + n


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The writable bytes of contiguous CPU tensor `t` (any dtype, bf16 included)."""
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def read(path: str | Path, info: TensorInfo, region: tuple[slice, ...] | None = None) -> torch.Tensor:
    """The block `region` (default: all) of the tensor described by `info`, in its stored dtype.

    Only the block's bytes are read: one pread per contiguous run (a row of the block when it
    leaves columns out, else the whole run of rows)."""
    path = Path(path)
    shape = info.shape
    region = region or tuple(slice(0, n) for n in shape)
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, shape))
    out = torch.empty(tuple(max(0, s.stop - s.start) for s in region), dtype=info.dtype)
    if out.numel() == 0:
        return out
    item = _itemsize(info.dtype)
    # Dims from `k` on are read whole, so each run is region[k-1] x those dims, contiguous on disk.
    k = len(shape)
    while k > 0 and region[k - 1] == slice(0, shape[k - 1]):
        k -= 1
    inner = math.prod(shape[k:]) * item
    strides = [math.prod(shape[d + 1:]) * item for d in range(len(shape))]
    run_dim = max(k - 1, 0)
    run = (region[run_dim].stop - region[run_dim].start) * strides[run_dim] if k > 0 else inner
    dest = _bytes_view(out)
    with open(path, "rb") as f:
        fd, pos = f.fileno(), 0
        for index in itertools.product(*(range(s.start, s.stop) for s in region[:run_dim])):
            offset = info.offset + sum(i * st for i, st in zip(index, strides))
            if k > 0:
                offset += region[run_dim].start * strides[run_dim]
            _pread_into(fd, dest[pos:pos + run], offset, path)
            pos += run
    return out


def write(path: str | Path, infos: Mapping[str, TensorInfo],
          tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file holding `infos`' tensors, which `tensors` yields in that order.

    The header is written first from `infos`, then each tensor's bytes as it arrives, so only
    one tensor is in memory at a time. A tensor that disagrees with its info raises ValueError."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    begin = 0
    for name, info in infos.items():
        header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                        "data_offsets": [begin, begin + info.nbytes]}
        begin += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data aligned to 8 bytes, as the reference writer does
    names = iter(infos)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, t in tensors:
            expected = next(names, None)
            info = infos.get(name)
            if name != expected or info is None or tuple(t.shape) != info.shape or t.dtype != info.dtype:
                raise ValueError(f"{path}: got tensor {name!r} {tuple(t.shape)} {t.dtype}, expected "
                                 f"{expected!r} {infos[expected].shape if expected else ''}")
            f.write(_bytes_view(t.detach().to("cpu").contiguous()))
        left = next(names, None)
        if left is not None:
            raise ValueError(f"{path}: tensor {left!r} was never given")
