"""When the run checkpoints, and what goes with the state: the data position and the config."""
from __future__ import annotations

from typing import Any

from lib import checkpoint as ckpt_lib


class Saver:
    """Saves every `checkpoint.every` steps and at the end; `poll()` once per step reports a
    failed background save at the step it is known (`Checkpointer.poll`)."""

    def __init__(self, ckpt: ckpt_lib.Checkpointer, config: dict, data: Any):
        self.ckpt, self.config, self.data = ckpt, config, data

    def _extra(self) -> dict:
        return {"consumed_samples": self.data.consumed, "config": self.config}

    def maybe_save(self, step: int, state: dict) -> None:
        self.ckpt.poll()
        self.ckpt.save(step, state, self._extra())

    def save_now(self, step: int, state: dict) -> None:
        """Save `step` whatever `every` says (the last step, a stop signal) and wait until it is
        committed: the process may exit next."""
        self.ckpt.save(step, state, self._extra(), force=True)
        self.ckpt.wait()
