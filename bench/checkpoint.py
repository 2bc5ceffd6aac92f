"""Checkpoint save/restore: lib.checkpoint (orbax) against torch.distributed.checkpoint (DCP).

The state is a model preset's fp32 params plus two AdamW moments of the same shapes (random, so
no writer gains from compressible zeros). For each writer, async and sync: the time `save` blocks
the caller (what a training loop loses), the time until the checkpoint is committed on disk, and
the time to restore it into a preallocated state. The last save is followed by an in-place
params update while the write is in flight (the next training step); the restored state must
still equal the state at save() time. Medians over --reps saves, after one untimed
warm-up save (the first save pays one-off costs: jax start-up, thread pools, DCP planning caches).

    .venv/bin/python bench/checkpoint.py --preset small --reps 3
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from lib.pytree import flatten_by_path as flatten, unflatten_like  # noqa: E402
from models import llama  # noqa: E402


def make_state(preset: str) -> dict:
    params = llama.init(llama.PRESETS[preset], seed=0, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(1)
    moment = lambda t: torch.randn(t.shape, generator=g)
    like = lambda tree: unflatten_like(tree, {k: moment(v) for k, v in flatten(tree).items()})
    return {"params": params, "opt": {"mu": like(params), "nu": like(params)},
            "step": torch.tensor(100, dtype=torch.int64)}


@contextlib.contextmanager
def training_step_during_write(state, enabled: bool):
    """Update the params in place while a save is in flight, as the next training step would, and
    put the old values back after the save; the restore below must then see the old values."""
    flat = flatten(state["params"])
    old = {k: v.clone() for k, v in flat.items()} if enabled else {}
    for v in flat.values() if enabled else ():
        v.add_(1.0)
    yield
    for k, v in old.items():
        flat[k].copy_(v)


def zeros_like(tree):
    return unflatten_like(tree, {k: torch.zeros_like(v) for k, v in flatten(tree).items()})


def same(a, b) -> bool:
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def bench_orbax(state, root: Path, reps: int, async_save: bool) -> dict:
    ckpt = Checkpointer(CheckpointConfig(dir=str(root), every=1, keep=1, async_save=async_save))
    blocked, total = [], []
    for step in range(reps + 1):
        t0 = time.perf_counter()
        ckpt.save(step, state, {"consumed_samples": step}, force=True)
        t1 = time.perf_counter()
        with training_step_during_write(state, enabled=step == reps):
            ckpt.wait()
        t2 = time.perf_counter()
        if step:  # step 0 is the warm-up
            blocked.append(t1 - t0)
            total.append(t2 - t0)
    restore = []
    for _ in range(reps):
        target = zeros_like(state)
        t0 = time.perf_counter()
        got, _ = ckpt.restore(target)
        restore.append(time.perf_counter() - t0)
    ckpt.close()
    return {"blocked": blocked, "total": total, "restore": restore, "exact": same(got, state)}


def bench_dcp(state, root: Path, reps: int, async_save: bool) -> dict:
    import torch.distributed.checkpoint as dcp
    blocked, total = [], []
    for step in range(reps + 1):
        path = root / str(step)
        t0 = time.perf_counter()
        if async_save:
            future = dcp.async_save(state, checkpoint_id=str(path))
            t1 = time.perf_counter()
            with training_step_during_write(state, enabled=step == reps):
                future.result()
        else:
            dcp.save(state, checkpoint_id=str(path))
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        if step:  # step 0 is the warm-up
            blocked.append(t1 - t0)
            total.append(t2 - t0)
        if step:
            shutil.rmtree(root / str(step - 1))  # keep 1, as the orbax run does
    restore = []
    for _ in range(reps):
        target = zeros_like(state)
        t0 = time.perf_counter()
        dcp.load(target, checkpoint_id=str(root / str(reps)))
        restore.append(time.perf_counter() - t0)
    return {"blocked": blocked, "total": total, "restore": restore, "exact": same(target, state)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch dir (default: a temp dir, removed after)")
    args = ap.parse_args()

    # DCP's async path wants a process group even for one process.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    dist.init_process_group("gloo", rank=0, world_size=1)
    state = make_state(args.preset)
    nbytes = sum(t.numel() * t.element_size() for t in flatten(state).values())
    print(f"state: preset {args.preset}, params + 2 AdamW moments, fp32, {nbytes / 2**20:.0f} MiB, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-"))
    rows = []
    try:
        for name, fn in (("orbax (lib.checkpoint)", bench_orbax), ("torch.distributed.checkpoint", bench_dcp)):
            for async_save in (True, False):
                root = scratch / f"{fn.__name__}-{'async' if async_save else 'sync'}"
                r = fn(state, root, args.reps, async_save)
                med = {k: statistics.median(v) for k, v in r.items() if k != "exact"}
                med["exact"] = r["exact"]
                med["range"] = {k: (min(v), max(v)) for k, v in r.items() if k != "exact"}
                rows.append((name, "async" if async_save else "sync", med))
                print(f"{name:30s} {'async' if async_save else 'sync':5s} blocked {med['blocked']:.3f}s "
                      f"total {med['total']:.3f}s restore {med['restore']:.3f}s "
                      f"restored == state at save time: {r['exact']}", flush=True)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
        dist.destroy_process_group()

    print("\nmedian (min-max) seconds")
    print("| writer | mode | blocked | save to commit | restore | restored = state at save() |")
    print("|---|---|---|---|---|---|")
    for name, mode, m in rows:
        cell = lambda k: f"{m[k]:.2f} ({m['range'][k][0]:.2f}-{m['range'][k][1]:.2f})"
        print(f"| {name} | {mode} | {cell('blocked')} | {cell('total')} | {cell('restore')} | "
              f"{'yes' if m['exact'] else 'NO'} |")
    by = {(n.split()[0], mode): m for n, mode, m in rows}
    for mode in ("async", "sync"):
        o, d = by[("orbax", mode)], by[("torch.distributed.checkpoint", mode)]
        print(f"orbax/DCP {mode}: blocked x{o['blocked'] / d['blocked']:.2f}, total x{o['total'] / d['total']:.2f}, "
              f"restore x{o['restore'] / d['restore']:.2f}")


if __name__ == "__main__":
    main()
