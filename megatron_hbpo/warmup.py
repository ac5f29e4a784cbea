"""Supervised warm-up of the synthetic task's base model, in the same Megatron stack as the RL step.

RL can only reinforce what the policy already samples, so the base must sometimes write short
chains; mostly it writes verbose ones, padded to about the same length at every level and whatever
budget the prompt names (the over-thinking base HBPO starts from). Its first-pass additions are
wrong at `warmup.error_rate`, which only the checked styles catch. `warmup.style_mix` sets the
shares. The result is a weights-only dist checkpoint in `warmup.dir`, with a fingerprint of what
produced it, so an HBPO run and its GRPO baseline start from the same base and the second run
reuses the first one's warm-up instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from megatron_hbpo.algo.budgets import build_prompt
from megatron_hbpo.config import Recipe
from megatron_hbpo.data.synthetic import TASK_VERSION, make_problem, response_text, style_mix_sample
from megatron_hbpo.evaluate import write_json_atomic
from megatron_hbpo.megatron.batching import PolicySequence

FINGERPRINT_FILE = "warmup.json"


def warmup_dir(recipe: Recipe) -> Path:
    return Path(recipe.warmup.dir or Path(recipe.checkpoint.dir) / "warmup")


def fingerprint(recipe: Recipe) -> dict:
    """Everything the warm-up weights depend on (not the RL settings, which may differ between runs)."""
    # prompt_budgets enters resolved, as "budgets"; dir is where, not what.
    warmup = {k: v for k, v in dataclasses.asdict(recipe.warmup).items() if k not in ("dir", "prompt_budgets")}
    return {"model": dataclasses.asdict(recipe.model), "warmup": warmup,
            "levels": list(recipe.data.synthetic_levels), "budgets": prompt_budgets(recipe),
            "budget_template": recipe.algo.budget_template, "think_open": recipe.algo.think_open,
            "think_close": recipe.algo.think_close, "prompt_template": recipe.data.prompt_template,
            "micro_batch_tokens": recipe.train.micro_batch_tokens, "task_version": TASK_VERSION}


def prompt_budgets(recipe: Recipe) -> list[int]:
    return list(recipe.warmup.prompt_budgets or recipe.algo.budgets)


def warmup_sequences(tokenizer: Any, rng: random.Random, count: int, recipe: Recipe) -> list[PolicySequence]:
    """`count` supervised sequences: prompt (natural, or with a random budget prefix) + styled response + eos."""
    w, algo, data = recipe.warmup, recipe.algo, recipe.data
    budgets = prompt_budgets(recipe)
    sequences = []
    for _ in range(count):
        problem = make_problem(rng, rng.choice(data.synthetic_levels))
        mode = rng.choice(budgets) if budgets and rng.random() < w.budget_prompt_fraction else None
        prompt = build_prompt(tokenizer, data.prompt_template.format(problem=problem.text), mode,
                              template=algo.budget_template, think_open=algo.think_open,
                              system_prompt=data.system_prompt)
        # Natural mode: the model opens its thinking block itself.
        response = response_text(problem, style_mix_sample(rng, w.style_mix), rng=rng, error_rate=w.error_rate,
                                 think_open=algo.think_open if mode is None else "", think_close=algo.think_close)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(PolicySequence(tokens=prompt_ids + response_ids, prompt_length=len(prompt_ids)))
    return sequences


def run_warmup(recipe: Recipe, hf_config: Any, tokenizer: Any, *,
               log: Callable[[str], None] = print) -> Path:
    """Train the base (or reuse a matching earlier warm-up) and return its weights directory.

    Collective: every rank calls it. Requires `megatron.parallel.initialize`.
    """
    from megatron.core import parallel_state

    from megatron_hbpo.megatron.checkpoint import save_weights
    from megatron_hbpo.megatron.train_step import MegatronPolicy

    w = recipe.warmup
    out = warmup_dir(recipe)
    weights = out / "weights"
    expected = fingerprint(recipe)
    if (out / FINGERPRINT_FILE).is_file():
        found = json.loads((out / FINGERPRINT_FILE).read_text())
        if found.get("fingerprint") == expected and weights.is_dir():
            log(f"warm-up: reusing {weights} ({found.get('steps')} steps, final loss {found.get('final_loss'):.4f})")
            return weights
        raise FileExistsError(f"{out} holds a warm-up made with other settings (model, warmup or task fields "
                              "differ); delete it or set warmup.dir to another directory")
    if dist.get_rank() == 0 and weights.exists():  # left by a run killed before it wrote the fingerprint
        import shutil

        shutil.rmtree(weights)
    dist.barrier()
    warm_recipe = dataclasses.replace(
        recipe, optimizer=dataclasses.replace(recipe.optimizer, lr=w.lr, min_lr=w.min_lr, lr_schedule="cosine",
                                              lr_warmup_steps=min(50, w.steps // 10), weight_decay=w.weight_decay))
    policy = MegatronPolicy(warm_recipe, hf_config, optimizer_steps=w.steps)
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = w.sequences_per_step // parallel_state.get_data_parallel_world_size()
    start, loss, tokens = time.perf_counter(), float("nan"), 0
    for step in range(1, w.steps + 1):
        # Seeded by (seed, step, DP rank): every TP/PP rank of a DP group sees the same data.
        rng = random.Random(f"{w.seed}:{step}:{dp_rank}")
        metrics = policy.train_step(warmup_sequences(tokenizer, rng, per_rank, recipe), objective="sft")
        loss, tokens = metrics.loss, tokens + metrics.response_tokens
        if step == 1 or step % max(1, w.steps // 10) == 0 or step == w.steps:
            log(f"warm-up step {step}/{w.steps}: loss {loss:.4f}, lr {metrics.lr:.2e}, "
                f"{tokens / (time.perf_counter() - start):.0f} response tok/s")
    out.mkdir(parents=True, exist_ok=True)
    save_weights(policy.model[0], weights)
    if dist.get_rank() == 0:
        write_json_atomic(out / FINGERPRINT_FILE, {"fingerprint": expected, "steps": w.steps, "final_loss": loss,
                                                   "seconds": time.perf_counter() - start})
    dist.barrier()
    del policy
    return weights

