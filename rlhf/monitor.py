"""PPO's reward-hacking monitor: an object the PPO loop holds and calls once per step.

Every `every` steps (and at the last) the policy answers a fixed held-out batch (the same prompts and sampling seed
at every check), which a judge the policy never trains on and the reward model both score. It only logs: nothing
reaches the loss, and its sampling runs in a forked RNG, so training goes exactly as with the monitor off. It
prints a WARNING when the reward model's score keeps rising while the gold score falls, or when the answers'
length or repetition drift (`metrics.hacking_warnings`).
"""

from __future__ import annotations

from pathlib import Path

from rlhf.data import Messages, fit_prompts, prompt_text, read_prompts, resolve_data_path, write_jsonl
from rlhf.metrics import hacking_warnings, mean, repetition
from rlhf.scoring import Scorer, answer_and_score, load_judge, reward_scorer
from rlhf.tracking import say


class Monitor:
    def __init__(self, prompts: list[Messages], judge: Scorer | None, reward: Scorer | None, every: int, last_step: int,
                 sampling: dict, window: int, length_drift: float, distinct_drift: float, samples_file: Path,
                 examples: int = 3):
        self.prompts, self.judge, self.reward, self.every, self.last_step = prompts, judge, reward, every, last_step
        self.sampling = sampling  # max_new_tokens, temperature, batch_size, bf16, seed of `answer_and_score`
        self.window, self.length_drift, self.distinct_drift = window, length_drift, distinct_drift
        self.samples_file, self.examples = samples_file, examples
        self.checks: list[dict[str, float]] = []
        self.samples: list[dict] = []

    def due(self, step: int) -> bool:
        """Whether `step` is a check step."""
        return bool(self.prompts) and (step % self.every == 0 or step == self.last_step)

    def __call__(self, policy, tokenizer, step: int) -> dict:
        """At a check step: score the held-out batch, warn, and → the metrics to log (`monitor/...`); else {}."""
        if not self.due(step):
            return {}
        rollout, scores = answer_and_score(policy, tokenizer, self.prompts, self.judge, self.reward, **self.sampling)
        check = {**{k: mean(v) for k, v in scores.items()}, "distinct2": repetition(rollout.texts)["distinct2"]}
        self.checks.append(check)
        alarms = hacking_warnings(self.checks, self.window, self.length_drift, self.distinct_drift)
        for alarm in alarms:
            say(f"[ppo] WARNING (monitor, step {step}): {alarm}")
        self.samples += [{"step": step, "prompt": prompt_text(self.prompts[i]), "response": rollout.texts[i],
                          **{k: round(scores[k][i], 3) for k in ("gold", "reward_model") if k in scores}}
                         for i in range(min(self.examples, len(self.prompts)))]
        write_jsonl(self.samples_file, self.samples)
        return {**{f"monitor/{k}": v for k, v in check.items()}, "monitor/warning": float(bool(alarms)),
                **({"monitor/warnings": alarms} if alarms else {})}


def ppo_monitor(config, tokenizer, reward_model, reward_tokenizer, device, bf16: bool, gold, log_dir: Path) -> Monitor:
    """The monitor a PPO run's config asks for (`monitor_*` keys; `monitor_every` 0 = off): its held-out prompts fitted
    like the training prompts, its judge ('gold' shares the run's annotator), the reward model as a plain scorer."""
    prompts: list[Messages] = []
    judge = reward = None
    if config.monitor_every:
        held_out = read_prompts(resolve_data_path(config.monitor_prompts))[:config.monitor_size]
        prompts, _ = fit_prompts(tokenizer, held_out, config.max_prompt_length, config.truncation)
        judge = load_judge(config.monitor_judge, device, bf16, annotator=gold)
        reward = reward_scorer(reward_model, reward_tokenizer, device, bf16) if reward_model is not None else None
        say(f"[ppo] monitor: {len(prompts)} held-out prompts every {config.monitor_every} steps, "
            f"judge '{config.monitor_judge}'")
    sampling = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
                "batch_size": config.generation_batch_size, "bf16": bf16, "seed": config.seed}
    return Monitor(prompts, judge, reward, max(1, config.monitor_every), config.steps - 1, sampling,
                   config.monitor_window, config.monitor_length_drift, config.monitor_distinct_drift,
                   log_dir / "monitor_samples.jsonl")
