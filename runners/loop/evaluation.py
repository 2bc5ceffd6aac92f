"""Evaluation tasks inside training: knowledge, not only the loss, as the run goes.

    pretrain ... eval.tasks=[mmlu,hellaswag] eval.mmlu=... eval.limit=50 train.eval_every=100

Every `train.eval_every` steps the tasks' documents (read and tokenized once, at start-up) are
scored on the current parameters with the same scorer as `runners.evaluate`, and their accuracy
is logged beside the validation loss (`mmlu_acc`, `hellaswag_acc_norm`, ...: metrics.jsonl and
TensorBoard).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib import evals
from lib.errors import UserError
from lib.evals import report
from lib.evals.tokens import doc_requests, scored_docs
from lib.tokenizer import load_tokenizer
from models import llama
from parallel import score
from runners.loop.setup import Run


class TaskScores:
    """`cfg.tasks` scored every `every` steps (no tasks, or every=0: never).

    params_of: the model's whole parameter tree from the trained one (LoRA: adapters over the
    frozen base); tokenizer: the file the tasks' text is tokenized with.
    """

    def __init__(self, run: Run, cfg: evals.TaskConfig, every: int, *, model: llama.Config,
                 tokenizer: str | None, dtype: torch.dtype, params_of: Callable[[Any], Any]):
        self.every, self.params_of = every, params_of
        self.docs = evals.task_docs(cfg) if cfg.tasks and every else []
        if not self.docs:
            return
        if tokenizer is None:
            raise UserError("eval.tasks are text: set data.tokenizer=<the model's tokenizer file>")
        if run.mesh.size("pipe") > 1:
            raise UserError(f"eval.tasks with mesh.pipe={run.mesh.size('pipe')}: task scoring runs the "
                            "whole model on each rank group, not through pipeline stages; score the "
                            "run's checkpoints with runners.evaluate (they load under any mesh)")
        tok = load_tokenizer(tokenizer)
        self.requests, self.owner = doc_requests(tok, self.docs)
        self.scorer = score.Scorer(model, run.mesh, run.rules, kernels=run.kernels, dtype=dtype,
                                   backend=run.backend, cache_dir=str(Path(run.out_dir) / "inductor-cache"),
                                   pad_id=tok.pad_id, device=run.dev.torch_device)

    def maybe_run(self, step: int, state: dict, reporter: Any) -> None:
        if not self.docs or step % self.every:
            return
        with torch.no_grad():
            results, _ = self.scorer(self.params_of(state["params"]), self.requests)
        summary = report.summarize(scored_docs(self.docs, self.owner, [ll for ll, _ in results]))
        values = {}
        for task, metrics in summary.items():
            values[f"{task}_acc"] = metrics["acc"]
            if "acc_norm" in metrics:
                values[f"{task}_acc_norm"] = metrics["acc_norm"]
        reporter.log(step, values)
