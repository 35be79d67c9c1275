"""Stage 3: PPO against the reward model, anchored to the frozen SFT model by a per-token KL penalty.

What: the policy answers prompts; the reward model scores each answer; the reward a token earns is
−β·KL_t(π‖π_ref), and the answer's (normalised) score is added on its last token. GAE turns these
rewards into advantages, and the clipped PPO objective updates the policy and its value head.
Papers: Schulman et al. 2017 (PPO); Ziegler et al. 2019 and Stiennon et al. 2020 (KL-shaped reward,
adaptive β); Ouyang et al. 2022 step 3; Huang et al. 2024, "The N+ implementation details of RLHF
with PPO" (EOS truncation, missing-EOS penalty, reward normalisation, dropout off, temperature).
Our deviations: by default (`critic: head`) the critic is a zero-initialised linear value head on the
policy's last hidden state (the cheap option on one CPU: one forward pass gives logits and values);
`critic: model` is the classic set-up of four models (a separate critic started from the reward model,
as in Ouyang et al. and TRL), which the side-by-side benchmark against TRL uses. The reference is the
same weights with the LoRA adapter off when LoRA is on. Scores are normalised with the mean/std the
reward stage measured on reference samples.
Reward-hacking monitor (`rlhf.monitor`): every `monitor_every` steps the policy answers a fixed held-out batch,
which the gold judge and the reward model both score; it only logs, and warns when the two part ways.

Critic-free choices (`advantage`, the same loop; `rlhf grpo` is this stage with GRPO's defaults): `grpo` (Shao et
al. 2024), `dr_grpo` (Liu et al. 2025), `rloo` (Ahmadian et al. 2024) sample `group_size` answers per prompt and
baseline each answer's score against its group; `reinforce_pp` (Hu 2025) whitens the KL-shaped returns over the
batch. None of them has a value function. The KL to the reference goes in the reward (`kl_in: reward`, k1) or in
the loss (`kl_in: loss`, k3, GRPO's way); DAPO's options (Yu et al. 2025): `clip_low`/`clip_high`,
`dynamic_sampling`, `loss_aggregation: token`, `overlong_buffer`. Rewards come from a reward model, Python reward
functions (`reward_fn`, `rlhf.rewards`), or both summed. The equations are in `rlhf.losses`.

Under torchrun (`rlhf.distributed`): each process samples and scores its part of the prompts with the weights
gathered once per round, the log-probabilities of the batch are computed a part per process and exchanged, so that
every statistic is the global batch's, and each mini-batch's update is split over the processes (FSDP2).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from rlhf import config as cfg
from rlhf import distributed, fast, losses
from rlhf.annotators import SimulatedAnnotator
from rlhf.checkpoint import TrainingState, trim_metrics
from rlhf.data import (
    LengthPolicy,
    Messages,
    encode_conversation,
    next_batch,
    position_ids_from_mask,
    prompt_text,
    read_prompt_rows,
    resolve_data_path,
    write_jsonl,
)
from rlhf.guard import BadSteps
from rlhf.hardware import Precision, autocast, pick_device, resolve_bf16
from rlhf.models import (
    adapter_disabled,
    add_lora,
    backbone_and_head,
    check_writable,
    count_parameters,
    forward_logits,
    gathered_for_saving,
    load_causal_lm,
    load_reward_model,
    load_reward_normalisation,
    load_tokenizer,
    optimizer_and_schedule,
    packed_width,
    prompt_once_hidden,
    resolve_model_path,
    save_atomic,
    score_sequences,
)
from rlhf.monitor import ppo_monitor
from rlhf.ops import logprobs_and_entropy_from_logits, logprobs_from_logits, masked_mean, whiten, zero_outside
from rlhf.rewards import WeightedRewards
from rlhf.rollout import Rollout, concatenate, sample
from rlhf.tracking import RunLog, run_to_end, say, seed_everything

# advantage → the group baseline of each answer's score (None: per-token advantages, `gae` and `reinforce_pp`)
ADVANTAGES = {"gae": None, "reinforce_pp": None, "grpo": losses.grpo_advantages,
              "dr_grpo": losses.dr_grpo_advantages, "rloo": losses.rloo_advantages}
AGGREGATIONS = {"token": losses.token_mean, "sequence": losses.sequence_mean, "constant": losses.constant_mean}


@dataclass
class Config:
    name: ClassVar[str] = "ppo"  # the stage's name in what it prints (`rlhf grpo` runs this loop as "grpo")
    policy: str = cfg.field("runs/sft", "the SFT model: the policy's start and the frozen KL reference")
    reward_model: str = cfg.field("runs/reward", "the reward model folder (from `rlhf reward`); '' or 'none' = no "
                                                 "reward model (then reward_fn gives the rewards)")
    reward_fn: list[str] = cfg.field([], "Python reward functions, path/to/file.py:function or module:function, "
                                         "called with the prompts, the completions and the rows' other fields "
                                         "(e.g. rlhf.verifiable:reward); summed with the reward model's score")
    reward_weights: list[float] = cfg.field([], "a weight per reward function ([] = 1 each)")
    data: str = cfg.field("builtin:prompts_train", "prompts file or builtin:prompts_train")
    max_prompts: int = cfg.field(0, "use only the first N prompts of data (0 = all), as `rlhf pairs` does")
    output_dir: str = cfg.field("runs/ppo", "where the trained policy is written")
    steps: int = cfg.field(10, "PPO iterations (each: sample a batch, score, update)")
    batch_size: int = cfg.field(32, "responses sampled per iteration (batch_size / group_size prompts)")
    advantage: str = cfg.field("gae", "gae (PPO with a critic), grpo, dr_grpo, rloo (group baselines, no critic) or "
                                      "reinforce_pp (batch-whitened returns, no critic)")
    group_size: int = cfg.field(1, "answers sampled per prompt (at least 2 for grpo, dr_grpo and rloo)")
    kl_in: str = cfg.field("reward", "where the KL to the reference goes: reward (-β·k1 per token, or per answer "
                                     "for the group baselines) or loss (β·k3 as a loss term, GRPO's way)")
    loss_aggregation: str = cfg.field("token", "the policy loss over tokens: token (mean over the batch's tokens: "
                                               "PPO, DAPO), sequence (mean per answer, then over answers: GRPO) or "
                                               "constant (sum / (answers · max_new_tokens): Dr. GRPO)")
    dynamic_sampling: bool = cfg.field(False, "DAPO: drop groups whose answers all scored the same and sample "
                                              "other prompts in their place")
    dynamic_sampling_tries: int = cfg.field(4, "with dynamic_sampling: sampling rounds per iteration at most; "
                                               "short of enough groups, the last round's others fill the batch")
    overlong_buffer: int = cfg.field(0, "DAPO's soft overlong penalty: an answer longer than max_new_tokens - this "
                                        "loses up to 1 (linearly to the limit); 0 = off")
    mini_batch_size: int = cfg.field(16, "responses per gradient step (with group_size, a multiple of it keeps a "
                                         "prompt's answers in one mini-batch)")
    ppo_epochs: int = cfg.field(2, "passes over each batch")
    max_new_tokens: int = cfg.field(64, "longest response in tokens")
    max_prompt_length: int = cfg.field(128, "longer prompts are cut from the left or skipped (see truncation)")
    truncation: str = cfg.field("truncate", "prompts over max_prompt_length: truncate or skip")
    temperature: float = cfg.field(0.7, "sampling temperature (logprobs are recomputed at the same temperature)")
    lr: float = cfg.field(1e-5, "policy learning rate")
    value_lr: float = cfg.field(1e-3, "value head learning rate (critic: head; the head starts at zero and must catch "
                                      "up fast)")
    critic_lr: float = cfg.field(1e-5, "learning rate of a separate critic (critic: model): a full model, so about the "
                                       "policy's lr, not the value head's")
    kl_estimator: str = cfg.field("k1", "per-token KL estimator in the reward: k1 (log ratio) or k3")
    beta: float = cfg.field(0.05, "KL coefficient β (initial value when target_kl is set); 0 = no KL penalty",
                            check=cfg.at_least(0))
    target_kl: float = cfg.field(0.0, "target KL per response for the adaptive controller (0 = fixed β)")
    kl_horizon: int = cfg.field(10000, "adaptive controller horizon in responses")
    gamma: float = cfg.field(1.0, "discount")
    lam: float = cfg.field(0.95, "GAE λ")
    clip: float = cfg.field(0.2, "policy ratio clip")
    clip_low: float = cfg.field(0.0, "lower ratio clip: ratio ≥ 1 - clip_low (0 = clip)")
    clip_high: float = cfg.field(0.0, "upper ratio clip: ratio ≤ 1 + clip_high (0 = clip; DAPO: 0.28)")
    value_clip: float = cfg.field(0.2, "value clip")
    vf_coef: float = cfg.field(0.1, "value loss coefficient")
    normalize_reward: bool = cfg.field(True, "normalise scores to ~N(0,1) on reference samples (from the reward stage)")
    missing_eos_penalty: float = cfg.field(1.0, "subtracted from the score of a response that never ends")
    critic: str = cfg.field("head", "the value function: 'head' (a linear head on the policy, one forward pass) or "
                                    "'model' (a separate critic started from the reward model, trained at critic_lr)")
    lora_r: int = cfg.field(0, "LoRA rank (0 = train all weights); with LoRA the reference is the adapter switched off")
    lora_alpha: int = cfg.field(16, "LoRA alpha")
    gold: bool = cfg.field(True, "also score rollouts with the built-in gold annotator, for logging only")
    monitor_every: int = cfg.field(4, "reward-hacking monitor: score a fixed held-out batch every N steps (and at the "
                                      "last) with the judge and the reward model, for logging only (0 = off)")
    monitor_prompts: str = cfg.field("builtin:prompts_heldout", "the monitor's held-out prompts")
    monitor_size: int = cfg.field(32, "how many of them the monitor uses (the first N)")
    monitor_judge: str = cfg.field("gold", "the monitor's judge: 'gold' (the built-in simulated annotator) or a "
                                           "reward-model folder")
    monitor_window: int = cfg.field(3, "warn when the reward model's score rose at each of the last N checks while the "
                                       "gold score fell")
    monitor_length_drift: float = cfg.field(0.5, "warn when the mean answer length moves more than this share from the "
                                                 "first check")
    monitor_distinct_drift: float = cfg.field(0.15, "warn when distinct-2 falls more than this share from the first "
                                                    "check")
    sample_every: int = cfg.field(5, "write sample responses every N steps")
    generation_batch_size: int = cfg.field(64, "prompts sampled at once")
    reuse_rollout_forward: bool = cfg.field(True, "with ppo_epochs 1 and mini_batch_size = batch_size, the update "
                                                  "reuses the rollout's forward pass instead of a second one "
                                                  "(same result)")
    side_by_side: bool = cfg.field(True, "CPU with critic: model: run the policy's and the critic's backward passes at "
                                         "once, each on half the cores (same gradients; faster where one model's "
                                         "matmuls do not fill the cores)")
    bf16: Precision = cfg.field("auto", "bf16 autocast: auto (where the CPU or GPU has it natively), true or false")
    compile: bool = cfg.field(False, "torch.compile each decoder layer for the training and scoring passes (and, with "
                                     "compile_decode, the rollout's decode step as one graph): faster steps after a "
                                     "one-off compile; needs a C++ compiler")
    compile_decode: bool = cfg.field(True, "with compile: sampling's decode step compiled too (one more compile, "
                                           "~20 s, per batch size and cache-length bucket)")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    fsdp: distributed.Sharding = cfg.field("auto", "shard the policy's weights, gradients and optimiser state, and the "
                                                   "frozen reference and reward model, over the processes with FSDP2: "
                                                   "auto (with more than one process), true or false")
    activation_checkpointing: bool = cfg.field(False, "recompute each decoder layer in the backward pass (less memory, "
                                                      "about one more forward pass)")
    seed: int = cfg.field(0, "random seed")
    save_every: int = cfg.field(5, "save the whole training state every N steps (0 = only on SIGTERM/SIGINT)")
    keep_last: int = cfg.field(1, "training states kept (the newest)")
    resume: str = cfg.field("auto", "auto (continue from the saved training state if there is one), never (start over) "
                                    "or must")
    resume_force: bool = cfg.field(False, "resume even when the config or the data differ from the saved state's")
    max_bad_steps: int = cfg.field(3, "stop after this many updates in a row with a non-finite loss or gradient norm "
                                      "(each is skipped)")

    def __post_init__(self):
        if self.mini_batch_size > self.batch_size or self.batch_size % self.mini_batch_size:
            raise cfg.ConfigError(f"'mini_batch_size' ({self.mini_batch_size}) must divide 'batch_size' "
                                  f"({self.batch_size})")
        if self.temperature <= 0:
            raise cfg.ConfigError(f"'temperature' must be greater than 0 (PPO samples), got {self.temperature}")


# a packed row (`shared_prompt_packing`) grows no wider than this or the unpacked width, whichever is larger:
# attention's cost grows with the square of a row's width while the tokens saved grow only linearly
PACKED_WIDTH = 512


def shared_prompt_packing(model, rollout: Rollout, max_width: int = PACKED_WIDTH):
    """The rollout's answers grouped behind one copy of their prompt (a group's answers, for GRPO and the other
    group methods), for `prompt_once_hidden` → (groups, the rollout rows in group order); None when that saves
    nothing (no two rows share a prompt, as in PPO with one answer per prompt) or the model cannot take it
    (`backbone_and_head`). A group wider than the cap is split over several rows."""
    if backbone_and_head(model) is None:
        return None
    rows, response_width = rollout.response_ids.shape
    unpacked_width = rollout.prompt_ids.shape[1] + response_width
    prompt_lengths, answer_lengths = rollout.prompt_mask.sum(1).tolist(), rollout.response_mask.sum(1).tolist()
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for row, length in enumerate(prompt_lengths):  # the prompts are left-padded
        prompt = tuple(rollout.prompt_ids[row, rollout.prompt_ids.shape[1] - length:].tolist())
        by_prompt.setdefault(prompt, []).append(row)
    if len(by_prompt) == rows:
        return None
    cap = max(max_width, unpacked_width)
    response_ids = rollout.response_ids.tolist()
    groups, order = [], []
    for prompt, members in by_prompt.items():
        current: list[int] = []
        filled = len(prompt)  # the current packed row's width so far
        for row in members + [None]:
            if current and (row is None or filled + answer_lengths[row] > cap):
                groups.append((list(prompt), [response_ids[r][:answer_lengths[r]] for r in current]))
                order += current
                current, filled = [], len(prompt)
            if row is not None:
                current.append(row)
                filled += answer_lengths[row]
    if len(groups) * packed_width(groups) >= 0.9 * rows * unpacked_width:
        return None
    return groups, order


def mini_batch_order(config: Config, device) -> torch.Tensor:
    """A random order of the batch's rows for one epoch's mini-batches. With answers in groups (group_size > 1)
    and mini-batches of whole groups, whole groups are shuffled (as verl counts its mini-batches in prompts): a
    mini-batch then holds every answer to its prompts, and its passes read each prompt once
    (`shared_prompt_packing`); shuffled row by row, a prompt's answers spread over the mini-batches and little is
    shared."""
    group = config.group_size
    if group > 1 and config.mini_batch_size % group == 0:
        groups = torch.randperm(config.batch_size // group, device=device)
        return (groups[:, None] * group + torch.arange(group, device=device)).flatten()
    return torch.randperm(config.batch_size, device=device)


def response_logprobs_values(model, value_head, rollout: Rollout, temperature: float, bf16: bool, device,
                             want_values: bool = True, want_entropy: bool = False):
    """Log-probabilities (B, R) of the sampled response tokens, values (B, R) and entropy, from one forward pass.

    Logits are divided by the sampling temperature, so that the ratio π/π_old compares the same
    distribution the tokens were drawn from. The sequence carries the sampling-time padding; or, where
    several answers share a prompt, it is read once for all of them (`shared_prompt_packing`: every token has
    the hidden state it has in its own sequence, to rounding). `value_head` None (a separate critic gives the
    values, see `critic_values`) means no values here.
    """
    prompt_width, response_width = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    want_values = want_values and value_head is not None
    packing = shared_prompt_packing(model, rollout)
    width = packed_width(packing[0]) if packing else prompt_width + response_width
    with autocast(device, bf16), fast.attention_for_width(device, width, bf16):
        if packing:
            groups, order = packing
            hidden = prompt_once_hidden(model, groups, device, response_width)
            hidden = hidden[torch.tensor(order).argsort().to(device)]  # back to the rollout's rows
            logits = backbone_and_head(model)[1](hidden)
        else:
            # position t predicts token t+1: the response tokens are predicted from prompt_width-1 on, so only the
            # last response_width+1 positions need the LM head (the prompt's would be computed and thrown away)
            logits, hidden = forward_logits(model, rollout.input_ids, rollout.attention_mask, want_hidden=want_values,
                                            logits_to_keep=response_width + 1)
            logits = logits[:, :-1]
            hidden = hidden[:, prompt_width - 1:-1] if want_values else None
        values = value_head(hidden).squeeze(-1).float() if want_values else None
    if want_entropy:
        logprobs, entropy = logprobs_and_entropy_from_logits(logits, rollout.response_ids, rollout.response_mask,
                                                             temperature)
    else:
        logprobs, entropy = logprobs_from_logits(logits, rollout.response_ids, temperature), None
    return logprobs, values, entropy


def critic_values(critic, rollout: Rollout, bf16: bool, device) -> torch.Tensor:
    """Values (B, R) from a separate critic: a sequence classifier's backbone, its score head read at every
    position (the value of the state before each response token), with the sampling-time padding."""
    prompt_width = rollout.prompt_ids.shape[1]
    backbone = getattr(critic, critic.base_model_prefix)
    mask = rollout.attention_mask
    with autocast(device, bf16), fast.attention_for_width(device, mask.shape[1], bf16):
        hidden = backbone(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False).last_hidden_state
        return critic.score(hidden[:, prompt_width - 1:-1]).squeeze(-1).float()


@dataclass
class Models:
    """The four roles of PPO: the policy (with its value head, or a separate critic; neither for the critic-free
    advantages), the frozen reference (None with LoRA: the policy with its adapter off) and the frozen reward model
    (None when reward functions alone give the rewards), with its score normalisation."""
    tokenizer: object
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    reward_model: torch.nn.Module | None
    reward_tokenizer: object
    value_head: torch.nn.Module | None
    critic: torch.nn.Module | None
    reward_mean: float
    reward_std: float
    reward_functions: WeightedRewards | None = None

    def policy_forward(self, rollout: Rollout, config: Config, bf16: bool, device, want_entropy: bool = False):
        """π's log-probabilities, the values and (optionally) the entropy of the rollout's responses."""
        logprobs, values, entropy = response_logprobs_values(self.policy, self.value_head, rollout, config.temperature,
                                                              bf16, device, want_entropy=want_entropy)
        if self.critic is not None:  # in the returns' units: the critic starts as the reward model, raw scores
            values = (critic_values(self.critic, rollout, bf16, device) - self.reward_mean) / self.reward_std
        return logprobs, values, entropy

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout, config: Config, bf16: bool, device) -> torch.Tensor:
        if self.reference is not None:
            return response_logprobs_values(self.reference, None, rollout, config.temperature, bf16, device)[0]
        with adapter_disabled(self.policy):
            return response_logprobs_values(self.policy, None, rollout, config.temperature, bf16, device)[0]

    def optimiser(self, config: Config):
        """AdamW over the policy (at lr) and the value head or critic (at value_lr), linear decay over every update
        → (optimiser, schedule, policy parameters, critic parameters)."""
        policy_parameters = [p for p in self.policy.parameters() if p.requires_grad]
        value_function = self.critic or self.value_head
        critic_parameters = list(value_function.parameters()) if value_function is not None else []
        updates = config.steps * config.ppo_epochs * (config.batch_size // config.mini_batch_size)
        critic_lr = config.critic_lr if self.critic is not None else config.value_lr
        groups = [{"params": policy_parameters, "lr": config.lr}]
        groups += [{"params": critic_parameters, "lr": critic_lr}] if critic_parameters else []
        optimizer, schedule = optimizer_and_schedule(groups, config.lr, 0.0, updates, 0)
        return optimizer, schedule, policy_parameters, critic_parameters

    def scores(self, prompts: list[Messages], fields: dict[str, list], rollout: Rollout, config: Config, bf16: bool,
               device):
        """→ (the reward model's raw scores of the answers (the chat as its template writes it), None without one;
        the scores optimised: the reward model's normalised to ~N(0, 1) on reference samples, plus the weighted
        reward functions, minus the penalties for an answer that never ended and (DAPO) one that ran long; each
        reward function's mean)."""
        raw, function_means = None, {}
        scores = torch.zeros(len(prompts), device=device)
        if self.reward_model is not None:
            conversations = [encode_conversation(self.reward_tokenizer, p, t) for p, t in zip(prompts, rollout.texts)]
            raw = score_sequences(self.reward_model, conversations, self.reward_model.config.pad_token_id, device,
                                  bf16).to(device)
            scores = (raw - self.reward_mean) / self.reward_std
        if self.reward_functions is not None:
            values, function_means = self.reward_functions([prompt_text(p) for p in prompts], rollout.texts, fields)
            scores = scores + torch.tensor(values, device=device)
        scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
        if config.overlong_buffer:
            scores = scores + losses.overlong_penalty(rollout.lengths, config.max_new_tokens, config.overlong_buffer)
        return raw, scores, function_means


def load_models(config: Config, device, bf16: bool) -> Models:
    """The models PPO needs, sharded with FSDP2 where `fsdp` says so: the policy, and the frozen reference and
    reward model too, as large as the policy (a whole copy of each on every process would take back what sharding
    the policy saved). Their frozen Linear weights stay fp32 then (FSDP shards one dtype per unit)."""
    sharded = distributed.use_fsdp(config.fsdp)
    policy_path = resolve_model_path(config.policy)
    tokenizer = load_tokenizer(policy_path)
    policy = load_causal_lm(policy_path, device)
    reference = None
    if config.lora_r > 0:
        policy = add_lora(policy, config.lora_r, config.lora_alpha)
    else:
        reference = load_causal_lm(policy_path, device, trainable=False, bf16_linears=bf16 and not sharded)
    reward_path = reward_tokenizer = reward_model = None
    if uses_reward_model(config):
        reward_path = resolve_model_path(config.reward_model)
        reward_tokenizer = load_tokenizer(reward_path)
        reward_model = load_reward_model(reward_path, device, reward_tokenizer, trainable=False,
                                         bf16_linears=bf16 and not sharded)
    functions = WeightedRewards(config.reward_fn, config.reward_weights) if config.reward_fn else None
    # the value function, for GAE only: the critic-free advantages take their baseline from the other answers
    critic = value_head = None
    if config.advantage == "gae" and config.critic == "model":  # a fourth model: a trainable copy of the reward model
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"critic: model reads the policy's token ids, but the reward model {reward_path} has "
                             f"another tokenizer than the policy {policy_path}; use critic: head")
        critic = load_reward_model(reward_path, device, reward_tokenizer, trainable=True)
        # sharded like a reward model in training: its backbone and its score head are called one by one
        critic = distributed.parallel(critic, config, bf16, device, units=[critic.base_model, critic.score])
    elif config.advantage == "gae":  # a zero-initialised linear head on the policy's last hidden state
        text_config = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
        value_head = torch.nn.Linear(text_config.hidden_size, 1).to(device)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    if config.compile:
        fast.compile_layers(policy, reference, reward_model, critic)
    trainable, total = count_parameters(policy)
    # FSDP2 under torchrun (`fsdp`); the value head, a few thousand numbers, stays whole on every process
    policy = distributed.parallel(policy, config, bf16, device)
    reference = distributed.parallel(reference, config, bf16, device) if reference is not None else None
    reward_model = distributed.parallel(reward_model, config, bf16, device) if reward_model is not None else None
    normalised = config.normalize_reward and reward_path is not None
    mean, std = load_reward_normalisation(reward_path) if normalised else (0.0, 1.0)
    sources = ([f"reward model {reward_path} (normalised with mean {mean:.3f}, std {std:.3f})"] if reward_path else [])
    sources += [f"reward functions {', '.join(config.reward_fn)}"] if functions else []
    say(f"[{config.name}] policy {policy_path} ({trainable / 1e6:.1f}M of {total / 1e6:.1f}M trained), advantage "
        f"{config.advantage}, {' + '.join(sources)} on {device}")
    return Models(tokenizer, policy, reference, reward_model, reward_tokenizer, value_head, critic, mean, std,
                  functions)


