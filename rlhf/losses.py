"""Every equation of the toolkit, as small pure functions on tensors.

- ``sft_loss``: token-level mean negative log-likelihood (supervised fine-tuning).
- ``bradley_terry_loss``: pairwise reward-model loss -log σ(r_chosen - r_rejected - margin).
- ``kl_k1`` / ``kl_k3``: per-token estimators of KL(π || π_ref) from sampled tokens.
- ``kl_shaped_rewards``: per-token PPO rewards, -β·KL on every token plus the score on the last one.
- ``gae``: generalised advantage estimation and returns.
- ``ppo_policy_loss``: clipped surrogate objective.
- ``ppo_value_loss``: clipped value-function loss.
- ``adaptive_kl_beta``: the proportional KL controller of Ziegler et al. (2019).
- ``grpo_advantages``, ``dr_grpo_advantages``, ``rloo_advantages``: group baselines of the critic-free methods;
  ``discounted_returns`` (REINFORCE++), ``overlong_penalty`` (DAPO), ``clipped_surrogate`` with asymmetric clip,
  and three ways to aggregate a per-token loss (``token_mean``, ``sequence_mean``, ``constant_mean``); ``kl_loss``;
  ``clipped_policy_loss`` (the surrogate aggregated); ``groups_all_equal`` (dynamic sampling's test).
- ``dpo_loss``: direct preference optimisation -log σ(β·h), h the chosen-minus-rejected log-ratio.
- ``ipo_loss``: identity preference optimisation (h - 1/(2β))².
- ``cdpo_loss``: conservative DPO, DPO with label smoothing ε (a share ε of labels assumed flipped).
- ``simpo_loss``: reference-free, length-normalised -log σ(β·(c - r) - γ).

Masked helpers (``masked_mean``, ``whiten``, ...) live in ``rlhf.ops``.

Conventions: ``B`` batch, ``T`` response length. A ``mask`` ``(B, T)`` is bool (or 0/1), True for
a real response token. Every loss returns ``(loss, stats)``; ``stats`` maps names to detached
0-dim tensors. Rollout data (``old_*``, ``ref_logprobs``, ``advantages``, ``returns``) is detached
inside the functions: it is a fixed target, and a stray graph would put wrong gradients in.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from rlhf.ops import masked_mean, masked_sum

Stats = Dict[str, torch.Tensor]
MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: k3 stays finite where the policy gives a token ~0 probability


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
    """Mean negative log-likelihood over all masked tokens of the batch.

    logprobs ``(B, T)`` log-probabilities of the target tokens; mask ``(B, T)``.
    Token-level mean (long answers weigh more than short ones, as in next-token pretraining).
    An all-False mask gives a loss of 0 that is still part of the graph.
    stats: ``nll`` (= loss), ``tokens`` (number of masked tokens).
    """
    valid = mask.bool()
    loss = masked_mean(-logprobs, valid)
    return loss, {"nll": loss.detach(), "tokens": valid.sum().detach()}


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Stats]:
    """Pairwise preference loss: mean over pairs of -log σ(r_c - r_r - margin).

    chosen_rewards, rejected_rewards ``(B,)``; margin ``(B,)`` or None (0). logsigmoid keeps
    large negative differences finite. stats: ``accuracy`` (fraction with r_c > r_r; ties count
    as wrong), ``margin`` (mean r_c - r_r, without the given margin), ``chosen_reward``,
    ``rejected_reward`` (means).
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(),
        }
    return loss, stats


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log π - log π_ref, ``(B, T)``. Unbiased, but can be negative."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate (ρ - 1) - log ρ with ρ = π_ref / π, ``(B, T)``.

    Unbiased and never negative (x - 1 >= log x), with lower variance than k1. log ρ is clamped at
    MAX_LOG_RATIO: expm1 overflows to Inf above ~88, and one Inf would make the batch's rewards NaN.
    """
    log_rho = (ref_logprobs - logprobs).clamp(max=MAX_LOG_RATIO)
    # expm1 stays accurate when ρ ≈ 1; the clamp removes rounding below 0.
    return (torch.expm1(log_rho) - log_rho).clamp(min=0.0)


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> Tuple[torch.Tensor, Stats]:
    """Per-token PPO rewards: -beta·kl on every masked token, plus the score on the last one.

    scores ``(B,)`` (reward-model score of each response), kl ``(B, T)`` per-token KL estimate,
    mask ``(B, T)`` → rewards ``(B, T)``, 0 off the mask. The score lands on the last True
    position of each row; a row without any True gets no score (all zeros). Computed without
    gradient (rewards are data for PPO).
    stats: ``kl`` (mean over rows of Σ_t kl), ``kl_penalty`` (mean over rows of Σ_t -beta·kl),
    ``non_score_reward`` (mean of -beta·kl per masked token), ``score`` (mean score).
    """
    with torch.no_grad():
        valid = mask.to(device=kl.device, dtype=torch.bool)
        non_score = torch.where(valid, -beta * kl.detach(), torch.zeros_like(kl))
        rewards = non_score.clone()

        # Last True index per row (-1 when the row is empty), valid for any mask layout.
        positions = torch.arange(kl.shape[1], device=kl.device).expand_as(valid)
        last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
        rows = torch.nonzero(last >= 0).squeeze(-1)
        rewards[rows, last[rows]] += scores.detach().to(rewards.dtype)[rows]

        stats = {
            "kl": masked_sum(kl.detach(), valid, dim=1).mean(),
            "kl_penalty": non_score.sum(dim=1).mean(),
            "non_score_reward": masked_mean(non_score, valid),
            "score": scores.detach().float().mean(),
        }
    return rewards, stats


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the time axis.

    rewards, values, mask ``(B, T)`` → advantages, returns ``(B, T)``.
    δ_t = r_t + γ·V_{t+1} - V_t,  A_t = δ_t + γ·λ·A_{t+1},  returns = A + V.
    The episode is the sequence of masked tokens: the value after the last masked token is 0
    (the episode ends there), and masked-out positions are skipped (their rewards and values are
    ignored) and get advantage 0 and return 0. No gradient.
    """
    valid = mask.to(device=values.device, dtype=torch.bool)
    rewards = rewards.detach().to(values.dtype)
    values = values.detach()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        ok = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(ok, adv_t, torch.zeros_like(adv_t))
        # A masked-out step passes the carry through unchanged, so padding after the episode
        # leaves next_value = 0 for the last real token.
        next_value = torch.where(ok, values[:, t], next_value)
        next_adv = torch.where(ok, adv_t, next_adv)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> Tuple[torch.Tensor, Stats]:
    """Clipped surrogate: masked token mean of max(-A·ρ, -A·clip(ρ, 1-clip, 1+clip)).

    logprobs (current policy, with grad), old_logprobs (rollout policy), advantages, mask: all
    ``(B, T)``; ρ = exp(logprobs - old_logprobs). Taking the max of the two losses is the
    pessimistic bound: the ratio gets no reward for moving past 1±clip.
    stats: ``clipfrac`` (fraction of masked tokens where the clipped term is the active one),
    ``approx_kl`` (masked mean of ½(logprobs - old_logprobs)²), ``ratio`` (masked mean of ρ).
    """
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.pow(2), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> Tuple[torch.Tensor, Stats]:
    """Clipped value loss: ½ · masked mean of max((V - R)², (V_clip - R)²).

    values (current, with grad), old_values (rollout), returns, mask: all ``(B, T)``;
    V_clip = old_values + clamp(values - old_values, -clip, clip) keeps the value head from
    jumping far from its rollout estimate in one update.
    stats: ``value_clipfrac`` (fraction of masked tokens where the clipped term is larger),
    ``value_error`` (masked mean of (values - returns)²).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns).pow(2)
    err_clipped = (v_clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "value_clipfrac": masked_mean((err_clipped > err).float(), mask),
            "value_error": masked_mean(err, mask),
        }
    return loss, stats


def adaptive_kl_beta(
    beta: float, kl: float, target: float, n_steps: int, horizon: float
) -> float:
    """Ziegler et al. (2019) proportional controller for the KL coefficient.

    e = clip(kl / target - 1, -0.2, 0.2); returns beta · (1 + e · n_steps / horizon).
    ``kl`` is the measured KL (same unit as ``target``), ``n_steps`` the samples seen since the
    last update, ``horizon`` the controller's time constant.
    """
    error = min(max(float(kl) / float(target) - 1.0, -0.2), 0.2)
    new_beta = float(beta) * (1.0 + error * float(n_steps) / float(horizon))
    if not math.isfinite(new_beta):
        raise ValueError(f"adaptive_kl_beta produced {new_beta}")
    return new_beta


# --- critic-free online RL: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ ----------------------------------
# A batch holds ``group_size`` answers per prompt, next to each other: ``scores`` ``(N,)`` with N = prompts ×
# group_size. Each estimator gives every answer one advantage (REINFORCE++: one per token); the policy loss
# is the clipped surrogate, aggregated over tokens in one of three ways.


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 for a group baseline, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - mean of its group) / (std of its group + eps), ``(N,)``.

    The std is the unbiased one (as TRL and verl compute it); a group whose answers all score the same gets 0."""
    groups = _grouped(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): r - mean of its group, without GRPO's division by the std (which weighs the
    questions whose answers barely differ the most), ``(N,)``."""
    groups = _grouped(scores, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i minus the mean of the other k-1 answers of its group,
    = (k·r_i - Σ_group r) / (k - 1), ``(N,)``."""
    groups = _grouped(scores, group_size)
    return ((group_size * groups - groups.sum(dim=1, keepdim=True)) / (group_size - 1)).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^(s-t) r_s over the valid tokens of each row, ``(B, T)`` → ``(B, T)`` (0 on padding).
    REINFORCE++ (Hu 2025) takes these returns, with the KL penalty inside the per-token rewards, as the
    advantages after whitening them over the whole batch (`ops.whiten`)."""
    valid = mask.bool()
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(valid, returns, torch.zeros_like(returns))


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment, ``(B,)``: 0 up to max_length - buffer tokens, then falling linearly to -1
    at max_length (and -1 beyond): an answer near the limit loses a little, one cut off the most."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"the overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    over = lengths.float() - (max_length - buffer)
    return -(over / buffer).clamp(min=0.0, max=1.0)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float = 0.2, clip_high: float = 0.2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss max(-A·ρ, -A·clip(ρ, 1-clip_low, 1+clip_high)) and whether the clipped term
    is the active one, both ``(B, T)``; ρ = exp(logprobs - old_logprobs). PPO clips symmetrically; DAPO raises
    clip_high (e.g. 0.28) so that unlikely tokens with a positive advantage can grow faster."""
    ratio = torch.exp(logprobs - old_logprobs.detach())
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over every valid token of the batch (PPO, DAPO): a long answer weighs by its length."""
    return masked_mean(x, mask)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each answer's tokens, then over answers (GRPO): a short answer's tokens weigh more."""
    return masked_mean(x, mask, dim=1).mean()


