"""algo/anytime.py against docs/anytime.md, re-derived with explicit loops over Python floats."""

import math
import random
import statistics

import pytest
import torch

from megatron_hbpo.algo import anytime as at

BUDGETS = [2000, 4000, 6000, 8000]
LINEAR = [0.1, 0.2, 0.3, 0.4]


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Independent references: the formulas of docs/anytime.md, slot s and budget j 1-based as written there
# --------------------------------------------------------------------------------------------------


def ref_prior(kind, budgets):
    m = len(budgets)
    if kind == "base":
        return [0.0] * (m - 1) + [1.0]
    if kind == "uniform":
        return [1.0 / m] * m
    return [b / sum(budgets) for b in budgets]


def ref_parts(rbar, prior, lam):
    """R[g][s], V1[g][s], V2[s] as lists (index s-1)."""
    G, m = len(rbar), len(prior)
    P = [p / sum(prior) for p in prior]
    R = [[sum(P[j - 1] * rbar[g][j - 1] for j in range(s, m + 1)) for s in range(1, m + 1)] for g in range(G)]
    V2 = [(sum(R[g][s - 1] for g in range(G)) / G if G > 1 else 0.0) for s in range(1, m + 1)]
    V1 = []
    for g in range(G):
        row = []
        for s in range(1, m + 1):
            if s == 1:
                row.append(0.0)
                continue
            num = sum(lam ** (s - j) * rbar[g][j - 1] for j in range(1, s))
            den = sum(lam ** (s - j) for j in range(1, s))
            row.append(num / den * sum(P[j - 1] for j in range(s, m + 1)))
        V1.append(row)
    return R, V1, V2


def ref_thinking(rbar, prior, vr, lam):
    R, V1, V2 = ref_parts(rbar, prior, lam)
    G, m = len(rbar), len(prior)
    out = []
    for g in range(G):
        row = []
        for s in range(1, m + 1):
            v1, v2 = V1[g][s - 1], V2[s - 1]
            V = {"brpo": (s - 1) / m * v1 + (m - s + 1) / m * v2, "v2only": v2, "v1only": v1, "none": 0.0}[vr]
            row.append(R[g][s - 1] - V)
        out.append(row)
    return out


def ref_summary(r, cuts, method):
    G, m, A = len(r), len(r[0]), len(r[0][0])
    out = [[[0.0] * A for _ in range(m)] for _ in range(G)]
    for g in range(G):
        for j in range(m):
            for a in range(A):
                if method == "grpo":
                    if j == m - 1:
                        out[g][j][a] = r[g][j][a] - sum(r[h][j][0] for h in range(G)) / G
                elif A == 1:
                    out[g][j][a] = r[g][j][a] - sum(r[h][j][0] for h in range(G)) / G
                else:
                    members = [r[g][k][b] for k in range(m) if cuts[g][k] == cuts[g][j] for b in range(A)]
                    out[g][j][a] = r[g][j][a] - sum(members) / len(members)
    return out


def random_budgets(rng, m):
    if rng.random() < 0.5:
        step = rng.randint(2, 50)
        return [step * j for j in range(1, m + 1)]
    return sorted(rng.sample(range(1, 400), m))


def random_lengths(rng, G, budgets):
    """Lengths that often end before b_1, exactly on a budget, between budgets and at b_m."""
    picks = [rng.randint(1, budgets[-1]) for _ in range(G)]
    for g in range(G):
        roll = rng.random()
        if roll < 0.25:
            picks[g] = rng.choice(budgets)
        elif roll < 0.4:
            picks[g] = rng.randint(1, budgets[0])
    return picks


# --------------------------------------------------------------------------------------------------
# Budgets, priors, cuts
# --------------------------------------------------------------------------------------------------


