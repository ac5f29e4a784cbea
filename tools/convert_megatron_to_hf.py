"""Convert a Megatron checkpoint written by this project back to a Hugging Face checkpoint.

    python tools/convert_megatron_to_hf.py --ckpt IN --out OUT [--dtype bf16|fp32] [--overwrite]

OUT is loadable by transformers.AutoModelForCausalLM and by vLLM: safetensors shards + index,
config.json, generation_config.json and the tokenizer files; vocabulary padding dropped, tied
embeddings restored by the config. Runs on the CPU in one process. A bad input (not a converted
checkpoint, or one whose weights and config come from different models) is one line naming the flag,
exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a directory written by convert_hf_to_megatron.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: the checkpoint's dtype")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    args = parser.parse_args()

    from megatron_hbpo import runtime

    runtime.configure(cpu_only=True)  # a CPU tool: never take a GPU from a training job on the node

    from megatron_hbpo.convert.checkpoints import megatron_to_hf_checkpoint, summary_line
    from megatron_hbpo.convert.hf_io import CheckpointError

    try:
        stats = megatron_to_hf_checkpoint(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                          max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: --ckpt {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: --out {e}", file=sys.stderr)
        return 2
    print(summary_line(args.out, stats))
    return 0


if __name__ == "__main__":  # dist_checkpointing starts worker processes that re-import __main__
    sys.exit(main())
