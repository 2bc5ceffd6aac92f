"""A multiple-choice document, the prompt lm-evaluation-harness 0.4 builds for it, and its score.

Every task here is multiple choice, scored the way lm-eval 0.4 scores `output_type:
multiple_choice`: each choice is a continuation `delimiter + choice` of the same context, its
log-likelihood is the summed log-probability of its tokens, and

    acc       = argmax(loglikelihoods) == target
    acc_norm  = argmax(loglikelihoods / len(choice text in characters)) == target

(the delimiter is not counted in the length). The context of a few-shot prompt is, as lm-eval
renders it in plain text: the task description, then for each shot its question, the target
delimiter, its answer and the few-shot delimiter "\\n\\n", then the question itself.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Doc:
    task: str                 # "mmlu", "boolq", ...
    subject: str | None       # MMLU / C-Eval subject ("anatomy"), None for single-file tasks
    index: int                # 0-based position in its file
    context: str              # description, few-shot examples and the question
    choices: tuple[str, ...]  # answer texts; acc_norm divides by their length in characters
    target: int               # index of the correct choice
    delimiter: str = TARGET_DELIMITER

    @property
    def continuations(self) -> list[str]:
        return [self.delimiter + choice for choice in self.choices]


@dataclass(frozen=True)
class Shot:
    question: str   # the shot's prompt text (doc_to_text)
    answer: str     # the text of its correct choice


def fewshot_context(question: str, shots: Sequence[Shot] = (), description: str = "") -> str:
    """lm-eval 0.4's plain-text prompt (`ConfigurableTask.fewshot_context`, no chat template)."""
    parts = [description]
    for shot in shots:
        parts += [shot.question, TARGET_DELIMITER, shot.answer, FEWSHOT_DELIMITER]
    parts.append(question)
    return "".join(parts)


@dataclass(frozen=True)
class Scored:
    """A document with its choices' log-likelihoods, and what lm-eval would conclude."""
    doc: Doc
    loglikelihoods: tuple[float, ...]

    @property
    def prediction(self) -> int:
        return _argmax(self.loglikelihoods)

    @property
    def prediction_norm(self) -> int:
        return _argmax([_per_char(ll, len(c)) for ll, c in zip(self.loglikelihoods, self.doc.choices)])

    @property
    def correct(self) -> bool:
        return self.prediction == self.doc.target

    @property
    def correct_norm(self) -> bool:
        return self.prediction_norm == self.doc.target


@dataclass(frozen=True)
class Answered:
    """A document answered by generating text (ModelLink's way for lettered exams): the
    prediction is the first standalone choice letter of the text, -1 (wrong) when there is none."""
    doc: Doc
    text: str

    @property
    def prediction(self) -> int:
        match = re.search(r"\b(" + "|".join(map(re.escape, self.doc.choices)) + r")\b", self.text)
        return self.doc.choices.index(match.group(1)) if match else -1

    prediction_norm = prediction

    @property
    def correct(self) -> bool:
        return self.prediction == self.doc.target

    correct_norm = correct


Outcome = Scored | Answered


def _per_char(loglikelihood: float, length: int) -> float:
    """ll / length with numpy's float semantics for an empty choice (lm-eval divides arrays)."""
    if length:
        return loglikelihood / length
    return -math.inf if loglikelihood < 0 else math.inf


def _argmax(values: Sequence[float]) -> int:
    """numpy's argmax: the first index of the maximum."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best
