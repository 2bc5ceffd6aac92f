"""lib/checkpoint.py: bit-exact round trips, retention, atomic commits under SIGKILL, errors, and a
two-process sharded save restored under another layout and under one process."""
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_worker import reference_state  # noqa: E402

from lib.checkpoint import CheckpointConfig, Checkpointer, Reader, is_native_checkpoint  # noqa: E402
from lib.pytree import flatten_by_path as flatten, unflatten_like  # noqa: E402
from lib.errors import UserError  # noqa: E402

WORKER = str(Path(__file__).parent / "ckpt_worker.py")
REPO = str(Path(__file__).parent.parent)


def zeros_like(tree):
    return unflatten_like(tree, {k: torch.zeros_like(v) for k, v in flatten(tree).items()})


def assert_bit_equal(got, want):
    got, want = flatten(got), flatten(want)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        a, b = got[k].contiguous(), want[k].contiguous()
        # Compare raw bytes: equal floats are not enough (-0.0, NaN payloads, bf16 rounding).
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k


def run_worker(mode: str, path: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, mode, str(path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, **kw)


def test_roundtrip_is_bit_exact_with_retention_and_extra(tmp_path):
    state = reference_state()
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), every=2, keep=2, async_save=True))
    saved = [s for s in range(1, 8) if ckpt.save(s, state, {"consumed_samples": 10 * s, "config": {"lr": 3e-4}})]
    ckpt.wait()
    assert saved == [2, 4, 6]
    assert ckpt.latest_step() == 6
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 6]
    got, extra = ckpt.restore(zeros_like(state))
    assert_bit_equal(got, state)
    assert extra == {"consumed_samples": 60, "config": {"lr": 3e-4}}
    got4, extra4 = ckpt.restore(zeros_like(state), step=4)
    assert extra4["consumed_samples"] == 40
    # An async save owns a copy: a training step that updates params in place right after
    # save() returns must not leak into the checkpoint.
    before = state["params"]["layers"][0]["wq"].clone()
    assert ckpt.save(8, state)
    state["params"]["layers"][0]["wq"].add_(1.0)
    ckpt.wait()
    got8, _ = ckpt.restore(zeros_like(state), step=8)
    assert torch.equal(got8["params"]["layers"][0]["wq"], before)
    state["params"]["layers"][0]["wq"].copy_(before)
    ckpt.close()
    # A new process (here: a new Checkpointer) resumes from the same place.
    again = Checkpointer(CheckpointConfig(dir=str(tmp_path), every=2, keep=2))
    assert again.latest_step() == 8 and again.can_restore()
    assert_bit_equal(again.restore(zeros_like(state))[0], state)
    again.close()


def test_saved_names_are_the_dotted_tree_paths(tmp_path):
    """These names are the on-disk format (the hand-written flatten before optree wrote the same):
    checkpoints written by earlier versions must keep loading."""
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=False))
    ckpt.save(1, reference_state(), force=True)
    ckpt.close()
    with Reader(tmp_path) as reader:
        assert reader.step == 1
        assert set(reader.shapes()) == {
            "params.embed", "params.layers.0.wq", "params.layers.0.norm", "params.layers.1.wq",
            "params.layers.1.norm", "params.odd", "opt.mu.0", "opt.mu.1", "opt.count", "step"}
        assert reader.shapes()["params.layers.1.wq"] == (6, 4)


def test_reading_a_checkpoint_logs_no_warnings(tmp_path, caplog):
    """Every generate / chat / evaluate opens its checkpoint read-only: orbax's warnings about
    that choice ("Given directory is read only", ...) would greet each run."""
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=False))
    ckpt.save(1, reference_state(), force=True)
    ckpt.close()
    caplog.clear()
    with caplog.at_level("WARNING"), Reader(tmp_path) as reader:
        assert reader.step == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_restore_casts_to_target_dtype(tmp_path):
    state = reference_state()
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=False))
    ckpt.save(1, state, force=True)
    target = zeros_like(state)
    target["params"]["layers"][0]["wq"] = torch.zeros(6, 4, dtype=torch.bfloat16)
    target["params"]["embed"].requires_grad_()  # a trainable leaf is filled in place all the same
    got, _ = ckpt.restore(target)
    assert got["params"]["embed"] is target["params"]["embed"]
    assert torch.equal(got["params"]["embed"].detach(), state["params"]["embed"])
    assert got["params"]["layers"][0]["wq"].dtype == torch.bfloat16
    want = state["params"]["layers"][0]["wq"].to(torch.bfloat16)
    assert torch.equal(got["params"]["layers"][0]["wq"], want)