def uses_reward_model(config: Config) -> bool:
    return config.reward_model not in ("", "none")


def check(config: Config) -> None:
    if config.critic not in ("head", "model"):
        raise ValueError(f"critic must be 'head' or 'model', got '{config.critic}'")
    if config.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', got '{config.kl_estimator}'")
    if config.batch_size % config.mini_batch_size:
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of mini_batch_size "
                         f"({config.mini_batch_size})")
    if config.advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got '{config.advantage}'")
    if config.group_size < 1 or (ADVANTAGES[config.advantage] is not None and config.group_size < 2):
        raise ValueError(f"advantage '{config.advantage}' baselines each answer against the other answers to its "
                         f"prompt: group_size must be at least 2, got {config.group_size}")
    if config.batch_size % config.group_size:
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of group_size ({config.group_size}): "
                         f"each prompt gets group_size answers")
    if config.dynamic_sampling and (config.group_size < 2 or config.dynamic_sampling_tries < 1):
        raise ValueError(f"dynamic_sampling drops groups of equal scores: it needs group_size ≥ 2 (got "
                         f"{config.group_size}) and dynamic_sampling_tries ≥ 1 (got {config.dynamic_sampling_tries})")
    if config.kl_in not in ("reward", "loss"):
        raise ValueError(f"kl_in must be 'reward' or 'loss', got '{config.kl_in}'")
    if config.loss_aggregation not in AGGREGATIONS:
        raise ValueError(f"loss_aggregation must be one of {', '.join(AGGREGATIONS)}, got '{config.loss_aggregation}'")
    if not 0 <= config.overlong_buffer <= config.max_new_tokens:
        raise ValueError(f"overlong_buffer must be between 0 (off) and max_new_tokens ({config.max_new_tokens}), "
                         f"got {config.overlong_buffer}")
    if config.max_prompts < 0:
        raise ValueError(f"max_prompts must be ≥ 0 (0 = all), got {config.max_prompts}")
    if not uses_reward_model(config) and not config.reward_fn:
        raise ValueError("no reward: give a reward_model folder, reward_fn (path/to/file.py:function or "
                         "module:function), or both")
    if config.reward_weights and len(config.reward_weights) != len(config.reward_fn):
        raise ValueError(f"{len(config.reward_fn)} reward functions but {len(config.reward_weights)} reward_weights")
    if config.mini_batch_size < distributed.world_size():
        raise distributed.SettingError(f"mini_batch_size: each of the {distributed.world_size()} processes takes a "
                                       f"part of every mini-batch; mini_batch_size ({config.mini_batch_size}) must be "
                                       f"at least that")
    if not uses_reward_model(config) and config.advantage == "gae" and config.critic == "model":
        raise ValueError("critic: model starts the critic from the reward model: give reward_model, or use "
                         "critic: head")