def test_training_budgets():
    assert at.training_budgets(8000, 4) == BUDGETS
    assert at.training_budgets(8000, 1) == [8000]
    assert at.training_budgets(8000, 8) == [1000 * j for j in range(1, 9)]
    assert at.training_budgets(8000, None, [1000, 3000, 8000]) == [1000, 3000, 8000]
    assert at.training_budgets(8000, 3, [1000, 3000, 8000]) == [1000, 3000, 8000]
    with pytest.raises(ValueError, match=r"algo\.anytime\.n_budgets: 3 does not divide"):
        at.training_budgets(8000, 3)
    with pytest.raises(ValueError, match=r"algo\.anytime\.budgets: must be positive and strictly increasing"):
        at.training_budgets(8000, None, [2000, 2000, 8000])
    with pytest.raises(ValueError, match=r"algo\.anytime\.budgets: the last budget 6000"):
        at.training_budgets(8000, None, [2000, 6000])
    with pytest.raises(ValueError, match=r"algo\.anytime\.n_budgets: 4 does not match"):
        at.training_budgets(8000, 4, [4000, 8000])


@pytest.mark.parametrize("kind", ["base", "uniform", "linear"])
def test_budget_prior_matches_reference(kind):
    rng = random.Random(7)
    for m in (1, 2, 3, 4, 8):
        budgets = random_budgets(rng, m)
        got = at.budget_prior(kind, budgets)
        assert got.dtype == torch.float64 and got.shape == (m,)
        assert got.sum().item() == pytest.approx(1.0, abs=1e-15)
        assert got.tolist() == pytest.approx(ref_prior(kind, budgets), abs=1e-15)


def test_budget_prior_worked_values():
    assert at.budget_prior("linear", BUDGETS).tolist() == pytest.approx(LINEAR, abs=1e-15)
    assert at.budget_prior("uniform", BUDGETS).tolist() == [0.25] * 4
    assert at.budget_prior("base", BUDGETS).tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"algo\.anytime\.prior: unknown 'triangular'"):
        at.budget_prior("triangular", BUDGETS)


def test_cut_points_and_segments():
    assert at.cut_points(1234, BUDGETS) == [1234] * 4
    assert at.cut_points(4000, BUDGETS) == [2000, 4000, 4000, 4000]
    assert at.cut_points(5001, BUDGETS) == [2000, 4000, 5001, 5001]
    assert at.cut_points(8000, BUDGETS) == BUDGETS
    assert at.thinking_segments(5001, BUDGETS) == [(0, 2000), (2000, 4000), (4000, 5001), (5001, 5001)]


# --------------------------------------------------------------------------------------------------
# Thinking advantage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vr", ["brpo", "v2only", "v1only", "none"])
@pytest.mark.parametrize("kind", ["base", "uniform", "linear"])
def test_thinking_advantage_matches_reference(vr, kind):
    rng = random.Random(hash((vr, kind)) % 1000)
    for G, m, A in [(8, 4, 4), (1, 4, 4), (2, 1, 1), (5, 3, 2), (3, 8, 1), (1, 1, 1), (4, 6, 3)]:
        budgets = random_budgets(rng, m)
        lam = rng.choice([0.5, 0.5, 0.3, 1.0])
        rbar = [[rng.randint(0, A) / A for _ in range(m)] for _ in range(G)]
        prior = ref_prior(kind, budgets)
        got = at.thinking_advantage(_t(rbar), at.budget_prior(kind, budgets), variance_reduction=vr, lam=lam)
        assert got.dtype == torch.float64 and got.shape == (G, m)
        want = ref_thinking(rbar, prior, vr, lam)
        assert torch.allclose(got, _t(want), rtol=0, atol=1e-12), (G, m, lam)


