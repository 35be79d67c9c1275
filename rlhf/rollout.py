"""Sampling responses: batched generation with a KV cache, truncation at the first EOS.

A rollout keeps exactly the tensors that were sampled (left-padded prompts, right-padded responses)
so that log-probabilities recomputed later see the same padding and positions as sampling did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from rlhf.data import Messages, encode_prompt, pad_left
from rlhf.fast import decoder_for, weights_cast_once
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

    def to(self, device: torch.device) -> "Rollout":
        return Rollout(self.prompt_ids.to(device), self.prompt_mask.to(device), self.response_ids.to(device),
                       self.response_mask.to(device), self.ended.to(device), self.texts)

    def select(self, index: torch.Tensor | slice) -> "Rollout":
        if isinstance(index, slice):
            texts = self.texts[index]
        else:
            texts = [self.texts[i] for i in index.tolist()]
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.response_ids[index],
                       self.response_mask[index], self.ended[index], texts)


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and those of the model's generation config, which for
    Llama 3 or Qwen2.5 is a list (`<|eot_id|>` beside `<|end_of_text|>`, `<|im_end|>` beside `<|endoftext|>`)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if isinstance(i, int))


def truncate_at_eos(response_ids: torch.Tensor, eos_id: int | list[int],
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (ids with pad after the first EOS (any of `eos_id` when a list), mask True up to and including it,
    ended (B,))."""
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=response_ids.device)
    is_eos = torch.isin(response_ids, eos)
    ended = is_eos.any(dim=1)
    # number of EOS seen strictly before each position: 0 means still inside the response
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    ids = response_ids.masked_fill(~mask, pad_id)
    return ids, mask, ended


