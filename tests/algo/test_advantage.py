"""hierarchical_advantage against docs/method.md, re-derived with Python floats and `statistics`."""

import math
import random
import statistics

import pytest
import torch

from megatron_hbpo.algo.advantage import group_normalized_advantage, hierarchical_advantage


def f2(b, l_max=4096, beta=4.0):
    return beta * math.cos(math.pi * b / (2 * l_max))


def reference(rewards, budgets, groups, l_max=4096, beta=4.0, w_intra=1.0, eps=1e-6, center=False):
    out = [0.0] * len(rewards)
    for g in set(groups):
        idx = [i for i in range(len(rewards)) if groups[i] == g]
        rs = [rewards[i] for i in idx]
        mean = sum(rs) / len(rs)
        std = statistics.stdev(rs) if len(rs) > 1 else None
        intra = {}
        for b in {budgets[i] for i in idx}:
            sub = [rewards[i] for i in idx if budgets[i] == b]
            intra[b] = sum(sub) / len(sub) - f2(b, l_max, beta)
        shift = sum(intra.values()) / len(intra) if center else 0.0
        for i in idx:
            inter = 0.0 if std is None else (rewards[i] - mean) / (std + eps)
            out[i] = inter + w_intra * (intra[budgets[i]] - shift)
    return out


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("w_intra", [1.0, 2.0, 0.0])
def test_matches_reference_on_shuffled_groups_of_mixed_sizes(center, w_intra):
    rng = random.Random(1)
    rewards, budgets, groups = [], [], []
    budget_set = [512, 1024, 2048, 2560]
    for g, size in enumerate([16, 16, 8, 4, 1, 5, 2]):
        for j in range(size):
            budgets.append(budget_set[j % 4])
            groups.append(100 + 7 * g)  # ids need not be contiguous
            rewards.append(0.0 if rng.random() < 0.3 else f2(budgets[-1]) - rng.random())
    order = list(range(len(rewards)))
    rng.shuffle(order)
    rewards, budgets, groups = ([x[i] for i in order] for x in (rewards, budgets, groups))
    got = hierarchical_advantage(_t(rewards), _t(budgets), torch.tensor(groups), w_intra=w_intra, center_intra=center)
    want = reference(rewards, budgets, groups, w_intra=w_intra, center=center)
    assert got.dtype == torch.float64
    assert torch.allclose(got, _t(want), rtol=0, atol=1e-10)


def test_hand_computed_group():
    # One prompt, budgets (1024, 2048), two samples each, l_max 4096, beta 4.
    rewards = [3.0, 1.0, 2.0, 0.0]
    budgets = [1024, 1024, 2048, 2048]
    # mean 1.5; stdev (n-1) = sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3)
    std = math.sqrt(5 / 3)
    intra_1024 = 2.0 - 4 * math.cos(math.pi / 8)
    intra_2048 = 1.0 - 4 * math.cos(math.pi / 4)
    want = [1.5 / (std + 1e-6) + intra_1024, -0.5 / (std + 1e-6) + intra_1024,
            0.5 / (std + 1e-6) + intra_2048, -1.5 / (std + 1e-6) + intra_2048]
    got = hierarchical_advantage(_t(rewards), _t(budgets), torch.zeros(4, dtype=torch.long))
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert intra_1024 < 0 and intra_2048 < 0  # R <= f2 everywhere, so the intra term only pushes down


def test_single_sample_group_has_no_inter_term():
    got = hierarchical_advantage(_t([2.5]), _t([1024]), torch.tensor([0]))
    assert got.item() == pytest.approx(2.5 - f2(1024), abs=1e-12)
    assert group_normalized_advantage(_t([2.5]), torch.tensor([0])).item() == 0.0


def test_all_equal_rewards_give_zero_inter_term():
    got = group_normalized_advantage(_t([1.0] * 8), torch.zeros(8, dtype=torch.long))
    assert torch.equal(got, torch.zeros(8, dtype=torch.float64))
    hier = hierarchical_advantage(_t([1.0] * 4), _t([512, 512, 2048, 2048]), torch.zeros(4, dtype=torch.long))
    assert hier.tolist() == pytest.approx([1 - f2(512)] * 2 + [1 - f2(2048)] * 2, abs=1e-12)


def test_centered_intra_sums_to_zero_per_prompt():
    rewards = _t([3.0, 1.0, 2.0, 0.0, 1.0, 1.5])
    budgets = _t([512, 512, 1024, 1024, 2048, 2048])
    groups = torch.zeros(6, dtype=torch.long)
    inter = group_normalized_advantage(rewards, groups)
    centered = hierarchical_advantage(rewards, budgets, groups, center_intra=True) - inter
    assert centered[::2].sum().item() == pytest.approx(0.0, abs=1e-12)


def test_grpo_is_the_inter_term():
    rewards, groups = _t([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 1, 1, 1])
    got = group_normalized_advantage(rewards, groups)
    s = statistics.stdev([1.0, 0.0, 1.0])
    assert got[:3].tolist() == pytest.approx([(1 - 2 / 3) / (s + 1e-6), (-2 / 3) / (s + 1e-6), (1 - 2 / 3) / (s + 1e-6)])
    assert torch.equal(hierarchical_advantage(rewards, _t([7] * 6), groups, w_intra=0.0), got)


def test_float32_stays_float32_and_bad_shapes_raise():
    got = hierarchical_advantage(torch.tensor([1.0, 2.0]), torch.tensor([512, 512]), torch.tensor([0, 0]))
    assert got.dtype == torch.float32
    with pytest.raises(ValueError, match="1-D"):
        hierarchical_advantage(torch.ones(3), torch.ones(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="floating"):
        group_normalized_advantage(torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
