"""Files and folders made by libraries for temporaries get the user's umask once they are output.

`tempfile.mkdtemp` makes 0700 folders and safetensors writes 0600 files: right for temporaries,
wrong for an exported model directory that the user's group should read like everything else
the tools write with `open()` and `mkdir()`, which follow the umask.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
