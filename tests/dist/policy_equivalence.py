"""TP / PP / DP equivalence of the Megatron HBPO step on CPU (gloo).

    python  policy_equivalence.py --mode ref --out REF.pt            (world 1: TP = PP = DP = 1)
    torchrun --nproc-per-node 2 policy_equivalence.py --mode tp|pp|dp|dp_distopt --ref REF.pt
    torchrun --nproc-per-node 1 policy_equivalence.py --mode gpu --ref REF.pt    (CUDA against a CPU REF)

`--loss` names the losses to compare, comma-separated (default clipped: HBPO's token-mean clipped
loss); one process runs each in turn, so the reference and each parallel mode start up once for all
of them. The reference file and the report hold one entry per loss, then per model family.

`--loss anytime` runs them with AnytimeReasoner's packed tree rows (a prompt + thinking trunk and
summary branches that see it up to their cut, per-token advantages, inserted tokens out of the loss)
and its loss normalised by the constant N_rows * C (docs/anytime.md, "Loss").

`--loss sequence` runs the same comparisons with AdaptThink's sequence-ratio loss (a mean over
sequences, normalised by the global sequence count; its first response token's old log-prob comes
from the rollout log-probs, log 0.5 here) in place of HBPO's token-mean clipped loss.

For a tiny Qwen2-shaped model (GQA, q/k/v bias, untied) and a tiny Llama-shaped one (MHA, tied
embeddings, Llama-3 rope scaling), the parallel run loads the reference weights; each rank reports
(tests/dist/common.write_report) how far its response log-probs, token-mean loss, gradients
(gathered to full tensors) and weights after one optimizer step are from the reference. In dp mode
the ranks hold uneven shares of the sequences, and a NaN advantage on one rank must stop both
ranks before the optimizer step. In gpu mode the same step runs on CUDA in fp32 (TF32 off) against a
reference made on CPU; `--attention` picks the core attention of either run (e.g. an unfused CPU
reference for SDPA on CUDA). tests/megatron/test_megatron_policy.py and tests/test_gpu.py assert on
the reports.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from common import policy_from_recipe, write_report

from megatron_hbpo import runtime
from megatron_hbpo.algo.adaptthink import AdaptThinkLoss
from megatron_hbpo.algo.loss import AnytimeLoss, ClippedLoss
from megatron_hbpo.config import ClusterConfig, ModelConfig, ParallelConfig, Recipe, TrainConfig, validate
from megatron_hbpo.megatron import parallel
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.megatron.model import hf_config_from_recipe
from megatron_hbpo.megatron.state import iter_full_tensors
from megatron_hbpo.megatron.train_step import NonFiniteError

VOCAB = 100
TOL = 2e-6  # fp32, different reduction orders
LOSSES = {"clipped": ClippedLoss(temperature=1.0), "sequence": AdaptThinkLoss(temperature=1.0),
          "anytime": AnytimeLoss(temperature=1.0, loss_normalizer=50)}

MODELS = {
    "qwen2": dict(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=128, rope_theta=1e6,
                  add_qkv_bias=True, tie_word_embeddings=False),
    "llama": dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=4, vocab_size=VOCAB, max_position_embeddings=128, rope_theta=5e5,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32},
                  tie_word_embeddings=True),
}
PARALLEL = {
    "ref": ParallelConfig(),
    "tp": ParallelConfig(tensor_model_parallel_size=2),
    "pp": ParallelConfig(pipeline_model_parallel_size=2),
    "dp": ParallelConfig(),
    "dp_distopt": ParallelConfig(),
    "gpu": ParallelConfig(),
}


def recipe_for(family: str, mode: str, world: int, attention: str = "auto") -> Recipe:
    recipe = Recipe(name=f"equiv-{family}-{mode}",
                    model=ModelConfig(params_dtype="fp32", make_vocab_size_divisible_by=8, transformer_impl="local",
                                      attention_backend=attention, **MODELS[family]),
                    parallel=PARALLEL[mode], cluster=ClusterConfig(gpus_per_node=world),
                    train=TrainConfig(prompts_per_step=2, mini_batch_prompts=2, micro_batch_tokens=80, total_steps=1))
    recipe.rollout.max_prompt_length, recipe.rollout.max_response_length = 16, 64
    recipe.algo.budgets = [16, 32]
    recipe.rollout.n_rollouts = 2
    recipe.optimizer.lr = 1e-3
    # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 a gradient of ~1e-8 that
    # differs in the last bits between reduction orders moves its weight by a different fraction of
    # lr. A larger eps keeps the comparison about the gradients, not about that amplification.
    recipe.optimizer.adam_eps = 1e-4
    recipe.optimizer.use_distributed_optimizer = mode == "dp_distopt"
    return validate(recipe, world)


def make_tree_rows() -> list[PolicySequence]:
    """Packed anytime rows: (prompt, thinking, [(cut, inserted, generated)]) with random tokens and
    per-token advantages; the inserted tokens are out of the loss."""
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 20, [(8, 3, 4), (8, 3, 5), (20, 2, 3), (20, 2, 6)]), (3, 6, [(6, 2, 3), (6, 2, 2)]),
              (6, 14, [(4, 3, 3), (10, 3, 2)]), (4, 9, [(9, 2, 7)]), (2, 11, [(3, 3, 2), (11, 2, 4), (11, 2, 2)]),
              (5, 7, [(7, 2, 2)]), (3, 16, [(5, 3, 3), (16, 2, 5)])]
    rows = []
    for prompt, thinking, branches in shapes:
        spans = sum(i + n for _, i, n in branches)
        tokens = torch.randint(0, VOCAB, (prompt + thinking + spans,), generator=g).tolist()
        trainable = [True] * thinking
        for _, inserted, generated in branches:
            trainable += [False] * inserted + [True] * generated
        rows.append(PolicySequence(tokens, prompt, branches=[(prompt + c, i + n) for c, i, n in branches],
                                   token_advantages=torch.randn(thinking + spans, generator=g),
                                   trainable=torch.tensor(trainable)))
    return rows


def make_sequences(loss: str) -> list[PolicySequence]:
    if loss == "anytime":
        return make_tree_rows()
    g = torch.Generator().manual_seed(7)
    sequences = []
    for length, prompt in [(40, 7), (9, 3), (23, 5), (6, 2), (31, 6), (17, 4), (12, 2)]:
        tokens = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        sequences.append(PolicySequence(tokens, prompt, advantage=float(torch.randn(1, generator=g))))
    if loss == "sequence":  # a forced first token sampled with probability 0.5 (AdaptThink's)
        for seq in sequences:
            seq.logp_rollout = torch.cat([torch.tensor([-0.6931471805599453]), torch.zeros(seq.response_length - 1)])
    return sequences


def reference(out_path: str, attention: str, losses: list[str]) -> int:
    runtime.configure()
    parallel.initialize(ParallelConfig(), seed=1234)
    result: dict = {}
    report: dict = {}
    for name in losses:
        result[name], report[name] = reference_for(name, attention)
    torch.save(result, out_path)
    write_report(report)
    return 0


def reference_for(loss_name: str, attention: str) -> tuple[dict, dict]:
    loss_fn = LOSSES[loss_name]
    result, report = {}, {}
    for family in MODELS:
        recipe = recipe_for(family, "ref", 1, attention)
        policy = policy_from_recipe(recipe, hf_config_from_recipe(recipe.model), tree_rows=loss_name == "anytime")
        weights0 = {name: t.clone() for name, t in iter_full_tensors(policy.model[0])}
        sequences = make_sequences(loss_name)
        logp = policy.logprobs(sequences, temperature=1.0)
        g = torch.Generator().manual_seed(11)
        # Rollout log-probs a little off the trainer's, so that some ratios are clipped.
        logp_old = [x + 0.3 * torch.randn(x.shape, generator=g) for x in logp]
        for seq, old in zip(sequences, logp_old):
            seq.logp_old = old
        sums, _, _ = policy.forward_backward(sequences, loss_fn)
        grads = {name: t.clone() for name, t in iter_full_tensors(policy.model[0], grads=True)}
        # The same mini-batch in one micro-batch instead of several: the same token-mean gradient.
        policy.micro_batch_tokens = 1000
        _, _, single = policy.forward_backward(sequences, loss_fn)
        policy.micro_batch_tokens = recipe.train.micro_batch_tokens
        split_diff = max(float((t - grads[name]).abs().max()) for name, t in iter_full_tensors(policy.model[0], grads=True))
        if loss_name == "anytime":
            report[f"{family} transformers"] = packed_vs_transformers(policy, recipe, sequences, logp)
        policy.optimizer.step()
        weights1 = dict(iter_full_tensors(policy.model[0]))
        loss = sums["loss"] / sums["normalizer"]
        clipped = sums[loss_fn.metric_names[0]]
        result[family] = dict(weights0=weights0, logp=logp, logp_old=logp_old, loss=loss,
                              clipped=clipped, grads=grads, weights1=weights1)
        report[family] = {"single_micro_batches": single, "split_grad_diff": split_diff, "loss": loss,
                          "tokens": sums["tokens"], "clipped": clipped, "normalizer": sums["normalizer"]}
    return result, report


def packed_vs_transformers(policy, recipe: Recipe, rows: list[PolicySequence], logp: list[torch.Tensor]) -> dict:
    """The packed rows' log-probs of the trainable tokens against transformers (float64) scoring each as
    one plain sequence: the trunk (prompt + thinking) for thinking tokens, prompt + thinking[:cut] +
    inserted + summary for each branch's summary tokens (docs/anytime.md, "Loss": summary tokens see
    exactly the context they were sampled with)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    from megatron_hbpo.convert.mapping import megatron_to_hf
    from megatron_hbpo.megatron.state import unwrap

    hf_config = hf_config_from_recipe(recipe.model)
    state = {k: v for k, v in unwrap(policy.model[0]).state_dict().items() if not k.endswith("_extra_state")}
    hf_state = dict(pair for name, tensor in state.items() for pair in megatron_to_hf(name, tensor, hf_config))
    model = (Qwen2ForCausalLM if recipe.model.family == "qwen2" else LlamaForCausalLM)(hf_config).double().eval()
    model.load_state_dict({k: v.double() for k, v in hf_state.items()}, strict=False)
    if hf_config.tie_word_embeddings:
        model.tie_weights()

    def plain_logp(tokens: list[int]) -> torch.Tensor:  # [len - 1]: log p(tokens[t + 1] | tokens[:t + 1])
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, :-1, :VOCAB]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)

    worst_thinking = worst_summary = 0.0
    summary_tokens = 0
    for row, packed in zip(rows, logp):
        p, trunk = row.prompt_length, row.trunk_length
        want = plain_logp(row.tokens[:trunk])[p - 1:]
        worst_thinking = max(worst_thinking, float((packed[:trunk - p].double() - want).abs().max()))
        start = trunk
        for context, span in row.branches or []:
            plain = row.tokens[:context] + row.tokens[start:start + span]
            want = plain_logp(plain)[context - 1:]  # the span's tokens, each from its sampled context
            got = packed[start - p:start - p + span].double()
            keep = row.trainable[start - p:start - p + span]
            worst_summary = max(worst_summary, float((got[keep] - want[keep]).abs().max()))
            summary_tokens += int(keep.sum())
            start += span
    return {"thinking_err": worst_thinking, "summary_err": worst_summary, "summary_tokens": summary_tokens}


