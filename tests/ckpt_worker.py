"""Subprocess side of tests/test_checkpoint.py (run as a script, one mode per call).

  sharded DIR      2 ranks (RANK/WORLD_SIZE/MASTER_* set): save an FSDP (Shard(0)) state, then
                   restore it under Shard(1)/Replicate placements; print OK when bit-exact.
  killed_save DIR  save step 1, then block inside orbax's commit of step 2 (print COMMITTING)
                   until the parent SIGKILLs this process.
  full_disk DIR    save step 1, cap the file size (RLIMIT_FSIZE) as a full disk would, save a
                   larger step 2 asynchronously, poll until its error shows, print it and the
                   directory listing after close().
"""
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lib.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from lib.pytree import flatten_by_path as flatten, unflatten_like  # noqa: E402
from lib.errors import UserError  # noqa: E402


def reference_state(scale: int = 1) -> dict:
    """The same full tensors in every process (fixed seed). Over 2 ranks most shapes split
    evenly; "odd" splits evenly along neither dim (5 x 3), which jax shardings cannot express."""
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "params": {"embed": r(8 * scale, 6).bfloat16(),
                   "layers": [{"wq": r(6, 4), "norm": r(6)}, {"wq": r(6, 4), "norm": r(6)}],
                   "odd": r(5, 3)},
        "opt": {"mu": [r(8 * scale, 6), r(6, 4)], "count": torch.tensor(3, dtype=torch.int64)},
        "step": torch.tensor(42, dtype=torch.int64),
    }


def sharded() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    ref = reference_state()

    def place(tree, placement_of):
        flat = flatten(tree)
        out = {k: distribute_tensor(v, mesh, [placement_of(v)], src_data_rank=None) if v.ndim else v
               for k, v in flat.items()}
        return unflatten_like(tree, out)

    ckpt = Checkpointer(CheckpointConfig(dir=sys.argv[2], every=1, keep=2), rank, world)
    state = place(ref, lambda v: Shard(0))
    ckpt.save(42, state, {"consumed_samples": 1000, "rank_seen": rank})
    ckpt.wait()

    # Another layout of the same state: columns split where possible, else replicated.
    target = place(_zeros_like(ref), lambda v: Shard(1) if v.ndim == 2 else Replicate())
    got, extra = ckpt.restore(target)
    for key, want in flatten(ref).items():
        t = flatten(got)[key]
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        assert torch.equal(full.view(-1).view(torch.uint8) if full.ndim else full,
                           want.view(-1).view(torch.uint8) if want.ndim else want), key
        assert t.dtype == want.dtype, key
        if t.ndim == 2:
            assert t.placements == (Shard(1),), (key, t.placements)
    assert extra == {"consumed_samples": 1000, "rank_seen": 0}, extra
    ckpt.close()
    dist.destroy_process_group()
    print("OK", rank, flush=True)


def _zeros_like(tree):
    return unflatten_like(tree, {k: torch.zeros_like(v) for k, v in flatten(tree).items()})


def killed_save() -> None:
    from orbax.checkpoint._src.path import atomicity

    ckpt = Checkpointer(CheckpointConfig(dir=sys.argv[2], every=1, keep=3))
    ckpt.save(1, reference_state(), {"step": 1})
    ckpt.wait()

    async def hang(self):  # all of step 2 is written; only the commit rename is missing
        print("COMMITTING", flush=True)
        time.sleep(600)
    atomicity.AtomicRenameTemporaryPath.finalize = hang
    ckpt.save(2, reference_state(scale=64), {"step": 2})
    ckpt.wait()
    print("NOT KILLED", flush=True)


def full_disk() -> None:
    ckpt = Checkpointer(CheckpointConfig(dir=sys.argv[2], every=1, keep=3, async_save=True))
    ckpt.save(1, reference_state(), {"step": 1})
    ckpt.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        ckpt.save(2, reference_state(scale=1024), {"step": 2})
        for _ in range(1200):  # the training loop polls once per step
            time.sleep(0.05)
            ckpt.poll()
        print("SAVED", flush=True)
    except UserError as e:
        print(f"USERERROR {e}", flush=True)
    ckpt.close()  # the failure was reported: closing does not raise it again
    print("CLOSED", sorted(os.listdir(sys.argv[2])), flush=True)


if __name__ == "__main__":
    {"sharded": sharded, "killed_save": killed_save, "full_disk": full_disk}[sys.argv[1]]()
