"""A fresh vLLM engine started from the exported HF checkpoint of the refit weights must answer
exactly as the refit engine did (greedy ids; log-probs to 1e-5).

    python fresh_engine_check.py --work DIR      (after vllm_engine_check.py wrote DIR)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_hbpo import runtime
from megatron_hbpo.rollout.engine import Request, SamplingSettings
from megatron_hbpo.rollout.vllm_engine import VLLMEngine


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    work = Path(parser.parse_args().work)
    runtime.configure(megatron=False)
    expected = json.loads((work / "refit_greedy.json").read_text())
    engine = VLLMEngine(work / "refit_hf", seed=0, dtype="float32", max_model_len=512)
    [sample] = engine.generate([Request(expected["prompt"], n=1, budget=None,
                                        sampling=SamplingSettings(temperature=0.0, max_tokens=24))])
    worst = max(abs(a - b) for a, b in zip(sample.logprobs.tolist(), expected["logprobs"]))
    print(f"fresh engine: same greedy ids {sample.response_ids == expected['ids']}, max |logp diff| {worst:.1e}",
          flush=True)
    return 0 if sample.response_ids == expected["ids"] and worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
