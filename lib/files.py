"""Writing files safely: atomically, and with the user's umask.

    write_text_atomic(out / "config.yaml", text)
    with atomic_path(out / "model.safetensors") as tmp:   # write `tmp` any way; renamed on success
        save_file(tensors, str(tmp))

An atomic write goes to `.<name>.tmp<pid>` beside the target (same filesystem, so the rename is
atomic) and is renamed onto it only when complete: a reader, or a run restarted after a crash,
sees the old file or the new one, never a half-written one; a failed write leaves no temporary.

`tempfile.mkdtemp` makes 0700 folders and safetensors writes 0600 files: right for temporaries,
wrong for an exported model directory that the user's group should read like everything else
the tools write with `open()` and `mkdir()`, which follow the umask.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write instead of `path`; renamed onto `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def umask() -> int:
    """The process's umask, read without changing it (another thread may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # No procfs: set and restore. A file created meanwhile by another thread gets 022, never 0.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str, suffix: str) -> Path:
    """A new uniquely named folder in `parent`, with the mode `mkdir` would give it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(path, 0o777 & ~umask())
    return path


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library the mode `open()` would have given it."""
    os.chmod(path, 0o666 & ~umask())
