"""How fast could a finished `make demo` run have been on this CPU? Every position each stage put through the model,
counted from the run's own folder, over the rate this CPU multiplies at: a floor per stage, to set against the
stage's measured seconds.

    .venv/bin/python bench/demo_floor.py runs/demo_avx2 --ceiling bench/results/ppo_ceiling_..._avx2.json

Not a speed-up, a yardstick for issue 23's `make demo` targets (≤ 15 minutes at the no-AMX level, ≤ 20 at AVX2):
whether a target is reachable with the work the demo does, or needs less work.

1. Work, per stage, from the run folder (`stages/*.json` for the settings and the measured seconds, the pairs stage's
   answers, PPO's logged answer lengths) and the built-in data the stages read. A position costs the multiply-adds
   of the model's linear layers (`per_position_flops`, from the model's config); the LM head is counted only where a
   stage needs logits; a backward pass counts as two forward passes.
   - SFT: every demonstration, each epoch, forward and backward; the LM head over the answer.
   - pairs: each answer in the pairs file sampled: its prompt's prefill, then one position per new token with the
     LM head.
   - reward model: the train pairs, each epoch, forward and backward, the prompt once per pair (as `pair_scores`
     packs it); then every answer scored as its own conversation (held-out accuracy and the score scale).
   - PPO: per iteration, the batch's answers generated (the logged mean length), the policy's forward over the
     rollout (its log-probabilities and values), the reference's and the reward model's, then `ppo_epochs` forward
     and backward passes of the policy (with one epoch over one mini-batch the rollout's forward is reused, so it is
     not counted); the monitor's held-out answers at each check (generated, at the logged length, and scored).
   - DPO: the train pairs, each epoch, the policy's forward and backward and the reference's forward (once, with
     `precompute_reference`), the prompt once per pair, the LM head over the answers.
   - evaluation: each model's answers to the held-out prompts (generated, at the length limit), scored by the reward
     model, and read by the model and by its reference for the KL; its answers to each behaviour set (generated).
2. Speed: the fp32 or bf16 multiply rate `ppo_ceiling.py` measured at the same level on this CPU (`--ceiling`).
3. The floor leaves out attention, norms, the optimiser, the judge, padding, loading and saving, so the real stages
   can only be slower.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoConfig  # noqa: E402

from rlhf.data import encode_conversation, encode_prompt, encode_response, read_prompts, resolve_data_path  # noqa: E402
from rlhf.models import load_tokenizer, resolve_model_path  # noqa: E402
from rlhf.tracking import last_run, read_jsonl  # noqa: E402

BACKWARD = 2  # a backward pass costs two forward passes' multiply-adds


def per_position_flops(config) -> tuple[int, int]:
    """(the decoder layers', the LM head's) multiply-add FLOPs per position in a forward pass of a Llama-shaped model:
    q, k, v, o, gate, up and down in every layer; the head over the vocabulary."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_size = getattr(config, "head_dim", None) or hidden // heads
    layer = hidden * heads * head_size * 2 + hidden * kv_heads * head_size * 2 + 3 * hidden * config.intermediate_size
    return 2 * layer * config.num_hidden_layers, 2 * hidden * config.vocab_size


def ppo_iteration_positions(answers: int, prompt: float, answer: float, epochs: int, reused: bool) -> dict:
    """Positions (through the layers, through the LM head) one PPO iteration puts through a model, in forward-pass
    equivalents: generating; the rollout's forward (unless `reused`), the reference's and the reward model's; `epochs`
    forward and backward passes."""
    whole = answers * (prompt + answer)
    layers = answers * prompt + answers * answer  # generating: the prefill and one position per new token
    head = answers * answer
    forwards = 2 if reused else 3  # the reference and the reward model, and the rollout's own unless reused
    layers += forwards * whole
    head += (forwards - 1) * answers * answer  # log-probabilities of the answer: all but the reward model's
    layers += epochs * (1 + BACKWARD) * whole
    head += epochs * (1 + BACKWARD) * answers * answer
    return {"layers": layers, "head": head}


def stage(run: Path, name: str) -> dict:
    return json.loads((run / "stages" / f"{name}.json").read_text())


def train_pairs(pairs: list[dict], done: dict) -> list[dict]:
    """The pairs a reward or DPO stage trained on: shuffled with its seed, the held-out ones first (as the stages
    split them; the demo skips no pair)."""
    shuffled = list(pairs)
    random.Random(done["config"]["seed"]).shuffle(shuffled)
    return shuffled[len(shuffled) - done["result"]["train_pairs"]:]


