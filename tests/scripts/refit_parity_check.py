"""Refit parity: an engine loaded from checkpoint A and refit with every tensor of checkpoint B must
answer exactly as a fresh engine loaded from B (greedy ids, log-probs), tied embeddings included.

    python refit_parity_check.py --work DIR [--pair NAME A_DIR B_DIR ...] [--tiny]

`--tiny` builds tiny Qwen2 and Llama models (tied and untied) under DIR; `--pair` names checkpoint
pairs made elsewhere (the real-model test). Several engines start one after another in this one
process (the second and later start in under a second). Prints one JSON line per pair:
{"name", "same_ids", "max_logp_diff", "tokens"}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from megatron_hbpo.convert.hf_io import HFCheckpoint
from megatron_hbpo import runtime
from megatron_hbpo.rollout.engine import Request, SamplingSettings
from megatron_hbpo.rollout.vllm_engine import VLLMEngine

PROMPTS = [list(range(5, 40)), list(range(60, 70)), [7, 3, 9, 11, 200, 13, 2, 150]]


def greedy(engine: VLLMEngine, max_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    settings = SamplingSettings(temperature=0.0, max_tokens=max_tokens)
    samples = engine.generate([Request(p, n=1, budget=None, sampling=settings, group_id=i)
                               for i, p in enumerate(PROMPTS)])
    return [s.response_ids for s in samples], [s.logprobs.tolist() for s in samples]


def compare(name: str, a: Path, b: Path, *, max_tokens: int, dtype: str) -> dict:
    engine = VLLMEngine(a, seed=0, dtype=dtype, max_model_len=512)
    before_ids, _ = greedy(engine, max_tokens)  # also fills the prefix cache with A's KV
    source = HFCheckpoint(b)
    names = list(source.weight_map)
    # Two buckets, as the trainer's export stream hands them over.
    engine.update_weights([[(n, source.get(n)) for n in names[: len(names) // 2]],
                           [(n, source.get(n)) for n in names[len(names) // 2:]]])
    refit_ids, refit_logp = greedy(engine, max_tokens)
    del engine
    gc.collect()
    fresh = VLLMEngine(b, seed=0, dtype=dtype, max_model_len=512)
    fresh_ids, fresh_logp = greedy(fresh, max_tokens)
    del fresh
    gc.collect()
    same = refit_ids == fresh_ids
    diff = max((abs(x - y) for r, f in zip(refit_logp, fresh_logp) for x, y in zip(r, f)), default=float("inf"))
    return {"name": name, "same_ids": same, "max_logp_diff": diff, "tokens": sum(len(i) for i in refit_ids),
            "changed_by_refit": before_ids != refit_ids}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--tiny", action="store_true", help="build and check tiny Qwen2/Llama, tied and untied")
    parser.add_argument("--pair", nargs=3, action="append", default=[], metavar=("NAME", "A", "B"))
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--only", default=None, help="with --tiny: check this pair only (e.g. qwen2-tied)")
    parser.add_argument("--plain-reload", action="store_true",
                        help="negative control: vLLM's reload_weights alone, without re-tying the output layer")
    args = parser.parse_args()
    runtime.configure(megatron=False)
    if args.plain_reload:
        from megatron_hbpo.rollout import vllm_engine

        def plain(worker, weights_iterator):
            worker.reload_weights(weights_iterator=weights_iterator)
            return []

        vllm_engine._reload_weights_and_retie = plain
    work = Path(args.work)
    pairs = [(name, Path(a), Path(b)) for name, a, b in args.pair]
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tiny_models import save_tiny_llama, save_tiny_qwen2

        for family, save in (("qwen2", save_tiny_qwen2), ("llama", save_tiny_llama)):
            for tied in (False, True):
                name = f"{family}-{'tied' if tied else 'untied'}"
                if args.only and name != args.only:
                    continue
                a = save(work / name / "a", seed=0, tie_word_embeddings=tied)
                b = save(work / name / "b", seed=1, tie_word_embeddings=tied)
                pairs.append((name, a, b))
    for name, a, b in pairs:
        print(json.dumps(compare(name, a, b, max_tokens=args.max_tokens, dtype=args.dtype)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
