"""Run under torchrun (gloo, 2 ranks): a converted checkpoint loaded at TP=2 or PP=2.

    torchrun --nproc-per-node 2 converted_checkpoint.py --hf-dir HF --ckpt CKPT --mode tp|pp

Checks that the Megatron policy loaded from CKPT gives transformers' log-probs on the original HF
model (fp32), and that the export stream (the refit source) yields exactly the original HF tensors,
in the same order on every call, holding at most one bucket plus one tensor. Each rank reports its
measurements and the failed checks (tests/dist/common.write_report).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from common import write_report

from megatron_hbpo import runtime
from megatron_hbpo.config import ClusterConfig, ParallelConfig, Recipe, TrainConfig, validate
from megatron_hbpo.convert.export import HFExportStream
from megatron_hbpo.convert.hf_io import HFCheckpoint
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.megatron.checkpoint import load_weights
from megatron_hbpo.megatron.model import model_config_from_hf
from megatron_hbpo.megatron.train_step import MegatronPolicy

PARALLEL = {"tp": ParallelConfig(tensor_model_parallel_size=2), "pp": ParallelConfig(pipeline_model_parallel_size=2)}
BUCKET_BYTES = 40_000
REAL_TEXT = [
    ("What is the capital of France?", "The capital of France is Paris. It is also its largest city."),
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
     "clips did Natalia sell altogether in April and May?",
     "In May she sold 48 / 2 = 24 clips, so altogether she sold 48 + 24 = 72 clips. The answer is \\boxed{72}."),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--mode", choices=sorted(PARALLEL), required=True)
    parser.add_argument("--real-text", action="store_true", help="score real chat text instead of random ids")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()

    hf_config = AutoConfig.from_pretrained(args.hf_dir)
    runtime.configure()
    parallel.initialize(PARALLEL[args.mode], seed=5)  # a different seed: every weight must come from the file
    world = dist.get_world_size()
    recipe = Recipe(name="converted", model=model_config_from_hf(hf_config, params_dtype="fp32", transformer_impl="local"),
                    parallel=PARALLEL[args.mode], cluster=ClusterConfig(gpus_per_node=world),
                    # a prompt per rollout replica (one engine per rank)
                    train=TrainConfig(prompts_per_step=world, mini_batch_prompts=world, micro_batch_tokens=128,
                                      total_steps=1))
    recipe.rollout.max_prompt_length, recipe.rollout.max_response_length, recipe.algo.budgets = 32, 96, [32]
    recipe.rollout.n_rollouts = 1
    validate(recipe, world)
    policy = MegatronPolicy(hf_config, recipe.model, recipe.parallel, recipe.optimizer,
                            micro_batch_tokens=recipe.train.micro_batch_tokens, optimizer_steps=1)
    load_weights(policy.model[0], f"{args.ckpt}/megatron")
    failures = []

    if args.real_text:  # a chat prompt and an assistant answer through the model's own tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
        sequences = []
        for question, answer in REAL_TEXT:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            sequences.append(PolicySequence(prompt_ids + answer_ids, len(prompt_ids)))
    else:
        g = torch.Generator().manual_seed(0)
        sequences = [PolicySequence(torch.randint(0, hf_config.vocab_size, (n,), generator=g).tolist(), p)
                     for n, p in [(30, 5), (12, 3), (45, 9)]]
    logp = policy.logprobs(sequences, temperature=1.0)
    reference = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    diffs = []
    with torch.no_grad():
        for seq, got in zip(sequences, logp):
            ids = torch.tensor([seq.tokens])
            logits = reference(ids).logits[0, :-1]
            want = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)[seq.prompt_length - 1:]
            diffs.append((got - want).abs())
    worst, mean = float(torch.cat(diffs).max()), float(torch.cat(diffs).mean())
    report = {"logp_max_diff": worst, "logp_mean_diff": mean, "response_tokens": sum(len(d) for d in diffs)}
    if worst > args.tolerance:
        failures.append(f"log-probs differ from transformers by {worst:.2e}")

    source = HFCheckpoint(args.hf_dir)
    original = {name: source.get(name) for name in source.weight_map}
    stream = HFExportStream(policy.model[0], hf_config, bucket_bytes=BUCKET_BYTES)
    orders = []
    for _ in range(2):
        names = []
        for bucket in stream:
            for name, tensor in bucket:
                names.append(name)
                if name not in original or not torch.equal(tensor.cpu(), original[name]):
                    failures.append(f"export stream tensor {name} differs from the HF original")
        orders.append(names)
    report.update(exported=len(orders[0]), peak_bytes=stream.peak_bytes, max_tensor_bytes=stream.max_tensor_bytes)
    if sorted(orders[0]) != sorted(original):
        failures.append(f"export stream names {sorted(set(original) ^ set(orders[0]))} differ from the HF checkpoint")
    if orders[0] != orders[1]:
        failures.append("export stream order changed between calls")
    if stream.peak_bytes > BUCKET_BYTES + stream.max_tensor_bytes:
        failures.append(f"export stream held {stream.peak_bytes} bytes, more than a bucket plus one tensor")
    sizes = [sum(t.numel() * t.element_size() for _, t in bucket) for bucket in stream]
    if any(size > BUCKET_BYTES for size, bucket in zip(sizes, stream) if len(bucket) > 3):
        failures.append(f"a bucket of several tensors exceeds {BUCKET_BYTES} bytes: {sizes}")

    dist.barrier()
    dist.destroy_process_group()
    write_report({**report, "failures": failures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
