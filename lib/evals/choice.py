"""Your own multiple-choice task: a jsonl file of {"context", "choices", "answer"} lines, scored
like the built-in tasks (continuation " <choice>", acc and acc_norm). An optional few-shot file
of the same shape gives its first k lines as solved examples: "<context> <answer>\\n\\n" each."""
from __future__ import annotations

from pathlib import Path

from lib.errors import UserError
from lib.evals import files
from lib.evals.doc import Doc, Shot, fewshot_context


def _read(path: Path) -> list[tuple[str, str, list[str], int]]:
    rows = []
    for line, record in files.jsonl_records(path):
        where = f"{path}:{line}"
        context = files.field(record, "context", where)
        choices = files.field(record, "choices", where, list)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: 'choices' should be a list of at least two strings")
        answer = files.field(record, "answer", where, (int, str))
        if isinstance(answer, str):
            if answer not in choices:
                raise UserError(f"{where}: answer {answer!r} is not one of its choices")
            answer = choices.index(answer)
        if not 0 <= answer < len(choices):
            raise UserError(f"{where}: answer {answer} is not an index into its {len(choices)} choices")
        rows.append((where, context, choices, answer))
    return rows


def docs(path: str | Path, num_fewshot: int = 0, fewshot: str | Path | None = None,
         limit: int | None = None) -> list[Doc]:
    path = files.existing_file(path, "eval.choice", "a .jsonl file")
    shots: list[Shot] = []
    if num_fewshot:
        if fewshot is None:
            raise UserError(f"eval.num_fewshot={num_fewshot} needs eval.choice_fewshot=<jsonl of "
                            "solved examples>")
        examples = _read(files.existing_file(fewshot, "eval.choice_fewshot", "a .jsonl file"))
        if num_fewshot > len(examples):
            raise UserError(f"eval.num_fewshot={num_fewshot} but {fewshot} has {len(examples)} examples")
        shots = [Shot(context, choices[answer]) for _, context, choices, answer in examples[:num_fewshot]]
    return [Doc(task="choice", subject=None, index=index, context=fewshot_context(context, shots),
                choices=tuple(choices), target=answer)
            for index, (_, context, choices, answer) in enumerate(_read(path)[:limit])]
