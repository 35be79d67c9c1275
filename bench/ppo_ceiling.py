"""How fast could a PPO iteration of `bench/ppo_vs_trl.py` be on this CPU? The work each side does, counted, over
what this CPU can do, measured: a floor on each side's seconds, and so a ceiling on the ratio ours/TRL.

    .venv/bin/python bench/ppo_ceiling.py --isa AVX2 --against bench/results/ppo_vs_trl_..._avx2_auto.json

Not a speed-up, a yardstick: it says whether a ratio target (issue 23: PPO ≥ 2× TRL 1.12 at every ISA level) is
reachable with the work both tools do, or needs less work.

The setting is `ppo_vs_trl.py`'s like-for-like one: the embedded SmolLM2-135M-Instruct as policy and reference, a
critic and a reward model of the same backbone, batch 8, 48-token answers, one PPO epoch over one mini-batch.

1. Work, counted with torch's `FlopCounterMode` on the real model at the real shapes (the bench's first 8 prompts,
   answers of 48 tokens): a forward pass of the backbone, of the LM head over every position or over the answer's
   only, and a backward pass of each. Per iteration:
   - TRL 1.12 (`trl/experimental/ppo/ppo_trainer.py`): after generating, forward passes of the policy and the
     reference (logits at every position, sliced afterwards), the critic and the reward model; then the policy's and
     the critic's forward and backward passes of the update.
   - ours (`rlhf.ppo`, one epoch and one mini-batch): the update's forward pass of the policy and critic gives the
     rollout's log-probabilities and values too (`reuse_forward`); the reference and the reward model forward; the
     LM head only over the answer's positions; then the two backward passes.
2. Speed, measured here: the matrix-multiply rate of the model's own linear shapes at the training batch (the best of
   several calls; the precision `bf16: auto` picks at this level), and the rate at which two threads read memory.
3. Floors: generation can be no faster than reading every weight once per new token (the decode step at batch 8 is
   bound by memory, not arithmetic) plus the prompt's prefill at the multiply rate; the training passes no faster
   than their multiply-adds at that rate. Both sides generate the same tokens, so they share the generation floor.
4. With `--against` (a `ppo_vs_trl.py --json` result measured at the same level on this CPU): each side's measured
   seconds over its floor, and TRL's measured seconds over our floor, the highest ratio our work could reach here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _isa  # noqa: E402

ISA = _isa.reexec()  # --isa LEVEL: the caps must be in the environment before torch is imported

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from rlhf.data import encode_prompt, read_prompts, resolve_data_path  # noqa: E402
from rlhf.hardware import autocast, resolve_bf16  # noqa: E402
from rlhf.models import load_tokenizer, resolve_model_path  # noqa: E402

BATCH, ANSWER_TOKENS = 8, 48  # as in ppo_vs_trl.py


def flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def pass_flops(model, input_ids: torch.Tensor, prompt_width: int, bf16: bool) -> dict:
    """Multiply-add FLOPs of one forward and one backward pass: the backbone, and the LM head over every position
    or over the answer's (the positions that predict its tokens)."""
    backbone, head = model.model, model.lm_head
    out = {}
    with autocast(torch.device("cpu"), bf16):
        with FlopCounterMode(display=False) as counter:
            hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        out["backbone_forward"] = counter.get_total_flops()
        out["backbone_backward"] = flops(lambda: hidden.float().sum().backward())
        hidden = hidden.detach().requires_grad_()
        for name, positions in (("all", hidden), ("answer", hidden[:, prompt_width - 1:-1])):
            with FlopCounterMode(display=False) as counter:
                logits = head(positions)
            out[f"head_{name}_forward"] = counter.get_total_flops()
            out[f"head_{name}_backward"] = flops(lambda logits=logits: logits.float().sum().backward())
    return out


def per_iteration(f: dict) -> dict:
    """FLOPs of one iteration after generating, per side (module docstring, step 1). The critic and the reward
    model are the backbone with a one-output head (negligible)."""
    backbone = f["backbone_forward"]
    policy_all = backbone + f["head_all_forward"]
    trl = (2 * policy_all  # policy and reference forward, logits everywhere
           + 2 * backbone  # critic and reward model forward
           + policy_all + f["backbone_backward"] + f["head_all_backward"]  # the update: policy
           + backbone + f["backbone_backward"])  # the update: critic
    ours = (backbone + f["head_answer_forward"]  # reference
            + backbone  # reward model
            + backbone + f["head_answer_forward"] + f["backbone_backward"] + f["head_answer_backward"]  # policy
            + backbone + f["backbone_backward"])  # critic
    return {"trl": trl, "ours": ours}


