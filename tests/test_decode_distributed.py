"""Sharded decoding (tests/decode_worker.py): under tensor parallelism (kv heads and vocabulary
split over 2 ranks, attention per shard) and data parallelism (rows split over 2 ranks), every
rank picks exactly the tokens one process picks, beam-search row reorders included."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import free_port

WORKER = Path(__file__).resolve().parent / "decode_worker.py"

pytestmark = pytest.mark.distributed


def test_tensor_and_data_parallel_decoding_picks_the_tokens_of_one_process(tmp_path):
    out, port, world = tmp_path / "tokens.json", free_port(), 2
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   TORCH_DEVICE_BACKEND_AUTOLOAD="0")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), "tensor=2", "data=2"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"rank {failed[0]} failed:\n{logs[failed[0]][-6000:]}"
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
    single = ranks[0]["single"]
    assert len(single) == 3 and all(len(row) == 12 for row in single)
    for case in ("tensor=2", "data=2"):
        for rank in range(world):
            assert ranks[rank][case] == single, (case, rank)
    # the sharding really happened: kv heads over tensor; rows over data, padded from 3 to 4
    assert ranks[0]["tensor=2 placements"] == {"wk": "(Shard(dim=1),)", "cache": "(Shard(dim=2),)",
                                               "rows": 3}
    assert ranks[0]["data=2 placements"] == {"wk": "(Replicate(),)", "cache": "(Shard(dim=0),)",
                                             "rows": 4}
