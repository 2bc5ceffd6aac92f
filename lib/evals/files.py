"""Reading task files as users download them: csv, jsonl, json and parquet, with errors that name
the file and line (or row) at fault."""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib.errors import UserError


def csv_rows(path: Path, columns: int, header: bool = False) -> Iterator[tuple[int, str, list[str]]]:
    """(row number counted from 0 after any header, "file:line" for messages, cells) of a csv
    file whose rows all have `columns` cells; quoted fields may span lines, as in MMLU's."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            if header:
                next(reader, None)
            for row_number, row in enumerate(reader):
                if not row:
                    continue
                if len(row) != columns:
                    raise UserError(f"{path}:{reader.line_num}: expected {columns} columns, "
                                    f"got {len(row)}")
                yield row_number, f"{path}:{reader.line_num}", row
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a valid csv file: {e}") from None


def csv_dicts(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, str, dict[str, str]]]:
    """(row number from 0, "file:line", row) of a csv file with a header naming at least
    `required`."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: the header {reader.fieldnames} lacks columns {missing}")
            for row_number, row in enumerate(reader):
                if None in row or any(row[c] is None for c in required):
                    raise UserError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} "
                                    "columns as in the header")
                yield row_number, f"{path}:{reader.line_num}", row
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a valid csv file: {e}") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, object) of a jsonl file; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number}: not valid JSON: {e.msg}") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{line_number}: expected a JSON object")
                yield line_number, record
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def table_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a parquet, json (a list of objects) or jsonl file."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file: {e}") from None
    if path.suffix == ".jsonl":
        return [record for _, record in jsonl_records(path)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        # a .json file may also hold one object per line
        if e.msg == "Extra data":
            return [record for _, record in jsonl_records(path)]
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
        raise UserError(f"{path}: expected a JSON list of objects")
    return data


def field(record: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in record:
        raise UserError(f"{where}: no {key!r} field (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind):
        raise UserError(f"{where}: {key!r} should be {getattr(kind, '__name__', kind)}, "
                        f"got {value!r}")
    return value


def existing_file(path: str | Path, key: str, expected: str) -> Path:
    """`path` itself, or the file named like `expected` inside the folder `path`."""
    path = Path(path)
    if path.is_dir():
        inside = path / expected
        if not inside.is_file():
            raise UserError(f"{key}: {path} is a folder without {expected}")
        return inside
    if not path.is_file():
        raise UserError(f"{key}: {path} does not exist")
    return path
