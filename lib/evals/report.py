"""Accuracy tables as lm-eval 0.4 reports them: per task, and for MMLU per subject, per category
(STEM, humanities, social sciences, other) and overall, each group weighted by its size
(`weight_by_size: True` in lm-eval's group configs, i.e. the mean over all its questions); the
macro average over subjects is given beside it. Standard errors are lm-eval's: the sample
standard deviation over sqrt(n)."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from lib.evals import WITH_ACC_NORM
from lib.evals.doc import Outcome
from lib.evals.exams import MMLU_SUBJECTS


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _metrics(scored: Sequence[Outcome], norm: bool) -> dict:
    acc, acc_stderr = _mean_and_stderr([float(s.correct) for s in scored])
    row = {"n": len(scored), "acc": acc, "acc_stderr": acc_stderr}
    if norm:
        row["acc_norm"], row["acc_norm_stderr"] = _mean_and_stderr([float(s.correct_norm) for s in scored])
    return row


def summarize(scored: Sequence[Outcome]) -> dict:
    """{task: metrics}; for exams also {"subjects": {...}, "categories": {...} (MMLU),
    "macro_acc": ...}."""
    by_task: dict[str, list[Outcome]] = defaultdict(list)
    for s in scored:
        by_task[s.doc.task].append(s)
    out = {}
    for task, items in by_task.items():
        norm = task in WITH_ACC_NORM
        row = _metrics(items, norm)
        if items[0].doc.subject is not None:
            by_subject: dict[str, list[Outcome]] = defaultdict(list)
            for s in items:
                by_subject[s.doc.subject].append(s)
            row["subjects"] = {k: _metrics(v, norm) for k, v in sorted(by_subject.items())}
            row["macro_acc"] = sum(m["acc"] for m in row["subjects"].values()) / len(by_subject)
            if task == "mmlu":
                by_category: dict[str, list[Outcome]] = defaultdict(list)
                for s in items:
                    by_category[MMLU_SUBJECTS.get(s.doc.subject, "other")].append(s)
                row["categories"] = {k: _metrics(v, norm) for k, v in sorted(by_category.items())}
        out[task] = row
    return out


def format_table(summary: dict) -> str:
    lines = [f"{'task':<52} {'n':>6} {'acc':>7} {'± stderr':>9} {'acc_norm':>9}"]

    def line(name: str, m: dict) -> None:
        norm = f"{m['acc_norm']:9.4f}" if "acc_norm" in m else f"{'':9}"
        lines.append(f"{name:<52} {m['n']:>6} {m['acc']:7.4f} {m['acc_stderr']:9.4f} {norm}")

    for task, m in summary.items():
        for subject, sm in m.get("subjects", {}).items():
            line(f"  {task}_{subject}", sm)
        for category, cm in m.get("categories", {}).items():
            line(f" {task} {category}", cm)
        line(task, m)
        if "macro_acc" in m:
            lines.append(f"{task + ' (macro average over subjects)':<52} {'':>6} {m['macro_acc']:7.4f}")
    return "\n".join(lines)
