"""Convert a Hugging Face Qwen2/Llama checkpoint into a Megatron dist checkpoint for training.

    python tools/convert_hf_to_megatron.py --hf-dir IN --out OUT [--dtype bf16|fp32] [--overwrite]

OUT gets megatron/ (loadable at any TP/PP), hf/ (config and tokenizer files) and
hbpo_checkpoint.json. The weights keep the source's dtype (bf16 for bf16 weights, fp32 for fp32 or
fp16 ones: nothing is rounded) unless --dtype says otherwise; the summary line names the dtype written.
Runs on the CPU in one process; peak memory is the model plus one layer. A bad input is one line
naming the flag, exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: the source's (fp16 -> fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    args = parser.parse_args()

    from megatron_hbpo import runtime

    runtime.configure(cpu_only=True)  # a CPU tool: never take a GPU from a training job on the node

    from megatron_hbpo.config import ConfigError
    from megatron_hbpo.convert.checkpoints import hf_to_megatron_checkpoint, summary_line
    from megatron_hbpo.convert.hf_io import CheckpointError

    try:
        stats = hf_to_megatron_checkpoint(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, ConfigError) as e:
        print(f"error: --hf-dir {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: --out {e}", file=sys.stderr)
        return 2
    print(summary_line(args.out, stats))
    return 0


if __name__ == "__main__":  # dist_checkpointing starts worker processes that re-import __main__
    sys.exit(main())
