"""Sampling responses: batched generation with a KV cache, truncation at the first EOS.

A rollout keeps exactly the tensors that were sampled (left-padded prompts, right-padded responses)
so that log-probabilities recomputed later see the same padding and positions as sampling did.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from rlhf.data import Messages, encode_prompt, pad_left, position_ids_from_mask
from rlhf.decoder import LayerStackDecoder, ModelWithCache, covers
from rlhf.hardware import autocast


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    response_ids: torch.Tensor  # (B, R) right-padded with pad after the first EOS
    response_mask: torch.Tensor  # (B, R) True for real response tokens, the first EOS included
    ended: torch.Tensor  # (B,) True if the response emitted EOS within the token limit
    texts: list[str]  # decoded responses, special tokens dropped

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def select(self, index: torch.Tensor | slice) -> "Rollout":
        if isinstance(index, slice):
            texts = self.texts[index]
        else:
            texts = [self.texts[i] for i in index.tolist()]
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index], self.ended[index], texts)


@contextmanager
def weights_cast_once(model, bf16: bool):
    """Let autocast cast each fp32 weight to bf16 once per `generate` call instead of once per token.

    Autocast keeps its bf16 copies only of leaf tensors that require grad; a frozen model's weights would be
    cast again at every decode step, and decoding at small batches is bound by that memory traffic (SmolLM2-135M,
    batch 8, `bench/ppo_vs_trl.py --generation`: `generate` on a frozen model 56 tokens/s, 107 with the casts kept;
    with `decode` as well, 139 against `generate`'s 62 in a later run). Frozen models loaded with `bf16_linears`
    need it only for the tied LM head. Under `no_grad` nothing is recorded, so the flags are only switched on for
    the call and restored after. Only the model's own forward (`ModelWithCache`) needs it: `LayerStackDecoder`
    casts its own copy of the weights once.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()] if bf16 else []
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def truncate_at_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (ids with pad after the first EOS, mask True up to and including it, ended (B,))."""
    is_eos = response_ids == eos_id
    ended = is_eos.any(dim=1)
    # number of EOS seen strictly before each position: 0 means still inside the response
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    ids = response_ids.masked_fill(~mask, pad_id)
    return ids, mask, ended


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token id per row of `probs` (B, V), drawn by inverting the cumulative distribution.

    Same distribution as `torch.multinomial(probs, 1)`, which on CPU draws an exponential variate for every
    vocabulary entry: 6.9 ms of a 61 ms decode step at batch 8 over SmolLM2's 49,152 tokens (profiled here),
    against a cumulative sum and 8 uniforms. A token of zero probability spans an empty interval of the
    cumulative sum, so it is never drawn.
    """
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool) -> torch.Tensor:
    """Token ids (B,) from the last position's logits (B, V): argmax, or a draw from softmax(logits / T),
    restricted with `top_p` < 1 to the most likely tokens whose mass first reaches top_p."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return draw_tokens(probs)


def eager_layers():
    """A context in which layers compiled by `compile_layers` run eager (decoding: a KV cache indexed by layer number
    would compile once per layer). In a process that never loaded dynamo nothing is compiled, and importing it
    only for this would cost ~0.9 s."""
    if "torch._dynamo" not in sys.modules:
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 0.7, top_p: float = 1.0, greedy: bool = False, min_new_tokens: int = 0,
           fast: bool = True, compiled: bool = False) -> torch.Tensor:
    """Response ids (B, ≤ max_new_tokens) for left-padded prompts, with a KV cache; pad after a row's EOS.

    What `generate` does for plain sampling, without its per-step machinery (logits processors, stopping
    criteria, input preparation) and with `draw_tokens`. The prompt's positions skip its left padding; each new
    token takes the next position and attends to every earlier real token. Stops when every row has ended or at
    the limit. Run it under `no_grad` (and autocast). The forward pass per token is `LayerStackDecoder` for the
    models it covers (`fast`; with `compiled`, each step one compiled graph), else the model's own with
    transformers' cache (`ModelWithCache`), where layers compiled with `compile_layers` run eager (`eager_layers`).
    """
    if max_new_tokens <= 0:
        return prompt_ids.new_empty(prompt_ids.shape[0], 0)
    own_pass = fast and covers(model)
    with nullcontext() if own_pass else eager_layers():
        forward = (LayerStackDecoder(model, prompt_mask, max_new_tokens, compiled) if own_pass
                   else ModelWithCache(model, prompt_mask, max_new_tokens))
        logits = forward.prefill(prompt_ids)
        running = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            logits = logits.float()
            if step < min_new_tokens:
                logits[:, eos_id] = float("-inf")
            token = next_token(logits, temperature, top_p, greedy).masked_fill_(~running, pad_id)
            tokens.append(token)
            running &= token != eos_id
            if step == max_new_tokens - 1 or not running.any():
                break
            logits = forward.step(token)
        return torch.stack(tokens, dim=1)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[Messages],
    max_new_tokens: int,
    temperature: float = 0.7,
    top_p: float = 1.0,
    batch_size: int = 64,
    bf16: bool = True,
    progress: bool = False,
    greedy: bool = False,
    min_new_tokens: int = 0,
    compiled: bool = False,
) -> Rollout:
    """Sample one response per prompt. Prompts are batched `batch_size` at a time (big batches are faster on
    CPU: a frozen SmolLM2-135M gave ~860 tok/s at 96, ~830 at 64, ~270 at 8), then stitched into one
    right-padded Rollout. `compiled`: decode steps as compiled graphs (`LayerStackDecoder`), for long runs."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    pieces = []
    chunks = range(0, len(encoded), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sampling", unit="batch", leave=False)
    for start in chunks:
        prompt_ids, prompt_mask = pad_left(encoded[start:start + batch_size], tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        with autocast(device, bf16), weights_cast_once(model, bf16):
            response = decode(model, prompt_ids, prompt_mask, max_new_tokens, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, temperature, top_p, greedy, min_new_tokens, compiled=compiled)
        pieces.append((prompt_ids, prompt_mask, response))
    prompt_width = max(p.shape[1] for p, _, _ in pieces)
    response_width = max(1, max(r.shape[1] for _, _, r in pieces))
    pad = tokenizer.pad_token_id
    all_prompt, all_prompt_mask, all_response = [], [], []
    for prompt_ids, prompt_mask, response in pieces:
        left = prompt_width - prompt_ids.shape[1]
        all_prompt.append(torch.nn.functional.pad(prompt_ids, (left, 0), value=pad))
        all_prompt_mask.append(torch.nn.functional.pad(prompt_mask, (left, 0), value=0))
        right = response_width - response.shape[1]
        all_response.append(torch.nn.functional.pad(response, (0, right), value=pad))
    response_ids, response_mask, ended = truncate_at_eos(torch.cat(all_response), tokenizer.eos_token_id, pad)
    texts = tokenizer.batch_decode(response_ids.masked_fill(~response_mask, pad), skip_special_tokens=True)
    return Rollout(torch.cat(all_prompt), torch.cat(all_prompt_mask), response_ids, response_mask, ended,
                   [t.strip() for t in texts])


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, want_hidden: bool = False,
                   logits_to_keep: int = 0):
    """One forward pass with positions that skip left padding (as in `generate`); with `logits_to_keep` only the
    last that many positions go through the vocabulary-wide LM head (0 = all)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=want_hidden,
        use_cache=False,
        logits_to_keep=logits_to_keep,
    )
    return out.logits, (out.hidden_states[-1] if want_hidden else None)
