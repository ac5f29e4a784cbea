"""AnytimeReasoner's token-level assignment (docs/anytime.md, "Integration"): for a thinking sample that ended
before b_1, one cut off at b_m and one that ended with EOS without `</think>`, which summary requests are
made, which context each summary sees, and which advantage every thinking, inserted and summary token of
the packed training row gets, against the spec's rules written out here with explicit loops."""

from __future__ import annotations

import torch

from conftest import REPO
from megatron_hbpo.algo import anytime
from megatron_hbpo.algo.methods import Anytime, ScoredRollouts
from megatron_hbpo.components.anytime_rollouts import AnytimeRecord, Summary, anytime_scores, score_summaries
from megatron_hbpo.config import load_recipe
from megatron_hbpo.data.synthetic import task_tokenizer
from megatron_hbpo.rollout.engine import SamplingSettings

BUDGETS = [4, 8, 12, 16]
A = 2


def method() -> Anytime:
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu_anytime.yaml",
                         ["algo.anytime.thinking_budget=16", f"algo.anytime.n_summaries={A}", "algo.anytime.eval_budgets=[]"])
    return Anytime(recipe.algo, temperature=1.0)


class AlwaysRight:
    """A verifier that accepts every extracted answer: rewards then show only the format/EOS rules."""

    def check(self, golds, answers):
        return [(True, "ok") for _ in answers]


