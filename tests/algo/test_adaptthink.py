"""AdaptThink: forced first token, constrained advantage, R_ref and the sequence-ratio loss, against
docs/baselines.md ("AdaptThink") re-derived with Python loops."""

import math
import random

import pytest
import torch

from megatron_hbpo.algo.adaptthink import (
    adaptthink_accuracy,
    adaptthink_policy_loss,
    adaptthink_reward,
    assign_modes,
    forced_generation_request,
    forced_rollout,
    is_nothinking,
    lookup_reference_accuracy,
    mode_logprob,
    reference_accuracy,
    think_tag_counts,
)

NOTHINK_ID, THINK_ID = 151649, 71486


def reference_reward(correct, format_ok, n_open, n_close, forced_nt, r_ref, delta=0.05):
    acc = 1.0 if (correct and format_ok and n_open == 0 and n_close == 1) else 0.0
    return acc - r_ref + (delta if forced_nt else 0.0)


def _reward(rows, **kw):
    cols = list(zip(*rows))
    return adaptthink_reward(torch.tensor(cols[0]), torch.tensor(cols[1]), torch.tensor(cols[2]),
                             torch.tensor(cols[3]), torch.tensor(cols[4]), torch.tensor(cols[5], dtype=torch.float64),
                             **kw)


def test_worked_values():
    # delta 0.05, R_ref 0.9: NoThinking correct / wrong, Thinking correct / wrong.
    got = _reward([(True, True, 0, 1, True, 0.9), (False, True, 0, 1, True, 0.9),
                   (True, True, 0, 1, False, 0.9), (False, True, 0, 1, False, 0.9)])
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([0.15, -0.85, 0.10, -0.90], abs=1e-12)


def test_random_samples_match_reference():
    rng = random.Random(4)
    rows = [(rng.random() < 0.6, rng.random() < 0.9, rng.choice([0, 0, 0, 1]), rng.choice([0, 1, 1, 1, 2]),
             rng.random() < 0.5, rng.randint(0, 16) / 16) for _ in range(2000)]
    for delta in (0.0, 0.05, 0.1):
        got = _reward(rows, delta=delta)
        assert got.tolist() == pytest.approx([reference_reward(*r, delta=delta) for r in rows], abs=1e-12)


def test_format_rules():
    texts = {
        "</think>The answer is \\boxed{4}.": (0, 1),
        "Alright, 2+2=4.</think>\\boxed{4}": (0, 1),
        "</think>Hmm.</think>\\boxed{4}": (0, 2),  # re-opened thinking after an empty block
        "Alright<think> 2+2</think>\\boxed{4}": (1, 1),
        "Alright, 2+2 is... (truncated)": (0, 0),
    }
    counts = [think_tag_counts(t) for t in texts]
    assert counts == list(texts.values())
    n_open, n_close = map(list, zip(*counts))
    acc = adaptthink_accuracy(torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool),
                              torch.tensor(n_open), torch.tensor(n_close))
    assert acc.tolist() == [True, True, False, False, False]


def test_all_wrong_group_still_has_a_signal_favouring_nothinking():
    modes = assign_modes(16)
    got = _reward([(False, True, 0, 1, nt, 0.4) for nt in modes])
    assert got.tolist() == pytest.approx([-0.35] * 8 + [-0.4] * 8, abs=1e-12)


def test_format_error_or_truncation_is_wrong():
    got = _reward([(True, False, 0, 1, True, 0.5), (True, False, 0, 0, False, 0.5)])
    assert got.tolist() == pytest.approx([-0.45, -0.5], abs=1e-12)


def test_easy_and_impossible_problems():
    easy = _reward([(True, True, 0, 1, False, 1.0), (True, True, 0, 1, True, 1.0)])
    assert easy.tolist() == pytest.approx([0.0, 0.05], abs=1e-12)  # easy problems drift to NoThinking
    hard = _reward([(True, True, 0, 1, False, 0.0), (False, True, 0, 1, False, 0.0)])
    assert hard.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)


