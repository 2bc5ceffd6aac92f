"""PIQA (valid.jsonl: goal, sol1, sol2; labels one per line in valid-labels.lst), zero-shot as
lm-eval 0.4's `piqa`: "Question: <goal>\\nAnswer:" with choices sol1 / sol2 (acc and acc_norm)."""
from __future__ import annotations

from pathlib import Path

from lib.errors import UserError
from lib.evals import files
from lib.evals.doc import Doc, fewshot_context


def docs(path: str | Path, limit: int | None = None) -> list[Doc]:
    """`path`: a folder holding valid.jsonl and valid-labels.lst, or the jsonl itself with its
    labels file beside it (`<name>-labels.lst`)."""
    path = files.existing_file(path, "eval.piqa", "valid.jsonl")
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        raise UserError(f"eval.piqa: {path} has no labels file beside it ({labels_path.name})")
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    records = list(files.jsonl_records(path))
    if len(labels) != len(records):
        raise UserError(f"eval.piqa: {labels_path} has {len(labels)} labels but {path} has "
                        f"{len(records)} questions")
    out = []
    for index, ((line, record), label) in enumerate(zip(records, labels)):
        where = f"{path}:{line}"
        if label not in ("0", "1"):
            raise UserError(f"{labels_path}:{index + 1}: label {label!r} is not 0 or 1")
        choices = (files.field(record, "sol1", where), files.field(record, "sol2", where))
        out.append(Doc(task="piqa", subject=None, index=index,
                       context=fewshot_context(f"Question: {files.field(record, 'goal', where)}\nAnswer:"),
                       choices=choices, target=int(label)))
        if limit is not None and len(out) == limit:
            break
    return out
