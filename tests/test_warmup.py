"""Warm-up data and the reuse rule of a finished warm-up (the training itself runs in test_trainer)."""

from __future__ import annotations

import json
import random

import pytest

from megatron_hbpo.config import Recipe, load_recipe
from megatron_hbpo.data.chat import PromptBuilder, PromptFormat
from megatron_hbpo.data.synthetic import task_tokenizer
from megatron_hbpo.warmup import FINGERPRINT_FILE, fingerprint, run_warmup, warmup_sequences


def fingerprint_of(recipe: Recipe) -> dict:
    return fingerprint(recipe.warmup, recipe.model, recipe.data, recipe.algo, recipe.train.micro_batch_tokens)


def warmup_of(recipe: Recipe, log) -> object:
    return run_warmup(recipe.warmup, model=recipe.model, parallel=recipe.parallel, optimizer=recipe.optimizer,
                      data=recipe.data, algo=recipe.algo, micro_batch_tokens=recipe.train.micro_batch_tokens,
                      checkpoint_dir=recipe.checkpoint.dir, hf_config=None, tokenizer=None, log=log)


def test_warmup_sequences_mix_prompt_modes_and_end_with_eos():
    recipe = load_recipe("recipes/tiny_cpu.yaml")
    tokenizer = task_tokenizer()
    prompts = PromptBuilder(tokenizer, PromptFormat.of(recipe.data, recipe.algo))
    sequences = warmup_sequences(prompts, random.Random(0), 400, recipe.warmup, recipe.data, recipe.algo)
    budgeted = 0
    for seq in sequences:
        prompt = tokenizer.decode(seq.tokens[:seq.prompt_length])
        response = tokenizer.decode(seq.tokens[seq.prompt_length:])
        assert seq.tokens[-1] == tokenizer.eos_token_id
        assert prompt.count("<think>") + response.count("<think>") == 1  # opened once, by prompt or model
        if "within" in prompt:
            budgeted += 1
            assert prompt.endswith(" tokens") and not response.startswith("<think>")
        else:
            assert response.startswith("<think>")
        assert "</think>\\boxed{" in response
    assert 0.4 < budgeted / 400 < 0.6  # warmup.budget_prompt_fraction 0.5


def test_grpo_baseline_shares_the_hbpo_warmup():
    hbpo = fingerprint_of(load_recipe("recipes/tiny_cpu.yaml"))
    assert hbpo == fingerprint_of(load_recipe("recipes/tiny_cpu_grpo.yaml"))
    assert hbpo != fingerprint_of(load_recipe("recipes/tiny_cpu.yaml", ["warmup.error_rate=0.2"]))


def test_finished_warmup_is_reused_and_a_different_one_refused(tmp_path):
    recipe = load_recipe("recipes/tiny_cpu.yaml", [f"warmup.dir={tmp_path}"])
    (tmp_path / "weights").mkdir()
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint_of(recipe), "steps": 1500,
                                                         "final_loss": 0.05}))
    logs = []
    assert warmup_of(recipe, logs.append) == tmp_path / "weights"
    assert "reusing" in logs[0]
    other = load_recipe("recipes/tiny_cpu.yaml", [f"warmup.dir={tmp_path}", "model.num_layers=4"])
    with pytest.raises(FileExistsError, match="other settings"):
        warmup_of(other, logs.append)
