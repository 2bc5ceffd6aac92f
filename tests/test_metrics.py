"""lib/metrics.py: rates and MFU by hand, the JSONL file, TensorBoard events, rank and resume."""
from __future__ import annotations

import io
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lib import metrics
from models import llama


def test_mfu_hand_example():
    # 2 devices, 2 steps in 4 s, 16384 tokens: 4096 tok/s, 2048 per device.
    # 1e9 FLOP/token -> 2.048e12 FLOP/s per device; over a 4e12 peak that is 51.2 %.
    rates = metrics.throughput(tokens=16384, samples=8, seconds=4.0, steps=2, world_size=2,
                               flops_per_token=1e9, peak_flops=4e12)
    assert rates == pytest.approx({"step_time_s": 2.0, "tokens_per_s": 4096.0,
                                   "tokens_per_s_per_device": 2048.0, "samples_per_s": 2.0,
                                   "tflops_per_device": 2.048, "mfu": 0.512})


def test_mfu_from_model_flops():
    config = llama.PRESETS["llama2-7b"]
    fpt = llama.flops_per_token(config, seq_len=4096)
    # 6·N with N = 6.74e9 weights (7B less the 131M input embedding) plus attention scores:
    # 6·6.607e9 + 12·32·32·128·4096 = 3.964e10 + 6.44e9 ≈ 4.61e10 FLOP per token.
    assert fpt == pytest.approx(4.61e10, rel=0.01)
    rates = metrics.throughput(tokens=3000 * 8, samples=8, seconds=1.0, steps=1, world_size=8,
                               flops_per_token=fpt, peak_flops=376e12)
    assert rates["mfu"] == pytest.approx(3000 * fpt / 376e12)


def test_unknown_peak_gives_no_mfu():
    rates = metrics.throughput(tokens=10, samples=1, seconds=1.0, steps=1, world_size=1,
                               flops_per_token=1e6, peak_flops=None)
    assert rates["mfu"] is None and rates["tflops_per_device"] == pytest.approx(1e-5)


def test_meter_reads_intervals():
    clock = iter([0.0, 2.0, 3.0])
    syncs = []
    meter = metrics.ThroughputMeter(flops_per_token=1.0, peak_flops=10.0, world_size=1,
                                    sync=lambda: syncs.append(1), clock=lambda: next(clock))
    meter.update(tokens=10, samples=2)
    meter.update(tokens=10, samples=2)
    first = meter.read()
    assert first["tokens_per_s"] == 10.0 and first["step_time_s"] == 1.0 and first["mfu"] == 1.0
    meter.update(tokens=5, samples=1)
    assert meter.read()["tokens_per_s"] == 5.0
    assert len(syncs) == 3


def log_steps(out_dir, rank=0, peak=True, resume_step=None, steps=range(10, 31)):
    console = io.StringIO()
    with metrics.MetricsLogger(out_dir, every=10, rank=rank, resume_step=resume_step,
                               console=console) as logger:
        for step in steps:
            if logger.should_log(step):
                logger.log(step, {"loss": torch.tensor(5.0 - step / 10), "lr": 1e-3,
                                  "mfu": 0.25 if peak else None,
                                  **metrics.memory_metrics({"peak": 3 * metrics.GIB})})
    return console.getvalue()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_and_console(tmp_path):
    out = log_steps(tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[0]["loss"] == pytest.approx(4.0) and records[0]["mfu"] == 0.25
    assert records[0]["mem_peak_gib"] == 3.0 and isinstance(records[0]["time"], float)
    first_line = out.splitlines()[0]
    assert first_line.startswith("step 10 | loss 4 | lr 0.001 | mfu 25.0% | mem_peak_gib 3")


def test_unknown_mfu_is_printed_unknown_and_not_written(tmp_path):
    out = log_steps(tmp_path, peak=False)
    assert "mfu unknown" in out
    assert all("mfu" not in r for r in read_jsonl(tmp_path / "metrics.jsonl"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "mfu" not in events.Tags()["scalars"]


def test_tensorboard_events(tmp_path):
    log_steps(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "mfu", "mem_peak_gib"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([4.0, 3.0, 2.0])


def test_other_ranks_write_nothing(tmp_path):
    assert log_steps(tmp_path / "rank1", rank=1) == ""
    assert not (tmp_path / "rank1").exists()


def test_resume_appends_and_drops_steps_after_the_checkpoint(tmp_path):
    log_steps(tmp_path, steps=range(10, 36))
    log_steps(tmp_path, resume_step=20, steps=range(21, 41))  # crashed at 35, checkpoint at 20
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30, 40]


def test_nan_loss_is_visible(tmp_path):
    with metrics.MetricsLogger(tmp_path, every=1, console=io.StringIO()) as logger:
        logger.log(1, {"loss": float("nan")})
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == "nan"


def test_paused_time_is_not_training_time():
    now = [0.0]
    meter = metrics.ThroughputMeter(flops_per_token=1.0, peak_flops=None, clock=lambda: now[0])
    meter.update(tokens=100, samples=1)
    now[0] = 1.0
    with meter.paused():
        now[0] = 11.0  # ten seconds of validation
    now[0] = 12.0
    meter.update(tokens=100, samples=1)
    assert meter.read()["tokens_per_s"] == 100.0  # 200 tokens over 2 s of training


def test_resume_drops_a_cut_last_line(tmp_path, capsys):
    """A kill mid-write leaves half a line: the resume warns, drops it and goes on."""
    with metrics.MetricsLogger(tmp_path, every=1, console=io.StringIO()) as logger:
        for step in (1, 2):
            logger.log(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.3')  # no end: the kill came here
    with metrics.MetricsLogger(tmp_path, every=1, resume_step=2, console=io.StringIO()) as logger:
        logger.log(3, {"loss": 0.33})
    assert "dropped 1 unreadable line(s) (line 3" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.33)]
