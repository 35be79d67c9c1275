"""`rlhf serve MODEL_DIR --host H --port P`: an OpenAI-compatible chat-completions server for any checkpoint.

What: `GET /v1/models` and `POST /v1/chat/completions` (the model's chat template; max_tokens, temperature,
top_p, seed, stop; streaming as server-sent events; log-probabilities with up to 20 alternatives per token),
so that any OpenAI client talks to a trained model: the official Python package, a chat UI, or
`rlhf label --judge openai:NAME@http://HOST:PORT/v1`, which makes any checkpoint a judge endpoint.
Our deviations: one request generates at a time (a lock; no batching across requests, which a CPU would not
run faster anyway); `n` must be 1; log-probabilities are the model's own (temperature 1), whatever the
sampling temperature; no tools or response formats. The API key is checked only when --api_key_env names one.
It listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf import config as cfg
from rlhf.data import Messages, encode_prompt
from rlhf.hardware import Precision, autocast, pick_device, resolve_bf16
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.rollout import decode_steps, next_token
from rlhf.tracking import say

POSITIONAL = "model"  # `rlhf serve MODEL_DIR` is `rlhf serve --model MODEL_DIR`
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Config:
    model: str = cfg.field("default", "the checkpoint to serve: a causal-LM folder, 'default' or 'tiny' (also "
                                      "positional)")
    host: str = cfg.field("127.0.0.1", "address to listen on (0.0.0.0 opens it to the network)")
    port: int = cfg.field(8000, "port (0 = any free port, printed at start)")
    name: str = cfg.field("", "the model id clients ask for ('' = the folder's name)")
    max_new_tokens: int = cfg.field(512, "longest answer, and the default when a request names none")
    api_key_env: str = cfg.field("", "an environment variable holding the key clients must send ('' = no key)")
    threads: int = cfg.field(4, "worker threads (generation itself runs one request at a time)")
    bf16: Precision = cfg.field(False, "bf16 autocast: true, false or auto (on where bf16 is native; log-probabilities "
                                       "less exact)")
    device: str = cfg.field("auto", "cpu, cuda or auto")


class RequestError(ValueError):
    """A request the client must fix: answered with its HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class Settings:
    messages: Messages
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


def _number(body: dict, key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=key)
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be between {low} and {high}, got {value}", param=key)
    return value


def _content(message: dict, index: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def parse_request(body: Any, limit: int) -> Settings:
    """Check a chat-completions body → Settings; a RequestError names the offending parameter."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}", param="messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}", param="messages")
        chat.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    if _number(body, "n", 1, 1, 128, integer=True) != 1:
        raise RequestError("only n = 1 is supported", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    top_logprobs = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    logprobs = bool(body.get("logprobs")) or top_logprobs > 0
    options = body.get("stream_options") or {}
    return Settings(
        messages=chat,
        max_tokens=min(limit, _number({"max_tokens": max_tokens}, "max_tokens", limit, 1, 1 << 30, integer=True)),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
        stop=stop, stream=bool(body.get("stream")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        logprobs=logprobs, top_logprobs=top_logprobs)


@torch.no_grad()
def decode(model, prompt_ids: list[int], settings: Settings, eos_ids: set[int],
           bf16: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, log-probabilities over the vocabulary) one token at a time: the rollouts' decode loop over
    the model's own forward pass and transformers' cache, one sequence, with this request's seed."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed if settings.seed is not None else random.getrandbits(63))

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        logits = logits.float().cpu()
        token = next_token(logits, settings.temperature, settings.top_p, greedy=settings.temperature == 0,
                           generator=generator)
        return token.to(device)

    ids = torch.tensor([prompt_ids], device=device)
    with autocast(device, bf16):
        for token, logits in decode_steps(model, ids, torch.ones_like(ids), settings.max_tokens, eos_ids, -1, choose,
                                          fast=False):
            yield int(token[0]), torch.log_softmax(logits[0].float().cpu(), -1)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not to be sent yet)."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


class Generator:
    """The model, its tokenizer and a lock: turns Settings into text pieces with their log-probabilities."""

    def __init__(self, model, tokenizer, bf16: bool):
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        self.lock = threading.Lock()
        eos = model.generation_config.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    def token_info(self, token: int, logprobs: torch.Tensor, top: int) -> dict:
        def entry(t: int) -> dict:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": float(logprobs[t]), "bytes": list(text.encode("utf-8"))}

        info = entry(token)
        info["top_logprobs"] = [entry(t) for t in logprobs.topk(top).indices.tolist()] if top else []
        return info

    def prompt_ids(self, settings: Settings) -> list[int]:
        """The templated prompt; max_tokens shrinks to the room the model's context leaves after it."""
        ids = encode_prompt(self.tokenizer, settings.messages)
        if len(ids) >= self.context:
            raise RequestError(f"the prompt ({len(ids)} tokens) leaves no room in the model's context of "
                               f"{self.context} tokens", param="messages", code="context_length_exceeded")
        settings.max_tokens = min(settings.max_tokens, self.context - len(ids))
        return ids

    def pieces(self, settings: Settings, prompt_ids: list[int]) -> Iterator[tuple[str, list[dict], str | None, int]]:
        """Yield (new text, its tokens' log-probability entries, finish reason or None, tokens so far).

        The whole answer is decoded again at each token and only the new characters are sent, so a character
        split over several tokens is never sent half-made; text that may begin a stop string waits.
        """
        tokens: list[int] = []
        entries: list[dict] = []
        sent = ""
        with self.lock:
            for token, logprobs in decode(self.model, prompt_ids, settings, self.eos_ids, self.bf16):
                if token in self.eos_ids:
                    yield sent_rest(self.tokenizer, tokens, sent), entries, "stop", len(tokens)
                    return
                tokens.append(token)
                if settings.logprobs:
                    entries.append(self.token_info(token, logprobs, settings.top_logprobs))
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in settings.stop if s in text), default=-1)
                if cut >= 0:
                    yield text[len(sent):cut] if cut > len(sent) else "", entries, "stop", len(tokens)
                    return
                if text.endswith("\ufffd"):  # half a character: wait for the rest
                    continue
                ready = text[: len(text) - held_back(text, settings.stop)]
                if len(ready) > len(sent) or entries:
                    yield ready[len(sent):], entries, None, len(tokens)
                    sent, entries = ready, []
            yield sent_rest(self.tokenizer, tokens, sent), entries, "length", len(tokens)


