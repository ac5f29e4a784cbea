"""Prompt datasets in the project's schema, with row-level validation.

Schema, one row per problem (jsonl, a json array, or parquet):

    problem  str, required   the question shown to the model (inserted into data.prompt_template)
    answer   str, required   the ground truth the verifier compares with (LaTeX or plain text)
    level    str, optional   difficulty (MATH levels 1-5, the synthetic task's levels)
    source   str, optional   where the row came from (dataset name)

Numbers in `answer` or `level` are accepted and kept as their text. A bad row (missing or empty
problem/answer, not an object) raises DataError naming the file and line (row for parquet), or, with
skip_bad_rows, is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_hbpo import atomic


class DataError(ValueError):
    """A dataset problem; the message names the file and line or row."""


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class PromptRow:
    problem: str
    answer: str
    level: str | None = None
    source: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs: 'file:line' for jsonl, 'file[row]' for json arrays and parquet."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use {', '.join(DATA_SUFFIXES)} "
                        "(tools/prepare_data.py converts DeepScaleR json and verl parquet)")
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{path}:{number}", DataError(f"{path}:{number}: not valid JSON ({e.msg})")
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); a .json file is one array "
                                "of rows (one row per line: name it .jsonl)") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
            for number, record in enumerate(data):
                yield f"{path}[{number}]", record
        else:
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise DataError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None
            for number, record in enumerate(table.to_pylist()):
                yield f"{path}[{number}]", record
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; is it really {suffix}?") from None


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return value.strip() if isinstance(value, str) else None


def row_from_record(location: str, record: Any, *, problem_key: str = "problem",
                    answer_key: str = "answer") -> PromptRow:
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected an object with {problem_key!r} and {answer_key!r}, "
                        f"got {type(record).__name__}")
    problem, answer = _text(record.get(problem_key)), _text(record.get(answer_key))
    if not problem:
        raise DataError(f"{location}: missing or empty {problem_key!r}")
    if not answer:
        raise DataError(f"{location}: missing or empty {answer_key!r}")
    return PromptRow(problem=problem, answer=answer, level=_text(record.get("level")),
                     source=_text(record.get("source")))


def load_prompts(path: str | Path, *, problem_key: str = "problem", answer_key: str = "answer",
                 skip_bad_rows: bool = False) -> tuple[list[PromptRow], int]:
    """(rows, number of skipped bad rows). Without skip_bad_rows the first bad row raises DataError."""
    rows, skipped = [], 0
    for location, record in read_records(path):
        try:
            rows.append(row_from_record(location, record, problem_key=problem_key, answer_key=answer_key))
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({skipped} skipped as bad)" if skipped else ""))
    return rows, skipped


def write_jsonl(path: str | Path, rows: list[PromptRow]) -> None:
    """Write rows atomically (megatron_hbpo.atomic)."""
    atomic.write_jsonl(path, (row.to_json() for row in rows))