def test_model_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    state = reference_state()
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=False))
    ckpt.save(5, state, force=True)
    wider = zeros_like(state)
    wider["params"]["layers"][1]["wq"] = torch.zeros(6, 8)
    with pytest.raises(UserError, match=r"'params\.layers\.1\.wq' has shape \(6, 4\), the model expects \(6, 8\)"):
        ckpt.restore(wider)
    deeper = zeros_like(state)
    deeper["params"]["layers"].append({"wq": torch.zeros(6, 4), "norm": torch.zeros(6)})
    with pytest.raises(UserError, match=r"has no 'params\.layers\.2\.norm'"):
        ckpt.restore(deeper)
    shallower = zeros_like(state)
    shallower["params"]["layers"].pop()
    with pytest.raises(UserError, match=r"has 'params\.layers\.1\.norm' \(shape \(6,\)\), which the model does not"):
        ckpt.restore(shallower)


def test_unreadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    state = reference_state()
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=False))
    ckpt.save(3, state, force=True)
    ckpt.close()
    for f in (tmp_path / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files
            f.write_bytes(b"garbage")
    again = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    assert again.latest_step() == 3
    with pytest.raises(UserError, match=f"cannot read checkpoint {tmp_path / '3'}"):
        again.restore(zeros_like(state))
    (tmp_path / "3" / "state" / "_METADATA").write_text("{not json")
    with pytest.raises(UserError, match=f"cannot read checkpoint {tmp_path / '3'}"):
        again.restore(zeros_like(state))


def test_unwritable_dir_fails_at_startup(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"checkpoint dir {blocker / 'ckpt'} is not writable"):
        Checkpointer(CheckpointConfig(dir=str(blocker / "ckpt")))


def test_load_native_and_finetune_takes_params_only(tmp_path):
    state = reference_state()
    src = tmp_path / "pretrain"
    ckpt = Checkpointer(CheckpointConfig(dir=str(src), async_save=False))
    ckpt.save(7, state, {"consumed_samples": 70}, force=True)
    ckpt.close()
    assert is_native_checkpoint(src) and is_native_checkpoint(src / "7")
    assert not is_native_checkpoint(tmp_path) and not is_native_checkpoint(src / "7" / "state")

    resumed = Checkpointer(CheckpointConfig(dir=str(tmp_path / "run2"), load=str(src)))
    assert resumed.latest_step() is None and resumed.can_restore()
    got, extra = resumed.restore(zeros_like(state))
    assert_bit_equal(got, state)
    assert extra == {"consumed_samples": 70}

    fresh = zeros_like(state)
    tuned = Checkpointer(CheckpointConfig(dir=str(tmp_path / "run3"), load=str(src / "7"), finetune=True))
    got, extra = tuned.restore(fresh)
    assert_bit_equal(got["params"], state["params"])
    assert all(got_leaf is fresh_leaf for got_leaf, fresh_leaf in
               zip(flatten(got["opt"]).values(), flatten(fresh["opt"]).values()))
    assert got["step"] is fresh["step"]
    assert extra == {}

    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text("{}")
    from_hf = Checkpointer(CheckpointConfig(load=str(hf_like)))
    assert not from_hf.can_restore()  # the runner loads HF weights itself
    with pytest.raises(UserError, match="is not a checkpoint written by this project"):
        from_hf.restore(fresh)


def test_sigkill_during_commit_keeps_previous_checkpoint(tmp_path):
    proc = run_worker("killed_save", tmp_path)
    lines = []
    for line in proc.stdout:  # the worker blocks inside orbax's commit of step 2
        lines.append(line)
        if line.startswith("COMMITTING"):
            break
    else:
        pytest.fail("worker ended before committing:\n" + "".join(lines[-30:]))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in tmp_path.iterdir()), "kill landed mid-save"

    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), every=1, keep=3))
    assert ckpt.latest_step() == 1
    got, extra = ckpt.restore(zeros_like(reference_state()))
    assert_bit_equal(got, reference_state())
    assert extra == {"step": 1}
    # The half-written step is cleaned away, so step 2 can be saved again.
    assert ckpt.save(2, reference_state(), {"step": 2})
    ckpt.wait()
    assert ckpt.latest_step() == 2
    assert not any("tmp" in p.name for p in tmp_path.iterdir())


