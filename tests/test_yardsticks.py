"""The bench's yardsticks: what a PPO iteration (`bench/ppo_ceiling.py`) and a finished `make demo` run
(`bench/demo_floor.py`) must compute at least, counted from hand-checkable pieces."""

from pathlib import Path

import torch
from test_hhh import _script
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf.models import build_tiny_model

BENCH = Path(__file__).parent.parent / "bench"


def test_ppo_ceiling_counts_what_each_side_computes_after_generating(monkeypatch):
    """bench/ppo_ceiling.py: TRL's ten passes with the LM head everywhere against our eight with it on the answer
    only, from hand-chosen pass costs (backbone forward 10, backward 20; LM head 4 everywhere, 1 on the answer,
    backward twice that)."""
    monkeypatch.syspath_prepend(str(BENCH))  # its `_isa`, as when run as a script
    ceiling = _script("ppo_ceiling", "bench")
    parts = {"backbone_forward": 10, "backbone_backward": 20, "head_all_forward": 4, "head_all_backward": 8,
             "head_answer_forward": 1, "head_answer_backward": 2}
    # TRL: 2·(10+4) + 2·10 + (10+4+20+8) + (10+20) = 28 + 20 + 42 + 30; ours: 11 + 10 + (10+1+20+2) + (10+20)
    assert ceiling.per_iteration(parts) == {"trl": 120, "ours": 84}


def test_demo_floor_counts_a_positions_multiply_adds_from_the_config(tmp_path, monkeypatch):
    """bench/demo_floor.py: the layers' and the LM head's FLOPs per position, from the model's config, equal what
    torch counts on the model itself (a tiny Llama with grouped-query attention)."""
    monkeypatch.syspath_prepend(str(BENCH))
    floor = _script("demo_floor", "bench")
    path = build_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layer_flops, head_flops = floor.per_position_flops(AutoConfig.from_pretrained(path))
    positions = 7
    with torch.no_grad(), FlopCounterMode(display=False) as layers:
        hidden = model.model(input_ids=torch.randint(0, 100, (1, positions)), use_cache=False).last_hidden_state
    with torch.no_grad(), FlopCounterMode(display=False) as head:
        model.lm_head(hidden)
    assert layers.get_total_flops() == positions * layer_flops
    assert head.get_total_flops() == positions * head_flops


def test_demo_floor_counts_a_ppo_iteration():
    """Two answers of 5 tokens to prompts of 3, two epochs: generating 2·3 + 2·5 positions (LM head at the 10 new
    ones); the rollout's, the reference's and the reward model's forward, 3 · 16 (LM head on the answers for two of
    them, 20); two forward and backward passes, 2 · 3 · 16 (LM head 2 · 3 · 10). With one epoch reused, the rollout's
    forward is not run again."""
    floor = _script("demo_floor", "bench")
    assert floor.ppo_iteration_positions(2, 3, 5, epochs=2, reused=False) == {"layers": 160, "head": 90}
    assert floor.ppo_iteration_positions(2, 3, 5, epochs=1, reused=True) == {"layers": 96, "head": 50}
