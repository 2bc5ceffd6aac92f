"""What stops a run early: divergence (non-finite steps in a row) and stop signals."""
from __future__ import annotations

import math
import signal
from collections.abc import Mapping

import torch

from lib import device
from lib.errors import Interrupted, UserError
from runners.loop.report import scalar


class DivergenceGuard:
    """A non-finite step leaves the state untouched (the step skips it). Under fp16 that is loss
    scaling at work until the scale reaches its floor; otherwise it is divergence, tolerated
    `max_bad_steps - 1` times in a row."""

    def __init__(self, max_bad_steps: int, step_dtype: str, min_loss_scale: float):
        self.max_bad_steps, self.fp16, self.min_scale = max_bad_steps, step_dtype == "fp16", min_loss_scale
        self.bad_steps = 0

    def check(self, step: int, m: Mapping[str, torch.Tensor], last_checkpoint: int | None) -> None:
        loss = scalar(m["loss"])
        diverged = not math.isfinite(loss) or bool(scalar(m["skipped"]))
        scaling = self.fp16 and scalar(m["loss_scale"]) > self.min_scale
        if not diverged or scaling:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        if self.bad_steps >= self.max_bad_steps:
            raise UserError(
                f"training diverged at step {step}: loss {loss}, grad norm {scalar(m['grad_norm'])} "
                f"({self.bad_steps} non-finite steps in a row, train.max_bad_steps="
                f"{self.max_bad_steps}; those updates were skipped, the last checkpoint is step "
                f"{last_checkpoint}). Lower optim.lr, clip gradients (optim.grad_clip) or train in "
                "fp32/bf16")


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and
    stops with `Interrupted` (exit status 128 + the signal: 143 for SIGTERM, 130 for SIGINT).
    A second signal stops at once (KeyboardInterrupt).

    Ranks may receive the signal in different steps, so `agreed()` takes the maximum over the
    process group: every rank stops after the same step (a rank alone in the save's collectives
    while the others enter the next step would deadlock)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dev: device.Device):
        self.signum = 0
        self._previous: dict = {}
        self._dev = dev

    def agreed(self) -> int:
        """The signal number every rank agrees to stop for, or 0."""
        if not torch.distributed.is_initialized():
            return self.signum
        flag = torch.tensor(self.signum, device=self._dev.torch_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def interrupted(self, step: int, signum: int, saved: bool) -> Interrupted:
        name = signal.Signals(signum).name
        then = (f"the checkpoint of step {step} is saved: rerun the same command to resume"
                if saved else "no checkpoint directory, nothing saved")
        return Interrupted(f"interrupted by {name} at step {step}; {then}", 128 + signum)

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