def constant_mean(x: torch.Tensor, mask: torch.Tensor, max_length: int) -> torch.Tensor:
    """Sum over valid tokens divided by a constant, rows × max_length (Dr. GRPO): no length bias either way."""
    return masked_sum(x, mask) / (x.shape[0] * max_length)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, aggregate=token_mean,
            **aggregate_args) -> torch.Tensor:
    """The KL to the reference as a loss term (GRPO's way, instead of inside the reward): k3 per token, with its
    gradient, aggregated like the policy loss."""
    log_ratio = (ref_logprobs.detach() - logprobs).clamp(max=MAX_LOG_RATIO)
    return aggregate(torch.expm1(log_ratio) - log_ratio, mask, **aggregate_args)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2, aggregate=token_mean,
                        **aggregate_args) -> Tuple[torch.Tensor, Stats]:
    """The clipped surrogate (``clipped_surrogate``) aggregated over the valid tokens, ``(B, T)`` inputs.

    With clip_low = clip_high and ``token_mean`` it is ``ppo_policy_loss``, number for number; GRPO aggregates with
    ``sequence_mean``, Dr. GRPO with ``constant_mean``, DAPO with ``token_mean`` and clip_high > clip_low.
    stats as ``ppo_policy_loss``: ``clipfrac``, ``approx_kl``, ``ratio`` (masked means over tokens).
    """
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high)
    loss = aggregate(per_token, mask, **aggregate_args)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats = {
            "clipfrac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.pow(2), mask),
            "ratio": masked_mean(torch.exp(log_ratio), mask),
        }
    return loss, stats