def multiply_rate(model, tokens: int, bf16: bool, repeats: int = 5) -> float:
    """FLOP/s of the model's linear shapes (one decoder layer's and the LM head's) at `tokens` rows, in bf16 or
    fp32: the best of `repeats` timings of all of them in turn."""
    layer = model.model.layers[0]
    weights = [module.weight.detach() for module in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                     layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                     layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
                                                     model.lm_head)]
    dtype = torch.bfloat16 if bf16 else torch.float32  # weights cast once, as ours casts them under bf16
    weights = [w.to(dtype) for w in weights]
    inputs = [torch.randn(tokens, w.shape[1], dtype=dtype) for w in weights]
    work = sum(2 * tokens * w.shape[0] * w.shape[1] for w in weights)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            began = time.perf_counter()
            for x, w in zip(inputs, weights):
                torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - began)
    return work / best


def read_rate(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s at which this process's threads read a buffer much larger than the caches (summing it)."""
    buffer = torch.ones(megabytes * 2**20 // 4)  # written once, so its pages are real
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - began)
    return buffer.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", default="native", help="cap oneDNN and ATen to this level (bench/_isa.py)")
    parser.add_argument("--against", help="a ppo_vs_trl.py --json result measured at this level on this CPU")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = resolve_model_path("default")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bf16 = resolve_bf16("auto", torch.device("cpu"))
    prompts = read_prompts(resolve_data_path("builtin:prompts_train"))[:BATCH]
    prompt_width = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    width = prompt_width + ANSWER_TOKENS
    input_ids = torch.randint(0, len(tokenizer), (BATCH, width))  # the count depends on the shape only

    # 1. work
    parts = pass_flops(model, input_ids, prompt_width, bf16)
    work = per_iteration(parts)
    prefill = flops(lambda: model.model(input_ids=input_ids[:, :prompt_width], use_cache=False))
    decoded_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                        if "embed_tokens" not in name) + model.lm_head.weight.numel() * 4
    if bf16:
        decoded_bytes //= 2  # our decoder reads bf16 copies of the weights under bf16

    # 2. speed
    rate = multiply_rate(model, BATCH * width, bf16)
    bandwidth = read_rate()

    # 3. floors
    generation = prefill / rate + ANSWER_TOKENS * decoded_bytes / bandwidth
    floors = {side: generation + work[side] / rate for side in work}
    result = {"machine": _isa.machine(), "bf16": bf16, "prompt_width": prompt_width, "width": width,
              "pass_gflop": {k: v / 1e9 for k, v in parts.items()},
              "iteration_gflop_after_generation": {k: v / 1e9 for k, v in work.items()},
              "multiply_gflop_per_s": rate / 1e9, "read_gb_per_s": bandwidth / 1e9,
              "generation_floor_s": generation, "floor_s": floors}
    print(f"{_isa.describe(result['machine'])}; bf16 {bf16}")
    print(f"work after generating, per iteration: TRL {work['trl'] / 1e9:.0f} GFLOP, ours {work['ours'] / 1e9:.0f} "
          f"GFLOP ({work['trl'] / work['ours']:.2f}× less); multiplies at {rate / 1e9:.0f} GFLOP/s, memory read at "
          f"{bandwidth / 1e9:.1f} GB/s")
    print(f"floors: generation {generation:.2f} s; iteration TRL {floors['trl']:.2f} s, ours {floors['ours']:.2f} s")

    # 4. against a measured run
    if args.against:
        measured = json.loads(Path(args.against).read_text())
        setting = next(v for v in measured.values() if isinstance(v, dict) and "ours" in v and "trl" in v)
        seconds = {side: setting[side]["s_per_iteration"] for side in ("trl", "ours")}
        result["measured_s"] = seconds
        result["measured_over_floor"] = {side: seconds[side] / floors[side] for side in seconds}
        result["ratio_measured"] = seconds["trl"] / seconds["ours"]
        result["ratio_ceiling"] = seconds["trl"] / floors["ours"]
        print(f"measured ({args.against}): TRL {seconds['trl']:.2f} s ({result['measured_over_floor']['trl']:.2f}× "
              f"its floor), ours {seconds['ours']:.2f} s ({result['measured_over_floor']['ours']:.2f}× its floor); "
              f"ratio {result['ratio_measured']:.2f}×, at most {result['ratio_ceiling']:.2f}× with ours at its floor")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