def test_requests_contexts_and_token_advantages_of_three_endings():
    tok = task_tokenizer(summary_markers=True)
    think_end, eos = anytime.think_end_token_id(tok), tok.eos_token_id
    truncation, final = anytime.summary_insert_ids(tok)
    word = tok.convert_tokens_to_ids(" check")
    m = method()
    assert m.budgets == BUDGETS
    prompt = [3, 4, 5]
    samples = {"ended": [word, word, think_end], "cut_off": [word] * 16, "eos": [word] * 9 + [eos]}
    sampling = SamplingSettings(max_tokens=6)
    plans = {name: m.summary_plan(prompt, z, group_id=0, sampling=sampling, think_end_id=think_end, eos_id=eos,
                                  truncation_ids=truncation, final_answer_ids=final) for name, z in samples.items()}

    # Requests: one per distinct cut, n = (slots sharing it) * A; the prompt closes the thinking at the cut.
    ended = plans["ended"]
    assert ended.ending == "ended" and ended.cuts == [3, 3, 3, 3] and ended.slots == [[0, 1, 2, 3]]
    assert [q.n for q in ended.requests] == [4 * A]
    assert ended.requests[0].prompt_ids == prompt + samples["ended"] + final  # natural end: no truncation insert
    cut = plans["cut_off"]
    assert cut.ending == "cut_off" and cut.cuts == BUDGETS and [q.n for q in cut.requests] == [A] * 4
    for q, c in zip(cut.requests, BUDGETS):
        assert q.prompt_ids == prompt + samples["cut_off"][:c] + truncation + final  # every slot truncated
    eos_plan = plans["eos"]
    assert eos_plan.ending == "eos" and eos_plan.cuts == [4, 8, 10, 10] and eos_plan.slots == [[0], [1], [2, 3]]
    assert [q.n for q in eos_plan.requests] == [A, A, 2 * A]
    assert eos_plan.requests[-1].prompt_ids == prompt + samples["eos"] + truncation + final  # truncated even at L

    # Summaries: 2 tokens each ("\boxed{" then eos), the inserted tokens are the request's tail.
    summary_ids = [tok.convert_tokens_to_ids("\\boxed{"), eos]
    g = torch.Generator().manual_seed(0)
    records = []
    for name, plan in plans.items():
        summaries = []
        for request, shared, n_inserted in zip(plan.requests, plan.slots, plan.inserted):
            for slot in shared:
                for _ in range(A):
                    summaries.append(Summary(slot=slot, inserted_ids=request.prompt_ids[-n_inserted:], ids=summary_ids,
                                             logprobs=torch.zeros(2), reward=0.0, format_ok=True))
        records.append(AnytimeRecord(prompt_ids=prompt, response_ids=samples[name], logprobs=torch.zeros(len(samples[name])),
                                     length=len(samples[name]), budget=None, group_id=0, level=None, correct=False,
                                     format_ok=True, truncated=name == "cut_off", ending=name, cuts=plan.cuts,
                                     budgets=BUDGETS, summaries=summaries))

    for record in records:
        n_branch = len(BUDGETS) * A
        adv = torch.cat([torch.tensor([1.0, 2.0, 3.0, 4.0]), 10.0 + torch.arange(n_branch, dtype=torch.float64)])
        seq = record.policy_sequence(adv)
        L = len(record.response_ids)
        want_adv, want_train = [], []
        for t in range(1, L + 1):  # 1-based thinking token t' belongs to slot min{j : b_j >= t'}
            j = min(j for j, b in enumerate(BUDGETS) if b >= t)
            want_adv.append(adv[j].item())
            want_train.append(True)
        contexts = []
        for k, s in enumerate(record.summaries):
            want_adv += [0.0] * len(s.inserted_ids) + [10.0 + k] * len(s.ids)
            want_train += [False] * len(s.inserted_ids) + [True] * len(s.ids)
            contexts.append(len(prompt) + record.cuts[k // A])
        assert seq.token_advantages.tolist() == want_adv, record.ending
        assert seq.trainable.tolist() == want_train, record.ending
        assert [c for c, _ in seq.branches] == contexts
        assert seq.trunk_length == len(prompt) + L
        # Each branch's tokens are its inserted ids then its summary, in slot-major order.
        start = seq.trunk_length
        for (context, span), s in zip(seq.branches, record.summaries):
            assert seq.tokens[start:start + span] == s.inserted_ids + s.ids
            start += span

    # Rewards: the EOS sample's summaries at its cut L score 0 whatever the answer; its earlier cuts do not.
    flat = [(r, s) for r in records for s in r.summaries]
    boxed_seven = tok.encode("\\boxed{7}", add_special_tokens=False) + [eos]
    rewards, formats, _ = score_summaries(
        tok, AlwaysRight(), inserted=[s.inserted_ids for _, s in flat], summaries=[boxed_seven for _ in flat],
        prefix_ends_with_eos=[r.response_ids[r.cuts[s.slot] - 1] == eos for r, s in flat], golds=["7"] * len(flat),
        think_end_id=think_end, eos_id=eos)
    by_record = [rewards[i * len(BUDGETS) * A:(i + 1) * len(BUDGETS) * A] for i in range(3)]
    assert by_record[0] == [1.0] * 8 and by_record[1] == [1.0] * 8
    assert by_record[2] == [1.0] * 4 + [0.0] * 4  # slots 3 and 4 cut at L, whose last token is EOS
    assert all(formats)

    # The method's advantages of these three as one group: summary tokens of slots sharing a cut compare with
    # all k * A of that cut's summaries (anytime.summary_advantage), thinking slots by the BRPO baseline.
    for record, rs in zip(records, by_record):
        for s, r in zip(record.summaries, rs):
            s.reward = r
    scores = anytime_scores(records)
    rollouts = ScoredRollouts(lengths=torch.zeros(3), correct=torch.zeros(3, dtype=torch.bool),
                              format_ok=torch.ones(3, dtype=torch.bool), group_ids=torch.zeros(3, dtype=torch.long),
                              budgets=torch.full((3,), float("nan")), anytime=scores)
    returns, adv = m.rewards_and_advantages(rollouts)
    rbar = scores.rewards.mean(-1)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert torch.allclose(returns, (rbar * prior).sum(-1))
    assert torch.allclose(adv[:, :4], anytime.thinking_advantage(rbar, prior))
    eos_summary = adv[2, 4:].reshape(4, A)
    # The EOS sample: slots 1, 2 all right (own-cut mean 1 -> 0), slots 3, 4 share cut 10, all 0 -> 0.
    assert torch.equal(eos_summary, torch.zeros(4, A, dtype=torch.float64))
