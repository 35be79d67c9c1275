"""Compiled decoder layers for the scoring and training passes, and the attention kernel each pass takes.

`compile_layers` compiles each decoder layer with `torch.compile` (regional compilation): inductor fuses a layer's
elementwise work (norms, rotary, SiLU·up, residual adds, the casts around them) into a few kernels, and the
matmuls stay oneDNN's. Layers of one class share their compiled code (their weights are graph inputs), and
`dynamic=True` keeps one graph across sequence widths. Compiling the whole model as one graph was slower to
compile by an order of magnitude for little more speed; the figures are in bench/README.md ("Why each speed path
exists").

Attention: on CPU under bf16 autocast, the fused (flash) kernel's backward is slow for short sequences, so eager
training passes at or below `SHORT_SEQUENCE` tokens take the math kernel (`attention_for_width`), and compiled layers
take `ops`-level `masked_attention` (flash forward, our backward) through the attention function registered with
transformers as `TRAINING_ATTENTION`. Passes whose results are compared (policy and reference log-probabilities)
run under the same choice, so the KL is exactly 0 at the start.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from rlhf.fast.attention import masked_attention

SHORT_SEQUENCE = 160  # at or below this width the math attention kernel beats flash for bf16 training on CPU
TRAINING_ATTENTION = "rlhf_sdpa"  # the attention implementation `compile_layers` gives the models it compiles


@functools.cache
def eager_flash() -> bool:
    """Whether eager short bf16 passes on this CPU take the flash forward (and our backward) rather than the math
    kernel. Without AMX the math kernel's forward is the slow part of a scoring pass (several times the flash
    forward's time at PPO's widths) while its backward is only a little faster than ours, so the flash forward
    wins over a PPO iteration; with AMX the math kernel's fused backward wins (bench/README.md)."""
    from rlhf.hardware import cpu_info

    return not cpu_info().amx


def attention_for_width(device: torch.device, width: int, bf16: bool):
    """The scaled-dot-product-attention kernel for an eager training or scoring pass `width` tokens wide.

    On an AMX CPU the math kernel for short bf16 sequences (its (width × width) matrices stay small there, and the
    flash backward is slow); elsewhere (fp32, CUDA, long sequences, CPUs without AMX, where models loaded by
    `rlhf.models` take `masked_attention`) SDPA's own choice. The kernels agree to rounding.
    """
    if not bf16 or device.type != "cpu" or width > SHORT_SEQUENCE or eager_flash():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _training_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention function for our models: `masked_attention` for short bf16 sequences on CPU.

    Compiled layers always take it there (inside a compiled layer the math kernel's softmax is the slow part);
    eager passes take it on CPUs without AMX (`eager_flash`), where every pass, scoring or training, then runs
    the same flash forward, so the policy and the reference still compute the same numbers (KL 0 at the start).
    Anything else (fp32, CUDA, longer widths, steps with a KV cache) is transformers' SDPA path.
    """
    width = query.shape[2]
    if ((torch.compiler.is_compiling() or eager_flash()) and query.device.type == "cpu"
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and dropout == 0.0
            and 1 < width == key.shape[2] <= SHORT_SEQUENCE and kwargs.get("position_bias") is None
            and (attention_mask is None or attention_mask.dtype == torch.bool)):
        if attention_mask is None:  # no padding: causal (or full) attention, as SDPA's is_causal would give
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            attention_mask = torch.ones(width, width, dtype=torch.bool, device=query.device)
            attention_mask = attention_mask.tril() if causal else attention_mask
        bf16 = torch.bfloat16  # what autocast would hand SDPA: the rotary embedding leaves query and key float32
        out = masked_attention(query.to(bf16), key.to(bf16), value.to(bf16), attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_training_attention(model: torch.nn.Module) -> None:
    """Give a model loaded for CPU work `TRAINING_ATTENTION` in place of SDPA (a saved config.json does not carry
    it); other attention implementations are left alone."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(_register_training_attention())


@functools.cache
def _register_training_attention() -> str:
    """Make `TRAINING_ATTENTION` a name transformers knows (once), with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAINING_ATTENTION, _training_attention)
    AttentionMaskInterface.register(TRAINING_ATTENTION, sdpa_mask)
    return TRAINING_ATTENTION


def compile_layers(*models: torch.nn.Module | None) -> int:
    """Compile each decoder layer of these models for the scoring and training passes (see the module docstring).

    The models' attention becomes `TRAINING_ATTENTION`; a saved config.json does not carry this choice. Passes with
    a KV cache run these layers eager (`eager_layers`): a cache indexed by layer number would compile once per
    layer; sampling has its own compiled step instead (`LayerStackDecoder(compiled=True)`). Needs a C++ compiler
    on CPU. A None model (no reference, no critic) is passed over. → the number of layers compiled.
    """
    import torch._inductor.config
    from transformers.modeling_layers import GradientCheckpointingLayer

    # generated CPU kernels read the calling thread's thread count when they run, not the compiling thread's when
    # they are made: inside a `SideBySide` lane they then take that lane's share of the cores instead of all of them
    torch._inductor.config.cpp.dynamic_threads = True
    for model in models:
        if model is not None and getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(_register_training_attention())
    layers = [m for model in models if model is not None
              for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def eager_layers():
    """A context in which layers compiled by `compile_layers` run eager (decoding with transformers' KV cache).

    In a process that never loaded dynamo nothing is compiled, and importing it only for this costs most of a
    second, so then it is a no-op."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")
