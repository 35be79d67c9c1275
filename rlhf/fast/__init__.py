"""Everything in `rlhf` that exists only for speed; the algorithm files call it through the names below.

- `decoder_for`: the forward pass sampling runs per new token (our own for Llama and Qwen2, else the model's own).
- `compile_layers`, `attention_for_width`: compiled decoder layers and the attention kernel of a training pass.
- `SideBySide`, `backward_and_clip`: two independent backward passes at once, a share of the cores each.
- `linears_to_bf16`, `cast_norm_outputs_once`, `weights_cast_once`: fewer dtype casts under bf16 autocast.

None of it changes what is computed beyond rounding; each piece says why it pays and where (bench/README.md has
the measurements).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from rlhf.fast.casts import cast_norm_outputs_once, linears_to_bf16, weights_cast_once
from rlhf.fast.compile import (
    TRAINING_ATTENTION,
    attention_for_width,
    compile_layers,
    eager_layers,
    use_training_attention,
)
from rlhf.fast.decoder import LayerStackDecoder, ModelWithCache, covers
from rlhf.fast.lanes import SideBySide, backward_and_clip

__all__ = ["TRAINING_ATTENTION", "LayerStackDecoder", "ModelWithCache", "SideBySide", "attention_for_width",
           "backward_and_clip", "cast_norm_outputs_once", "compile_layers", "covers", "decoder_for", "eager_layers",
           "linears_to_bf16", "use_training_attention", "weights_cast_once"]


@contextmanager
def decoder_for(model, prompt_mask: torch.Tensor, max_new_tokens: int, fast: bool = True,
                compiled: bool = False) -> Iterator[LayerStackDecoder | ModelWithCache]:
    """The per-token forward pass for one batch of left-padded prompts: `prefill(ids)`, then `step(tokens)`.

    `LayerStackDecoder` for the models it covers (with `compiled`, each step one compiled graph); otherwise the
    model's own forward with transformers' cache, with any compiled layers run eager for it.
    """
    if fast and covers(model):
        yield LayerStackDecoder(model, prompt_mask, max_new_tokens, compiled)
    else:
        with eager_layers():
            yield ModelWithCache(model, prompt_mask, max_new_tokens)
