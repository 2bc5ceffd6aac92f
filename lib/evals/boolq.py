"""BoolQ (dev.jsonl of the original release: question, title, answer, passage), zero-shot as
lm-eval 0.4's `boolq` (tasks/super_glue/boolq): "<passage>\\nQuestion: <question>?\\nAnswer:"
with choices "no" / "yes". The passage is used as given, without its title."""
from __future__ import annotations

from pathlib import Path

from lib.evals import files
from lib.evals.doc import Doc, fewshot_context


def docs(path: str | Path, limit: int | None = None) -> list[Doc]:
    path = files.existing_file(path, "eval.boolq", "dev.jsonl")
    out = []
    for index, (line, record) in enumerate(files.jsonl_records(path)):
        where = f"{path}:{line}"
        passage = files.field(record, "passage", where)
        question = files.field(record, "question", where)
        answer = files.field(record, "answer", where, bool)
        out.append(Doc(task="boolq", subject=None, index=index,
                       context=fewshot_context(f"{passage}\nQuestion: {question}?\nAnswer:"),
                       choices=("no", "yes"), target=int(answer)))
        if limit is not None and len(out) == limit:
            break
    return out
