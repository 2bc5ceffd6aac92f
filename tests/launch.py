"""Start N ranks of a worker script as processes with torchrun's environment (gloo on CPU)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Path, world_size: int, args: list[str], timeout: int = 420) -> None:
    """Run `python worker *args` as ranks 0..world_size-1; fail with the log of the first rank
    that exits non-zero."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TORCH_DEVICE_BACKEND_AUTOLOAD="0")
        procs.append(subprocess.Popen([sys.executable, str(worker), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"rank {failed[0]} failed:\n{logs[failed[0]][-6000:]}"