def draw_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` (B, V), drawn by inverting the cumulative distribution.

    Same distribution as `torch.multinomial(probs, 1)`, which on CPU draws an exponential variate for every
    vocabulary entry (a tenth of a decode step at batch 8), against a cumulative sum and B uniforms here. A token
    of zero probability spans an empty interval of the cumulative sum, so it is never drawn. The rows need not
    sum to 1. `generator`: the random stream to draw from (the global one when None). A row that is not a
    distribution (NaN, Inf, negative, or all zero: the model's logits diverged) raises ValueError instead of
    becoming a token id.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    broken = ~torch.isfinite(total) | (total <= 0) | (probs < 0).any(dim=-1)
    if bool(broken.any()):
        row = int(broken.nonzero()[0, 0])
        raise ValueError(f"sampling: the next-token distribution of row {row} is not finite or sums to "
                         f"{float(total[row])} (the model's weights or logits hold NaN/Inf); lower the lr")
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def next_token(logits: torch.Tensor, temperature: float, top_p: float = 1.0, greedy: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (B,) from the last position's logits (B, V): argmax, or a draw from softmax(logits / T),
    restricted with `top_p` < 1 to the most likely tokens whose mass first reaches top_p (nucleus sampling)."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return draw_tokens(probs, generator)


def decode_steps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, eos_ids: set[int],
                 pad_id: int, choose: Callable[[torch.Tensor, int], torch.Tensor], fast: bool = True,
                 compiled: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The decode loop: yield (token ids (B,), the logits (B, V) they were chosen from) one new token at a time.

    What `generate` does for plain sampling, without its per-step machinery (logits processors, stopping criteria,
    input preparation). `choose(logits, step)` picks the tokens; a row that has ended gets `pad_id`. The prompt's
    positions skip its left padding; each new token takes the next position and attends to every earlier real
    token. Stops when every row has emitted one of `eos_ids`, or at the limit. Run it under `no_grad` (and
    autocast). The forward pass per token is `rlhf.fast.decoder_for`'s: our own for the models it covers (`fast`),
    else the model's own with transformers' cache.
    """
    if max_new_tokens <= 0:
        return
    with decoder_for(model, prompt_mask, max_new_tokens, fast=fast, compiled=compiled) as forward:
        logits = forward.prefill(prompt_ids)
        running = torch.ones(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        eos = torch.tensor(sorted(eos_ids), device=prompt_ids.device)
        for step in range(max_new_tokens):
            token = choose(logits, step).masked_fill_(~running, pad_id)
            yield token, logits
            running &= ~torch.isin(token, eos)
            if step == max_new_tokens - 1 or not running.any():
                return
            logits = forward.step(token)


def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, eos_id: int | list[int],
           pad_id: int,
           temperature: float = 0.7, top_p: float = 1.0, greedy: bool = False, min_new_tokens: int = 0,
           fast: bool = True, compiled: bool = False) -> torch.Tensor:
    """Response ids (B, ≤ max_new_tokens) for left-padded prompts, sampled from softmax(logits / temperature)
    (or greedy), EOS held back for the first `min_new_tokens`; pad after a row's EOS (any of `eos_id` when a list)."""
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        logits = logits.float()
        if step < min_new_tokens:
            logits = logits.clone()
            logits[:, eos_ids] = float("-inf")
        return next_token(logits, temperature, top_p, greedy)

    tokens = [token for token, _ in decode_steps(model, prompt_ids, prompt_mask, max_new_tokens, set(eos_ids), pad_id,
                                                 choose, fast, compiled)]
    return torch.stack(tokens, dim=1) if tokens else prompt_ids.new_empty(prompt_ids.shape[0], 0)


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
    openings: list[str] | None = None,
) -> Rollout:
    """Sample one response per prompt. Prompts are batched `batch_size` at a time (big batches are several times
    faster per token on CPU), then stitched into one right-padded Rollout. `compiled`: decode steps as compiled
    graphs (`LayerStackDecoder`), for long runs. `openings`: per prompt, text the response starts with (prefilled
    after the assistant header, then sampled on; '' = none): its tokens count as prompt ids, its text is the start
    of the returned text."""
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    if openings is not None and len(openings) != len(prompts):
        raise ValueError(f"openings: one per prompt, got {len(openings)} for {len(prompts)} prompts")
    openings = openings or [""] * len(prompts)
    encoded = [encode_prompt(tokenizer, p) + (tokenizer.encode(o, add_special_tokens=False) if o else [])
               for p, o in zip(prompts, openings)]
    pieces = []
    chunks = range(0, len(encoded), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="sampling", unit="batch", leave=False)
    for start in chunks:
        prompt_ids, prompt_mask = pad_left(encoded[start:start + batch_size], tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        with autocast(device, bf16), weights_cast_once(model, bf16):
            response = decode(model, prompt_ids, prompt_mask, max_new_tokens, stops,
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
    response_ids, response_mask, ended = truncate_at_eos(torch.cat(all_response), stops, pad)
    texts = tokenizer.batch_decode(response_ids.masked_fill(~response_mask, pad), skip_special_tokens=True)
    return Rollout(torch.cat(all_prompt), torch.cat(all_prompt_mask), response_ids, response_mask, ended,
                   [(o + t).strip() for o, t in zip(openings, texts)])


def concatenate(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts sampled apart (e.g. dynamic sampling's tries) as one: prompts padded further on the left, responses
    on the right, as `sample` stitches its own generation batches."""
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    response_width = max(r.response_ids.shape[1] for r in rollouts)

    def left(x: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (prompt_width - x.shape[1], 0), value=value)

    def right(x: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, response_width - x.shape[1]), value=value)

    return Rollout(torch.cat([left(r.prompt_ids, pad_id) for r in rollouts]),
                   torch.cat([left(r.prompt_mask, 0) for r in rollouts]),
                   torch.cat([right(r.response_ids, pad_id) for r in rollouts]),
                   torch.cat([right(r.response_mask, False) for r in rollouts]),
                   torch.cat([r.ended for r in rollouts]), [t for r in rollouts for t in r.texts])
