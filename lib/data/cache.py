"""Index arrays built once and cached on disk as .npy, keyed by a hash of what they depend on.

With torch.distributed initialised, rank 0 builds and the other ranks wait for the files: the
indices are identical everywhere, and building them on every rank would race on the same paths.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lib.errors import UserError

WAIT_TIMEOUT_S = 600.0


def distributed_rank() -> int:
    """This process's rank, or 0 without torch.distributed (not imported means not initialised,
    so preprocessing and tools never pay for importing torch)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank()


def cached_arrays(cache_dir: str | os.PathLike, kind: str, key: dict,
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load `kind`'s arrays for `key` from `cache_dir`, building (rank 0) and saving them if absent.

    A damaged cache (a truncated or deleted array, a cut description file: a full disk or a
    crash of another tool) is rebuilt with a warning: the arrays are a pure function of `key`.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(cache_dir) / f"{kind}-{digest}"
    # The description file is written last: its presence means every array is complete.
    done = Path(f"{base}.json")
    if not done.exists():
        if distributed_rank() == 0:
            arrays = build()
            _save(base, done, key, arrays)
            return arrays
        _wait_for(done)
    try:
        return _load(base, done)
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        print(f"warning: {done}: the cached dataset index is damaged ({e}); rebuilding it", file=sys.stderr)
        arrays = build()
        if distributed_rank() == 0:  # every rank builds the same arrays; one writes them
            _save(base, done, key, arrays)
        return arrays


def _load(base: Path, done: Path) -> dict[str, np.ndarray]:
    names = json.loads(done.read_text())["arrays"]
    # mmap checks each file's length against its header, so a truncated array fails here.
    return {name: np.load(f"{base}-{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}


def _save(base: Path, done: Path, key: dict, arrays: dict[str, np.ndarray]) -> None:
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{base.parent}: cannot create the dataset index cache folder ({e})") from e
    for name, arr in arrays.items():
        tmp = f"{base}-{name}.tmp{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, f"{base}-{name}.npy")
    tmp = f"{done}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps({"key": key, "arrays": sorted(arrays)}, indent=1, sort_keys=True))
    os.replace(tmp, done)


def _wait_for(done: Path) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not done.exists():
        if time.monotonic() > deadline:
            raise UserError(f"{done}: rank 0 did not build the dataset index in {WAIT_TIMEOUT_S:.0f} s "
                            "(is the cache folder on a filesystem every rank sees?)")
        time.sleep(0.1)
