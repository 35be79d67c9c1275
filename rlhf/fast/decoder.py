"""The forward pass that sampling runs once per new token, for Llama-shaped causal LMs (Llama and Qwen2 families).

Why: at the batches PPO samples on CPU (8 answers) a decode step through transformers' modules spends as long
outside its matmuls as in them: autocast's dispatch, the mask and cache machinery, two to five small ops per
projection. This pass reads the same weights with one matmul for q, k and v and one for the MLP's gate and up
(pre-packed for oneDNN on CPU where oneDNN supports the dtype), a KV cache written in place, and nothing else per
layer but the norms, the rotary embedding and attention. With `compiled` (PPO's `compile: true`) each decode step
is one inductor graph. The speed-ups are in bench/README.md.

The numbers are the model's own under autocast: the residual stream stays in the embedding's dtype (fp32), the
norm outputs and matmuls run in the autocast dtype. The rotary embedding is the model's own module, so any rope
scaling it supports is applied as it applies it. Tests check it against the model's forward (fp32: same logits
to 1e-4, same greedy tokens). LoRA adapters are read merged into each weight, once per decoder. Whatever else
(other architectures and adapters, sliding-window attention, another activation) is left to the model itself
(`ModelWithCache`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rlhf.data import position_ids_from_mask
from rlhf.hardware import packs_bf16_weights

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def covers(model) -> bool:
    """True if `LayerStackDecoder` computes this model's forward pass: a Llama or Qwen2 causal LM, plain or with
    LoRA adapters from peft on its projections (read as base weight + the active adapters' B·A·scale)."""
    model = _causal_lm(model)
    if type(model).__name__ not in SUPPORTED:
        return False
    config = model.config
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "use_sliding_window", False):
        return False
    projections = [model.lm_head] + [getattr(layer.self_attn, name) for layer in model.model.layers
                                     for name in ("q_proj", "k_proj", "v_proj", "o_proj")] \
        + [getattr(layer.mlp, name) for layer in model.model.layers for name in ("gate_proj", "up_proj", "down_proj")]
    return all(type(m) is torch.nn.Linear or _is_lora_linear(m) for m in projections)


def _causal_lm(model):
    """The transformers model inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_lora_linear(module) -> bool:
    """A peft LoRA layer around a plain Linear. DoRA (which rescales the weight's columns) and a LoRA bias (which
    `get_delta_weight` leaves out) are not read here."""
    return (type(getattr(module, "base_layer", None)) is torch.nn.Linear and hasattr(module, "lora_A")
            and hasattr(module, "get_delta_weight") and not any(getattr(module, "use_dora", {}).values())
            and not any(getattr(module, "lora_bias", {}).values()))


def _weight_and_bias(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the projection multiplies by: a Linear's weight, or a LoRA layer's base weight plus each active
    adapter's delta (none when the adapters are switched off, as for PPO's reference, or already merged)."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    weight = module.base_layer.weight
    if not module.merged and not module.disable_adapters:
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter)
    return weight, module.base_layer.bias


def _fused(linears: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections that read the same input, in `dtype`: their outputs side by
    side. Each weight is cast straight into its rows of the new tensor (one pass, not a cat then a cast)."""
    parts = [_weight_and_bias(m) for m in linears]
    weight = parts[0][0].new_empty(sum(w.shape[0] for w, _ in parts), parts[0][0].shape[1], dtype=dtype)
    bias = None if all(b is None for _, b in parts) else weight.new_zeros(weight.shape[0])
    row = 0
    for w, b in parts:
        weight[row:row + w.shape[0]].copy_(w.detach())
        if b is not None:
            bias[row:row + w.shape[0]].copy_(b.detach())
        row += w.shape[0]
    return weight, bias


