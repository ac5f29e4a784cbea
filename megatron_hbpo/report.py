"""Compare finished runs: accuracy % / mean tokens per level, the base and each run after training.

    python -m megatron_hbpo.report runs/tiny_cpu runs/tiny_cpu_grpo [--mode natural|budget:N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_hbpo.data.chat import NATURAL, parse_mode
from megatron_hbpo.evaluation.summary import runs_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare runs' summary.json (accuracy %% / mean tokens per level).")
    parser.add_argument("runs", nargs="+", help="run directories (logging.dir) holding summary.json")
    parser.add_argument("--mode", default=NATURAL, help="natural (default) or a budget mode, e.g. budget:16")
    args = parser.parse_args(argv)
    try:
        mode = parse_mode(args.mode)
    except ValueError as e:
        print(f"error: --mode: {e}", file=sys.stderr)
        return 2
    summaries = {}
    for run in args.runs:
        file = Path(run) / "summary.json"
        if not file.is_file():
            print(f"error: {file}: not found (a run writes it when it finishes with eval.before_after: true)",
                  file=sys.stderr)
            return 2
        summaries[Path(run).name] = json.loads(file.read_text())
    print(runs_table(summaries, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
