"""The training loop in this process, with a scripted rollout engine typed by the RolloutEngine protocol.

The engine writes synthetic-task responses (right or wrong, short or long, some cut at the token
limit) and scores them with the policy's own log-probs, so everything after generation is the real
trainer: verifier, method, Megatron step, refit, metrics, checkpoints. tests/test_trainer.py runs
the whole job with vLLM as users do; this file checks the loop's wiring against independent
recomputations, quickly.
"""

from __future__ import annotations

import math
import os
import re
import signal

import pytest
import torch

from conftest import REPO
from megatron_hbpo.algo.constants import BETA
from megatron_hbpo.config import load_recipe
from megatron_hbpo.data.synthetic import Problem, response_text
from megatron_hbpo.megatron.batching import PolicySequence
from megatron_hbpo.rollout.engine import Request, RolloutEngine, Sample

L_MAX = 96


class ScriptedEngine:
    """Responses from the synthetic task's own styles, drawn with the global torch generator (which the
    trainer seeds per step, as vLLM's CPU sampling is); log-probs from the policy, like an exact engine."""

    def __init__(self, tokenizer, policy, temperature: float, *, skew_after_refit: float = 0.0):
        self.tokenizer = tokenizer
        self.policy = policy
        self.temperature = temperature
        self.skew_after_refit = skew_after_refit  # a "broken refit": log-probs off by this after one
        self.refits = 0
        self.requests: list[Request] = []
        self.samples: list[Sample] = []
        self.awake = True

    def generate(self, requests: list[Request]) -> list[Sample]:
        assert self.awake, "generate() on a sleeping engine"
        import random

        samples = []
        for request in requests:
            text = self.tokenizer.decode(request.prompt_ids)
            operands = tuple(int(d) for d in re.findall(r"[a-j](\d)", text.split("last digit of")[-1]))
            problem = Problem(operands, len(operands) - 1)
            for _ in range(request.n):
                rng = random.Random(int(torch.randint(0, 2**31, ())))
                style = rng.choice(["concise", "steps", "checked", "verbose"])
                body = response_text(problem, style, rng=rng, error_rate=0.3,
                                     think_open="" if request.budget is not None else "<think>")
                ids = self.tokenizer(body, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                limit = request.sampling.max_tokens
                finish = "length" if len(ids) > limit else "stop"
                ids = ids[:limit]
                samples.append(Sample(prompt_ids=list(request.prompt_ids), response_ids=ids, logprobs=torch.zeros(0),
                                      finish_reason=finish, budget=request.budget, group_id=request.group_id,
                                      ended_with_eos=ids[-1] == self.tokenizer.eos_token_id))
        logp = self.policy.logprobs([PolicySequence(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples],
                                    temperature=self.temperature)
        for sample, values in zip(samples, logp):
            sample.logprobs = values + (self.skew_after_refit if self.refits else 0.0)
        self.requests += requests
        self.samples += samples
        return samples

    def update_weights(self, stream) -> None:
        for _ in stream:
            pass
        self.refits += 1

    def sleep(self) -> None:
        self.awake = False

    def wake(self) -> None:
        self.awake = True


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A world of one in this process, the tiny recipe's tokenizer and model config, and a verifier."""
    from megatron_hbpo import runtime
    from megatron_hbpo.algo.verify import AnswerVerifier
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.train import load_tokenizer_and_config

    runtime.configure()
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml")
    parallel.initialize(recipe.parallel, recipe.train.seed)
    # The world of one stays out of the environment: later tests' tools and torchruns inherit it.
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)
    tokenizer, hf_config = load_tokenizer_and_config(recipe.model, recipe.data)
    with AnswerVerifier(num_workers=1) as verifier:
        yield tokenizer, hf_config, verifier


def make_trainer(world, root, *overrides, skew: float = 0.0):
    from megatron_hbpo.data.source import PromptSource
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.megatron.train_step import MegatronPolicy
    from megatron_hbpo.train import build_trainer

    tokenizer, hf_config, verifier = world
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [
        "warmup.steps=0", "train.total_steps=3", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
        "checkpoint.save_interval=2", f"checkpoint.dir={root / 'ck'}", f"logging.dir={root / 'run'}",
        "logging.progress_bar=false", "logging.tensorboard=false", "eval.before_after=false", "optimizer.lr=1e-3",
        *overrides])
    parallel.initialize(recipe.parallel, recipe.train.seed)  # the same initial weights for every trainer
    t = recipe.train
    policy = MegatronPolicy(hf_config, recipe.model, recipe.parallel, recipe.optimizer,
                            micro_batch_tokens=t.micro_batch_tokens,
                            optimizer_steps=t.total_steps * (t.prompts_per_step // t.mini_batch_prompts))
    engine = ScriptedEngine(tokenizer, policy, recipe.rollout.temperature, skew_after_refit=skew)
    assert isinstance(engine, RolloutEngine)  # the protocol the trainer is written against
    trainer, _ = build_trainer(recipe, policy=policy, hf_config=hf_config, tokenizer=tokenizer, engine=engine,
                               verifier=verifier, source=PromptSource(recipe.data, t.seed),
                               log=lambda _: None)
    return trainer, engine, recipe


def hbpo_reward_reference(length: int, budget: int, correct: bool, format_ok: bool, alpha: float) -> float:
    """The piecewise reward (docs/method.md), in float64 from its formula."""
    if not format_ok or not correct:
        return 0.0
    f1 = BETA * math.cos(math.pi * length / (2 * L_MAX)) - alpha * abs(length - budget)
    f2 = BETA * math.cos(math.pi * budget / (2 * L_MAX))
    return min(f1, f2)


def test_steps_follow_the_method_and_log_what_happened(world, tmp_path):
    trainer, engine, recipe = make_trainer(world, tmp_path)
    history = trainer.run()
    assert [m["step"] for m in history] == [1, 2, 3]
    # HBPO splits each prompt's 8 rollouts over the 4 budgets, 2 each, in order.
    first_step = engine.requests[:16]
    assert [(r.group_id, r.budget, r.n) for r in first_step] == [(g, b, 2) for g in range(4) for b in (16, 32, 48, 64)]
    # One refit per step, and the engine was awake for each generate (wake before, sleep after).
    assert engine.refits == 3
    # The logged reward is the spec's reward of what the engine generated, recomputed here.
    step1 = engine.samples[:32]
    _, _, verifier = world
    texts = world[0].batch_decode([s.response_ids for s in step1], skip_special_tokens=True)
    golds = [trainer.source.batch(0, 4)[s.group_id].answer for s in step1]
    verdicts = verifier.score(texts, golds)
    rewards = [hbpo_reward_reference(s.length, s.budget, v.correct, v.format_ok and not s.truncated,
                                     recipe.algo.alpha) for s, v in zip(step1, verdicts)]
    first = history[0]
    assert first["rollout/samples"] == 32 and first["train/optimizer_steps"] == 2
    assert first["rollout/reward"] == pytest.approx(sum(rewards) / 32, abs=1e-12)
    assert first["rollout/accuracy"] == pytest.approx(sum(v.correct for v in verdicts) / 32)
    assert first["rollout/truncation_rate"] == pytest.approx(sum(s.truncated for s in step1) / 32)
    for budget in (16, 32, 48, 64):
        mine = [r for r, s in zip(rewards, step1) if s.budget == budget]
        assert first[f"budget_{budget}/reward"] == pytest.approx(sum(mine) / len(mine), abs=1e-12)
    # An exact engine: no mismatch; the loss moved the weights, and metrics are finite.
    assert first["mismatch/mean_abs"] == 0.0 and first["mismatch/max_abs"] == 0.0
    for row in history:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    assert history[-1]["train/grad_norm"] > 0
    # Checkpoints at the interval and at the last step, with the trainer state a resume needs.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_0000002", "step_0000003"]
    import json

    state = json.loads((tmp_path / "ck" / "step_0000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["mismatch_baseline"] == 0.0 and state["recipe"] == "tiny_cpu"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_resume_continues_the_same_trajectory(world, tmp_path):
    from megatron_hbpo.components.metrics import deterministic_metrics

    full, _, _ = make_trainer(world, tmp_path / "full")
    expected = [deterministic_metrics(m) for m in full.run()]
    first, _, _ = make_trainer(world, tmp_path / "part", "train.total_steps=2")
    first.run()
    resumed, engine, _ = make_trainer(world, tmp_path / "part", "checkpoint.resume=auto")
    assert resumed.resume()
    resumed.refitter.refit()
    history = resumed.run()
    assert [m["step"] for m in history] == [3]
    assert deterministic_metrics(history[0]) == expected[2]


def test_a_broken_refit_stops_before_the_update(world, tmp_path):
    from megatron_hbpo.components.refit import RefitMismatchError

    trainer, engine, _ = make_trainer(world, tmp_path, skew=0.5)
    before = {name: p.detach().clone() for name, p in trainer.policy.model[0].named_parameters()}
    with pytest.raises(RefitMismatchError, match=r"at step 2 after a refit .*limit 0\.001"):
        trainer.run()
    assert engine.refits == 1
    # Step 1 trained; step 2 stopped before its update: the weights are those after step 1.
    after_step1 = {name: p.detach().clone() for name, p in trainer.policy.model[0].named_parameters()}
    assert any(not torch.equal(before[n], after_step1[n]) for n in before)


def test_sigterm_saves_and_stops_at_the_end_of_the_step(world, tmp_path):
    trainer, engine, _ = make_trainer(world, tmp_path, "train.total_steps=5", "checkpoint.save_interval=10")
    original = engine.generate

    def generate_then_preempt(requests):
        if engine.refits == 1:  # during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(requests)

    engine.generate = generate_then_preempt
    previous = signal.getsignal(signal.SIGTERM)
    history = trainer.run()
    assert signal.getsignal(signal.SIGTERM) == previous  # the loop's handler is gone again
    assert trainer.preempted and [m["step"] for m in history] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_0000002"]
    assert "time/checkpoint" in history[-1]


def test_the_warmup_base_initialises_from_its_init_seed_alone(world):
    """Every RL seed of a comparison shares one base, and the shipped base is rebuilt by a tool that never
    sees train.seed: the warm-up's model starts from warmup.init_seed whatever the RNG state before it."""
    from megatron_hbpo.megatron.state import iter_full_tensors
    from megatron_hbpo.warmup import _warmup_policy

    tokenizer, hf_config, _ = world
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml")
    args = dict(model=recipe.model, parallel=recipe.parallel, optimizer=recipe.optimizer, data=recipe.data,
                algo=recipe.algo, micro_batch_tokens=recipe.train.micro_batch_tokens, hf_config=hf_config,
                tokenizer=tokenizer)

    def initial_weights(rng_seed: int, init_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(rng_seed)  # what train.seed left behind
        warmup = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [f"warmup.init_seed={init_seed}"]).warmup
        policy, _ = _warmup_policy(warmup, **args)
        return {name: t.clone() for name, t in iter_full_tensors(policy.model[0])}

    first, second, other = initial_weights(1, 1234), initial_weights(2, 1234), initial_weights(1, 99)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)