def test_mode_split():
    assert assign_modes(16) == [True] * 8 + [False] * 8
    assert assign_modes(4, 0.25) == [True, False, False, False]
    assert assign_modes(1) == [False]  # round(0.5) = 0: Python rounds half to even
    assert assign_modes(3) == [True, True, False]  # round(1.5) = 2
    assert mode_logprob(True) == mode_logprob(False) == pytest.approx(math.log(0.5))
    assert mode_logprob(True, 0.25) == pytest.approx(math.log(0.25))
    assert mode_logprob(False, 0.25) == pytest.approx(math.log(0.75))


def test_forced_token_moves_from_prompt_to_response():
    prompt = [1, 2, 3, 4]
    engine_prompt, max_new = forced_generation_request(prompt, NOTHINK_ID, 4096)
    assert engine_prompt == [1, 2, 3, 4, NOTHINK_ID] and max_new == 4095
    generated, gen_logp = [10, 11, 12], [-0.1, -0.2, -0.3]
    tokens, prompt_length, logp = forced_rollout(prompt, NOTHINK_ID, generated, gen_logp,
                                                 forced_logprob=mode_logprob(True))
    assert tokens == [1, 2, 3, 4, NOTHINK_ID, 10, 11, 12]
    assert prompt_length == 4 and tokens[prompt_length] == NOTHINK_ID  # the first response token
    assert len(tokens) - prompt_length == 4  # L counts the forced token
    assert logp == pytest.approx([math.log(0.5), -0.1, -0.2, -0.3])
    assert forced_rollout(prompt, THINK_ID, generated, forced_logprob=0.0)[2] is None
    with pytest.raises(ValueError, match="log-probs"):
        forced_rollout(prompt, THINK_ID, generated, [-0.1], forced_logprob=0.0)
    with pytest.raises(ValueError, match=">= 2"):
        forced_generation_request(prompt, THINK_ID, 1)


def test_evaluation_mode_detection():
    assert is_nothinking("</think>\n\nThe answer is 4.")
    assert is_nothinking("\n</think>4")
    assert not is_nothinking("Okay, let me think.</think>4")
    assert is_nothinking("<think></think>\\boxed{4}")  # an empty block the model opened itself
    assert not is_nothinking("<think>2+2=4</think>\\boxed{4}")


def test_reference_accuracy_table_and_lookup():
    keys = ["p1"] * 4 + ["p2"] * 4
    table = reference_accuracy(keys, [1, 0, 1, 1, 0, 0, 0, 0], samples_per_problem=4)
    assert table == {"p1": 0.75, "p2": 0.0}
    assert lookup_reference_accuracy(table, ["p2", "p1", "p1"]).tolist() == [0.0, 0.75, 0.75]
    with pytest.raises(ValueError, match="'p3'"):
        lookup_reference_accuracy(table, ["p1", "p3", "p3"])
    with pytest.raises(ValueError, match="4 samples per problem"):
        reference_accuracy(["p1", "p1", "p2"], [1, 1, 0], samples_per_problem=4)


# -- loss ---------------------------------------------------------------------------------------------


def reference_loss(logp_new, logp_old, adv, mask, forced_nt, eps_low=0.2, eps_high=0.2, p_nt=0.5):
    """Mean over sequences of max(-A rho, -A clip(rho)), rho from length-normalised log-probs with the
    first response token's old log-prob set to the sampling probability of its mode; Python loops."""
    total, count = 0.0, 0
    for b in range(logp_new.shape[0]):
        positions = [t for t in range(logp_new.shape[1]) if mask[b][t]]
        if not positions:
            continue
        s_new = sum(logp_new[b, t] for t in positions) / len(positions)
        old = [logp_old[b][t] for t in positions]
        old[0] = math.log(p_nt if forced_nt[b] else 1 - p_nt)
        s_old = sum(old) / len(positions)
        rho = torch.exp(s_new - s_old)
        a = adv[b]
        total = total + torch.maximum(-a * rho, -a * rho.clamp(1 - eps_low, 1 + eps_high))
        count += 1
    return total / count


