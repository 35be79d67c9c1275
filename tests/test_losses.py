import math
import subprocess
import sys
from pathlib import Path

import torch

from rlhf.losses import (
    adaptive_kl_beta,
    bradley_terry_loss,
    gae,
    kl_k1,
    kl_k3,
    kl_shaped_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
)

REPO = Path(__file__).resolve().parents[1]
E = math.e


def close(actual, expected, tol=1e-5):
    value = float(actual.detach()) if torch.is_tensor(actual) else float(actual)
    assert abs(value - expected) < tol, (value, expected)


# ---------------------------------------------------------------- SFT


def test_sft_loss_masked_token_mean_and_grad():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, stats = sft_loss(logprobs, mask)
    close(loss, 7.0 / 3)  # (1 + 2 + 4) / 3 = 2.3333
    close(stats["nll"], 7.0 / 3)
    assert int(stats["tokens"]) == 3
    assert not stats["nll"].requires_grad
    loss.backward()
    # d loss / d logprob = -1/3 on each of the 3 masked tokens, 0 elsewhere
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_sft_loss_empty_mask_is_zero_and_connected():
    logprobs = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)
    loss, stats = sft_loss(logprobs, torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    assert int(stats["tokens"]) == 0
    loss.backward()  # still part of the graph
    assert torch.all(logprobs.grad == 0)


# ---------------------------------------------------------------- reward model


def test_bradley_terry_equal_scores_is_log2():
    r = torch.tensor([0.3, -1.0])
    loss, stats = bradley_terry_loss(r, r.clone())
    close(loss, math.log(2))  # -log σ(0) = log 2 ≈ 0.693147
    close(stats["accuracy"], 0.0)  # ties are not counted as correct
    close(stats["margin"], 0.0)


def test_bradley_terry_margin_and_accuracy():
    chosen = torch.tensor([1.0])
    rejected = torch.tensor([0.0])
    loss, _ = bradley_terry_loss(chosen, rejected)
    close(loss, math.log1p(math.exp(-1.0)))  # -log σ(1) = log(1+e^-1) ≈ 0.313262
    loss, stats = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0]))
    close(loss, math.log(2))  # -log σ(1 - 1) = log 2
    close(stats["margin"], 1.0)  # the stat is r_c - r_r, without the given margin

    chosen = torch.tensor([1.0, 0.0, 2.0])
    rejected = torch.tensor([0.0, 1.0, 2.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    close(stats["accuracy"], 1.0 / 3)  # only the first pair has r_c > r_r
    close(stats["margin"], 0.0)  # (1 - 1 + 0) / 3
    close(stats["chosen_reward"], 1.0)  # (1 + 0 + 2) / 3
    close(stats["rejected_reward"], 1.0)  # (0 + 1 + 2) / 3
    # (-log σ(1) - log σ(-1) - log σ(0)) / 3 = (0.313262 + 1.313262 + 0.693147) / 3 = 0.773224
    close(loss, (math.log1p(E**-1) + math.log1p(E) + math.log(2)) / 3)


def test_bradley_terry_large_gap_is_finite():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    close(loss, 400.0, tol=1e-3)  # -log σ(-400) ≈ 400


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    logprobs = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    close(kl_k1(logprobs, ref)[0, 0], math.log(2))  # log 0.5 - log 0.25 = log 2 ≈ 0.693147
    # ρ = 0.25 / 0.5 = 0.5: (0.5 - 1) - log 0.5 = -0.5 + 0.693147 = 0.193147
    close(kl_k3(logprobs, ref)[0, 0], -0.5 + math.log(2))
    # ρ = 2 (policy below reference): (2 - 1) - log 2 = 0.306853 > 0 while k1 = -log 2 < 0
    close(kl_k3(ref, logprobs)[0, 0], 1 - math.log(2))
    close(kl_k1(ref, logprobs)[0, 0], -math.log(2))
    same = torch.randn(3, 4)
    assert torch.all(kl_k3(same, same) == 0)
    assert torch.all(kl_k3(torch.randn(3, 4), torch.randn(3, 4)) >= 0)


def test_kl_shaped_rewards():
    scores = torch.tensor([2.0, 3.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.5, 0.4, 0.5]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    rewards, stats = kl_shaped_rewards(scores, kl, mask, beta=0.1)
    expected = torch.tensor(
        [
            [-0.01, -0.02 + 2.0, 0.0],  # -β·kl, score on the last valid token (index 1)
            [0.0, 0.0, 0.0],  # empty row: nothing, no score
            [-0.05, 0.0, -0.05 + 5.0],  # last True is index 2 even with a hole
        ]
    )
    torch.testing.assert_close(rewards, expected)
    close(stats["kl"], (0.3 + 0.0 + 1.0) / 3)  # row sums of masked kl: 0.1+0.2, 0, 0.5+0.5
    close(stats["kl_penalty"], (-0.03 + 0.0 - 0.10) / 3)  # = -0.043333
    close(stats["non_score_reward"], (-0.01 - 0.02 - 0.05 - 0.05) / 4)  # per masked token = -0.0325
    close(stats["score"], 10.0 / 3)  # (2 + 3 + 5) / 3


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed_with_padding():
    # 3-step episode then one padding position whose reward/value must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # δ2 = 1 + 1·0 - 0.7 = 0.3         (episode ends: next value 0)
    # δ1 = 0 + 1·0.7 - 0.6 = 0.1
    # δ0 = 0 + 1·0.6 - 0.5 = 0.1
    # A2 = 0.3
    # A1 = δ1 + 0.95·A2 = 0.1 + 0.285 = 0.385
    # A0 = δ0 + 0.95·A1 = 0.1 + 0.36575 = 0.46575
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3, 0.0]]))
    # returns = A + V: 0.96575, 0.985, 1.0; padding 0
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]]))


