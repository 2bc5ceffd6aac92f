"""One rank of tests/test_decode_distributed.py: sharded greedy decoding against one process.

    python tests/decode_worker.py OUT.json tensor=2 data=2

For each mesh case the rank decodes a left-padded batch of three prompts (an odd batch: under
data=2 the rows are padded to a multiple of the batch shards) with the "tiny" model placed by
the default rule table, and also reorders the rows once midway as beam search does. Rank 0
also decodes alone (no mesh) and writes both token lists as JSON; every rank writes its own
tokens too, so the test sees that all ranks agree.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import llama  # noqa: E402
from parallel import sharding  # noqa: E402
from parallel.decode import Decoder  # noqa: E402
from parallel.mesh import MeshConfig, build_mesh  # noqa: E402
from tests.helpers_decode import left_pad  # noqa: E402

MODEL = llama.PRESETS["tiny"]
NEW_TOKENS, REORDER_AT = 12, 5


def decode(decoder: Decoder, prompts: list[list[int]]) -> list[list[int]]:
    tokens, pads = left_pad(prompts)
    cache = decoder.init_cache(len(prompts), tokens.shape[1] + NEW_TOKENS, pads)
    logits, cache = decoder.forward(tokens, cache, last_only=True)
    out = []
    for i in range(NEW_TOKENS):
        nxt = logits.argmax(-1)
        if i == REORDER_AT:  # beam search's shuffle: row 0 continues row 2, row 2 row 0
            rows = torch.tensor([2, 1, 0])
            decoder.reorder(cache, rows)
            nxt = nxt[rows]
            out = [o[rows] for o in out]
        out.append(nxt)
        logits, cache = decoder.forward(nxt[:, None], cache, last_only=True)
    return torch.stack(out, 1).tolist()


def main(out_path: str, *cases: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    params = llama.init(MODEL, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, MODEL.vocab_size, (n,), generator=g).tolist() for n in (9, 4, 13)]
    results = {}
    if rank == 0:
        results["single"] = decode(Decoder(params, MODEL, backend=None), prompts)
    for case in cases:
        sizes = {"data": 1, "fsdp": 1, "tensor": 1}
        sizes.update({k: int(v) for k, v in (item.split("=") for item in case.split(","))})
        mesh = build_mesh(MeshConfig(**sizes))
        rules = sharding.load_rules(mesh=mesh)
        decoder = Decoder(params, MODEL, backend=None, mesh=mesh, rules=rules)
        results[case] = decode(decoder, prompts)
        cache = decoder.init_cache(3, 8, torch.zeros(3, dtype=torch.long))
        results[case + " placements"] = {"wk": str(decoder.params["layers"][0]["wk"].placements),
                                         "cache": str(cache["layers"][0]["k"].placements),
                                         "rows": cache["start"].shape[0]}
    Path(f"{out_path}.rank{rank}").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