def test_thinking_advantage_renormalises_an_unnormalised_prior():
    rbar = [[0.0, 0.5, 1.0], [1.0, 1.0, 0.25]]
    got = at.thinking_advantage(_t(rbar), _t([2.0, 0.0, 6.0]))
    want = ref_thinking(rbar, [0.25, 0.0, 0.75], "brpo", 0.5)
    assert torch.allclose(got, _t(want), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"algo\.anytime\.prior: must be non-negative"):
        at.thinking_advantage(_t(rbar), _t([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"algo\.anytime\.prior: must be non-negative"):
        at.thinking_advantage(_t(rbar), _t([1.0, -0.5, 1.0]))
    with pytest.raises(ValueError, match=r"algo\.anytime\.variance_reduction: unknown 'v3'"):
        at.thinking_advantage(_t(rbar), _t([1.0, 1.0, 1.0]), variance_reduction="v3")
    with pytest.raises(ValueError, match=r"algo\.anytime\.lam"):
        at.thinking_advantage(_t(rbar), _t([1.0, 1.0, 1.0]), lam=0.0)


def test_thinking_advantage_batched_equals_per_group():
    gen = torch.Generator().manual_seed(3)
    rbar = torch.randint(0, 5, (6, 8, 4), generator=gen).to(torch.float64) / 4
    prior = at.budget_prior("uniform", BUDGETS)
    batched = at.thinking_advantage(rbar, prior)
    for p in range(6):
        assert torch.equal(batched[p], at.thinking_advantage(rbar[p], prior))


def test_thinking_advantage_worked_example():
    # Budgets 2k..8k, linear prior P = (0.1, 0.2, 0.3, 0.4), lambda = 0.5, G = 2.
    # rbar_1 = (0, 0.5, 1, 1):   P*rbar = (0, 0.1, 0.3, 0.4)  -> R_1 = (0.8, 0.8, 0.7, 0.4)
    # rbar_2 = (0, 0, 0.5, 0.25): P*rbar = (0, 0, 0.15, 0.1) -> R_2 = (0.25, 0.25, 0.25, 0.1)
    # V2 = (0.525, 0.525, 0.475, 0.25); prior tail sum_{j>=s} P_j = (1, 0.9, 0.7, 0.4)
    # V1_1 = (0, 0, [.5*.5 / .75] * .7 = 7/30, [(.25*.5 + .5*1) / .875] * .4 = 2/7)
    # V1_2 = (0, 0, 0,                           [.5*.5 / .875] * .4 = 4/35)
    # BRPO V_s = ((s-1)/4) V1 + ((5-s)/4) V2:
    #   g=1: 0.525, 0.39375, 7/60 + 0.2375, 3/14 + 1/16 = 31/112
    #   g=2: 0.525, 0.39375, 0.2375,        3/35 + 1/16 = 83/560
    rbar = _t([[0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.25]])
    prior = at.budget_prior("linear", BUDGETS)
    brpo = at.thinking_advantage(rbar, prior)
    want = [[0.275, 0.40625, 83 / 240, 69 / 560], [-0.275, -0.14375, 0.0125, -27 / 560]]
    assert brpo.tolist()[0] == pytest.approx(want[0], abs=1e-12)
    assert brpo.tolist()[1] == pytest.approx(want[1], abs=1e-12)
    grpo_like = at.thinking_advantage(rbar, prior, variance_reduction="v2only")
    assert grpo_like.tolist() == [pytest.approx([0.275, 0.275, 0.225, 0.15], abs=1e-12),
                                  pytest.approx([-0.275, -0.275, -0.225, -0.15], abs=1e-12)]
    none = at.thinking_advantage(rbar, prior, variance_reduction="none")
    assert none.tolist() == [pytest.approx([0.8, 0.8, 0.7, 0.4]), pytest.approx([0.25, 0.25, 0.25, 0.1])]
    v1only = at.thinking_advantage(rbar, prior, variance_reduction="v1only")
    assert v1only.tolist()[1] == pytest.approx([0.25, 0.25, 0.25, 0.1 - 4 / 35], abs=1e-12)


def test_single_sample_has_no_group_baseline():
    # G = 1: V2 = 0, so v2only leaves the plain return and BRPO keeps only its V1 share.
    rbar = _t([[1.0, 0.0, 1.0, 1.0]])
    prior = at.budget_prior("uniform", BUDGETS)
    assert at.thinking_advantage(rbar, prior, variance_reduction="v2only").tolist() == [[0.75, 0.5, 0.5, 0.25]]
    # s=4: V1 = [(.125*1 + .25*0 + .5*1) / .875] * .25 = 5/28, weighted 3/4
    assert at.thinking_advantage(rbar, prior)[0, 3].item() == pytest.approx(0.25 - 0.75 * 5 / 28, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Summary advantage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("A", [1, 2, 4])
def test_summary_advantage_brpo_matches_reference(A):
    rng = random.Random(A)
    for G, m in [(8, 4), (1, 4), (3, 1), (5, 8), (2, 3)]:
        budgets = random_budgets(rng, m)
        lengths = random_lengths(rng, G, budgets)
        cuts = [[min(b, L) for b in budgets] for L in lengths]
        r = [[[float(rng.random() < 0.5) for _ in range(A)] for _ in range(m)] for _ in range(G)]
        got = at.summary_advantage(_t(r), torch.tensor(cuts), method="brpo")
        assert got.dtype == torch.float64 and got.shape == (G, m, A)
        assert torch.allclose(got, _t(ref_summary(r, cuts, "brpo")), rtol=0, atol=1e-12)


def test_summary_advantage_grpo_matches_reference():
    rng = random.Random(11)
    for G, m in [(8, 1), (8, 4), (1, 4), (3, 2)]:
        budgets = random_budgets(rng, m)
        cuts = [[min(b, L) for b in budgets] for L in random_lengths(rng, G, budgets)]
        r = [[[float(rng.random() < 0.5)] for _ in range(m)] for _ in range(G)]
        got = at.summary_advantage(_t(r), torch.tensor(cuts), method="grpo")
        assert torch.allclose(got, _t(ref_summary(r, cuts, "grpo")), rtol=0, atol=1e-12)
        assert (got[:, :-1] == 0).all()
    with pytest.raises(ValueError, match=r"^algo\.anytime\.summary_method: grpo .*n_summaries=1, got A=4"):
        at.summary_advantage(torch.zeros(2, 4, 4, dtype=torch.float64), torch.zeros(2, 4), method="grpo")
    with pytest.raises(ValueError, match=r"algo\.anytime\.summary_method: unknown 'ppo'"):
        at.summary_advantage(torch.zeros(2, 4, 1, dtype=torch.float64), torch.zeros(2, 4), method="ppo")


def test_summary_advantage_shared_cut_worked_example():
    # One sample of L = 3000 under 2k..8k: cuts (2000, 3000, 3000, 3000), A = 2.
    # Slot 1 alone: mean 0.5. Slots 2-4 share the cut: 6 summaries (1,1,0,1,1,1), mean 5/6.
    r = _t([[[1, 0], [1, 1], [0, 1], [1, 1]]])
    cuts = torch.tensor([[2000, 3000, 3000, 3000]])
    got = at.summary_advantage(r, cuts)
    s, f = 1 / 6, -5 / 6
    assert got[0].tolist() == [pytest.approx([0.5, -0.5]), pytest.approx([s, s]), pytest.approx([f, s]),
                               pytest.approx([s, s])]


def test_summary_advantage_one_draw_uses_the_group_at_the_slot():
    # A = 1 compares across samples at the same slot, even where a sample's slots share a cut.
    r = _t([[[1], [1]], [[0], [1]], [[0], [0]]])
    cuts = torch.tensor([[100, 100], [100, 200], [100, 150]])
    assert at.summary_advantage(r, cuts)[:, :, 0].tolist() == [pytest.approx([2 / 3, 1 / 3]),
                                                              pytest.approx([-1 / 3, 1 / 3]),
                                                              pytest.approx([-1 / 3, -2 / 3])]


# --------------------------------------------------------------------------------------------------
# Token-level assignment, summary prompts and rewards for the three endings
# --------------------------------------------------------------------------------------------------

SMALL = [4, 8, 12, 16]
THINK_END_ID, EOS_ID = 99, 98
PROMPT = [50, 51]
TRUNC, FINAL = [70, 71, THINK_END_ID], [80, 81, 82]


def _thinking(length, last):
    return [10 + t for t in range(length - 1)] + [last]


def _prompts(thinking, ending):
    return [at.summary_prompt(PROMPT, thinking, c, ending, truncation_ids=TRUNC, final_answer_ids=FINAL)
            for c in at.cut_points(len(thinking), SMALL)]


def test_sample_that_ended_before_the_first_budget():
    z = _thinking(3, THINK_END_ID)
    ending = at.thinking_ending(z, think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking_budget=16)
    assert ending == "ended"
    assert at.cut_points(3, SMALL) == [3, 3, 3, 3]
    adv = at.thinking_token_advantage(3, SMALL, _t([1.5, 2.5, 3.5, 4.5]))
    assert adv.tolist() == [1.5, 1.5, 1.5]  # the final `</think>` is a thinking token of slot 1
    for ids, n_inserted, truncated in _prompts(z, ending):
        assert (ids, n_inserted, truncated) == (PROMPT + z + FINAL, 3, False)


def test_sample_cut_off_at_the_last_budget():
    z = _thinking(16, 42)
    ending = at.thinking_ending(z, think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking_budget=16)
    assert ending == "cut_off"
    adv = at.thinking_token_advantage(16, SMALL, _t([1.0, 2.0, 3.0, 4.0]))
    assert adv.tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4 + [4.0] * 4
    prompts = _prompts(z, ending)
    # Every slot is truncated, the last one too although c = L.
    assert [p[2] for p in prompts] == [True] * 4
    assert prompts[3][0] == PROMPT + z + TRUNC + FINAL and prompts[3][1] == 6
    assert prompts[0][0] == PROMPT + z[:4] + TRUNC + FINAL


def test_sample_that_ended_with_eos_without_think_end():
    z = _thinking(10, EOS_ID)
    ending = at.thinking_ending(z, think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking_budget=16)
    assert ending == "eos"
    cuts = at.cut_points(10, SMALL)
    assert cuts == [4, 8, 10, 10]
    adv = at.thinking_token_advantage(10, SMALL, _t([1.0, 2.0, 3.0, 4.0]))
    assert adv.tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 2  # slot 4 owns no token
    assert [p[2] for p in _prompts(z, ending)] == [True] * 4
    # Only the summaries at the cut c = L see a prefix that ends with EOS: they score 0 even when correct.
    ends_with_eos = torch.tensor([[z[c - 1] == EOS_ID] for c in cuts])
    rewards = at.summary_rewards(torch.ones(4, 2, dtype=torch.bool), prefix_ends_with_eos=ends_with_eos,
                                 summary_has_think_end=False)
    assert rewards.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_sample_that_ended_exactly_on_a_budget():
    z = _thinking(8, THINK_END_ID)
    assert at.cut_points(8, SMALL) == [4, 8, 8, 8]
    assert [p[2] for p in _prompts(z, "ended")] == [True, False, False, False]
    assert at.thinking_token_advantage(8, SMALL, _t([1.0, 2.0, 3.0, 4.0])).tolist() == [1.0] * 4 + [2.0] * 4


def test_thinking_ending_and_prompt_errors():
    with pytest.raises(ValueError, match="neither"):
        at.thinking_ending([1, 2, 3], think_end_id=THINK_END_ID, eos_id=EOS_ID, thinking_budget=16)
    with pytest.raises(ValueError, match="outside"):
        at.summary_prompt(PROMPT, [1, 2], 3, "ended", truncation_ids=TRUNC, final_answer_ids=FINAL)
    with pytest.raises(ValueError, match="ending must be one of"):
        at.summary_prompt(PROMPT, [1, 2], 2, "done", truncation_ids=TRUNC, final_answer_ids=FINAL)
    with pytest.raises(ValueError, match="outside"):
        at.thinking_token_advantage(17, SMALL, _t([1.0, 2.0, 3.0, 4.0]))


def _tokenizer_with_think_end():
    from tiny_models import bpe_tokenizer

    tok = bpe_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["</think>"]})
    return tok


def _newline_merging_tokenizer():
    """A byte-level BPE that has learnt "\\n\\n\\n" as one token, so joining texts would change the ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["step one\n\n\nstep two\n\n\n**Final Answer**\n\\boxed{7}", "thinking...\n\nso"] * 40
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "</think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_summary_insert_ids_use_the_special_think_end_token():
    tok = _tokenizer_with_think_end()
    think_end = at.think_end_token_id(tok)
    assert think_end == tok.convert_tokens_to_ids("</think>")
    trunc, final = at.summary_insert_ids(tok)
    assert trunc[-1] == think_end and trunc.count(think_end) == 1
    assert tok.decode(trunc) == "...\n\n...\n\n</think>"
    assert tok.decode(final) == "\n\n**Final Answer**\n"
    assert tok.bos_token_id is None or tok.bos_token_id not in trunc + final
    # Without a `</think>` token the insert is plain text.
    from tiny_models import bpe_tokenizer

    plain = bpe_tokenizer()
    assert at.think_end_token_id(plain) is None
    trunc_plain, _ = at.summary_insert_ids(plain)
    assert plain.decode(trunc_plain) == "...\n\n...\n\n</think>" and len(trunc_plain) > len(trunc)


def test_summary_prompt_appends_inserts_as_ids_even_inside_a_word():
    tok = _tokenizer_with_think_end()
    trunc, final = at.summary_insert_ids(tok)
    prompt = tok.encode("Solve: 2 + 3", add_special_tokens=False)
    z = tok.encode("Let us think step by step", add_special_tokens=False) + [at.think_end_token_id(tok)]
    pieces = [tok.decode([i]) for i in z]
    cut = pieces.index(" th") + 1  # "Let us th|ink"
    ids, n_inserted, truncated = at.summary_prompt(prompt, z, cut, "ended", truncation_ids=trunc,
                                                   final_answer_ids=final)
    assert truncated and n_inserted == len(trunc) + len(final)
    assert ids == prompt + z[:cut] + trunc + final
    assert tok.decode(ids[len(prompt):]).startswith("Let us th...\n\n...\n\n</think>\n\n**Final Answer**\n")
    natural, n_natural, truncated = at.summary_prompt(prompt, z, len(z), "ended", truncation_ids=trunc,
                                                      final_answer_ids=final)
    assert not truncated and natural == prompt + z + final and n_natural == len(final)


def test_inserts_never_merge_with_the_last_thinking_token():
    tok = _newline_merging_tokenizer()
    trunc, final = at.summary_insert_ids(tok)
    z = tok.encode("step one\n", add_special_tokens=False) + [at.think_end_token_id(tok)]
    ids, _, _ = at.summary_prompt([], z, len(z) - 1, "ended", truncation_ids=trunc, final_answer_ids=final)
    assert ids == z[:-1] + trunc + final
    # Re-tokenising the joined text would have fused the trailing "\n" with the insert: not what was sampled.
    natural, _, _ = at.summary_prompt([], z[:-1], len(z) - 1, "eos", truncation_ids=[], final_answer_ids=final)
    text_route = tok.encode(tok.decode(z[:-1] + final), add_special_tokens=False)
    assert natural == z[:-1] + final and text_route != natural


# --------------------------------------------------------------------------------------------------
# Answer extraction and reward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, answer", [
    ("\n\n**Final Answer**\n\\boxed{5}", "5"),
    ("...\n\n...\n\n</think>\n\n**Final Answer**\nIt is \\boxed{3}, or rather \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\n\n**Final Answer**\nThe answer is\n\n\\boxed{5}", None),  # the box comes after the first blank line
    ("\n\n**Final Answer**\nno box here\n\n**Final Answer**\n\\boxed{5}", None),  # only the first such piece
    ("\n\nFinal Answer: \\boxed{5}", None),
    ("\n\nSo **Final Answer**\n\\boxed{5}", None),  # the piece must start with the header
    ("\n\n**Final Answer**\n\n\\boxed{5}", None),  # a blank line right after the header
    ("\n\n**Final Answer**\n\\boxed{}", None),
    ("\n\n**Final Answer**\n\\boxed{x^{2}+1}\nsince", "x^{2}+1"),
    ("\\boxed{9}\n\n**Final Answer**\n\\boxed{4}\n\n\\boxed{6}", "4"),
])
def test_extract_summary_answer(text, answer):
    assert at.extract_summary_answer(text) == answer


def test_summary_text_drops_a_trailing_eos_and_keeps_think_end():
    tok = _tokenizer_with_think_end()
    trunc, final = at.summary_insert_ids(tok)
    summary = tok.encode("\\boxed{42}.", add_special_tokens=False) + [tok.eos_token_id]
    text = at.summary_text(tok, trunc + final, summary, eos_id=tok.eos_token_id)
    assert text == "...\n\n...\n\n</think>\n\n**Final Answer**\n\\boxed{42}."
    assert at.extract_summary_answer(text) == "42"


def test_summary_rewards():
    correct = torch.tensor([True, True, True, False])
    got = at.summary_rewards(correct, prefix_ends_with_eos=torch.tensor([False, True, False, False]),
                             summary_has_think_end=torch.tensor([False, False, True, False]))
    assert got.dtype == torch.float64 and got.tolist() == [1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# Diagnostics and evaluation
# --------------------------------------------------------------------------------------------------


def ref_diagnostics(rbar, prior, lengths, budgets, lam):
    out = {}
    starts = [0] + budgets[:-1]
    parts = [ref_parts(group, prior, lam) for group in rbar]
    m = len(budgets)
    for s in range(1, m + 1):
        R, V1, V2, V = [], [], [], []
        for (Rp, V1p, V2p), lens in zip(parts, lengths):
            for g, L in enumerate(lens):
                if L > starts[s - 1]:
                    R.append(Rp[g][s - 1])
                    V1.append(V1p[g][s - 1])
                    V2.append(V2p[s - 1])
                    V.append((s - 1) / m * V1[-1] + (m - s + 1) / m * V2[-1])
        out[f"anytime/diag_samples_s{s}"] = float(len(R))
        if len(R) >= 2 and statistics.pvariance(R) > 0:
            for name, base in (("v1only", V1), ("v2only", V2), ("brpo", V)):
                out[f"anytime/var_ratio_{name}_s{s}"] = (statistics.pvariance([r - v for r, v in zip(R, base)])
                                                        / statistics.pvariance(R))
        for name, base in (("v1", V1), ("v2", V2)):
            if len(R) >= 2 and statistics.pvariance(base) > 0 and statistics.pvariance(R) > 0:
                out[f"anytime/corr_{name}_s{s}"] = statistics.correlation(base, R)
    return out


def test_variance_diagnostics_match_reference():
    rng = random.Random(5)
    P, G = 6, 8
    lengths = [random_lengths(rng, G, BUDGETS) for _ in range(P)]
    rbar = [[[rng.randint(0, 4) / 4 for _ in BUDGETS] for _ in range(G)] for _ in range(P)]
    prior = ref_prior("uniform", BUDGETS)
    got = at.variance_diagnostics(_t(rbar), _t(prior), torch.tensor(lengths), BUDGETS)
    want = ref_diagnostics(rbar, prior, lengths, BUDGETS, 0.5)
    assert set(got) == set(want)
    assert got == pytest.approx(want, abs=1e-12)
    assert "anytime/corr_v1_s1" not in got  # V1 = 0 at the first slot: no correlation to report
    assert {"anytime/var_ratio_brpo_s2", "anytime/corr_v2_s4"} <= set(got)
    assert all(math.isfinite(v) for v in got.values())


def test_variance_diagnostics_leave_out_what_is_undefined():
    # Every sample ends before b_1: later slots have no samples; equal returns leave no ratio.
    rbar = _t([[[1.0, 1.0, 1.0, 1.0]] * 4])
    got = at.variance_diagnostics(rbar, at.budget_prior("base", BUDGETS), torch.tensor([[100] * 4]), BUDGETS)
    assert got == {"anytime/diag_samples_s1": 4.0, "anytime/diag_samples_s2": 0.0,
                   "anytime/diag_samples_s3": 0.0, "anytime/diag_samples_s4": 0.0}


def test_budget_metrics():
    rewards = _t([[[1, 0], [1, 1]], [[0, 0], [1, 0]]])
    format_ok = torch.tensor([[[True, True], [True, False]], [[True, True], [True, True]]])
    cuts = torch.tensor([[100, 150], [100, 200]])
    got = at.budget_metrics(rewards, format_ok, cuts, [100, 200])
    assert got == {"anytime/acc_b100": 0.25, "anytime/format_rate_b100": 1.0, "anytime/think_len_b100": 100.0,
                   "anytime/acc_b200": 0.75, "anytime/format_rate_b200": 0.75, "anytime/think_len_b200": 175.0}


def test_evaluation_grid_and_anytime_accuracy():
    grid = at.evaluation_budgets()
    assert len(grid) == 32 and grid[0] == 250 and grid[-1] == 8000 and grid[1] - grid[0] == 250
    assert at.evaluation_budgets(16000, 1000) == [1000 * j for j in range(1, 17)]
    with pytest.raises(ValueError):
        at.evaluation_budgets(8000, 300)
    acc = {b: b / 8000 for b in grid}
    assert at.anytime_accuracy(acc) == pytest.approx(sum(range(1, 33)) / 32 / 32)
    assert at.anytime_accuracy(acc, at.TRAINING_EVAL_BUDGETS) == pytest.approx((0.25 + 0.5 + 0.75 + 1) / 4)
    assert at.anytime_accuracy([0.2, 0.4]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"no accuracy for budgets \[100\]"):
        at.anytime_accuracy(acc, [100])
    with pytest.raises(ValueError):
        at.anytime_accuracy([])


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

GOOD = {"n_samples": 8, "n_summaries": 4, "thinking_budget": 8000, "n_budgets": 4, "prior": "linear",
        "variance_reduction": "brpo", "lam": 0.5, "summary_method": "brpo", "summary_max_tokens": 118,
        "loss_normalizer": 10176, "row_length": 10176}


def test_config_defaults_and_presets_pass():
    assert at.check_config(**GOOD) == BUDGETS
    for name, preset in at.PRESETS.items():
        assert at.check_config(**{**GOOD, **preset}) == at.training_budgets(8000, preset["n_budgets"]), name


def test_presets_are_the_named_configurations():
    def row(a, method, m, prior, vr):
        return {"n_summaries": a, "summary_method": method, "n_budgets": m, "prior": prior, "variance_reduction": vr}

    assert at.PRESETS == {
        "grpo": row(1, "grpo", 1, "base", "v2only"),
        "base": row(4, "brpo", 4, "base", "brpo"),
        "linear": row(4, "brpo", 4, "linear", "brpo"),
        "uniform": row(4, "brpo", 4, "uniform", "brpo"),
        "grpo_linear": row(1, "grpo", 4, "linear", "v2only"),
        "grpo_decouple": row(4, "brpo", 4, "base", "v2only"),
        "grpo_vr": row(1, "grpo", 4, "base", "brpo"),
    }


@pytest.mark.parametrize("change, field", [
    ({"n_samples": 1}, "rollout.n_rollouts"),
    ({"n_summaries": 0}, "algo.anytime.n_summaries"),
    ({"n_budgets": 3}, "algo.anytime.n_budgets"),
    ({"n_budgets": None, "budgets": [3000, 2000, 8000]}, "algo.anytime.budgets"),
    ({"thinking_budget": 0}, "algo.anytime.thinking_budget"),
    ({"prior": "exponential"}, "algo.anytime.prior"),
    ({"variance_reduction": "v3"}, "algo.anytime.variance_reduction"),
    ({"lam": 0.0}, "algo.anytime.lam"),
    ({"lam": 1.5}, "algo.anytime.lam"),
    ({"summary_method": "dpo"}, "algo.anytime.summary_method"),
    ({"summary_method": "grpo"}, "algo.anytime.n_summaries"),
    ({"summary_max_tokens": 0}, "algo.anytime.summary_max_tokens"),
    ({"loss_normalizer": 0}, "algo.anytime.loss_normalizer"),
    ({"row_length": 10015}, "rollout.max_response_length"),
])
def test_config_checks_name_the_field(change, field):
    with pytest.raises(ValueError, match="^" + field.replace(".", r"\.") + ":"):
        at.check_config(**{**GOOD, **change})
    # 8000 + 16 * (118 + 8) = 10016 is the smallest row that fits.
    assert at.check_config(**{**GOOD, "row_length": 10016}) == BUDGETS
