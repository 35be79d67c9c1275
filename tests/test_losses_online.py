"""The critic-free estimators and the pieces of their losses, against numbers worked out by hand."""

import math

import pytest
import torch

from rlhf import losses

GROUP = torch.tensor([1.0, 0.0, 0.0, 1.0])  # one prompt, four answers: two right, two wrong


def test_grpo_divides_the_centred_scores_by_the_groups_std():
    # mean 0.5; unbiased std = sqrt(4 · 0.25 / 3) = 0.57735; 0.5 / 0.57735 = 0.86603
    expected = torch.tensor([0.86603, -0.86603, -0.86603, 0.86603])
    assert torch.allclose(losses.grpo_advantages(GROUP, 4, eps=0.0), expected, atol=1e-5)


def test_dr_grpo_only_centres():
    assert torch.equal(losses.dr_grpo_advantages(GROUP, 4), torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_rloo_leaves_each_answer_out_of_its_own_baseline():
    # a right answer: 1 - mean(0, 0, 1) = 2/3; a wrong one: 0 - mean(1, 0, 1) = -2/3
    assert torch.allclose(losses.rloo_advantages(GROUP, 4), torch.tensor([2, -2, -2, 2]) / 3)


def test_two_groups_are_baselined_apart():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0])
    assert torch.equal(losses.dr_grpo_advantages(scores, 2), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(losses.rloo_advantages(scores, 2), torch.tensor([-2.0, 2.0, 0.0, 0.0]))


@pytest.mark.parametrize("estimator", [losses.grpo_advantages, losses.dr_grpo_advantages, losses.rloo_advantages])
def test_a_group_whose_answers_all_score_the_same_teaches_nothing(estimator):
    assert torch.equal(estimator(torch.full((4,), 0.7), 4), torch.zeros(4))


@pytest.mark.parametrize("estimator", [losses.grpo_advantages, losses.dr_grpo_advantages, losses.rloo_advantages])
def test_a_one_answer_group_is_refused(estimator):
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        estimator(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        estimator(torch.tensor([1.0, 0.0, 1.0]), 4)


def test_discounted_returns_sum_the_rewards_ahead_on_valid_tokens():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [-0.1, 0.5, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.allclose(losses.discounted_returns(rewards, mask), torch.tensor([[1.0, 1.0, 1.0], [0.4, 0.5, 0.0]]))
    assert torch.allclose(losses.discounted_returns(rewards, mask, gamma=0.5)[0], torch.tensor([0.25, 0.5, 1.0]))


def test_overlong_penalty_falls_linearly_over_the_buffer():
    lengths = torch.tensor([40, 48, 56, 64, 70])
    assert torch.equal(losses.overlong_penalty(lengths, 64, 16), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="overlong buffer"):
        losses.overlong_penalty(lengths, 64, 0)


def test_the_asymmetric_clip_lets_a_rewarded_token_grow_further():
    logprobs, old = torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)  # ratio e
    loss, clipped = losses.clipped_surrogate(logprobs, old, torch.tensor([[1.0, -1.0]]), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28, math.e]])) and clipped.tolist() == [[True, False]]
    low, _ = losses.clipped_surrogate(torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), 0.2, 0.28)
    assert torch.allclose(low, torch.tensor([[0.8]]))  # ratio 1/e, pessimistic bound at 1 - clip_low


def test_three_ways_to_aggregate_a_per_token_loss():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert losses.token_mean(x, mask).item() == 2.5  # (1 + 2 + 3 + 4) / 4
    assert losses.sequence_mean(x, mask).item() == 3.0  # (2 + 4) / 2
    assert losses.constant_mean(x, mask, max_length=4).item() == 1.25  # 10 / (2 · 4)


def test_ppo_policy_loss_is_the_symmetric_surrogate_averaged_over_tokens():
    torch.manual_seed(0)
    logprobs, old, advantages = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    loss, _ = losses.ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    per_token, _ = losses.clipped_surrogate(logprobs, old, advantages, 0.2, 0.2)
    assert torch.allclose(loss, losses.token_mean(per_token, mask))


def test_kl_loss_is_k3_and_stays_finite():
    logprobs, ref = torch.tensor([[0.0, -1.0]], requires_grad=True), torch.tensor([[-1.0, 50.0]])
    mask = torch.tensor([[True, False]])
    loss = losses.kl_loss(logprobs, ref, mask)
    assert math.isclose(loss.item(), math.exp(-1) - 1 + 1, rel_tol=1e-6)  # ρ = e^-1: (ρ - 1) - log ρ
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    huge = losses.kl_loss(torch.zeros(1, 1), torch.full((1, 1), 500.0), torch.ones(1, 1, dtype=torch.bool))
    assert torch.isfinite(huge)


def test_clipped_policy_loss_is_ppos_loss_with_a_symmetric_clip_and_token_mean():
    torch.manual_seed(1)
    logprobs, old, advantages = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    loss, stats = losses.clipped_policy_loss(logprobs, old, advantages, mask, 0.2, 0.2, losses.token_mean)
    expected, expected_stats = losses.ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    assert torch.equal(loss, expected) and all(torch.equal(stats[k], v) for k, v in expected_stats.items())


def test_clipped_policy_loss_aggregates_per_answer_or_by_a_constant():
    # ratio 1 everywhere: the per-token loss is -A; answer 1 has 2 tokens at A = 1, answer 2 one token at A = -2
    advantages = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    zeros = torch.zeros(2, 2)
    sequence, _ = losses.clipped_policy_loss(zeros, zeros, advantages, mask, aggregate=losses.sequence_mean)
    constant, _ = losses.clipped_policy_loss(zeros, zeros, advantages, mask, aggregate=losses.constant_mean,
                                             max_length=4)
    token, stats = losses.clipped_policy_loss(zeros, zeros, advantages, mask)
    assert sequence.item() == 0.5  # (-1 + 2) / 2
    assert constant.item() == 0.0  # (-1 - 1 + 2) / (2 · 4)
    assert token.item() == 0.0  # (-1 - 1 + 2) / 3
    assert stats["clipfrac"].item() == 0.0 and stats["ratio"].item() == 1.0


def test_groups_all_equal_marks_the_groups_that_teach_nothing():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.3])
    assert losses.groups_all_equal(scores, 2).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="group_size must be at least 2"):
        losses.groups_all_equal(scores, 1)