def _batch(seed, batch=6, length=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(batch, length, generator=g, dtype=dtype) * 3
    logp_new = (logp_old + 0.3 * torch.randn(batch, length, generator=g, dtype=dtype)).clamp(max=-1e-3)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, 3, (1,), generator=g))  # a prompt tail before the response
        end = int(torch.randint(start + 1, length + 1, (1,), generator=g))
        mask[b, start:end] = True
    adv = torch.randn(batch, generator=g, dtype=dtype)
    forced_nt = torch.rand(batch, generator=g) < 0.5
    return logp_new, logp_old, adv, mask, forced_nt


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p_nt", [0.5, 0.3])
def test_loss_and_gradient_match_reference(seed, p_nt):
    logp_new, logp_old, adv, mask, forced_nt = _batch(seed)
    new_a = logp_new.clone().requires_grad_(True)
    out = adaptthink_policy_loss(new_a, logp_old, adv, mask, forced_nt, nothinking_fraction=p_nt)
    (out.loss_sum / out.num_sequences).backward()
    new_b = logp_new.clone().requires_grad_(True)
    want = reference_loss(new_b, logp_old.tolist(), adv.tolist(), mask.tolist(), forced_nt.tolist(), p_nt=p_nt)
    want.backward()
    assert out.num_sequences.item() == 6
    assert (out.loss_sum / out.num_sequences).item() == pytest.approx(want.item(), abs=1e-12)
    assert torch.allclose(new_a.grad, new_b.grad, rtol=0, atol=1e-12)
    assert torch.equal(new_a.grad[~mask], torch.zeros_like(new_a.grad[~mask]))


def test_forced_token_is_trained_against_its_sampling_probability():
    # One NoThinking sequence of 150 response tokens, on-policy except for the forced `</think>`,
    # which the model gives 1e-8: rho = exp((log 1e-8 - log 0.5) / 150) ~ 0.89, inside the clip
    # range, so every token, the forced one included, gets the gradient -A rho / |y|.
    n = 150
    logp_old = torch.full((1, n + 2), -0.5, dtype=torch.float64)
    logp_old[0, 1] = 123.0  # whatever the trainer had at the forced position is replaced by log 0.5
    mask = torch.zeros(1, n + 2, dtype=torch.bool)
    mask[0, 1:n + 1] = True
    logp_new = logp_old.clone()
    logp_new[0, 1] = math.log(1e-8)
    logp_new.requires_grad_(True)
    adv = torch.tensor([0.15], dtype=torch.float64)
    out = adaptthink_policy_loss(logp_new, logp_old, adv, mask, torch.tensor([True]))
    out.loss_sum.backward()
    rho = math.exp((math.log(1e-8) - math.log(0.5)) / n)
    assert 0.88 < rho < 0.90
    assert out.ratio_sum.item() == pytest.approx(rho, rel=1e-12)
    assert out.loss_sum.item() == pytest.approx(-0.15 * rho, rel=1e-12)
    assert logp_new.grad[0, 1].item() == pytest.approx(-0.15 * rho / n, rel=1e-12)
    assert torch.allclose(logp_new.grad[0, 1:n + 1], torch.full((n,), -0.15 * rho / n, dtype=torch.float64))
    assert logp_new.grad[0, 0].item() == 0.0 and logp_new.grad[0, n + 1].item() == 0.0
    assert out.clipped_sequences.item() == 0


def test_old_logprob_of_first_token_does_not_matter_but_others_do():
    logp_new, logp_old, adv, mask, forced_nt = _batch(5)
    base = adaptthink_policy_loss(logp_new, logp_old, adv, mask, forced_nt).loss_sum
    first = mask & (mask.cumsum(-1) == 1)
    changed = logp_old.clone()
    changed[first] = -50.0
    assert adaptthink_policy_loss(logp_new, changed, adv, mask, forced_nt).loss_sum.item() == pytest.approx(
        base.item(), abs=1e-12)
    second = mask & (mask.cumsum(-1) == 2)
    changed = logp_old.clone()
    changed[second] -= 1.0
    assert adaptthink_policy_loss(logp_new, changed, adv, mask, forced_nt).loss_sum.item() != pytest.approx(
        base.item(), abs=1e-6)