def groups_all_equal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N,)`` scores → ``(N / group_size,)`` True where every answer of the group scored the same: its group
    baseline is its own score, every advantage 0, and it teaches nothing (DAPO's dynamic sampling drops it)."""
    groups = _grouped(scores, group_size)
    return (groups == groups[:, :1]).all(dim=1)


# --- preference optimisation: DPO and its variants ---------------------------------------------------
# Inputs are per-pair sequence log-probabilities ``(B,)``: the policy's ``chosen_logprobs`` /
# ``rejected_logprobs`` (with grad) and, except for SimPO, the frozen reference's ``ref_chosen_logprobs`` /
# ``ref_rejected_logprobs`` (detached inside). The implicit reward of a response is β·(log π - log π_ref)
# (SimPO: β·mean log π). Shared stats: ``accuracy`` (fraction with chosen reward > rejected reward;
# ties count as wrong), ``margin`` (mean chosen - rejected reward), ``chosen_reward``,
# ``rejected_reward``, ``chosen_logprobs``, ``rejected_logprobs`` (means).


def _preference_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      chosen_logprobs: torch.Tensor, rejected_logprobs: torch.Tensor) -> Stats:
    with torch.no_grad():
        return {
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
            "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(),
            "chosen_logprobs": chosen_logprobs.mean(),
            "rejected_logprobs": rejected_logprobs.mean(),
        }


