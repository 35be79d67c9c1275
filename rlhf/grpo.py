"""`rlhf grpo`: the online-RL stage of `rlhf.ppo` with GRPO's defaults (Shao et al. 2024, DeepSeekMath).

What: each prompt gets `group_size` answers; an answer's advantage is its score minus its group's mean, over the
group's std, on every one of its tokens; no value function. The KL to the frozen start model is a k3 loss term
(β = 0.04) instead of a penalty in the reward. The loss is the clipped surrogate, here averaged over all the
batch's tokens (DAPO's `token` aggregation, which TRL also uses by default, rather than the paper's per-answer
mean; `loss_aggregation: sequence` gives the paper's).
This file holds only the defaults: the loop is PPO's (`rlhf/ppo.py`), so every PPO key works here too, and
`--advantage dr_grpo|rloo|reinforce_pp|gae` switches estimator. Rewards from a reward model, Python reward
functions (`--reward_fn rlhf.verifiable:reward`), or both; `configs/arithmetic.yaml` trains on the built-in
arithmetic task with its checker alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf import config as cfg
from rlhf import ppo


@dataclass
class Config(ppo.Config):
    name: ClassVar[str] = "grpo"
    output_dir: str = cfg.field("runs/grpo", "where the trained policy is written")
    advantage: str = cfg.field("grpo", "grpo (group mean and std), dr_grpo (group mean only), rloo (leave-one-out "
                                       "mean), reinforce_pp (batch-whitened returns) or gae (PPO with a critic)")
    group_size: int = cfg.field(4, "answers sampled per prompt (at least 2 for grpo, dr_grpo and rloo)")
    kl_in: str = cfg.field("loss", "where the KL to the reference goes: loss (β·k3 as a loss term, GRPO's way) or "
                                   "reward (-β·k1 in the reward)")
    beta: float = cfg.field(0.04, "KL coefficient β")
    ppo_epochs: int = cfg.field(1, "passes over each batch (1: the ratio is 1 at every update's start)")
    mini_batch_size: int = cfg.field(32, "responses per gradient step")
    loss_aggregation: str = cfg.field("token", "the policy loss over tokens: token (mean over the batch's tokens), "
                                               "sequence (per answer, then over answers: the GRPO paper) or constant "
                                               "(Dr. GRPO)")
    missing_eos_penalty: float = cfg.field(0.0, "subtracted from the score of a response that never ends")


def main(config: Config) -> dict:
    return ppo.main(config)
