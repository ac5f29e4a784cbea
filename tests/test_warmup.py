"""Warm-up data, the reuse rule of a finished warm-up and the shipped base (the training itself runs in
test_trainer)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron_hbpo.config import Recipe, load_recipe
from megatron_hbpo.data.chat import PromptBuilder, PromptFormat
from megatron_hbpo.data.synthetic import task_tokenizer
from megatron_hbpo import warmup
from megatron_hbpo.warmup import (FINGERPRINT_FILE, fingerprint, fingerprint_difference, run_warmup, source_digest,
                                  warmup_sequences)

REPO = Path(__file__).resolve().parents[1]


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


def finished(directory: Path, recipe: Recipe) -> None:
    """A finished warm-up of `recipe` in `directory`, as run_warmup leaves it (weights + warmup.json)."""
    (directory / "weights").mkdir(parents=True)
    (directory / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint_of(recipe), "steps": 1500,
                                                          "final_loss": 0.05}))


def test_finished_warmup_is_reused_and_a_different_one_refused(tmp_path):
    recipe = load_recipe("recipes/tiny_cpu.yaml", [f"warmup.dir={tmp_path}", "warmup.prebuilt=null"])
    finished(tmp_path, recipe)
    logs = []
    base = warmup_of(recipe, logs.append)
    assert base.weights == tmp_path / "weights" and not base.trained_here and base.record["steps"] == 1500
    assert "reusing" in logs[0]
    other = load_recipe("recipes/tiny_cpu.yaml", [f"warmup.dir={tmp_path}", "warmup.prebuilt=null", "model.num_layers=4"])
    with pytest.raises(FileExistsError, match=r"other settings or code \(model.num_layers differ\)"):
        warmup_of(other, logs.append)


def test_a_matching_prebuilt_base_is_used_and_another_trains_the_recipes_own(tmp_path):
    prebuilt, own = tmp_path / "prebuilt", tmp_path / "own"
    recipe = load_recipe("recipes/tiny_cpu.yaml", [f"warmup.prebuilt={prebuilt}", f"warmup.dir={own}"])
    finished(prebuilt, recipe)
    logs = []
    assert warmup_of(recipe, logs.append).weights == prebuilt / "weights"
    assert logs == [f"warm-up: using the prebuilt base {prebuilt} (1500 steps, final loss 0.0500; "
                    "warmup.prebuilt=null trains it here instead)"]
    # Another warm-up setting: the prebuilt base is not this recipe's, so the run says why and uses (here: a
    # finished) warm-up of its own in warmup.dir.
    other = load_recipe("recipes/tiny_cpu.yaml", [f"warmup.prebuilt={prebuilt}", f"warmup.dir={own}",
                                                  "warmup.error_rate=0.2"])
    finished(own, other)
    logs = []
    assert warmup_of(other, logs.append).weights == own / "weights"
    assert logs[0] == (f"warm-up: the prebuilt base {prebuilt} was made by other settings or code (warmup.error_rate "
                       f"differ); training this recipe's own in {own}")
    assert logs[1].startswith(f"warm-up: reusing {own / 'weights'}")


def test_the_fingerprint_covers_the_warmup_code(tmp_path, monkeypatch):
    extra = tmp_path / "source.py"
    extra.write_text("x = 1\n")
    monkeypatch.setattr(warmup, "WARMUP_SOURCES", (*warmup.WARMUP_SOURCES, str(extra)))
    recipe = load_recipe("recipes/tiny_cpu.yaml")
    before = fingerprint_of(recipe)
    extra.write_text("x = 2\n")
    after = fingerprint_of(recipe)
    assert fingerprint_difference(before, after) == ["code"]
    assert before["code"] != source_digest() == after["code"]


@pytest.mark.parametrize("recipe_file", ["tiny_cpu.yaml", "tiny_cpu_anytime.yaml"])
def test_the_shipped_base_is_what_the_recipe_trains(recipe_file):
    """assets/tiny_cpu_warmup (what `make run` starts from) and assets/tiny_cpu_anytime_warmup carry the
    fingerprint of their recipe's warm-up as the code trains it today, and a base that learned the additions.
    A change to the warm-up's settings or code fails here until `make warmup-base` rebuilds the bases."""
    recipe = load_recipe(f"recipes/{recipe_file}")
    shipped = REPO / recipe.warmup.prebuilt
    record = json.loads((shipped / FINGERPRINT_FILE).read_text())
    stale = fingerprint_difference(record["fingerprint"], fingerprint_of(recipe))
    assert not stale, f"{shipped} is stale ({', '.join(stale)} differ): run `make warmup-base` and commit it"
    assert (shipped / "weights" / "metadata.json").is_file()
    assert record["steps"] == recipe.warmup.steps and record["slip_rate"] <= 2 * recipe.warmup.error_rate + 0.05
    assert record["reference_tokens_per_s"] > 0 and record["tokens_per_s"] > 0


def test_a_run_on_a_reused_base_reports_what_training_it_would_add():
    """The time line of a run that did not train its base: this machine's reference speed against the speed of
    the run that built the base, and that base's warm-up time scaled by the two (300 s x 12000 / 6000)."""
    from megatron_hbpo.train import run_timing, timing_line

    base = warmup.WarmupBase(Path("base/weights"), {"tokens_per_s": 15000.0, "reference_tokens_per_s": 12000.0,
                                                    "seconds": 300.0}, trained_here=False)
    timing = run_timing({"warm-up": 0.1, "reference workload": 4.0, "evaluations": 50.0, "training steps": 100.0},
                        200.0, base, 6000.0)
    assert timing["other_s"] == pytest.approx(45.9) and not timing["warmup_trained_here"]
    assert timing_line(timing) == (
        "time: 200 s in all (warm-up 0 s, reference workload 4 s, evaluations 50 s, training steps 100 s, other 46 s); "
        "reference workload (the warm-up's first 20 steps): 6000 response tok/s (the base's own run: 12000; "
        "training the base here would add ~600 s)")