def sent_rest(tokenizer, tokens: list[int], sent: str) -> str:
    """The part of the answer not sent yet."""
    return tokenizer.decode(tokens, skip_special_tokens=True)[len(sent):]


def error_response(message: str, status: int, param: str | None = None, code: str | None = None):
    from flask import jsonify

    kind = "invalid_request_error" if status < 500 else "server_error"
    return jsonify({"error": {"message": message, "type": kind, "param": param, "code": code}}), status


def create_app(generator: Generator, name: str, api_key: str = "", limit: int = 512):
    """The Flask app: /v1/models and /v1/chat/completions."""
    from flask import Flask, Response, jsonify, request

    app = Flask("rlhf-serve")
    created = int(time.time())

    @app.before_request
    def check_key():
        if api_key and request.headers.get("Authorization", "") != f"Bearer {api_key}":
            return error_response("missing or wrong API key (send it as 'Authorization: Bearer KEY')", 401,
                                  code="invalid_api_key")
        return None

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list",
                        "data": [{"id": name, "object": "model", "created": created, "owned_by": "rlhf"}]})

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str):
        if model_id != name:
            return error_response(f"no model '{model_id}' here; this server has '{name}'", 404, "model",
                                  "model_not_found")
        return jsonify({"id": name, "object": "model", "created": created, "owned_by": "rlhf"})

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = request.get_json(silent=True)
        try:
            if isinstance(body, dict) and body.get("model") not in (None, name):
                raise RequestError(f"no model '{body.get('model')}' here; this server has '{name}'", 404, "model",
                                   "model_not_found")
            settings = parse_request(body, limit)
            prompt_ids = generator.prompt_ids(settings)
        except RequestError as e:
            return error_response(str(e), e.status, e.param, e.code)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        pieces = generator.pieces(settings, prompt_ids)
        if settings.stream:
            return Response(stream_events(head, settings, pieces, len(prompt_ids)), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        text, entries, finish, count = "", [], "length", 0
        for piece, piece_entries, reason, count in pieces:  # noqa: B007  (the last count is used below)
            text += piece
            entries += piece_entries
            finish = reason or finish
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": {"content": entries} if settings.logprobs else None, "finish_reason": finish}
        return jsonify({**head, "object": "chat.completion", "choices": [choice],
                        "usage": usage(len(prompt_ids), count)})

    @app.errorhandler(404)
    def not_found(_):
        return error_response(f"no such endpoint: {request.method} {request.path}", 404)

    @app.errorhandler(405)
    def wrong_method(_):
        return error_response(f"{request.method} is not allowed on {request.path}", 405)

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_events(head: dict, settings: Settings, pieces, prompt_tokens: int) -> Iterator[str]:
    """Server-sent events: a role chunk, a chunk per piece of text, the finish reason, usage if asked, [DONE]."""
    def event(delta: dict, entries: list | None = None, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta,
                  "logprobs": {"content": entries} if settings.logprobs and entries is not None else None,
                  "finish_reason": finish}
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

    yield event({"role": "assistant", "content": ""})
    count = 0
    for piece, entries, finish, count in pieces:  # noqa: B007  (the last count is used below)
        if piece or entries:
            yield event({"content": piece}, entries)
        if finish:
            yield event({}, None, finish)
    if settings.include_usage:
        chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(prompt_tokens, count)}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def main(config: Config) -> dict:
    from waitress.server import create_server

    # 1. the model, once, for every request
    device = pick_device(config.device)
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, device, trainable=False)
    name = config.name or Path(path).name
    api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
    if config.api_key_env and not api_key:
        raise ValueError(f"--api_key_env names '{config.api_key_env}', which is not set in the environment")

    # 2. serve until Ctrl-C
    app = create_app(Generator(model, tokenizer, resolve_bf16(config.bf16, device)), name, api_key,
                     config.max_new_tokens)
    server = create_server(app, host=config.host, port=config.port, threads=config.threads, ident="rlhf-serve")
    url = f"http://{server.effective_host}:{server.effective_port}/v1"
    say(f"[serve] {path} as '{name}' at {url} (chat completions, streaming, logprobs); Ctrl-C stops")
    try:
        server.run()
    except KeyboardInterrupt:
        say("[serve] stopped")
    finally:
        server.close()
    return {"stage": "serve", "url": url, "model": name}
