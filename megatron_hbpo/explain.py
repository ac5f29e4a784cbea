"""Validate a recipe and show what its HBPO settings do, on illustrative rollouts.

    python -m megatron_hbpo.explain --config recipes/tiny_cpu.yaml [dotted.overrides]

Prints the resolved layout (data-parallel size, optimizer steps per rollout batch), the budget
subgroups and prefixes, the reward R(L, b) a correct answer earns at each length under each
budget, and one prompt's group of illustrative responses taken through the real verifier,
reward, hierarchical advantage and policy loss. Nothing here is trained: it is the recipe author's
check that the knobs mean what they think before spending GPU hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from types import SimpleNamespace

import torch

from megatron_hbpo.algo.budgets import assign_budgets, budget_sentence
from megatron_hbpo.algo.methods import ScoredRollouts, method_for
from megatron_hbpo.algo.reward import budget_baseline, hbpo_reward
from megatron_hbpo.algo.verify import AnswerVerifier
from megatron_hbpo.config import ConfigError, Recipe, load_recipe


def _layout(recipe: Recipe) -> None:
    p, t, r = recipe.parallel, recipe.train, recipe.rollout
    print(f"recipe {recipe.name}: {recipe.model.family} {recipe.model.num_layers} layers, hidden "
          f"{recipe.model.hidden_size}, {recipe.model.num_attention_heads} heads / {recipe.model.num_query_groups} "
          f"query groups, head dim {recipe.head_dim}")
    print(f"  world {recipe.cluster.world_size} = TP {p.tensor_model_parallel_size} x PP "
          f"{p.pipeline_model_parallel_size} x CP {p.context_parallel_size} x DP {recipe.data_parallel_size}")
    print(f"  rollout layout: {recipe.rollout_layout.describe()} (rollout.tensor_parallel_size "
          f"{r.tensor_parallel_size} of {recipe.cluster.world_size} ranks; every rank runs a vLLM worker)")
    print(f"  per step: {t.prompts_per_step} prompts x {r.n_rollouts} rollouts = "
          f"{t.prompts_per_step * r.n_rollouts} responses, {t.prompts_per_step // t.mini_batch_prompts} optimizer "
          f"steps of {t.mini_batch_prompts} prompts; {t.total_steps} steps")


def _budgets(recipe: Recipe) -> None:
    a, r = recipe.algo, recipe.rollout
    if a.name != "hbpo":
        print(f"\n{a.name.upper()} baseline: {r.n_rollouts} rollouts per prompt, no budget subgroups "
              "(docs/baselines.md has its reward, advantage and loss)")
        return
    per = assign_budgets(r.n_rollouts, a.budgets)
    print(f"\nbudgets {a.budgets}: {r.n_rollouts // len(a.budgets)} rollouts each; L_max = "
          f"{r.max_response_length}, beta = {a.beta}, alpha = {a.alpha:.3g}")
    for b in a.budgets:
        starts = a.think_open + budget_sentence(b, a.budget_template)
        print(f"  b={b:<6d} x{per.count(b)}  assistant turn starts: {starts!r}")


def _reward_table(recipe: Recipe) -> None:
    a, l_max = recipe.algo, recipe.rollout.max_response_length
    if a.name != "hbpo":
        return
    lengths = sorted({max(1, round(l_max * f)) for f in (0.05, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)}
                     | {l_max + 1})
    print("\nreward of a correct answer, R(L, b) = min(f1, f2); '*' where f1 < f2 although L <= b")
    print("  " + "L".rjust(7) + "".join(f"b={b}".rjust(11) for b in a.budgets))
    f2 = budget_baseline(torch.tensor(a.budgets, dtype=torch.float64), l_max=l_max, beta=a.beta)
    for length in lengths:
        n = len(a.budgets)
        reward = hbpo_reward(torch.full((n,), float(length), dtype=torch.float64),
                             torch.tensor(a.budgets, dtype=torch.float64), torch.ones(n, dtype=torch.bool),
                             torch.ones(n, dtype=torch.bool), l_max=l_max, alpha=a.alpha, beta=a.beta,
                             format_error_reward=a.format_error_reward)
        cells = [f"{v:9.3f}{'*' if (length <= b and v < f2[i] - 1e-12) else ' '} "
                 for i, (b, v) in enumerate(zip(a.budgets, reward.tolist()))]
        print("  " + str(length).rjust(7) + "".join(c.rjust(11) for c in cells))
    print("  f2(b)  " + "".join(f"{v:9.3f}  ".rjust(11) for v in f2.tolist()))


def _worked_group(recipe: Recipe) -> None:
    """One prompt's group: shorter responses under tighter budgets, some wrong, one unfinished."""
    a, r = recipe.algo, recipe.rollout
    l_max = r.max_response_length
    budgets = assign_budgets(r.n_rollouts, a.budgets)
    gold = "\\frac{3}{4}"
    responses, lengths = [], []
    for i, b in enumerate(budgets):
        cap = b if b is not None else l_max // 2
        length = max(1, round(cap * (0.6 + 0.25 * (i % 3))))
        answer = ["0.75", "\\frac{6}{8}", "\\frac{4}{3}"][i % 3]  # two spellings of 3/4, one wrong
        text = f"<think>... {length} tokens of reasoning ...</think> The answer is $\\boxed{{{answer}}}$."
        if i == len(budgets) - 1:
            text, length = "<think>... still thinking when the length limit hit", l_max
        responses.append(text)
        lengths.append(length)

    with AnswerVerifier(recipe.verifier.num_workers, recipe.verifier.timeout_s) as verifier:
        verdicts = verifier.score(responses, [gold] * len(responses), think_close=a.think_close)
    budget_t = torch.tensor([float("nan") if b is None else b for b in budgets], dtype=torch.float64)
    rollouts = ScoredRollouts(lengths=torch.tensor(lengths, dtype=torch.float64),
                              correct=torch.tensor([v.correct for v in verdicts]),
                              format_ok=torch.tensor([v.format_ok for v in verdicts]),
                              group_ids=torch.zeros(len(budgets), dtype=torch.long), budgets=budget_t)
    method = method_for(a, l_max=l_max, temperature=r.temperature)
    reward, adv = method.rewards_and_advantages(rollouts)
    # The other setting of center_intra beside it, for HBPO (GRPO has none).
    other_algo = dataclasses.replace(a, center_intra=not a.center_intra)
    _, centered = method_for(other_algo, l_max=l_max, temperature=r.temperature).rewards_and_advantages(rollouts)
    length_t = rollouts.lengths

    print(f"\nillustrative group for one prompt (gold {gold}), through the verifier, reward and advantage")
    other = "center_intra=" + str(not a.center_intra).lower()
    print(f"  {'budget':>6} {'L':>5} {'answer':>12} {'status':>9} {'reward':>8} {'advantage':>10} {other:>18}")
    for i, v in enumerate(verdicts):
        shown = "-" if budgets[i] is None else str(budgets[i])
        print(f"  {shown:>6} {lengths[i]:>5} {str(v.answer):>12} {v.status:>9} {reward[i].item():8.3f} "
              f"{adv[i].item():10.3f} {centered[i].item():18.3f}")

    # The loss at the rollout policy (ratio 1): its gradient direction per response.
    tokens = int(max(lengths))
    mask = torch.arange(tokens)[None, :] < length_t[:, None]
    logp = torch.full((len(budgets), tokens), -1.0, dtype=torch.float64, requires_grad=True)
    batch = SimpleNamespace(response_mask=mask, advantages=adv, logp_old=logp.detach(), logp_ref=None,
                            logp_rollout=None)
    out = method.loss()(logp, batch)
    (out.loss_sum / out.normalizer).backward()
    assert logp.grad is not None
    push = -(logp.grad * mask).sum(dim=1)
    print(f"  loss at ratio 1: {(out.loss_sum / out.normalizer).item():.4f} over "
          f"{int(mask.sum())} tokens; per-response push on log-probs (sign = up/down): "
          + " ".join(f"{x:+.3f}" for x in push.tolist()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.budgets=[16,32]")
    args = parser.parse_args(argv)
    world_size = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        recipe = load_recipe(args.config, args.overrides, world_size=world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    _layout(recipe)
    _budgets(recipe)
    _reward_table(recipe)
    if recipe.algo.name in ("hbpo", "grpo"):  # the baselines' worked values are docs/baselines.md's tables
        _worked_group(recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
