"""What a run tells its user: throughput and MFU, metrics to the console / JSONL / TensorBoard,
a progress bar, and the summary at the end."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lib import device, dtypes, metrics
from lib.labels import IGNORE_INDEX
from models import llama
from runners.loop.setup import Run


def scalar(x: torch.Tensor | float) -> float:
    return float(x.detach().float().cpu()) if isinstance(x, torch.Tensor) else float(x)


class Reporter:
    """Logs every `log_every` steps (and the last); throughput excludes `paused()` time."""

    def __init__(self, run: Run, *, model: llama.Config, seq_len: int, step_dtype: str,
                 log_every: int, start_step: int, total_steps: int):
        from tqdm import tqdm
        self.run, self.total_steps = run, total_steps
        self.meter = metrics.ThroughputMeter(
            flops_per_token=llama.flops_per_token(model, seq_len),
            peak_flops=device.peak_flops(run.dev, dtypes.torch_dtype(step_dtype)),
            world_size=run.dist.world_size, sync=lambda: device.synchronize(run.dev))
        self.logger = metrics.MetricsLogger(run.out_dir, every=log_every, rank=run.dist.rank,
                                            resume_step=start_step)
        self.progress = tqdm(total=total_steps, initial=start_step, disable=not run.is_main,
                             desc="train", unit="step", dynamic_ncols=True, leave=False)

    def record(self, step: int, step_metrics: Mapping[str, torch.Tensor], *, tokens: int,
               samples: int) -> None:
        self.meter.update(tokens=tokens, samples=samples)
        self.progress.update(1)
        if self.logger.should_log(step) or step == self.total_steps:
            loss = scalar(step_metrics["loss"])
            row = {"loss": loss, "lr": scalar(step_metrics["lr"]),
                   "grad_norm": scalar(step_metrics["grad_norm"]),
                   "loss_scale": scalar(step_metrics["loss_scale"]),
                   "skipped": int(scalar(step_metrics["skipped"])),
                   **self.meter.read(), **metrics.memory_metrics(device.memory_stats(self.run.dev))}
            self.logger.log(step, row)
            self.progress.set_postfix(loss=f"{loss:.4f}")

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        self.logger.log(step, values)

    def paused(self) -> contextlib.AbstractContextManager:
        """Validation and checkpoint saves inside do not count as training time."""
        return self.meter.paused()

    def say(self, message: str, *, error: bool = False) -> None:
        """One line from rank 0, beside the progress bar."""
        if self.run.is_main:
            self.progress.write(message, file=sys.stderr if error else sys.stdout)

    def close(self) -> None:
        self.progress.close()
        self.logger.close()


@contextlib.contextmanager
def reporting(run: Run, **kw: Any) -> Iterator[Reporter]:
    reporter = Reporter(run, **kw)
    try:
        yield reporter
    finally:
        reporter.close()


class Validator:
    """The validation loss every `every` steps (0: never): mean token loss over the validation
    set's first batches, weighted by their trained tokens (which differ on masked data)."""

    def __init__(self, eval_fn: Any, data: Any, every: int):
        self.eval_fn, self.data, self.every = eval_fn, data, every

    def maybe_run(self, step: int, state: dict, reporter: Reporter) -> None:
        if self.eval_fn is None or not self.every or step % self.every:
            return
        total = tokens = 0.0
        for batch in self.data.valid_batches():
            n = float((batch["labels"] != IGNORE_INDEX).sum())
            total += scalar(self.eval_fn(state["params"], batch)) * n
            tokens += n
        reporter.log(step, {"val_loss": total / tokens if tokens else float("nan")})