def training_prompts(config: Config, tokenizer) -> tuple[list[Messages], list[dict]]:
    """The training prompts, cut or skipped at max_prompt_length and counted, with their rows' other fields (what
    reward functions are called with, e.g. an `answer`)."""
    lengths = LengthPolicy(config.max_prompt_length, config.truncation)
    rows = read_prompt_rows(resolve_data_path(config.data))
    fitted = [(lengths.fit_prompt_messages(tokenizer, p), fields)
              for p, fields in (rows[:config.max_prompts] if config.max_prompts else rows)]
    prompts = [p for p, _ in fitted if p is not None]
    fields = [f for p, f in fitted if p is not None]
    wanted = config.batch_size // config.group_size
    if len(prompts) < wanted:
        raise ValueError(f"{config.data}: {len(prompts)} usable prompts, fewer than batch_size / group_size = {wanted} "
                         f"(skipped {lengths.skipped} over max_prompt_length); lower batch_size or add prompts")
    say(f"[{config.name}] {len(prompts)} prompts ({lengths.skipped} skipped and {lengths.truncated} truncated at "
        f"max_prompt_length={config.max_prompt_length})")
    return prompts, fields


def sample_scored_batch(models: Models, config: Config, prompts: list[Messages], fields: list[dict], order: list[int],
                        rng: random.Random, bf16: bool, device):
    """Steps 1 and 2 of an iteration: group_size answers to each of batch_size / group_size prompts (next to each
    other), scored. With dynamic sampling (DAPO), groups whose answers all scored the same are dropped and new
    prompts sampled in their place, at most `dynamic_sampling_tries` rounds; short of enough, the last round's
    dropped groups fill the batch. → (rollout, its prompts, the reward model's raw scores (None without one), the
    scores optimised, what to log: sampling time, the share of groups of equal scores, each reward function's mean)."""
    k, wanted = config.group_size, config.batch_size // config.group_size
    kept: list[tuple[Rollout, list[Messages], torch.Tensor | None, torch.Tensor]] = []
    function_means: dict[str, list[float]] = {}
    have, tries, generation_seconds = 0, 0, 0.0
    while have < wanted:
        tries += 1
        index = next_batch(order, len(prompts), wanted - have, rng)
        batch_prompts = [prompts[i] for i in index for _ in range(k)]
        batch_fields = {key: [fields[i].get(key) for i in index for _ in range(k)]
                        for key in sorted({key for i in index for key in fields[i]})}
        rollout, raw, scores, means, seconds = sample_round(models, config, batch_prompts, batch_fields, bf16, device)
        generation_seconds += seconds
        for name, value in means.items():
            function_means.setdefault(name, []).append(value)
        groups = list(range(len(index)))
        if config.dynamic_sampling:
            equal = losses.groups_all_equal(scores, k).tolist()
            informative = [g for g in groups if not equal[g]]
            last_round = tries >= config.dynamic_sampling_tries
            groups = (informative + ([g for g in groups if equal[g]] if last_round else []))[:wanted - have]
        if len(groups) == len(index):
            kept.append((rollout, batch_prompts, raw, scores))
        elif groups:
            rows = torch.tensor([g * k + j for g in groups for j in range(k)], device=device)
            kept.append((rollout.select(rows), [batch_prompts[i] for i in rows.tolist()],
                         raw[rows] if raw is not None else None, scores[rows]))
        have += len(groups)
        if config.dynamic_sampling and tries >= config.dynamic_sampling_tries:
            break
    rollout = kept[0][0] if len(kept) == 1 else concatenate([r for r, _, _, _ in kept], models.tokenizer.pad_token_id)
    scores = torch.cat([s for _, _, _, s in kept])
    raw = torch.cat([r for _, _, r, _ in kept]) if kept[0][2] is not None else None
    extra = {"generation_seconds": generation_seconds}
    if k > 1:
        extra["equal_score_groups"] = losses.groups_all_equal(scores, k).float().mean().item()
    if config.dynamic_sampling:
        extra["sampling_rounds"] = tries
    extra.update({f"reward_fn/{name}": sum(v) / len(v) for name, v in function_means.items()})
    return rollout, [p for _, prompts_kept, _, _ in kept for p in prompts_kept], raw, scores, extra


