"""HellaSwag (hellaswag_val.jsonl: ctx_a, ctx_b, activity_label, endings, label), zero-shot as
lm-eval 0.4's `hellaswag`, with its text preprocessing (tasks/hellaswag/utils.py): the query
"<activity_label>: <ctx_a> <ctx_b capitalised>" and each ending are stripped, WikiHow's
" [title]" becomes ". ", other bracketed tags are removed and double spaces halved."""
from __future__ import annotations

import re
from pathlib import Path

from lib.errors import UserError
from lib.evals import files
from lib.evals.doc import Doc, fewshot_context


def preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def docs(path: str | Path, limit: int | None = None) -> list[Doc]:
    path = files.existing_file(path, "eval.hellaswag", "hellaswag_val.jsonl")
    out = []
    for index, (line, record) in enumerate(files.jsonl_records(path)):
        where = f"{path}:{line}"
        ctx = files.field(record, "ctx_a", where) + " " + files.field(record, "ctx_b", where).capitalize()
        query = preprocess(files.field(record, "activity_label", where) + ": " + ctx)
        endings = files.field(record, "endings", where, list)
        label = files.field(record, "label", where, (int, str))
        try:
            target = int(label)
        except ValueError:
            target = -1
        if not 0 <= target < len(endings):
            raise UserError(f"{where}: label {label!r} is not an index into its {len(endings)} endings")
        out.append(Doc(task="hellaswag", subject=None, index=index, context=fewshot_context(query),
                       choices=tuple(preprocess(str(e)) for e in endings), target=target))
        if limit is not None and len(out) == limit:
            break
    return out
