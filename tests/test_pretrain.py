"""runners.pretrain end to end (eager, tiny): training, logs, exact resume after SIGKILL, faults."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lib import checkpoint as ckpt_lib
from lib import cli, pytree
from lib import config as config_lib
from lib.config import ConfigError
from lib.data.corpus import default_dataset
from lib.errors import Interrupted, UserError
from models import hf, llama
from parallel import train_step
from runners import pretrain

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    prefix, tok = default_dataset(tmp_path_factory.mktemp("corpus"), max_bytes=200_000, vocab_size=512)
    return [f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]


def args(data, out, *extra):
    return ["model=tiny", *data, "data.seq_len=32", "train.global_batch=4", "train.steps=12",
            "train.log_every=1", "train.eval_every=6", "train.eval_batches=2",
            "train.step.compile=false", "optim.warmup_steps=2", "optim.decay_steps=12",
            "checkpoint.every=4", f"out_dir={out}", *extra]


def metrics(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def final_state(out, step, model=llama.PRESETS["tiny"]):
    target = train_step.init_state(llama.init(model), train_step.TrainStepConfig())
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(dir=str(Path(out, "checkpoints"))))
    state, extra = ckpt.restore(target, step=step)
    ckpt.close()
    return state, extra


def test_pretrain_trains_logs_and_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    pretrain.main(args(data, out, "optim.lr=3e-3"))
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3  # it learns
    for key in ("lr", "grad_norm", "tokens_per_s_per_device", "tflops_per_device", "step_time_s"):
        assert key in train_rows[-1]
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["12", "8"]  # keep=2
    state, extra = final_state(out, 12)
    assert int(state["step"]) == 12 and extra["consumed_samples"] == 48
    assert extra["config"]["model"]["n_layers"] == 2


def test_sigkill_then_resume_is_bit_identical(data, tmp_path):
    steps = ["train.steps=40", "optim.decay_steps=40", "train.eval_every=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    pretrain.main(args(data, whole, *steps))

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "runners.pretrain", *args(data, killed, *steps)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = killed / "metrics.jsonl"
        if log.exists() and any(json.loads(l)["step"] >= 10 for l in log.read_text().splitlines() if l):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    committed = [int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
    assert committed and max(committed) < 40

    pretrain.main(args(data, killed, *steps))
    a, _ = final_state(whole, 40)
    b, _ = final_state(killed, 40)
    for (path, x), (_, y) in zip(pytree.flatten_by_path(a).items(), pytree.flatten_by_path(b).items()):
        assert torch.equal(x, y), path
    # The resumed log continues where the checkpoint was, without duplicated steps.
    steps_logged = [r["step"] for r in metrics(killed) if "loss" in r]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 40


def test_divergence_stops_naming_the_step_and_keeps_the_state(data, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"diverged at step \d+: .* grad norm nan \(2 non-finite"):
        pretrain.main(args(data, out, "optim.lr=1e30", "optim.grad_clip=0", "optim.min_lr=0",
                           "optim.weight_decay=0", "train.max_bad_steps=2", "checkpoint.every=1"))
    # Non-finite steps are skipped: the last checkpoint holds finite parameters.
    state, _ = final_state(out, None)
    assert all(torch.isfinite(t).all() for t in pytree.flatten_by_path(state["params"]).values())


def test_mesh_that_does_not_fit_the_world(data, tmp_path):
    with pytest.raises(UserError, match=r"product 2 != world size 1"):
        pretrain.main(args(data, tmp_path / "m", "mesh.fsdp=2"))


def test_resume_faults_and_the_recorded_model(data, tmp_path, capsys):
    out = tmp_path / "resume"
    short = ["train.eval_every=0", "optim.decay_steps=8"]
    pretrain.main(args(data, out, "train.steps=4", *short))
    # model.* that contradicts the checkpoint is refused, naming the key and both values.
    with pytest.raises(UserError, match=r"model\.ffn_dim=128 contradicts .*checkpoints, which holds "
                                        r"a model with ffn_dim=176: leave model\.\* out"):
        pretrain.main(args(data, out, "train.steps=8", "model.ffn_dim=128", *short))
    # Another step dtype: not "another model?" but what differs and what to do instead.
    with pytest.raises(UserError, match=r"was trained with train\.step\.dtype=fp32; resuming it with "
                                        r"train\.step\.dtype=bf16 is not supported.*checkpoint\.finetune=true"):
        pretrain.main(args(data, out, "train.steps=8", "train.step.dtype=bf16", *short))
    # A second run on the same out_dir: the lock names its holder (here: this live process).
    lock = out / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    with pytest.raises(UserError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                        rf"pid {os.getpid()}, since now\)"):
        pretrain.main(args(data, out, "train.steps=8", *short))
    # A lock left by a dead process is taken over; a metrics line cut by a kill is dropped; the
    # model need not be restated (the default model has another shape: the recorded one is used).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.')
    capsys.readouterr()
    pretrain.main([a for a in args(data, out, "train.steps=6", *short) if a != "model=tiny"])
    captured = capsys.readouterr()
    assert f"locked by pid {dead.pid}" in captured.err and "taking the lock over" in captured.err
    assert "dropped 1 unreadable line(s) (line 5" in captured.err
    assert "resuming from" in captured.out and "at step 4" in captured.out
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 7))
    assert not lock.exists()  # released at the end
    state, extra = final_state(out, 6)
    assert extra["config"]["model"] == config_lib.to_dict(llama.PRESETS["tiny"])


def test_empty_data_paths_and_out_dir_are_errors(data, tmp_path):
    with pytest.raises(UserError, match="data.paths is empty"):
        pretrain.main(args(data, tmp_path / "e", "data.paths=[]"))
    assert not (tmp_path / "default-data").exists()  # the generated corpus was not used instead
    with pytest.raises(ConfigError, match="out_dir is empty"):
        pretrain.main([*args(data, tmp_path / "x"), "out_dir="])


def test_sigterm_saves_and_exits_with_143(data, tmp_path):
    """In-process: a timer sends SIGTERM once the loop has logged a step."""
    out = tmp_path / "term"

    def send_when_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = out / "metrics.jsonl"
            if log.exists() and log.read_text().strip():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)
    timer = threading.Thread(target=send_when_training, daemon=True)
    timer.start()
    with pytest.raises(Interrupted, match=r"interrupted by SIGTERM at step (\d+); the checkpoint of "
                                          r"step \1 is saved") as info:
        pretrain.main(args(data, out, "train.steps=400", "optim.decay_steps=400", "train.eval_every=0"))
    timer.join()
    assert info.value.exit_code == 143
    stopped = int(re.search(r"step (\d+);", str(info.value)).group(1))
    assert stopped < 400 and (out / "checkpoints" / str(stopped)).is_dir()

    def interrupted_main(argv):
        raise info.value
    with pytest.raises(SystemExit) as exit_info:  # what `python -m runners.pretrain` exits with
        cli.run(interrupted_main, [])
    assert exit_info.value.code == 143


def test_a_data_error_exits_2_with_one_line_and_no_traceback(data, tmp_path):
    """Resources opened at start-up (the checkpointer's orbax threads) are closed on the error
    path: nothing is printed after the error at interpreter exit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "runners.pretrain",
                           *args(data, tmp_path / "bad", "data.paths=[nowhere/corpus]")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: data path 'nowhere/corpus'"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "cannot schedule new futures" not in proc.stderr


def test_unwritable_output_is_reported(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="file"):
        pretrain.main(args(data, blocker / "run"))


def test_finetune_from_an_hf_directory(data, tmp_path):
    config = llama.PRESETS["tiny"]
    params = llama.init(config, seed=7)
    hf.save(tmp_path / "hf", config, params)
    out = tmp_path / "ft"
    pretrain.main(args(data, out, f"checkpoint.load={tmp_path / 'hf'}", "train.steps=1",
                       "optim.lr=0", "optim.min_lr=0", "train.eval_every=0"))
    state, _ = final_state(out, 1)
    torch.testing.assert_close(state["params"]["embed"], params["embed"], rtol=0, atol=0)


@pytest.mark.distributed
def test_torchrun_fsdp_then_resume_under_tensor_parallel(data, tmp_path):
    """Two ranks write one checkpoint under FSDP; the run resumes under TP (resharded on load)."""
    out = tmp_path / "dist"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "runners.pretrain"]
    common = args(data, out, "train.eval_every=0", "optim.decay_steps=8", "train.device=cpu")
    first = subprocess.run([*torchrun, *common, "train.steps=4", "mesh.fsdp=2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*torchrun, *common, "train.steps=8", "mesh.fsdp=1", "mesh.tensor=2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "at step 4" in second.stdout
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    state, extra = final_state(out, 8)
    assert extra["consumed_samples"] == 32 and extra["config"]["mesh"]["tensor"] == 2


def test_bf16_finetune_from_a_native_checkpoint_starts_from_its_weights(data, tmp_path):
    base = tmp_path / "base"
    pretrain.main(args(data, base, "train.steps=4", "optim.decay_steps=4", "train.eval_every=0"))
    loaded, _ = final_state(base, 4)
    out = tmp_path / "bf16"
    # No model.*: the checkpoint's recorded model is used (the default model has another shape).
    pretrain.main([a for a in args(data, out, f"checkpoint.load={base / 'checkpoints'}",
                                   "checkpoint.finetune=true", "train.step.dtype=bf16", "train.steps=1",
                                   "optim.lr=0", "optim.min_lr=0", "train.eval_every=0")
                   if a != "model=tiny"])
    target = train_step.init_state(llama.init(llama.PRESETS["tiny"]),
                                   train_step.TrainStepConfig(dtype="bf16"))
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.CheckpointConfig(dir=str(out / "checkpoints")))
    state, _ = ckpt.restore(target, step=1)
    ckpt.close()
    # lr 0: the step changes nothing, so the master weights are the loaded fp32 ones exactly (made
    # from the loaded params, not from a random init) and the params their bf16 rounding.
    loaded_wq = loaded["params"]["layers"][0]["wq"]
    assert torch.equal(state["params"]["layers"][0]["wq"], loaded_wq.to(torch.bfloat16))
    assert torch.equal(state["opt"]["master"]["layers"][0]["wq"], loaded_wq)


def test_evaluation_tasks_are_scored_during_training_as_runners_evaluate_scores_them(data, tmp_path):
    from runners import evaluate
    evals_dir = ROOT / "tests" / "data" / "evals"
    tasks = ["eval.tasks=[mmlu,hellaswag]", f"eval.mmlu={evals_dir}/mmlu/data",
             f"eval.hellaswag={evals_dir}/hellaswag", "eval.limit=2"]
    out = tmp_path / "run"
    pretrain.main(args(data, out, *tasks))
    logged = [r for r in metrics(out) if "mmlu_acc" in r]
    assert [r["step"] for r in logged] == [6, 12]
    assert {"hellaswag_acc", "hellaswag_acc_norm"} <= logged[-1].keys()
    # the last step's figures are those of the final checkpoint scored on its own
    evaluate.main([f"checkpoint.load={out}/checkpoints", f"out_dir={tmp_path / 'eval'}",
                   "eval.compile=false", *tasks])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert logged[-1]["mmlu_acc"] == results["mmlu"]["acc"]
    assert logged[-1]["hellaswag_acc_norm"] == results["hellaswag"]["acc_norm"]


def test_evaluation_task_files_are_checked_before_training(data, tmp_path):
    with pytest.raises(UserError, match="eval.tasks includes piqa: set eval.piqa="):
        pretrain.main(args(data, tmp_path / "run", "eval.tasks=[piqa]"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