def max_diff(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    rows = min(got.shape[0], want.shape[0]) if name.endswith(("word_embeddings.weight", "output_layer.weight")) \
        else got.shape[0]
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        # Rows past the real vocabulary are padding whose size depends on TP; they must stay zero-grad.
        assert rows >= VOCAB
    return float((got[:rows].double().cpu() - want[:rows].double().cpu()).abs().max())


def check(mode: str, ref_path: str, attention: str, losses: list[str]) -> int:
    ref = torch.load(ref_path)
    runtime.configure()
    if mode == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("gpu mode needs CUDA")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    parallel.initialize(PARALLEL[mode], seed=1234)
    report = {name: check_loss(mode, ref[name], attention, name) for name in losses}
    dist.barrier()
    dist.destroy_process_group()
    write_report(report)
    return 0


def check_loss(mode: str, ref: dict, attention: str, loss_name: str) -> dict:
    loss_fn = LOSSES[loss_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {}
    for family in MODELS:
        recipe = recipe_for(family, mode, world, attention)
        expected = ref[family]
        policy = policy_from_recipe(recipe, hf_config_from_recipe(recipe.model), tree_rows=loss_name == "anytime")
        policy.load_full_state(lambda name: expected["weights0"][name])
        sequences = make_sequences(loss_name)
        mine = list(range(len(sequences)))
        if mode.startswith("dp"):  # uneven data-parallel shares: 2 long sequences vs 5
            mine = [0, 4] if rank == 0 else [1, 2, 3, 5, 6]
        sequences = [sequences[i] for i in mine]

        logp = policy.logprobs(sequences, temperature=1.0)
        got: dict = {"logp_diff": max(float((a.cpu() - expected["logp"][i]).abs().max()) for a, i in zip(logp, mine))}
        for seq, i in zip(sequences, mine):
            seq.logp_old = expected["logp_old"][i]
        sums, padding, micro_batches = policy.forward_backward(sequences, loss_fn)
        got.update(loss_diff=abs(float(sums["loss"] / sums["normalizer"] - expected["loss"])),
                   clipped=sums[loss_fn.metric_names[0]], expected_clipped=expected["clipped"],
                   micro_batches=micro_batches, padding=padding, normalizer=sums["normalizer"])
        if not recipe.optimizer.use_distributed_optimizer:  # its grads are reduce-scattered shards
            got["grad_diff"] = max(max_diff(name, grad, expected["grads"][name])
                                   for name, grad in iter_full_tensors(policy.model[0], grads=True))
        policy.optimizer.step()
        got["step_diff"] = max(max_diff(name, weight, expected["weights1"][name])
                               for name, weight in iter_full_tensors(policy.model[0]))
        if mode == "dp" and loss_name != "anytime":
            got["nonfinite"] = check_nonfinite_stops_the_step(policy, sequences, rank, loss_fn)
        report[family] = got
    return report


def check_nonfinite_stops_the_step(policy, sequences: list[PolicySequence], rank: int, loss_fn) -> dict:
    """A NaN advantage on rank 1: the step must raise on both ranks and leave the weights alone."""
    before = {name: t.clone() for name, t in iter_full_tensors(policy.model[0])}
    if rank == 1:
        sequences[-1].advantage = float("nan")
    message = None
    try:
        policy.train_step(sequences, loss_fn)
    except NonFiniteError as error:
        message = str(error)
    finally:
        sequences[-1].advantage = 0.0
    after = dict(iter_full_tensors(policy.model[0]))
    return {"message": message, "changed": [name for name in before if not torch.equal(before[name], after[name])]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=sorted(PARALLEL), required=True)
    parser.add_argument("--out")
    parser.add_argument("--ref")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "unfused"],
                        help="model.attention_backend of this run")
    parser.add_argument("--loss", default="clipped",
                        help="comma-separated, from clipped (HBPO's token mean), sequence (AdaptThink's sequence "
                             "mean) and anytime (packed tree rows, constant normaliser)")
    args = parser.parse_args()
    losses = args.loss.split(",")
    if unknown := [name for name in losses if name not in LOSSES]:
        parser.error(f"--loss: unknown {', '.join(unknown)} (from {', '.join(LOSSES)})")
    if args.mode == "ref":
        return reference(args.out, args.attention, losses)
    return check(args.mode, args.ref, args.attention, losses)


if __name__ == "__main__":
    sys.exit(main())