def sample_round(models: Models, config: Config, batch_prompts: list[Messages], batch_fields: dict[str, list],
                 bf16: bool, device):
    """One round of sampling and scoring. Each process answers its part of the round's prompts (whole groups: a
    group's baseline needs all its answers), with the policy's whole weights gathered once for the round and then
    the reward model's (`distributed.gathered`: no collective per token), and every process gets the whole round
    back in prompt order. → (rollout, the reward model's raw scores (None without one), the scores optimised, each
    reward function's mean, seconds spent sampling)."""
    k = config.group_size
    groups = distributed.part_of(len(batch_prompts) // k)
    rows = slice(groups.start * k, groups.stop * k)
    prompts_here = batch_prompts[rows]  # empty on a process left idle by a round of fewer prompts than processes
    fields_here = {key: values[rows] for key, values in batch_fields.items()}
    if device.type == "cuda":  # the last update's queued kernels are not sampling time
        torch.cuda.synchronize(device)
    began = time.time()
    rollout = raw = scores = None
    means: dict[str, float] = {}
    with distributed.gathered(models.policy):
        if prompts_here:
            rollout = sample(models.policy, models.tokenizer, prompts_here, config.max_new_tokens, config.temperature,
                             batch_size=config.generation_batch_size, bf16=bf16,
                             compiled=config.compile and config.compile_decode).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.time() - began
    with distributed.gathered(models.reward_model):
        if rollout is not None:
            raw, scores, means = models.scores(prompts_here, fields_here, rollout, config, bf16, device)
    if not distributed.is_distributed():
        return rollout, raw, scores, means, seconds
    mine = (rollout.to("cpu"), None if raw is None else raw.cpu(), scores.cpu(), means, len(prompts_here)) \
        if rollout is not None else None
    parts = [part for part in distributed.gather_objects(mine) if part is not None]
    rollout = concatenate([part[0] for part in parts], models.tokenizer.pad_token_id).to(device)
    raw = torch.cat([part[1] for part in parts]).to(device) if parts[0][1] is not None else None
    scores = torch.cat([part[2] for part in parts]).to(device)
    answers = sum(part[4] for part in parts)
    means = {name: sum(part[3][name] * part[4] for part in parts) / answers for name in parts[0][3]}
    return rollout, raw, scores, means, seconds


def rows_of_every_process(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor's rows from every process, in rank order (the whole batch on every process; None stays None);
    the tensors themselves with one process."""
    if not distributed.is_distributed():
        return list(tensors)
    parts = distributed.gather_objects([None if t is None else t.detach().cpu() for t in tensors])
    return [None if t is None else torch.cat([part[i] for part in parts]).to(t.device) for i, t in enumerate(tensors)]


def main(config: Config) -> dict:
    """Train, save, and return the summary (the whole of `training`)."""
    return run_to_end(training(config))


def training(config: Config) -> Iterator[dict]:
    """The PPO run as a generator: set-up on the first `next`, then one logged row per iteration; its return
    value (StopIteration.value) is the summary, after the policy is saved. The benchmark steps it one iteration
    at a time; `main` runs it through."""
    check(config)
    # under torchrun each process samples its own answers: its own random stream (the prompts' order, drawn by `rng`
    # below, is the same everywhere)
    seed_everything(config.seed + distributed.rank())
    device = distributed.start(pick_device(config.device))  # a process group under torchrun; nothing alone
    bf16 = resolve_bf16(config.bf16, device)
    out = Path(config.output_dir)
    check_writable(out)
    started = time.time()

    # 0. models, prompts, the gold judge (logging only), the monitor, the optimiser
    models = load_models(config, device, bf16)
    tokenizer, policy = models.tokenizer, models.policy
    prompts, fields = training_prompts(config, tokenizer)
    gold = SimulatedAnnotator(noise_temperature=0.0, device=str(device)) if config.gold else None
    optimizer, schedule, policy_parameters, critic_parameters = models.optimiser(config)
    # the whole state is saved every save_every steps and on SIGTERM/SIGINT, and a rerun continues from it
    inputs = {"policy": resolve_model_path(config.policy), "data": resolve_data_path(config.data),
              **({"reward_model": resolve_model_path(config.reward_model)} if uses_reward_model(config) else {})}
    state = TrainingState(config.name, config, inputs, out)
    modules = {name: module for name, module in (("policy", policy), ("critic", models.critic),
                                                 ("value_head", models.value_head)) if module is not None}
    start, extra = state.resume(modules, optimizer, schedule)
    trim_metrics(out.parent / f"{out.name}_logs", start)
    log = RunLog(out.parent / f"{out.name}_logs")
    monitor = ppo_monitor(config, tokenizer, models.reward_model, models.reward_tokenizer, device, bf16, gold,
                          log.out_dir)
    # one epoch over one mini-batch: the update's forward pass is the rollout's own (the policy has not changed
    # in between), so its graph is kept and nothing runs twice
    reuse_forward = (config.reuse_rollout_forward and config.ppo_epochs == 1
                     and config.mini_batch_size == config.batch_size and not distributed.is_distributed())
    # with FSDP (or processes) the gradients are summed by `distributed.clip_gradients`, the value head's with them
    # a separate critic's backward beside the policy's, a share of the cores each (`rlhf.fast.lanes`)
    shared_gradients = distributed.is_distributed() or distributed.is_sharded(policy)
    lanes = fast.SideBySide(config.side_by_side and device.type == "cpu") \
        if models.critic is not None and not shared_gradients else None
    beta, rng, order, samples, history = config.beta, random.Random(config.seed), [], [], []
    bad_steps = BadSteps(config.name, config.max_bad_steps, unit="updates")
    if extra:
        beta, order, samples, history = extra["beta"], extra["order"], extra["samples"], extra["history"]
        rng.setstate(extra["rng"])
        monitor.checks, monitor.samples = extra["monitor_checks"], extra["monitor_samples"]
        bad_steps.load_state_dict(extra["bad_steps"])

    def trainer_values() -> dict:
        return {"beta": beta, "order": list(order), "samples": samples, "history": history, "rng": rng.getstate(),
                "monitor_checks": monitor.checks, "monitor_samples": monitor.samples,
                "bad_steps": bad_steps.state_dict()}

    from tqdm.auto import tqdm

    bar = tqdm(range(start, config.steps), desc=config.name, unit="step", initial=start, total=config.steps,
               disable=not distributed.is_main())
    state.watch_signals()
    clip_low, clip_high = config.clip_low or config.clip, config.clip_high or config.clip
    aggregate = AGGREGATIONS[config.loss_aggregation]
    aggregate_args = {"max_length": config.max_new_tokens} if config.loss_aggregation == "constant" else {}
    for step in bar:
        step_started = time.time()

        # 1. rollout: group_size answers to each of batch_size / group_size prompts (PPO: one each by default)
        # 2. score: the reward model reads the chat as its template writes it (normalised) and/or the reward
        #    functions read the answers and the rows' fields; penalise no EOS; with dynamic sampling, resample
        #    groups whose answers all scored the same
        rollout, batch_prompts, raw_scores, scores, sampling_stats = sample_scored_batch(
            models, config, prompts, fields, order, rng, bf16, device)
        mask = rollout.response_mask

        # 3. KL-shaped reward: π_old log-probs and values from the policy, π_ref log-probs from the reference
        #    (kl_in: loss keeps the KL out of the reward: it is a loss term in step 5); under torchrun each process
        #    computes its rows of the batch, and every process then holds all of them
        rows = distributed.part_of(rollout.response_ids.shape[0])
        rows_here = rollout.select(slice(rows.start, rows.stop)) if distributed.is_distributed() else rollout
        with torch.set_grad_enabled(reuse_forward):
            rollout_logprobs, rollout_values, entropy = models.policy_forward(rows_here, config, bf16, device, True)
        ref_logprobs = models.reference_logprobs(rows_here, config, bf16, device)
        old_logprobs, old_values, entropy, ref_logprobs = rows_of_every_process(
            rollout_logprobs.detach(), rollout_values.detach() if rollout_values is not None else None, entropy,
            ref_logprobs)
        kl = zero_outside((losses.kl_k1 if config.kl_estimator == "k1" else losses.kl_k3)(old_logprobs, ref_logprobs),
                          mask)  # not `* mask`: an Inf past EOS times 0 is NaN
        reward_beta = beta if config.kl_in == "reward" else 0.0
        rewards, reward_stats = losses.kl_shaped_rewards(scores, kl, mask, reward_beta)

        # 4. advantages: GAE (γ=1, λ=0.95) whitened over the batch's real tokens; REINFORCE++'s returns whitened
        #    likewise; or each answer's reward (score - β·KL) against the other answers to its prompt, on every token
        returns = None
        if config.advantage == "gae":
            advantages, returns = losses.gae(rewards, old_values * mask, mask, config.gamma, config.lam)
            advantages = whiten(advantages, mask)
        elif config.advantage == "reinforce_pp":
            returns = losses.discounted_returns(rewards, mask, config.gamma)
            advantages = whiten(returns, mask)
        else:
            answer_rewards = scores - reward_beta * kl.sum(1)
            advantages = ADVANTAGES[config.advantage](answer_rewards, config.group_size)[:, None] * mask

        # 5. update: several epochs of clipped policy + value loss on shuffled mini-batches
        update_stats: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            # one order for every process (rank 0's draw); each process takes its rows of each mini-batch
            permutation = distributed.from_rank0(mini_batch_order(config, device))
            for first in range(0, config.batch_size, config.mini_batch_size):
                index = permutation[first:first + config.mini_batch_size]
                mine = distributed.part_of(len(index))
                index = index[mine.start:mine.stop]
                part = rollout.select(index)
                if reuse_forward:  # step 3's graph, rows in the same shuffled order
                    logprobs = rollout_logprobs[index]
                    values = rollout_values[index] if rollout_values is not None else None
                else:
                    logprobs, values, _ = models.policy_forward(part, config, bf16, device)
                pg_loss, stats = losses.clipped_policy_loss(logprobs, old_logprobs[index], advantages[index],
                                                            part.response_mask, clip_low, clip_high, aggregate,
                                                            **aggregate_args)
                stats["policy_loss"] = pg_loss.detach()
                if config.kl_in == "loss" and beta:  # GRPO: β·k3 to the reference, aggregated like the policy loss
                    kl_term = losses.kl_loss(logprobs, ref_logprobs[index], part.response_mask, aggregate,
                                             **aggregate_args)
                    pg_loss, stats["kl_loss"] = pg_loss + beta * kl_term, kl_term.detach()
                # under torchrun: this process's share of the mini-batch's mean (over its tokens, or its answers for
                # the per-answer aggregations), so that the gradients summed over the processes are the mean's
                tokens = part.response_mask.sum()
                answers_or_tokens = tokens if config.loss_aggregation == "token" else len(index)
                terms = [(distributed.share_of_global_mean(pg_loss, answers_or_tokens), policy_parameters)]
                if values is not None:  # PPO's critic: the clipped value loss
                    vf_loss, vf_stats = losses.ppo_value_loss(values, old_values[index], returns[index],
                                                              part.response_mask, config.value_clip)
                    terms.append((config.vf_coef * distributed.share_of_global_mean(vf_loss, tokens),
                                  critic_parameters))
                    stats.update({**vf_stats, "value_loss": vf_loss.detach()})
                # the mini-batch's stats on every process: the losses are means over what they aggregate, the
                # rest (clip fraction, ratio, value error) over tokens
                aggregated = {k: stats.pop(k) for k in ("policy_loss", "kl_loss") if k in stats}
                stats = {**distributed.weighted_mean(aggregated, answers_or_tokens),
                         **distributed.weighted_mean(stats, tokens)}
                if shared_gradients:
                    sum(loss for loss, _ in terms).backward()
                    trained = [policy, models.critic] if models.critic is not None else policy
                    stats["grad_norm"] = distributed.clip_gradients(trained, 1.0, critic_parameters
                                                                    if models.value_head is not None else None)
                else:
                    stats["grad_norm"] = fast.backward_and_clip(terms, 1.0, lanes)
                checked = {k: stats[k] for k in ("policy_loss", "value_loss", "grad_norm") if k in stats}
                if bad_steps.ok(step, **checked):
                    optimizer.step()  # else no update: the weights stay those of the last good one
                    schedule.step()
                optimizer.zero_grad(set_to_none=True)
                for key, value in stats.items():
                    update_stats.setdefault(key, []).append(float(value))

        # 6. adaptive β (Ziegler et al.): move β so the per-response KL tracks the target
        kl_per_response = kl.sum(1).mean().item()
        if config.target_kl > 0:
            beta = losses.adaptive_kl_beta(beta, kl_per_response, config.target_kl, config.batch_size,
                                           config.kl_horizon)

        # 7. log (the gold score and the monitor only log: neither reaches the loss) and keep a few samples
        metrics = {
            **({"reward_model_score": raw_scores.mean()} if raw_scores is not None else {}),
            "score": scores.mean(), "kl": kl_per_response, "beta": beta,
            "entropy": masked_mean(entropy, mask), "response_length": rollout.lengths.float().mean(),
            "ended_fraction": rollout.ended.float().mean(), "non_score_reward": reward_stats["kl_penalty"],
            "total_reward": rewards.sum(1).mean(), **({"returns": masked_mean(returns, mask)} if returns is not None
                                                      else {"advantage_abs": masked_mean(advantages.abs(), mask)}),
            **{k: sum(v) / len(v) for k, v in update_stats.items()}, **sampling_stats,
            "lr": schedule.get_last_lr()[0], "step_seconds": time.time() - step_started,
        }
        gold_scores = None
        if gold:  # each process judges its rows
            gold_scores = gold.gold_scores([prompt_text(p) for p in batch_prompts[rows.start:rows.stop]],
                                           rollout.texts[rows.start:rows.stop])
            gold_scores = [s for part in distributed.gather_objects(gold_scores) for s in part]
        metrics.update({"gold_score": sum(gold_scores) / len(gold_scores)} if gold_scores else {})
        # the monitor answers its held-out prompts on rank 0, with the weights gathered on every process
        with distributed.gathered(*((policy, models.reward_model) if monitor.due(step) else ())):
            checks = monitor(policy, tokenizer, step) if distributed.is_main() else {}
        row = log.log(step, {**metrics, **checks})
        history.append(row)
        bar.set_postfix(score=f"{row['score']:.2f}", kl=f"{row['kl']:.2f}",
                        gold=f"{row.get('gold_score', float('nan')):.3f}")
        if step % config.sample_every == 0 or step == config.steps - 1:
            samples += first_samples(step, batch_prompts, rollout.texts, scores, gold_scores)
        if state.due(step + 1) and step + 1 < config.steps and not bad_steps.in_a_row:  # keep the last good one
            state.save(step + 1, modules, optimizer, schedule, trainer_values())
        state.stop_if_asked(step + 1, modules, optimizer, schedule, trainer_values())
        yield row
    state.release_signals()
    bad_steps.check_last(config.steps)
    log.close()
    if lanes is not None:
        lanes.close()

    # 8. save the policy (LoRA merged) as a plain causal-LM folder; the value head beside it, or a separate critic
    #    as a sequence-classifier folder inside it (critic/): the trained value function is not thrown away
    if distributed.is_main():
        write_jsonl(log.out_dir / "samples.jsonl", samples)
    summary = save(config, models, out, history, beta, time.time() - started)
    state.finished()
    distributed.barrier()
    return summary


def first_samples(step: int, prompts: list[Messages], texts: list[str], scores: torch.Tensor,
                  gold_scores: list[float] | None, count: int = 3) -> list[dict]:
    """The first few answers of a batch with their scores, for samples.jsonl."""
    return [{"step": step, "prompt": prompt_text(prompts[i]), "response": texts[i], "score": round(scores[i].item(), 3),
             **({"gold": round(gold_scores[i], 3)} if gold_scores else {})} for i in range(min(count, len(prompts)))]


def save(config: Config, models: Models, out: Path, history: list[dict], beta: float, seconds: float) -> dict:
    keys = ("score", "kl", "gold_score", "response_length")
    summary = {"stage": "ppo", "advantage": config.advantage, "steps": config.steps, "final_beta": beta,
               "first": {k: history[0].get(k) for k in keys}, "last": {k: history[-1].get(k) for k in keys},
               "seconds": round(seconds, 1)}
    # the whole weights on rank 0 (LoRA merged), from every process's shards
    final = gathered_for_saving(models.policy)
    critic = gathered_for_saving(models.critic) if models.critic is not None else None
    if final is None:
        return summary
    save_atomic(out, model=final, tokenizer=models.tokenizer,
                json_files={"rlhf_config.json": cfg.to_dict(config), "rlhf_summary.json": summary},
                tensors={"value_head.safetensors": models.value_head.state_dict()} if models.value_head else None,
                subfolders={"critic": (critic, models.reward_tokenizer)} if critic is not None else None)
    say(f"[{config.name}] saved {out} ({summary['seconds']} s): score {summary['first']['score']:.3f} → "
        f"{summary['last']['score']:.3f}, KL {summary['last']['kl']:.3f}")
    return summary
