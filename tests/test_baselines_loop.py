"""The baselines (L1-Exact, L1-Max, TLMRE, AdaptThink) through the real trainer in this process, with a
scripted rollout engine: requests, records, rewards, advantages and trained sequences against the pure
functions of algo/ recomputed here from what the engine returned (docs/baselines.md, "Integration").

The engine scripts each prompt's group by its group id, so that every step holds the edge cases: a
group all wrong, one all correct (at different lengths), one with a single correct answer, and one
mixing a truncated response, a format error (no `</think>`), an empty thinking block (NoThinking)
and a correct chain. Under AdaptThink's forced tokens it continues after the forced token, and its
NoThinking "format error" re-opens thinking after the empty block (a second `</think>`).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import REPO
from megatron_hbpo.algo.adaptthink import adaptthink_reward, reference_key, think_tag_counts
from megatron_hbpo.algo.advantage import group_normalized_advantage
from megatron_hbpo.algo.l1 import l1_reward, length_instruction, problem_target
from megatron_hbpo.algo.tlmre import rloo_advantage, tlmre_reward, whiten_advantages, whitening_moments
from megatron_hbpo.config import load_recipe
from megatron_hbpo.data.synthetic import Problem, response_text
from megatron_hbpo.megatron.batching import PolicySequence, collate
from megatron_hbpo.rollout.requests import samples_by_request, with_forced_response
from megatron_hbpo.rollout.engine import Request, RolloutEngine, Sample
from test_trainer_loop import world  # noqa: F401 (the fixture: a world of one, tokenizer, verifier)

N = 8  # rollouts per prompt in the tiny recipes
STYLES = ("concise", "steps", "checked", "verbose")


def scripted_text(problem: Problem, group: int, j: int, start: str) -> str:
    """The whole response (forced token included) of sample j of `group`; start: the response's first
    token ("<think>" in natural mode and Thinking, "</think>" in NoThinking)."""
    gold, wrong = problem.answer, str((int(problem.answer) + 1) % 10)
    chain = response_text(problem, STYLES[j % 4], think_close="")  # a chain without `</think>` and answer
    chain = chain[:chain.rindex("\\boxed{")]
    scenario = ["wrong", "correct", "one" if j == 0 else "wrong",
                ["truncated", "format", "nothinking", "correct"][j % 4]][group % 4]
    answer = gold if scenario in ("correct", "one", "nothinking") else wrong
    if scenario == "truncated":  # longer than any cap
        return start + " check" * 120
    if start == "</think>":  # NoThinking: answer at once; the "format error" re-opens thinking
        if scenario == "format":
            return "</think>" + chain + f"</think>\\boxed{{{gold}}}"
        return f"</think>\\boxed{{{answer}}}"
    if scenario == "format":
        return "<think>" + chain + f"\\boxed{{{gold}}}"
    if scenario == "nothinking":
        return f"<think></think>\\boxed{{{gold}}}"
    return "<think>" + chain + f"</think>\\boxed{{{answer}}}"


class BaselineEngine:
    """Scripted responses (scripted_text), continued after a forced last prompt token; log-probs from the
    policy, like an exact engine. `calls`: every generate's (requests, samples)."""

    def __init__(self, tokenizer, policy, temperature: float):
        self.tokenizer, self.policy, self.temperature = tokenizer, policy, temperature
        self.calls: list[tuple[list[Request], list[Sample]]] = []

    def generate(self, requests: list[Request]) -> list[Sample]:
        tok = self.tokenizer
        close, open_ = (tok.convert_tokens_to_ids(t) for t in ("</think>", "<think>"))
        samples = []
        for request in requests:
            text = tok.decode(request.prompt_ids)
            operands = tuple(int(d) for d in re.findall(r"[a-j](\d)", text.split("last digit of")[-1]))
            problem = Problem(operands, len(operands) - 1)
            last = request.prompt_ids[-1]
            for j in range(request.n):
                start = "</think>" if last == close else "<think>"
                ids = tok(scripted_text(problem, request.group_id, j, start), add_special_tokens=False)["input_ids"]
                if last in (close, open_):
                    assert ids[0] == last
                    ids = ids[1:]  # the engine continues after the forced token
                ids = ids + [tok.eos_token_id]
                limit = request.sampling.max_tokens
                finish = "length" if len(ids) > limit else "stop"
                ids = ids[:limit]
                samples.append(Sample(prompt_ids=list(request.prompt_ids), response_ids=ids, logprobs=torch.zeros(0),
                                      finish_reason=finish, budget=request.budget, group_id=request.group_id,
                                      ended_with_eos=ids[-1] == tok.eos_token_id))
        logp = self.policy.logprobs([PolicySequence(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples],
                                    temperature=self.temperature)
        for sample, values in zip(samples, logp):
            sample.logprobs = values
        self.calls.append((list(requests), samples))
        return samples

    def update_weights(self, stream) -> None:
        for _ in stream:
            pass

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def make_trainer(world, root, recipe_name: str, *overrides: str):  # noqa: F811
    from megatron_hbpo.data.source import PromptSource
    from megatron_hbpo.megatron import parallel
    from megatron_hbpo.megatron.train_step import MegatronPolicy
    from megatron_hbpo.train import build_trainer

    tokenizer, hf_config, verifier = world
    recipe = load_recipe(REPO / "recipes" / recipe_name, [
        "warmup.steps=0", "train.total_steps=1", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
        f"checkpoint.dir={root / 'ck'}", f"logging.dir={root / 'run'}", "logging.progress_bar=false",
        "logging.tensorboard=false", "eval.before_after=false", "optimizer.lr=1e-3", *overrides])
    parallel.initialize(recipe.parallel, recipe.train.seed)
    t = recipe.train
    policy = MegatronPolicy(hf_config, recipe.model, recipe.parallel, recipe.optimizer,
                            micro_batch_tokens=t.micro_batch_tokens,
                            optimizer_steps=t.total_steps * (t.prompts_per_step // t.mini_batch_prompts))
    engine = BaselineEngine(tokenizer, policy, recipe.rollout.temperature)
    assert isinstance(engine, RolloutEngine)
    trainer, _ = build_trainer(recipe, policy=policy, hf_config=hf_config, tokenizer=tokenizer, engine=engine,
                               verifier=verifier, source=PromptSource(recipe.data, t.seed),
                               log=lambda _: None)
    return trainer, engine, recipe


def run_one_step(trainer):
    """Run the trainer's one step, recording the method's inputs and outputs and every trained mini-batch."""
    seen: dict = {"minis": []}
    rewards_and_advantages, train_step = trainer.method.rewards_and_advantages, trainer.policy.train_step

    def method_spy(rollouts):
        seen["rollouts"], seen["rewards"], seen["advantages"] = rollouts, *rewards_and_advantages(rollouts)
        return seen["rewards"], seen["advantages"]

    def train_spy(sequences, loss):
        seen["minis"].append(list(sequences))
        return train_step(sequences, loss)

    trainer.method.rewards_and_advantages = method_spy
    trainer.policy.train_step = train_spy
    [seen["metrics"]] = trainer.run()
    return seen


def verdict(text: str, gold: str, finish: str) -> tuple[bool, bool]:
    """(format_ok, correct) without the project's verifier: the last \\boxed{d} after the last `</think>`;
    a truncated response is a format error."""
    head, sep, tail = text.rpartition("</think>")
    found = re.findall(r"\\boxed\{(\d)\}", tail) if sep else []
    format_ok = bool(found) and finish == "stop"
    return format_ok, format_ok and found[-1] == gold


def step_samples(trainer, engine, tokenizer):
    """Step 1's samples as the trainer must see them (a forced token moved to the response front), with
    independent scores: [(request, sample, L, correct, format_ok, text)]."""
    golds = [row.answer for row in trainer.source.batch(0, 4)]
    requests, samples = engine.calls[-1]
    out = []
    for request, sample in samples_by_request(requests, samples):
        s = with_forced_response(request, sample)
        text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
        format_ok, correct = verdict(text, golds[s.group_id], s.finish_reason)
        out.append((request, s, len(s.response_ids) - int(s.ended_with_eos), correct, format_ok, text))
    return out


def check_common(seen, samples, tokenizer):
    """What every method shares: the method saw the engine's samples as scored here, every sample was
    trained once with its advantage, and the metrics are finite."""
    r = seen["rollouts"]
    assert r.lengths.tolist() == [float(x[2]) for x in samples]
    assert r.correct.tolist() == [x[3] for x in samples] and r.format_ok.tolist() == [x[4] for x in samples]
    assert r.group_ids.tolist() == [x[1].group_id for x in samples]
    trained = [seq for mini in seen["minis"] for seq in mini]
    assert len(trained) == len(samples) and len(seen["minis"]) == 2
    for seq, (_, s, *_), adv in zip(trained, samples, seen["advantages"].tolist()):
        assert seq.tokens == s.prompt_ids + s.response_ids and seq.prompt_length == len(s.prompt_ids)
        assert seq.advantage == pytest.approx(adv, abs=1e-6)
    assert all(math.isfinite(v) for v in seen["metrics"].values() if isinstance(v, float)), seen["metrics"]
    assert seen["metrics"]["mismatch/mean_abs"] == 0.0  # an exact engine; a forced token's scheme log-prob is skipped


def edge_groups(samples):
    """The scripted edge cases are all there: group 0 all wrong, 1 all correct, 2 one correct (per request),
    3 mixed."""
    by_group = [[x for x in samples if x[1].group_id == g] for g in range(4)]
    assert not any(x[3] for x in by_group[0])
    assert sum(x[3] for x in by_group[2]) == len({id(x[0]) for x in by_group[2]})
    return by_group


@pytest.mark.parametrize("recipe", ["tiny_cpu_l1_exact.yaml", "tiny_cpu_l1_max.yaml"])
def test_l1_targets_prompts_rewards_and_advantages(world, tmp_path, recipe):  # noqa: F811
    trainer, engine, cfg = make_trainer(world, tmp_path, recipe)
    seen = run_one_step(trainer)
    tokenizer = world[0]
    samples = step_samples(trainer, engine, tokenizer)
    problems = trainer.source.batch(0, 4)
    c = cfg.algo.l1
    requests = engine.calls[-1][0]
    assert [(q.group_id, q.n, q.budget) for q in requests] == [(g, N, None) for g in range(4)]
    for q, row in zip(requests, problems):
        target, kind = problem_target(c.target_seed, row.problem, stage=c.stage, n_min=c.n_min, n_max=c.n_max,
                                      max_fraction=c.max_fraction)
        assert q.mode == ("length:" if kind == "exact" else "max_length:") + str(target)
        # The sentence ends the user turn, before the assistant tag; nothing after it.
        prompt = tokenizer.decode(q.prompt_ids)
        assert prompt.endswith(row.problem + length_instruction(target, kind) + "<|assistant|>"), prompt
    modes = [q.mode for q in requests for _ in range(q.n)]
    targets = torch.tensor([float(m.split(":")[1]) for m in modes], dtype=torch.float64)
    kinds = ["max" if m.startswith("max_length:") else "exact" for m in modes]
    expected = l1_reward(torch.tensor([x[2] for x in samples], dtype=torch.float64), targets, kinds,
                         torch.tensor([x[3] for x in samples]), torch.tensor([x[4] for x in samples]),
                         alpha=c.alpha, alpha_max=c.alpha_max, delta=c.delta)
    assert seen["rewards"].tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    group_ids = torch.tensor([x[1].group_id for x in samples])
    assert seen["advantages"].tolist() == pytest.approx(group_normalized_advantage(expected, group_ids).tolist(),
                                                        abs=1e-12)
    by_group = edge_groups(samples)
    # A truncated response scores as wrong at L = the cap.
    truncated = [x for x in by_group[3] if x[1].finish_reason == "length"]
    assert truncated and all(x[2] == cfg.rollout.max_response_length and not x[4] for x in truncated)
    check_common(seen, samples, tokenizer)


@pytest.mark.parametrize("whiten", [False, True])
def test_tlmre_rewards_and_leave_one_out_advantages(world, tmp_path, whiten):  # noqa: F811
    trainer, engine, cfg = make_trainer(world, tmp_path, "tiny_cpu_tlmre.yaml", f"algo.tlmre.batch_whiten={whiten}")
    seen = run_one_step(trainer)
    samples = step_samples(trainer, engine, world[0])
    assert {q.mode for q in engine.calls[-1][0]} == {"natural"}
    lengths = torch.tensor([x[2] for x in samples], dtype=torch.float64)
    group_ids = torch.tensor([x[1].group_id for x in samples])
    expected = tlmre_reward(lengths, torch.tensor([x[3] for x in samples]), torch.tensor([x[4] for x in samples]),
                            group_ids, alpha=cfg.algo.tlmre.alpha)
    assert seen["rewards"].tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    advantages = rloo_advantage(expected, group_ids)
    by_group = edge_groups(samples)
    assert all(a == 0 for a, x in zip(advantages.tolist(), samples) if x[1].group_id == 0)  # all wrong: no signal
    if whiten:  # one rank: the batch's own token-weighted moments (eos included in the tokens)
        tokens = torch.tensor([len(x[1].response_ids) for x in samples])
        advantages = whiten_advantages(advantages, whitening_moments(advantages, tokens))
    assert seen["advantages"].tolist() == pytest.approx(advantages.tolist(), abs=1e-12)
    # One correct answer in its group: z = 0, R = 1 - alpha / 2.
    [one] = [r for r, x in zip(expected.tolist(), samples) if x[1].group_id == 2 and x[3]]
    assert one == pytest.approx(1 - cfg.algo.tlmre.alpha / 2)
    check_common(seen, samples, world[0])
    assert len(by_group[1]) == N


def test_adaptthink_forced_tokens_reference_rewards_and_loss(world, tmp_path):  # noqa: F811
    from megatron_hbpo.algo.adaptthink import AdaptThinkLoss, adaptthink_policy_loss
    from megatron_hbpo.components.reference import REFERENCE_FILE

    tokenizer = world[0]
    trainer, engine, cfg = make_trainer(world, tmp_path, "tiny_cpu_adaptthink.yaml",
                                        "algo.adaptthink.reference_problems_per_level=2",
                                        "algo.adaptthink.ref_samples=4")
    with pytest.raises(RuntimeError, match="Trainer.prepare"):
        trainer.run()
    trainer.prepare()
    at = cfg.algo.adaptthink
    close, open_ = (tokenizer.convert_tokens_to_ids(t) for t in ("</think>", "<think>"))

    # R_ref: 2 problems x 4 levels, 4 samples each with `<think>` forced, through the evaluation harness.
    ref_requests, ref_samples = engine.calls[0]
    assert len(ref_requests) == 8 and all(q.n == 4 and q.prompt_ids[-1] == open_ for q in ref_requests)
    assert all(q.sampling.max_tokens == cfg.rollout.max_response_length - 1 for q in ref_requests)
    from megatron_hbpo.components.reference import reference_problems

    problems = reference_problems(trainer.method.reference(), cfg.data, [], cfg.train.seed)
    acc: dict[str, list[bool]] = {}
    for _, s in samples_by_request(ref_requests, ref_samples):
        text = tokenizer.decode([open_, *s.response_ids], skip_special_tokens=True)
        format_ok, correct = verdict(text, problems[s.group_id].answer, s.finish_reason)
        n_open, n_close = think_tag_counts(text, forced_text="<think>")
        acc.setdefault(reference_key("", problems[s.group_id].level, "level"), []).append(
            correct and n_open == 0 and n_close == 1)
    table = {k: sum(v) / len(v) for k, v in acc.items()}
    assert trainer.method.table == pytest.approx(table) and set(table) == {f"level:{lv}" for lv in (1, 2, 3, 4)}
    assert (tmp_path / "run" / REFERENCE_FILE).is_file()

    seen = run_one_step(trainer)
    samples = step_samples(trainer, engine, tokenizer)
    # Per prompt: 4 forced NoThinking then 4 forced Thinking, each cap counting the forced token.
    requests = engine.calls[-1][0]
    expected_requests = [(g, 4, token) for g in range(4) for token in (close, open_)]
    assert [(q.group_id, q.n, q.prompt_ids[-1]) for q in requests] == expected_requests
    assert all(q.sampling.max_tokens == 95 and q.forced_logprob == pytest.approx(math.log(0.5)) for q in requests)
    # The forced token is the first response token, trained, counted in L, with rollout log-prob log 0.5.
    trained = [seq for mini in seen["minis"] for seq in mini]
    for seq, (q, s, length, *_), in zip(trained, samples):
        assert seq.tokens[seq.prompt_length] == q.prompt_ids[-1] and seq.prompt_length == len(q.prompt_ids) - 1
        assert seq.logp_rollout[0].item() == pytest.approx(math.log(0.5))
        assert length == seq.response_length - int(s.ended_with_eos)
    forced_nt = torch.tensor([q.prompt_ids[-1] == close for q, *_ in samples])
    tags = [think_tag_counts(x[5], forced_text="</think>" if nt else "<think>") for x, nt in zip(samples, forced_nt)]
    r_ref = torch.tensor([table[f"level:{trainer.source.batch(0, 4)[x[1].group_id].level}"] for x in samples],
                         dtype=torch.float64)
    expected = adaptthink_reward(torch.tensor([x[3] for x in samples]), torch.tensor([x[4] for x in samples]),
                                 torch.tensor([t[0] for t in tags]), torch.tensor([t[1] for t in tags]), forced_nt,
                                 r_ref, delta=at.delta)
    assert seen["rewards"].tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    assert seen["advantages"].tolist() == seen["rewards"].tolist()  # no group statistics
    by_group = edge_groups(samples)
    # All wrong still gets a signal, milder for NoThinking; a re-opened block after `</think>` is wrong
    # although its last answer is right.
    assert all(a == pytest.approx(-t + (at.delta if nt else 0)) for a, t, nt, x in
               zip(expected.tolist(), r_ref.tolist(), forced_nt.tolist(), samples) if x[1].group_id == 0)
    reopened = [(x, a) for x, a in zip(samples, expected.tolist()) if x[5].count("</think>") == 2]
    assert reopened and all(x[3] and a < 0 for x, a in reopened)
    check_common(seen, samples, tokenizer)

    # The loss: the forced token's old log-prob is its rollout log-prob log 0.5, everything else logp_old.
    sequences = [PolicySequence(list(seq.tokens), seq.prompt_length, advantage=seq.advantage,
                                logp_old=seq.logp_old, logp_rollout=seq.logp_rollout) for seq in trained]
    batch = collate(sequences, list(range(len(sequences))))
    logp = batch.logp_old.clone().requires_grad_(True)
    out = AdaptThinkLoss(temperature=1.0)(logp, batch)
    reference = adaptthink_policy_loss(logp, batch.logp_old, batch.advantages, batch.response_mask, forced_nt)
    assert out.normalizer.item() == len(sequences)
    assert out.loss_sum.item() == pytest.approx(reference.loss_sum.item(), rel=1e-6)
    assert seen["metrics"]["train/ratio"] > 0 and 0 <= seen["metrics"]["train/clip_fraction"] <= 1
    assert len(by_group[1]) == N