def demo_positions(run: Path, tokenizer) -> dict[str, dict[str, float]]:
    """Per stage, positions through the layers and through the LM head, in forward-pass equivalents (docstring)."""
    def user(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    def prompt_length(text: str) -> int:
        return len(encode_prompt(tokenizer, user(text)))

    def prompt_texts(name: str) -> list[str]:
        return [messages[-1]["content"] for messages in read_prompts(resolve_data_path(name))]

    def packed(pairs: list[dict]) -> int:
        """A pair's positions with its prompt once (as `rlhf.reward.pair_scores` and DPO pack them)."""
        return sum(len(encode_conversation(tokenizer, user(p["prompt"]), p["chosen"]))
                   + len(encode_response(tokenizer, p["rejected"])) for p in pairs)

    def rows(path: Path) -> list[dict]:
        found = read_jsonl(path)
        if not found:
            sys.exit(f"{path}: missing or empty; pass a finished `rlhf pipeline` folder")
        return found

    out = {}
    sft = stage(run, "sft")["config"]
    demos = rows(resolve_data_path(sft["data"]))
    whole = sum(len(encode_conversation(tokenizer, user(d["prompt"]), d["completion"])) for d in demos)
    answer = sum(len(encode_response(tokenizer, d["completion"])) for d in demos)
    out["sft"] = {"layers": sft["epochs"] * (1 + BACKWARD) * whole, "head": sft["epochs"] * (1 + BACKWARD) * answer}

    pairs = rows(run / "pairs" / "pairs.jsonl")
    new = sum(len(encode_response(tokenizer, p[k], add_eos=False)) for p in pairs for k in ("chosen", "rejected"))
    out["pairs"] = {"layers": sum(2 * prompt_length(p["prompt"]) for p in pairs) + new, "head": new}

    reward = stage(run, "reward")
    every_answer = sum(len(encode_conversation(tokenizer, user(p["prompt"]), p[k])) for p in pairs
                       for k in ("chosen", "rejected"))
    out["reward"] = {"layers": reward["config"]["epochs"] * (1 + BACKWARD) * packed(train_pairs(pairs, reward))
                     + every_answer, "head": 0}

    ppo = stage(run, "ppo")["config"]
    prompts = prompt_texts(ppo["data"])
    mean_prompt = sum(map(prompt_length, prompts)) / len(prompts)
    metrics, _ = last_run(rows(run / "ppo_logs" / "metrics.jsonl"))  # the log of the run that finished
    layers = head = 0.0
    reused = ppo["ppo_epochs"] == 1 and ppo["mini_batch_size"] == ppo["batch_size"]  # as `rlhf.ppo` decides
    held = prompt_texts(ppo["monitor_prompts"])[:ppo["monitor_size"]]
    held_prompt = sum(map(prompt_length, held)) / len(held)
    for row in metrics:
        step = ppo_iteration_positions(ppo["batch_size"], mean_prompt, row["response_length"], ppo["ppo_epochs"],
                                       reused)
        layers, head = layers + step["layers"], head + step["head"]
        if "monitor/length" in row:  # a monitor check: its answers generated, then scored by the reward model
            layers += len(held) * 2 * (held_prompt + row["monitor/length"])
            head += len(held) * row["monitor/length"]
    out["ppo"] = {"layers": layers, "head": head}

    dpo = stage(run, "dpo")
    train = train_pairs(pairs, dpo)
    answers = sum(len(encode_response(tokenizer, p[k])) for p in train for k in ("chosen", "rejected"))
    epochs = dpo["config"]["epochs"]
    reference = 1 if dpo["config"]["precompute_reference"] else epochs
    out["dpo"] = {"layers": (epochs * (1 + BACKWARD) + reference) * packed(train),
                  "head": (epochs * (1 + BACKWARD) + reference) * answers}

    evaluation = stage(run, "eval")["config"]
    held = prompt_texts(evaluation["data"])
    held = held[:evaluation["max_prompts"]] if evaluation["max_prompts"] else held
    answers = len(evaluation["models"]) * len(held)
    held_prompt = sum(map(prompt_length, held)) / len(held)
    answer = evaluation["max_new_tokens"]
    # generated; scored by the reward model; read by the model and its reference for the KL
    layers, head = answers * ((held_prompt + answer) * 4), answers * answer * 3
    for key in ("harmful_prompts", "lookalike_prompts", "unanswerable_prompts", "answerable_prompts"):
        if evaluation.get(key) not in (None, "", "none"):  # each model answers each behaviour set's prompts
            kind = prompt_texts(evaluation[key])
            layers += len(evaluation["models"]) * sum(prompt_length(p) + answer for p in kind)
            head += len(evaluation["models"]) * len(kind) * answer
    out["eval"] = {"layers": layers, "head": head}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished `rlhf pipeline` folder (make demo's runs/demo)")
    parser.add_argument("--ceiling", required=True, help="a ppo_ceiling.py --json result at the run's level, this CPU")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    run, path = Path(args.run), resolve_model_path("default")
    layer_flops, head_flops = per_position_flops(AutoConfig.from_pretrained(path))
    rate = json.loads(Path(args.ceiling).read_text())["multiply_gflop_per_s"] * 1e9
    positions = demo_positions(run, load_tokenizer(path))
    floors = {name: (p["layers"] * layer_flops + p["head"] * head_flops) / rate for name, p in positions.items()}
    measured = {name: stage(run, name)["result"]["seconds"] for name in floors}
    result = {"run": str(run), "ceiling": args.ceiling, "multiply_gflop_per_s": rate / 1e9,
              "tflop": {name: floors[name] * rate / 1e12 for name in floors}, "floor_s": floors,
              "measured_s": measured, "floor_minutes": sum(floors.values()) / 60,
              "measured_minutes": sum(measured.values()) / 60}
    for name in floors:
        print(f"{name:7s} floor {floors[name]:6.1f} s, measured {measured[name]:6.1f} s "
              f"({measured[name] / floors[name]:.2f}× its floor)")
    print(f"all     floor {result['floor_minutes']:.1f} min, measured {result['measured_minutes']:.1f} min "
          f"(stages only) at {rate / 1e9:.1f} GFLOP/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
