"""How far training moved the policy in each prompt mode, measured on fixed text (teacher forcing).

    python tools/probe_modes.py [--config recipes/tiny_cpu.yaml] [--base WARMUP_DIR/weights] [--step CHECKPOINT]
                                [--problems 100] [--out probe.json] [dotted recipe overrides as the run had them]

Defaults: the recipe's warm-up weights (warmup.dir) and the newest checkpoint in its checkpoint.dir. For
held-out problems of each level, the correct unchecked chain ("3+b5=8;8+c2=0;...</think>\\boxed{0}",
the style HBPO converges to on the embedded task) is scored under the base and the trained weights, once
per prompt mode (natural: the model's own `<think>` first; budget:N: the budget prefix). Per mode and
level it prints the slip rate, the chance of sampling a wrong digit after "=" given a correct chain so far
(1 - mean p(right digit)), and the chain's mean log-probability per token. The text is the same in every
mode, so a difference between modes is the prompt's alone. CPU, one process, about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "recipes" / "tiny_cpu.yaml"))
    parser.add_argument("--base", default=None, help="warm-up weights directory (default: the recipe's warmup.dir)")
    parser.add_argument("--step", default=None, help="checkpoint directory (default: the newest of checkpoint.dir)")
    parser.add_argument("--problems", type=int, default=100, help="problems per level")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from megatron_hbpo import runtime
    from megatron_hbpo.config import load_recipe

    recipe = load_recipe(args.config, args.overrides, world_size=1)
    runtime.configure()
    from megatron_hbpo.data.chat import NATURAL, PromptBuilder, PromptFormat, budget_mode
    from megatron_hbpo.data.source import eval_set
    from megatron_hbpo.data.synthetic import Problem
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.megatron.checkpoint import list_checkpoints, load_training_state, load_weights
    from megatron_hbpo.megatron.train_step import MegatronPolicy
    from megatron_hbpo.train import load_tokenizer_and_config
    from megatron_hbpo.warmup import chain_scores, finished_base

    parallel.initialize(recipe.parallel, 0)
    tokenizer, hf_config = load_tokenizer_and_config(recipe.model, recipe.data)
    a = recipe.algo
    prompts = PromptBuilder(tokenizer, PromptFormat.of(recipe.data, a))
    modes = [NATURAL, *(budget_mode(b) for b in a.budgets)]
    # The evaluation's held-out problems ("last digit of a3+b5" -> operands (3, 5)).
    problems = [Problem(tuple(int(term[1:]) for term in row.problem.split("of ")[1].split("+")), int(row.level or 0))
                for row in eval_set(recipe.data, args.problems, recipe.eval.seed)]

    def measure(policy: MegatronPolicy) -> dict:
        return {mode: {str(level): cell for level, cell in chain_scores(
            policy, prompts, problems, mode, a, temperature=recipe.rollout.temperature).items()} for mode in modes}

    m = recipe.model
    policy = MegatronPolicy(hf_config, m, recipe.parallel, recipe.optimizer,
                            micro_batch_tokens=recipe.train.micro_batch_tokens, optimizer_steps=1)
    base_weights = Path(args.base) if args.base else finished_base(
        recipe.warmup, m, recipe.data, a, recipe.train.micro_batch_tokens, recipe.checkpoint.dir)
    if base_weights is None:
        print(f"error: --base: {args.config} has no finished warm-up base (prebuilt or in warmup.dir) matching its "
              "settings; run the recipe first or name the base's weights directory", file=sys.stderr)
        return 2
    load_weights(policy.model[0], base_weights)
    before = measure(policy)
    step = Path(args.step) if args.step else list_checkpoints(recipe.checkpoint.dir)[-1]
    load_training_state(policy, step)
    after = measure(policy)
    levels = list(next(iter(before.values())))
    print(f"slip rate % (a wrong digit after '=' given a correct chain so far) / chain log-prob per token; "
          f"base {base_weights} -> trained {step}; {args.problems} problems per level")
    print("| mode | " + " | ".join(f"level {lv}" for lv in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for mode in modes:
        for label, res in (("base", before), ("trained", after)):
            print(f"| {mode} {label} | " + " | ".join(
                f"{100 * res[mode][lv]['slip_rate']:.1f} / {res[mode][lv]['chain_logp']:.3f}"
                for lv in levels) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"base": before, "trained": after, "step": str(step)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
