"""DPO and its variants against hand-computed values."""

import math

import pytest
import torch

from rlhf.losses import cdpo_loss, dpo_loss, ipo_loss, simpo_loss

LOG2 = math.log(2)


def close(actual, expected, tol=1e-5):
    value = float(actual.detach()) if torch.is_tensor(actual) else float(actual)
    assert abs(value - expected) < tol, (value, expected)


# Two pairs used by several tests. Log-ratios: chosen [-10 - -11, -20 - -20] = [1, 0],
# rejected [-12 - -11, -15 - -16] = [-1, 1], so h = [1 - -1, 0 - 1] = [2, -1].
CHOSEN = torch.tensor([-10.0, -20.0])
REJECTED = torch.tensor([-12.0, -15.0])
REF_CHOSEN = torch.tensor([-11.0, -20.0])
REF_REJECTED = torch.tensor([-11.0, -16.0])


# ---------------------------------------------------------------- DPO


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_is_log2_when_policy_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = -50 * torch.rand(5, generator=g), -50 * torch.rand(5, generator=g)
    for beta in (0.1, 1.0):
        loss, stats = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
        close(loss, LOG2)  # h = 0: -log σ(0) = log 2 ≈ 0.693147, whatever the batch
        close(stats["accuracy"], 0.0)  # ties count as wrong
        close(stats["margin"], 0.0)


def test_dpo_chosen_more_likely_lowers_the_loss():
    ref_c, ref_r = torch.tensor([-30.0]), torch.tensor([-25.0])
    loss, stats = dpo_loss(ref_c + 2.0, ref_r, ref_c, ref_r, beta=0.1)
    # β·h = 0.1·2 = 0.2: -log σ(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139 < log 2
    close(loss, 0.598139)
    assert loss < LOG2
    close(stats["accuracy"], 1.0)
    close(stats["margin"], 0.2)
    close(stats["chosen_reward"], 0.2)
    close(stats["rejected_reward"], 0.0)
    # the rejected answer made more likely instead raises it: log(1 + e^0.2) = 0.798139
    loss, _ = dpo_loss(ref_c, ref_r + 2.0, ref_c, ref_r, beta=0.1)
    close(loss, 0.798139)


def test_dpo_hand_computed_two_pairs():
    loss, stats = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    # β·h = [1, -0.5]: (-log σ(1) - log σ(-0.5)) / 2 = (0.313262 + 0.974077) / 2 = 0.643669
    close(loss, 0.643669)
    close(stats["accuracy"], 0.5)  # rewards chosen [0.5, 0] vs rejected [-0.5, 0.5]: only the first wins
    close(stats["margin"], 0.25)  # mean(1, -0.5)
    close(stats["chosen_reward"], 0.25)  # mean(0.5, 0)
    close(stats["rejected_reward"], 0.0)  # mean(-0.5, 0.5)
    close(stats["chosen_logprobs"], -15.0)
    close(stats["rejected_logprobs"], -13.5)


def test_dpo_gradient_and_detached_reference_and_stats():
    chosen = torch.tensor([-5.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-7.0, -8.0], requires_grad=True)
    ref_c = chosen.detach().clone().requires_grad_(True)
    ref_r = rejected.detach().clone().requires_grad_(True)
    loss, stats = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    loss.backward()
    # d/dc of -log σ(β·h) / B = -β·σ(-β·h) / B = -0.1·0.5 / 2 = -0.025 at h = 0; +0.025 for rejected
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.025, -0.025]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.025, 0.025]))
    assert ref_c.grad is None and ref_r.grad is None  # the reference is a fixed target
    assert not any(v.requires_grad for v in stats.values())


def test_dpo_large_gap_is_finite():
    loss, _ = dpo_loss(torch.tensor([-4000.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1)
    close(loss, 400.0, tol=1e-3)  # -log σ(-400) ≈ 400


# ---------------------------------------------------------------- IPO


def test_ipo_hand_computed():
    loss, stats = ipo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    # target 1/(2·0.5) = 1; h = [2, -1]: ((2 - 1)² + (-1 - 1)²) / 2 = (1 + 4) / 2 = 2.5
    close(loss, 2.5)
    close(stats["margin"], 0.25)  # implicit rewards as in DPO: β·h = [1, -0.5]
    close(stats["accuracy"], 0.5)


def test_ipo_at_initialisation_and_gradient():
    chosen = torch.tensor([-3.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -4.0], requires_grad=True)
    loss, _ = ipo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    close(loss, 25.0)  # h = 0, target 1/(2·0.1) = 5: (0 - 5)² = 25
    loss.backward()
    # d/dc (h - 5)² / B = 2·(0 - 5) / 2 = -5; rejected +5
    torch.testing.assert_close(chosen.grad, torch.tensor([-5.0, -5.0]))
    torch.testing.assert_close(rejected.grad, torch.tensor([5.0, 5.0]))
    # at the target gap h = 5 the loss is 0
    loss, _ = ipo_loss(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1)
    close(loss, 0.0)


# ---------------------------------------------------------------- conservative DPO


def test_cdpo_hand_computed():
    loss, stats = cdpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, label_smoothing=0.1)
    # β·h = [1, -0.5]
    # pair 1: 0.9·(-log σ(1)) + 0.1·(-log σ(-1)) = 0.9·0.313262 + 0.1·1.313262 = 0.413262
    # pair 2: 0.9·(-log σ(-0.5)) + 0.1·(-log σ(0.5)) = 0.9·0.974077 + 0.1·0.474077 = 0.924077
    close(loss, (0.413262 + 0.924077) / 2)  # = 0.668670
    close(stats["margin"], 0.25)


def test_cdpo_reduces_to_dpo_and_is_log2_at_init():
    dpo, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    cdpo, _ = cdpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, label_smoothing=0.0)
    close(cdpo, float(dpo))
    loss, _ = cdpo_loss(CHOSEN, REJECTED, CHOSEN, REJECTED, beta=0.5, label_smoothing=0.3)
    close(loss, LOG2)  # h = 0: 0.7·log 2 + 0.3·log 2


# ---------------------------------------------------------------- SimPO


def test_simpo_hand_computed():
    chosen = torch.tensor([-1.0, -2.0])  # mean log-prob per token
    rejected = torch.tensor([-1.5, -1.0])
    loss, stats = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    # β·(c - r) - γ = [2·0.5 - 0.5, 2·(-1) - 0.5] = [0.5, -2.5]
    # (-log σ(0.5) - log σ(-2.5)) / 2 = (0.474077 + 2.578889) / 2 = 1.526483
    close(loss, 1.526483)
    close(stats["accuracy"], 0.5)  # rewards chosen [-2, -4] vs rejected [-3, -2]
    close(stats["margin"], -0.5)  # mean(1, -2), without γ
    close(stats["chosen_reward"], -3.0)
    close(stats["rejected_reward"], -2.5)


def test_simpo_equal_responses_and_gradient():
    chosen = torch.tensor([-1.2], requires_grad=True)
    rejected = torch.tensor([-1.2], requires_grad=True)
    loss, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    close(loss, math.log1p(math.exp(0.5)))  # -log σ(-0.5) = log(1 + e^0.5) = 0.974077
    loss.backward()
    # d/dc = -β·σ(-(β·0 - γ)) = -2·σ(0.5) = -2·0.622459 = -1.244919
    close(chosen.grad[0], -1.244919)
    close(rejected.grad[0], 1.244919)