def test_failed_async_save_is_reported_once_and_cleaned_up(tmp_path):
    """A full disk during a background save: one clear error at the next poll, naming the step;
    no orbax traceback; its partial output removed; the previous checkpoint intact."""
    proc = subprocess.run([sys.executable, WORKER, "full_disk", str(tmp_path)], cwd=REPO, text=True,
                          capture_output=True, timeout=120)
    assert (f"USERERROR saving checkpoint step 2 to {tmp_path} failed: File too large" in proc.stdout
            and "the last good checkpoint is step 1" in proc.stdout), proc.stdout[-3000:]
    assert "CLOSED ['1']" in proc.stdout  # no <step>.orbax-checkpoint-tmp left behind
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    assert ckpt.latest_step() == 1
    assert_bit_equal(ckpt.restore(zeros_like(reference_state()))[0], reference_state())


def test_a_state_with_nan_is_never_saved(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=False))
    ckpt.save(1, reference_state(), force=True)
    poisoned = reference_state()
    poisoned["opt"]["mu"][1][2, 3] = float("nan")
    with pytest.raises(UserError, match=r"not saving step 2: 'opt\.mu\.1' holds NaN or inf values; "
                                        r"the last checkpoint \(step 1\) is kept"):
        ckpt.save(2, poisoned, force=True)
    assert ckpt.latest_step() == 1
    ckpt.close()


@pytest.mark.parametrize("damage", ["metadata", "arrays", "deleted state"])
def test_a_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=False))
    ckpt.save(1, reference_state(), {"step": 1}, force=True)
    ckpt.save(2, reference_state(), {"step": 2}, force=True)
    ckpt.close()
    state_dir = tmp_path / "2" / "state"
    if damage == "metadata":
        (state_dir / "_METADATA").write_text("{not json")
    elif damage == "arrays":
        for f in state_dir.rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"garbage")
    else:
        shutil.rmtree(state_dir)
    again = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    got, extra = again.restore(zeros_like(reference_state()))
    assert extra == {"step": 1} and again.latest_step() == 1
    assert_bit_equal(got, reference_state())
    err = capsys.readouterr().err
    assert "warning: checkpoint step 2 in" in err and "is damaged" in err and "using step 1" in err
    assert [p.name.startswith("damaged-2-") for p in tmp_path.iterdir() if not p.name.isdigit()] == [True]
    # Training goes on: step 2 can be written again.
    assert again.save(2, reference_state(), {"step": 2}, force=True)
    again.close()


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:  # jax's coordinator takes MASTER_PORT + 1
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


@pytest.mark.distributed
def test_two_ranks_write_one_sharded_checkpoint_that_reshards(tmp_path):
    port = _free_port_pair()
    procs = [run_worker("sharded", tmp_path, {"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": str(port)}) for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {r}" in out, out[-3000:]
    # Each rank wrote its own shards into the one checkpoint.
    assert {d.name for d in (tmp_path / "42" / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                                                     "ocdbt.process_1"}
    # One process, plain tensors: every shard is read back into the full tensors.
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    got, extra = ckpt.restore(zeros_like(reference_state()))
    assert_bit_equal(got, reference_state())
    assert extra == {"consumed_samples": 1000, "rank_seen": 0}
