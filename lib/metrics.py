"""Training metrics: throughput and MFU, written to the console, metrics.jsonl and TensorBoard.

    meter = ThroughputMeter(flops_per_token=llama.flops_per_token(config, seq_len),
                            peak_flops=device.peak_flops(dev, dtype), world_size=dist.world_size,
                            sync=lambda: device.synchronize(dev))
    with MetricsLogger(out_dir, every=10, rank=dist.rank) as logger:
        for step in ...:
            ...
            meter.update(tokens=global_tokens, samples=global_samples)
            if logger.should_log(step):
                logger.log(step, {"loss": loss, "lr": lr, **meter.read(),
                                  **memory_metrics(device.memory_stats(dev))})

Only rank 0 writes. A metric whose value is None (MFU on a device without a known peak) is
printed as "unknown" and left out of the files: never a made-up number.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from lib.files import atomic_path

GIB = 1024**3


def throughput(*, tokens: int, samples: int, seconds: float, steps: int, world_size: int,
               flops_per_token: float, peak_flops: float | None) -> dict[str, float | None]:
    """Rates over an interval. `tokens`/`samples` are global (all ranks); FLOP/s and MFU are per
    device: model FLOPs per token × tokens/s per device, over the device's dense peak."""
    tokens_per_s = tokens / seconds
    per_device = tokens_per_s / world_size
    achieved = flops_per_token * per_device
    return {
        "step_time_s": seconds / steps,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": per_device,
        "samples_per_s": samples / seconds,
        "tflops_per_device": achieved / 1e12,
        "mfu": achieved / peak_flops if peak_flops else None,
    }


class ThroughputMeter:
    """Counts tokens and samples between reads; `read()` turns them into `throughput` rates.

    `sync` (e.g. `lambda: device.synchronize(dev)`) runs before the clock is read, so the time
    covers device work queued by the steps, not just their launch.
    """

    def __init__(self, *, flops_per_token: float, peak_flops: float | None, world_size: int = 1,
                 sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self._sync, self._clock = sync, clock
        self._start = self._now()
        self._tokens = self._samples = self._steps = 0

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._clock()

    def update(self, *, tokens: int, samples: int) -> None:
        self._tokens += tokens
        self._samples += samples
        self._steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside (validation, a checkpoint save) does not count as training time."""
        began = self._now()
        try:
            yield
        finally:
            self._start += self._now() - began

    def read(self) -> dict[str, float | None]:
        """Rates since the previous read (or construction); starts a new interval."""
        now = self._now()
        if self._steps == 0:
            raise RuntimeError("ThroughputMeter.read() before any update()")
        rates = throughput(tokens=self._tokens, samples=self._samples, seconds=now - self._start,
                           steps=self._steps, world_size=self.world_size,
                           flops_per_token=self.flops_per_token, peak_flops=self.peak_flops)
        self._start, self._tokens, self._samples, self._steps = now, 0, 0, 0
        return rates


def memory_metrics(stats: Mapping[str, int]) -> dict[str, float]:
    """`lib.device.memory_stats` output in GiB, keys prefixed "mem_" ("mem_peak_gib", ...)."""
    return {f"mem_{k}_gib": v / GIB for k, v in stats.items()}


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; other values unchanged."""
    return value.item() if hasattr(value, "item") else value


def _json_value(value: Any) -> Any:
    # NaN/inf are not JSON; a diverged loss must still show, so write it as a string.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _parse_line(line: bytes) -> dict | None:
    """A metrics.jsonl record, or None for a line that is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _console_value(key: str, value: Any) -> str:
    if value is None:
        return "unknown"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    """Writes logged steps to the console, `out_dir/metrics.jsonl` (one JSON object per line,
    flushed per line) and TensorBoard event files in `out_dir/tensorboard`. Rank 0 only.

    `resume_step`: when resuming from a checkpoint at that step, lines and TensorBoard events
    logged after it by the interrupted run are dropped, so each step appears once.
    """

    def __init__(self, out_dir: str | os.PathLike, every: int, rank: int = 0,
                 resume_step: int | None = None, console: TextIO | None = None):
        if every < 1:
            raise ValueError(f"log every={every}: must be >= 1")
        self.every, self.rank = every, rank
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self._console = console or sys.stdout
        self._file: TextIO | None = None
        self._writer = None
        if rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._drop_lines_after(resume_step)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # heavy import: rank 0 only
        self._writer = SummaryWriter(str(self.out_dir / "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def _drop_lines_after(self, step: int) -> None:
        """Keep the lines of steps <= `step`. A line that does not parse (the last one, cut
        short by a kill mid-write) is dropped with a warning, not left to break the file."""
        if not self.jsonl_path.exists():
            return
        lines = self.jsonl_path.read_bytes().splitlines(keepends=True)
        kept, bad = [], []
        for number, line in enumerate(lines, 1):
            record = _parse_line(line)
            if record is None:
                if line.strip():
                    bad.append(number)
                continue
            if record["step"] <= step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
        if bad:
            print(f"warning: {self.jsonl_path}: dropped {len(bad)} unreadable line(s) (line "
                  f"{', '.join(map(str, bad[:5]))}; cut short by a killed run?)", file=sys.stderr)
        if kept == lines:
            return
        with atomic_path(self.jsonl_path) as tmp:
            tmp.write_bytes(b"".join(kept))

    def should_log(self, step: int) -> bool:
        return step % self.every == 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (numbers, 0-d tensors, strings or None) for `step`."""
        if self.rank != 0:
            return
        values = {k: _plain(v) for k, v in metrics.items()}
        line = " | ".join([f"step {step}"] + [f"{k} {_console_value(k, v)}" for k, v in values.items()])
        # tqdm.write clears and redraws an active progress bar instead of writing through it.
        tqdm.write(line, file=self._console)
        self._console.flush()
        known = {k: v for k, v in values.items() if v is not None}
        record = {"step": step, "time": time.time(), **{k: _json_value(v) for k, v in known.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in known.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
