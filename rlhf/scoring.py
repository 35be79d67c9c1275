"""Answering and scoring held-out prompts: a judge or a reward model as a scorer, seeded sampling, the KL of a
policy's own answers to a reference. Shared by `rlhf eval` and PPO's reward-hacking monitor."""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.data import Messages, encode_conversation, prompt_text
from rlhf.hardware import autocast
from rlhf.losses import kl_k1
from rlhf.models import forward_logits, load_reward_model, load_tokenizer, resolve_model_path, score_sequences
from rlhf.ops import logprobs_from_logits, masked_sum
from rlhf.rollout import Rollout, sample

# A judge or a reward model: (prompts, answers) → one score per answer.
Scorer = Callable[[list[Messages], list[str]], list[float]]


def reward_scorer(reward_model, tokenizer, device, bf16: bool) -> Scorer:
    """Raw reward-model scores, the chat written by the reward model's own template (as PPO scores it)."""
    def score(prompts: list[Messages], answers: list[str]) -> list[float]:
        conversations = [encode_conversation(tokenizer, p, a) for p, a in zip(prompts, answers)]
        return score_sequences(reward_model, conversations, reward_model.config.pad_token_id, device, bf16).tolist()

    return score


def load_reward_scorer(name: str, device, bf16: bool) -> Scorer:
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    return reward_scorer(load_reward_model(path, device, tokenizer, trainable=False, bf16_linears=bf16), tokenizer,
                         device, bf16)


def load_judge(name: str, device, bf16: bool, annotator=None) -> Scorer | None:
    """'gold': the built-in simulated annotator without noise (or the `annotator` given); a folder (or
    `reward:DIR`, as `rlhf label` names judges): that reward model plays the judge; '' or 'none': no judge."""
    if name in ("", "none"):
        return None
    if name == "gold":
        if annotator is None:
            from rlhf.annotators import SimulatedAnnotator

            annotator = SimulatedAnnotator(noise_temperature=0.0, device=str(device))
        return lambda prompts, answers: annotator.gold_scores([prompt_text(p) for p in prompts], answers)
    return load_reward_scorer(name.removeprefix("reward:"), device, bf16)


def sample_seeded(model, tokenizer, prompts: list[Messages], max_new_tokens: int, temperature: float,
                  batch_size: int, bf16: bool, seed: int, progress: bool = False) -> Rollout:
    """Sample with a fixed seed inside a forked RNG: every model (and every monitor check) gets the same random
    stream, and the caller's own random state (PPO's training) is left exactly as it was."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return sample(model, tokenizer, prompts, max_new_tokens, temperature, batch_size=batch_size, bf16=bf16,
                      progress=progress)


def answer_and_score(model, tokenizer, prompts: list[Messages], judge: Scorer | None, reward: Scorer | None,
                     max_new_tokens: int, temperature: float, batch_size: int, bf16: bool, seed: int,
                     progress: bool = False) -> tuple[Rollout, dict[str, list[float]]]:
    """→ (rollout, per-answer scores: gold (if a judge), reward_model (if a reward model), length, ended)."""
    rollout = sample_seeded(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, bf16, seed, progress)
    scores = {"length": rollout.lengths.float().tolist(), "ended": rollout.ended.float().tolist()}
    if judge is not None:
        scores["gold"] = judge(prompts, rollout.texts)
    if reward is not None:
        scores["reward_model"] = reward(prompts, rollout.texts)
    return rollout, scores


@torch.no_grad()
def sequence_kl(policy, reference, rollout: Rollout, temperature: float, bf16: bool, device,
                batch_size: int = 16) -> torch.Tensor:
    """Per-response KL(π‖π_ref) estimated on the policy's own samples: Σ_t k1 = Σ_t log π − log π_ref → (B,)."""
    width = rollout.prompt_ids.shape[1]
    totals = []
    for start in range(0, rollout.response_ids.shape[0], batch_size):
        part = rollout.select(slice(start, start + batch_size)).to(device)
        logprobs = []
        for model in (policy, reference):
            with autocast(device, bf16):
                logits, _ = forward_logits(model, part.input_ids, part.attention_mask)
            logprobs.append(logprobs_from_logits(logits[:, width - 1:-1], part.response_ids, temperature))
        totals.append(masked_sum(kl_k1(*logprobs), part.response_mask, dim=1).cpu())
    return torch.cat(totals)