def dpo_loss(
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    beta: float = 0.1,
) -> Tuple[torch.Tensor, Stats]:
    """DPO (Rafailov et al. 2023): mean over pairs of -log σ(β·h).

    h = [log π(c) - log π_ref(c)] - [log π(r) - log π_ref(r)]; all inputs ``(B,)`` summed log-probs of
    the response tokens. At initialisation (π = π_ref) h = 0 and the loss is log 2 on any batch.
    """
    chosen_rewards = beta * (chosen_logprobs - ref_chosen_logprobs.detach())
    rejected_rewards = beta * (rejected_logprobs - ref_rejected_logprobs.detach())
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, _preference_stats(chosen_rewards, rejected_rewards, chosen_logprobs, rejected_logprobs)


def ipo_loss(
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    beta: float = 0.1,
) -> Tuple[torch.Tensor, Stats]:
    """IPO (Azar et al. 2023, eq. 17): mean over pairs of (h - 1/(2β))², β the paper's τ.

    h as in ``dpo_loss``; inputs ``(B,)``. A squared loss regresses the log-ratio gap to a fixed
    target 1/(2β) instead of pushing it to infinity, so it does not overfit deterministic preferences.
    The IPO authors (and TRL) feed per-token mean log-probs here, not sums: the target then does not
    depend on the response length. This function takes whichever the caller passes.
    """
    chosen_ratio = chosen_logprobs - ref_chosen_logprobs.detach()
    rejected_ratio = rejected_logprobs - ref_rejected_logprobs.detach()
    loss = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)).pow(2).mean()
    return loss, _preference_stats(beta * chosen_ratio, beta * rejected_ratio, chosen_logprobs, rejected_logprobs)


def cdpo_loss(
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> Tuple[torch.Tensor, Stats]:
    """Conservative DPO (Mitchell 2023): mean of -(1-ε)·log σ(β·h) - ε·log σ(-β·h).

    The DPO loss when a share ε of the preference labels is assumed flipped; ε = 0 is ``dpo_loss``.
    The optimum is at a finite gap (σ(β·h) = 1 - ε) instead of h → ∞. Inputs ``(B,)`` as in ``dpo_loss``.
    """
    chosen_rewards = beta * (chosen_logprobs - ref_chosen_logprobs.detach())
    rejected_rewards = beta * (rejected_logprobs - ref_rejected_logprobs.detach())
    logits = chosen_rewards - rejected_rewards
    loss = (-(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)).mean()
    return loss, _preference_stats(chosen_rewards, rejected_rewards, chosen_logprobs, rejected_logprobs)


def simpo_loss(
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> Tuple[torch.Tensor, Stats]:
    """SimPO (Meng et al. 2024): mean over pairs of -log σ(β·c - β·r - γ), no reference model.

    chosen_logprobs, rejected_logprobs ``(B,)`` are *mean* log-probs per response token (the length
    normalisation keeps long answers from winning by length); γ is the target reward margin. With
    c = r the loss is log(1 + e^γ), not log 2: the margin asks for a gap from the start.
    """
    chosen_rewards = beta * chosen_logprobs
    rejected_rewards = beta * rejected_logprobs
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _preference_stats(chosen_rewards, rejected_rewards, chosen_logprobs, rejected_logprobs)