def test_gae_lambda_one_gives_discounted_returns_and_no_grad():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, -0.2, 0.4], [1.0, 7.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # λ = 1: return_t = Σ γ^k r_{t+k}: row 0 → 0.25, 0.5, 1.0 ; row 1 (one step) → 2.0, then 0
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0], [2.0, 0.0, 0.0]]))
    # A = G - V: 0.25-0.3, 0.5+0.2, 1.0-0.4 ; 2.0-1.0
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.7, 0.6], [1.0, 0.0, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- PPO


def _one(x):
    return torch.tensor([[x]])


def test_ppo_policy_loss_clipped_positive_advantage():
    # log ratio 1 → ρ = e ≈ 2.718 > 1.2; A = 1: max(-e, -1.2) = -1.2 (clipped term active)
    loss, stats = ppo_policy_loss(_one(1.0), _one(0.0), _one(1.0), _one(True), clip=0.2)
    close(loss, -1.2)
    close(stats["clipfrac"], 1.0)
    close(stats["ratio"], E)
    close(stats["approx_kl"], 0.5)  # ½·1²


def test_ppo_policy_loss_negative_advantage_unclipped():
    # A = -1, ρ = e: max(e, 1.2) = e (unclipped term is the pessimistic one)
    loss, stats = ppo_policy_loss(_one(1.0), _one(0.0), _one(-1.0), _one(True), clip=0.2)
    close(loss, E)
    close(stats["clipfrac"], 0.0)


def test_ppo_policy_loss_ratio_one_and_masking_and_grad():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -50.0]])  # padding: huge ratio, must be ignored
    adv = torch.tensor([[2.0, -0.5, 100.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask)
    # ρ = 1 on both real tokens → loss = mean(-A) = (-2 + 0.5) / 2 = -0.75
    close(loss, -0.75)
    close(stats["clipfrac"], 0.0)
    close(stats["ratio"], 1.0)
    close(stats["approx_kl"], 0.0)
    loss.backward()
    # d/dlogp (-A·ρ) = -A·ρ = -A at ρ = 1, divided by 2 tokens: -1.0, 0.25; padding 0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.25, 0.0]]))


def test_ppo_value_loss():
    # V = 1.5, V_old = 1.0, R = 2.0, clip 0.2: V_clip = 1.2
    # (V - R)² = 0.25, (V_clip - R)² = 0.64 → loss = ½·0.64 = 0.32, clipped term active
    loss, stats = ppo_value_loss(_one(1.5), _one(1.0), _one(2.0), _one(True), clip=0.2)
    close(loss, 0.32)
    close(stats["value_clipfrac"], 1.0)
    close(stats["value_error"], 0.25)
    # V = 1.1 inside the clip range: both terms (1.1 - 2)² = 0.81 → loss 0.405
    loss, stats = ppo_value_loss(_one(1.1), _one(1.0), _one(2.0), _one(True), clip=0.2)
    close(loss, 0.405)
    close(stats["value_clipfrac"], 0.0)
    close(stats["value_error"], 0.81)


def test_ppo_value_loss_masking():
    values = torch.tensor([[1.0, 100.0]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0]])
    returns = torch.tensor([[3.0, -100.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.tensor([[1, 0]]))
    # only the first token: V_clip = 1.0 = V, (1 - 3)² = 4 → ½·4 = 2
    close(loss, 2.0)
    close(stats["value_error"], 4.0)
    loss.backward()
    # d/dV ½(V - R)² = V - R = -2 on the real token, 0 on padding
    torch.testing.assert_close(values.grad, torch.tensor([[-2.0, 0.0]]))


# ---------------------------------------------------------------- KL controller


def test_adaptive_kl_beta():
    # kl/target - 1 = 12/6 - 1 = 1 → clipped to 0.2: 0.1·(1 + 0.2·100/1000) = 0.102
    close(adaptive_kl_beta(0.1, 12.0, 6.0, 100, 1000), 0.102, tol=1e-12)
    # kl = 0: -1 → clipped to -0.2: 0.1·(1 - 0.02) = 0.098
    close(adaptive_kl_beta(0.1, 0.0, 6.0, 100, 1000), 0.098, tol=1e-12)
    # 6.6/6 - 1 = 0.1 (inside the clip): 0.1·(1 + 0.1·0.1) = 0.101
    close(adaptive_kl_beta(0.1, 6.6, 6.0, 100, 1000), 0.101, tol=1e-12)
    assert isinstance(adaptive_kl_beta(0.1, torch.tensor(6.0), 6.0, 1, 10), float)


# ---------------------------------------------------------------- imports


def test_losses_does_not_import_transformers():
    code = "import rlhf.losses, sys; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
