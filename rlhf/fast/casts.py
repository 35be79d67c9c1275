"""Fewer dtype casts under bf16 autocast: the same numbers, less memory traffic.

- `cast_norm_outputs_once`: each decoder layer's norm output cast to bf16 once, not once per consumer.
- `linears_to_bf16`: a frozen model's Linear weights stored in the bf16 autocast would round them to anyway.
- `weights_cast_once`: during one sampling call, autocast keeps its bf16 copies of a frozen model's weights.

Each exists because the cast it saves was measured as a share of a step on CPU (bench/README.md, "Why each speed
path exists"); none changes a forward number.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _in_autocast_dtype(module, args, output):
    """Forward hook: a float32 output becomes the autocast dtype when autocast is on (else unchanged)."""
    if isinstance(output, torch.Tensor) and output.dtype == torch.float32:
        device_type = output.device.type
        if torch.is_autocast_enabled(device_type):
            return output.to(torch.get_autocast_dtype(device_type))
    return None


def cast_norm_outputs_once(model: torch.nn.Module) -> int:
    """Under autocast, cast each decoder layer's norm output to bf16 once, where its consumers would each cast it.

    A layer's first norm feeds the q, k and v projections and its second the MLP's gate and up projections;
    autocast casts the fp32 norm output separately for each of them and keeps each copy for backward. Cast once,
    the linears share one bf16 tensor: the same forward numbers, 3 fewer (B, T, hidden) bf16 activations per
    layer kept for backward, fewer casts. In backward the three (two) gradients are summed in bf16 before the cast
    back, instead of in fp32. The residual stream is untouched (a norm's output is not added to it). Outside
    autocast the hook does nothing. Norms are the direct children named *Norm of each layer of the model's layer
    lists; the final norm is not one of them. → the number of norms hooked.
    """
    hooked = 0
    for module_list in (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
        for layer in module_list:
            for child in layer.children():
                if type(child).__name__.endswith("Norm"):
                    child.register_forward_hook(_in_autocast_dtype)
                    hooked += 1
    return hooked


def linears_to_bf16(model: torch.nn.Module) -> int:
    """Store a frozen model's Linear weights (and biases) in bf16, for a model only ever run under bf16 autocast.

    Autocast rounds each fp32 Linear weight to bf16 before its matmul; storing that rounding once gives the
    very same numbers without redoing the cast at every forward pass (and, for a frozen model, at every
    decode step), and halves those weights' memory. Embeddings and norms stay fp32, so the residual stream
    stays fp32 (a model cast to bf16 whole would round it in every layer). A Linear that shares its weight
    with an embedding (a tied LM head) is left as it is. → the number of Linears converted.
    """
    embedding_storage = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    converted = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.data_ptr() not in embedding_storage:
            if module.weight.requires_grad:
                raise ValueError("linears_to_bf16 is for frozen models; this one has a trainable Linear")
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            converted += 1
    # the rest (embeddings, norms) still points into the checkpoint file's memory map, which would keep the whole
    # file mapped and its fp32 Linear pages resident beside the bf16 copies: own copies let the map go
    for parameter in model.parameters():
        if parameter.dtype != torch.bfloat16:
            parameter.data = parameter.data.clone()
    return converted


@contextmanager
def weights_cast_once(model, bf16: bool):
    """Let autocast cast each fp32 weight to bf16 once per sampling call instead of once per token.

    Autocast keeps its bf16 copies only of leaf tensors that require grad; a frozen model's weights would be
    cast again at every decode step, and decoding at small batches is bound by that memory traffic. Under
    `no_grad` nothing is recorded, so the flags are only switched on for the call and restored after. Only the
    model's own forward (`ModelWithCache`) needs it: `LayerStackDecoder` casts its own copy of the weights once.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()] if bf16 else []
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
