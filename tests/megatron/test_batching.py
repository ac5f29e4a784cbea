"""Dynamic micro-batching: the token bound, the padding it leaves, and the tensors it builds."""

import random

import pytest
import torch

from megatron_hbpo.megatron.batching import PolicySequence, collate, gather_response, padding_fraction, plan_microbatches


def test_every_sequence_once_and_padded_size_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(20, 600) for _ in range(64)]
    plan = plan_microbatches(lengths, 2048, pad_multiple=8)
    assert sorted(i for batch in plan for i in batch) == list(range(64))
    for batch in plan:
        longest = -(-max(lengths[i] for i in batch) // 8) * 8
        assert len(batch) * longest <= 2048


def test_sorting_by_length_beats_padding_to_the_longest():
    rng = random.Random(1)
    # HBPO-like: four budgets, lengths spread from ~50 to ~2600 tokens.
    lengths = [rng.randint(b // 2, b) for b in (512, 1024, 2048, 2560) for _ in range(16)]
    plan = plan_microbatches(lengths, 8192)
    naive = 1 - sum(lengths) / (len(lengths) * max(lengths))
    ours = padding_fraction(lengths, plan)
    assert ours < 0.1 < naive
    # By hand: two sequences of 10 and 6 in one micro-batch pad 4 of 20 slots.
    assert padding_fraction([10, 6], [[0, 1]]) == pytest.approx(0.2)


def test_a_sequence_over_the_budget_is_an_error():
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        plan_microbatches([10, 300], 256)


def test_collate_aligns_labels_and_response_positions():
    seqs = [PolicySequence([5, 6, 7, 8, 9], prompt_length=2, advantage=1.5, logp_old=torch.tensor([-1.0, -2.0, -3.0])),
            PolicySequence([1, 2, 3], prompt_length=1, advantage=-0.5, logp_old=torch.tensor([-4.0, -5.0]))]
    batch = collate(seqs, [0, 1], pad_token_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch.labels.tolist() == [[6, 7, 8, 9, 0], [2, 3, 0, 0, 0]]
    # Position t predicts token t + 1: the response [7, 8, 9] is predicted at positions 1..3.
    assert batch.response_mask.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    assert batch.logp_old.tolist() == [[0.0, -1.0, -2.0, -3.0, 0.0], [-4.0, -5.0, 0.0, 0.0, 0.0]]
    assert batch.advantages.tolist() == [1.5, -0.5]
    assert batch.attention_mask[0, 0].tolist()[1] == [False, False, True, True, True]
    assert [t.tolist() for t in gather_response(batch.logp_old, batch, seqs)] == [[-1.0, -2.0, -3.0], [-4.0, -5.0]]
    assert batch.logp_ref is None


def test_bad_sequences_are_rejected():
    with pytest.raises(ValueError, match="prompt"):
        PolicySequence([1, 2], prompt_length=2)
    seqs = [PolicySequence([1, 2, 3], 1, logp_old=torch.zeros(5))]
    with pytest.raises(ValueError, match="response tokens"):
        collate(seqs, [0])
