"""Budget subgroups (docs/method.md, "Hierarchical budget exploration")."""

import pytest

from megatron_hbpo.algo.budgets import assign_budgets, budget_sentence


def test_assign_budgets_even_contiguous_subgroups():
    assert assign_budgets(8, [16, 32, 48, 64]) == [16, 16, 32, 32, 48, 48, 64, 64]
    assert assign_budgets(16, [512, 1024, 2048, 2560]).count(2048) == 4
    assert assign_budgets(3, []) == [None, None, None]
    with pytest.raises(ValueError, match="multiple"):
        assign_budgets(6, [1, 2, 3, 4])


def test_budget_sentence():
    assert budget_sentence(512) == " I will answer the question within 512 tokens"
    assert budget_sentence(64, " Budget: {budget}.") == " Budget: 64."