def test_clipping_cuts_the_gradient():
    # rho = e^0.5 > 1.2 with A > 0: the clipped branch is the max, no gradient; with A < 0 it is not.
    logp_old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp_old[:, 0] = math.log(0.5)
    logp_new = (logp_old + 0.5).requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = adaptthink_policy_loss(logp_new, logp_old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask,
                                 torch.tensor([True, False]))
    out.loss_sum.backward()
    assert out.clipped_sequences.item() == 1
    assert out.loss_sum.item() == pytest.approx(-1.2 + math.exp(0.5), abs=1e-12)
    assert torch.equal(logp_new.grad[0], torch.zeros(3, dtype=torch.float64))
    assert logp_new.grad[1].tolist() == pytest.approx([math.exp(0.5) / 3] * 3, abs=1e-12)


def test_split_batches_give_the_same_gradient():
    # Micro-batches / data-parallel ranks: add the shards' sums, divide by the global sequence count.
    logp_new, logp_old, adv, mask, forced_nt = _batch(11, batch=8, dtype=torch.float32)
    full = logp_new.clone().requires_grad_(True)
    out = adaptthink_policy_loss(full, logp_old, adv, mask, forced_nt)
    (out.loss_sum / out.num_sequences).backward()
    for cut in (4, 3):
        parts = logp_new.clone().requires_grad_(True)
        shards = [adaptthink_policy_loss(parts[s], logp_old[s], adv[s], mask[s], forced_nt[s])
                  for s in (slice(0, cut), slice(cut, None))]
        total = sum(int(s.num_sequences) for s in shards)
        assert total == int(out.num_sequences)
        sum(s.loss_sum for s in shards).div(total).backward()
        assert torch.allclose(parts.grad, full.grad, rtol=1e-6, atol=1e-7)
        assert sum(int(s.clipped_sequences) for s in shards) == int(out.clipped_sequences)


def test_padding_garbage_and_empty_rows_are_ignored():
    logp_new, logp_old, adv, mask, forced_nt = _batch(3)
    clean = adaptthink_policy_loss(logp_new, logp_old, adv, mask, forced_nt)
    dirty_new, dirty_old = logp_new.clone(), logp_old.clone()
    dirty_new[~mask], dirty_old[~mask] = float("nan"), float("inf")
    dirty_new.requires_grad_(True)
    # An extra row without response tokens (a fully padded slot) counts for nothing.
    pad = torch.zeros(1, mask.shape[1], dtype=torch.bool)
    out = adaptthink_policy_loss(torch.cat([dirty_new, torch.zeros(1, mask.shape[1], dtype=torch.float64)]),
                                 torch.cat([dirty_old, torch.zeros(1, mask.shape[1], dtype=torch.float64)]),
                                 torch.cat([adv, torch.tensor([5.0], dtype=torch.float64)]), torch.cat([mask, pad]),
                                 torch.cat([forced_nt, torch.tensor([True])]))
    out.loss_sum.backward()
    assert out.num_sequences.item() == clean.num_sequences.item() == 6
    assert out.loss_sum.item() == pytest.approx(clean.loss_sum.item(), abs=1e-12)
    assert torch.isfinite(dirty_new.grad).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one entry per sequence"):
        adaptthink_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool),
                               torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        adaptthink_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool),
                               torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D"):
        adaptthink_reward(torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool), torch.zeros(2),
                          torch.ones(2), torch.ones(3, dtype=torch.bool), torch.zeros(3))


def test_no_dual_clip():
    # A < 0 with rho = e^2 ~ 7.4: a dual clip at c = 3 would bound the loss at 3; AdaptThink has none.
    logp_old = torch.full((1, 4), -1.0, dtype=torch.float64)
    logp_old[0, 0] = math.log(0.5)
    logp_new = (logp_old + 2.0).requires_grad_(True)
    out = adaptthink_policy_loss(logp_new, logp_old, torch.tensor([-1.0], dtype=torch.float64),
                                 torch.ones(1, 4, dtype=torch.bool), torch.tensor([False]))
    out.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(math.exp(2.0), rel=1e-12)
    assert logp_new.grad[0].tolist() == pytest.approx([math.exp(2.0) / 4] * 4, rel=1e-12)
