"""`rlhf chat --model DIR`: talk to any checkpoint in the terminal (Ctrl-D or /exit to leave, /reset to start over)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf import config as cfg


@dataclass
class Config:
    model: str = cfg.field("default", "a causal-LM folder, or 'default' for the embedded model")
    max_new_tokens: int = cfg.field(256, "longest answer in tokens")
    temperature: float = cfg.field(0.7, "sampling temperature (0 = greedy)")
    system: str = cfg.field("", "an optional system message")
    device: str = cfg.field("auto", "cpu, cuda or auto")


def main(config: Config) -> dict:
    import torch
    from transformers import TextStreamer

    from rlhf.data import encode_prompt
    from rlhf.hardware import pick_device
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path

    device = pick_device(config.device)
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, device, trainable=False)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": config.system}] if config.system else []
    messages = list(start)
    print(f"Chatting with {path}. /reset starts over, /exit or Ctrl-D leaves.")
    turns = 0
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids = torch.tensor([encode_prompt(tokenizer, messages)], device=device)
        print("model> ", end="", flush=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=config.max_new_tokens, do_sample=config.temperature > 0,
                                 temperature=config.temperature or None, top_k=0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, streamer=streamer)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        turns += 1
    return {"turns": turns}
