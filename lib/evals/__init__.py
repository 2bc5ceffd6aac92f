"""Evaluation tasks as lm-evaluation-harness 0.4 defines them, read from the files users download.

    docs = load_docs("mmlu", "data/mmlu/data", num_fewshot=5)   # list[Doc]: context + choices
    ... score every doc's continuations with a model (parallel/score.py) ...
    summary = report.summarize([Scored(doc, loglikelihoods), ...])

Pure: nothing here touches a model. Each task module says which lm-eval definition it follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib.errors import UserError
from lib.evals import boolq, choice, exams, hellaswag, piqa
from lib.evals.doc import Doc, Scored

TASKS = ("mmlu", "ceval", "boolq", "piqa", "hellaswag", "choice")
DEFAULT_FEWSHOT = {"mmlu": 5, "ceval": 5}
# Tasks whose lm-eval definition reports acc_norm beside acc.
WITH_ACC_NORM = ("ceval", "piqa", "hellaswag", "choice")

__all__ = ["Doc", "Scored", "TASKS", "DEFAULT_FEWSHOT", "WITH_ACC_NORM", "TaskConfig", "check_task",
           "load_docs", "task_docs"]


@dataclass(frozen=True)
class TaskConfig:
    """Which tasks, from which files: the `eval.` keys of runners.evaluate, and of pretrain and
    sft, which score them every `train.eval_every` steps (no tasks: nothing scored)."""
    tasks: tuple[str, ...] = ()
    # Where each task's files are (see README "Evaluation" for the layouts read).
    mmlu: str | None = None
    ceval: str | None = None
    boolq: str | None = None
    piqa: str | None = None
    hellaswag: str | None = None
    choice: str | None = None           # your own {"context", "choices", "answer"} jsonl
    choice_fewshot: str | None = None   # solved examples for `choice` (first num_fewshot used)
    num_fewshot: int | None = None      # None: MMLU and C-Eval 5, others 0
    limit: int | None = None            # first N documents of each task (of each exam subject)

    def __post_init__(self):
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot={self.num_fewshot} must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1")


def task_docs(cfg: TaskConfig) -> list[Doc]:
    """The documents of every task of `cfg`, in order (read and checked up front)."""
    docs: list[Doc] = []
    for task in cfg.tasks:
        path = getattr(cfg, task)
        if path is None:
            raise UserError(f"eval.tasks includes {task}: set eval.{task}=<path to its files>")
        docs += load_docs(task, path, cfg.num_fewshot, cfg.limit, cfg.choice_fewshot)
    return docs


def check_task(name: str) -> str:
    if name not in TASKS:
        raise UserError(f"unknown evaluation task {name!r}; known tasks: {', '.join(TASKS)}")
    return name


def load_docs(task: str, path: str | Path, num_fewshot: int | None = None,
              limit: int | None = None, fewshot_path: str | Path | None = None) -> list[Doc]:
    """The documents of `task` read from `path`, with their prompts.

    num_fewshot: None = the task's default (MMLU and C-Eval 5, others 0); only the exams and
    `choice` (with `fewshot_path`) have solved examples to draw from.
    limit: the first N documents (of each subject for MMLU and C-Eval).
    """
    check_task(task)
    k = DEFAULT_FEWSHOT.get(task, 0) if num_fewshot is None else num_fewshot
    if k < 0:
        raise UserError(f"eval.num_fewshot={k} must be >= 0")
    if task == "mmlu":
        return exams.exam_docs(exams.MMLU, exams.read_mmlu(path), k, limit, str(path))
    if task == "ceval":
        return exams.exam_docs(exams.CEVAL, exams.read_ceval(path), k, limit, str(path))
    if task == "choice":
        return choice.docs(path, k, fewshot_path, limit)
    if k:
        raise UserError(f"{task} is zero-shot here (lm-eval has no few-shot split for it in "
                        f"these files): drop eval.num_fewshot={k}")
    module = {"boolq": boolq, "piqa": piqa, "hellaswag": hellaswag}[task]
    return module.docs(path, limit)