def _packs_for_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights are handed to oneDNN pre-packed (CPU; bf16 or fp32): in the layout its matmul wants, made
    once per decoder instead of at every call. It is the op inductor's CPU freezing pass uses. In bf16 the numbers
    are the same bit for bit, in fp32 the same to rounding. oneDNN packs bf16 only from AVX-512 up."""
    if dtype == torch.bfloat16 and not packs_bf16_weights():  # oneDNN below AVX-512 refuses to pack bf16
        return False
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class LayerStackDecoder:
    """Prefill and decode steps for one batch of left-padded prompts, with a preallocated KV cache.

    `prefill(prompt_ids)` → the logits (B, V) after the prompt (its mask given at construction);
    `step(token_ids)` → the logits after one more token per row. Weights are copied once, in the compute dtype
    (the autocast dtype when autocast is on at construction, else the model's), so a policy that trains between
    rollouts is read afresh by a new decoder.

    `compiled`: each decode step runs as one graph compiled by inductor (see `_compiled_layer_stack`). Its shapes
    are fixed: attention reads the whole cache, whose length is rounded up to a multiple of `CAPACITY_STEP`, with
    the slots not written yet masked out; so one compile serves every rollout of a batch size and length bucket.
    """

    @torch.no_grad()
    def __init__(self, model, prompt_mask: torch.Tensor, max_new_tokens: int, compiled: bool = False):
        device = prompt_mask.device
        model = _causal_lm(model)
        backbone, config = model.model, model.config
        self.dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                      else backbone.embed_tokens.weight.dtype)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_size = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        batch, prompt_width = prompt_mask.shape
        if _packs_for_cpu(device, self.dtype):
            self.linear = _packed_linear_op() if compiled else _packed_linear
            pack = lambda weight: torch.ops.mkldnn._reorder_linear_weight(weight, batch)  # noqa: E731
        else:
            self.linear, pack = F.linear, lambda weight: weight

        def fused(linears):
            weight, bias = _fused(linears, self.dtype)
            return pack(weight), bias

        self.layers = []
        for layer in backbone.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = fused([attention.q_proj, attention.k_proj, attention.v_proj])
            out, out_bias = fused([attention.o_proj])
            gate_up, gate_up_bias = fused([mlp.gate_proj, mlp.up_proj])
            down, down_bias = fused([mlp.down_proj])
            self.layers.append((layer.input_layernorm.weight.detach(), qkv, qkv_bias, out, out_bias,
                                layer.post_attention_layernorm.weight.detach(), gate_up, gate_up_bias, down, down_bias))
        self.embedding = backbone.embed_tokens.weight.detach()
        self.final_norm = backbone.norm.weight.detach()
        self.head, self.head_bias = fused([model.lm_head])
        self.rotary = backbone.rotary_emb

        capacity = prompt_width + max_new_tokens
        if compiled:
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        shape = (batch, self.kv_heads, capacity, self.head_size)
        # a compiled step attends to every slot, so the unwritten ones must hold numbers (0 · NaN would be NaN)
        allocate = torch.zeros if compiled else torch.empty
        self.keys = [allocate(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.values = [allocate(shape, dtype=self.dtype, device=device) for _ in self.layers]
        # which cache slots a query may attend to: the prompt's real tokens, then every generated one; as an additive
        # mask (0 or -inf) in the compute dtype, which attention takes as it is (a bool mask is converted at every call)
        self.key_bias = torch.zeros(batch, capacity, dtype=self.dtype, device=device)
        self.key_bias[:, :prompt_width].masked_fill_(prompt_mask == 0, float("-inf"))
        self.compiled_stack = _compiled_layer_stack() if compiled else None
        if compiled:
            self.key_bias[:, prompt_width:] = float("-inf")  # each slot is opened as its token is written
        self.filled = 0
        self.prompt_mask, self.prompt_positions = prompt_mask, position_ids_from_mask(prompt_mask)
        self.next_position = self.prompt_positions[:, -1:] + 1

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        width = prompt_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=prompt_ids.device).tril()
        # a padding position attends to itself only: its output is never read, and a row of -inf would give NaN
        real = self.prompt_mask[:, None] != 0
        attend = (causal & real) | torch.eye(width, dtype=torch.bool, device=prompt_ids.device)
        bias = torch.zeros(attend.shape, dtype=self.dtype, device=attend.device).masked_fill_(~attend, float("-inf"))
        return self._forward(prompt_ids, self.prompt_positions, bias[:, None], _layer_stack)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = self.next_position
        self.next_position = positions + 1
        if self.compiled_stack is None:  # attend to the slots filled so far, this token's included
            return self._forward(token_ids[:, None], positions, self.key_bias[:, None, None, :self.filled + 1],
                                 _layer_stack)
        self.key_bias[:, self.filled] = 0  # compiled: the whole cache, this token's slot now open
        return self._forward(token_ids[:, None], positions, self.key_bias[:, None, None], self.compiled_stack)

    @torch.no_grad()
    def _forward(self, token_ids: torch.Tensor, positions: torch.Tensor, key_bias: torch.Tensor,
                 layer_stack) -> torch.Tensor:
        start, end = self.filled, self.filled + token_ids.shape[1]
        with torch.autocast(token_ids.device.type, enabled=False):
            hidden = self.embedding[token_ids]  # (B, T, hidden), the residual stream in the embedding's dtype
            cos, sin = self.rotary(hidden, positions)  # (B, T, head_size)
            # rotate_half(x)·sin = roll(x, half)·(−sin₁, sin₂): one roll instead of a chunk, a neg and a cat
            half = self.head_size // 2
            cos, sin = cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, None]
            slots = torch.arange(start, end, device=token_ids.device)
            logits = layer_stack(hidden, cos, sin, slots, key_bias, self.layers, self.keys, self.values,
                                 self.final_norm, self.head, self.head_bias, self.linear,
                                 (self.heads, self.kv_heads, self.head_size, self.intermediate, self.eps, self.dtype))
        self.filled = end
        return logits


CAPACITY_STEP = 64  # a compiled decoder's cache length is a multiple of this: one compile per bucket, not per width


def _layer_stack(hidden, cos, sin, slots, key_bias, layers, keys, values, final_norm, head, head_bias, linear, sizes):
    """The decoder layers, the final norm and the LM head for `hidden` (B, T, hidden) at cache `slots` (T,): each
    layer writes its keys and values there and attends to the first key_bias.shape[-1] slots. → logits (B, V) of
    the last position. A plain function of tensors, so that `_compiled_layer_stack` can compile it whole."""
    heads, kv_heads, size, intermediate, eps, dtype = sizes
    batch, width, _ = hidden.shape
    half, end = size // 2, key_bias.shape[-1]
    for i, (norm_in, qkv, qkv_bias, out, out_bias, norm_mid, gate_up, gate_up_bias, down, down_bias) in \
            enumerate(layers):
        x = _rms_norm(hidden, norm_in, eps).to(dtype)
        qkv_heads = linear(x, qkv, qkv_bias).view(batch, width, heads + 2 * kv_heads, size).transpose(1, 2)
        qk = qkv_heads[:, :heads + kv_heads]  # q and k take the rotary embedding together
        qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin).to(dtype)
        keys[i].index_copy_(2, slots, qk[:, heads:])
        values[i].index_copy_(2, slots, qkv_heads[:, heads + kv_heads:])
        attended = F.scaled_dot_product_attention(qk[:, :heads], keys[i][:, :, :end], values[i][:, :, :end],
                                                  attn_mask=key_bias, enable_gqa=True)
        attended = attended.transpose(1, 2).reshape(batch, width, heads * size)
        hidden = hidden + linear(attended, out, out_bias)
        x = _rms_norm(hidden, norm_mid, eps).to(dtype)
        gate, up = linear(x, gate_up, gate_up_bias).split(intermediate, dim=-1)
        hidden = hidden + linear(F.silu(gate) * up, down, down_bias)
    last = _rms_norm(hidden[:, -1], final_norm, eps).to(dtype)
    return linear(last, head, head_bias)


@functools.cache
def _compiled_layer_stack():
    """`_layer_stack` compiled by inductor with fixed shapes, for decode steps (made once per process).

    Why: eager, a step is ~1,300 small ops, and between its matmuls they take about a third of the step. Compiled,
    the norms, rotary, casts and residual adds become a few fused kernels per layer, and the matmuls and attention
    stay the same oneDNN and ATen calls. It costs one compile per batch size and cache-length bucket, and needs a
    C++ compiler, like `compile_layers`.
    """
    return torch.compile(_layer_stack, dynamic=False)


@functools.cache
def _packed_linear_op():
    """`_packed_linear` as an operator of our own, for compiled graphs: inductor lowers oneDNN's packed linear
    only for weights it packed itself (frozen constants), while ours are packed anew for each rollout. To inductor
    this op is an opaque call with a few microseconds of dispatch (less than a `custom_op` wrapper's)."""
    library = torch.library.Library("rlhf", "DEF")
    library.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    library.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
    torch.library.register_fake("rlhf::packed_linear",
                                lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))
    _packed_linear_op.library = library  # the definition lives as long as this reference
    return torch.ops.rlhf.packed_linear.default


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama computes it, in x's dtype. Four plain ops: faster per call on CPU than
    `F.rms_norm` at decode shapes."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class ModelWithCache:
    """The same prefill / step interface over the model's own forward pass and transformers' DynamicCache."""

    def __init__(self, model, prompt_mask: torch.Tensor, max_new_tokens: int):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache(config=model.config)
        self.attention_mask, self.prompt_positions = prompt_mask, position_ids_from_mask(prompt_mask)
        self.next_position = self.prompt_positions[:, -1:] + 1

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=prompt_ids, attention_mask=self.attention_mask, position_ids=self.prompt_positions,
                          cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=1)
        positions = self.next_position
        self.next_position = positions + 1
        return self.model(input_ids=token_ids[:, None], attention_mask=self.attention_mask, position_ids=positions,
                          cache=self.cache, use_cache=True).logits[:, -1]
