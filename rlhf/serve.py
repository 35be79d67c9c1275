"""`rlhf serve MODEL_DIR --host H --port P`: an OpenAI-compatible chat-completions server for any checkpoint.

What: `GET /v1/models` and `POST /v1/chat/completions` (the model's chat template; max_tokens, temperature,
top_p, seed, stop; streaming as server-sent events; log-probabilities with up to 20 alternatives per token),
so that any OpenAI client talks to a trained model: the official Python package, a chat UI, or
`rlhf label --judge openai:NAME@http://HOST:PORT/v1`, which makes any checkpoint a judge endpoint.
Our deviations: one request generates at a time (a lock; no batching across requests, which a CPU would not
run faster anyway); `n` must be 1; log-probabilities are the model's own (temperature 1), whatever the
sampling temperature; temperatures below 1e-5 decode greedily; no tools or response formats, and a parameter
we do not honour is refused by name rather than ignored. It listens on 127.0.0.1 unless --host says otherwise.
Bounds, each refused with an OpenAI-style JSON error that names the parameter: the body (--max_request_bytes,
413), the prompt in characters before it is tokenised (--max_prompt_chars) and in tokens after (the context),
up to 4 stop strings of up to 256 characters, max_tokens up to --max_new_tokens, top_p in (0, 1], 64-bit seeds,
strict JSON types. A request has --request_timeout seconds from its arrival: a request still queued then gets a
503, a generation stops there (finish_reason 'length'). Generation also stops when the client disconnects,
streaming or not, and a queued request whose client has gone never runs.
Security: the API key (--api_key_env) is compared in constant time, before the body is read; bound to loopback,
only loopback Host names are answered (a web page cannot reach the server through DNS rebinding); message text is
encoded as text, so `<|im_end|>` typed in a message never becomes a control token (`rlhf.data.encode_chat`). The
HTTP layer (uvicorn/h11, bounded bodies and lines) is `rlhf.httpd`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import random
import threading
import time
import uuid
from contextlib import closing
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
LOG = logging.getLogger("rlhf.serve")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256
MIN_TEMPERATURE = 1e-5  # below this, logits / T overflow on the way to 0: the limit, greedy decoding, is used
SEEDS = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
PARAMETERS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "stop",
              "stream", "stream_options", "logprobs", "top_logprobs"}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}  # bookkeeping: no effect on the answer
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}  # accepted at their no-effect value only


@dataclass
class Config:
    model: str = cfg.field("default", "the checkpoint to serve: a causal-LM folder, 'default' or 'tiny' (also "
                                      "positional)")
    host: str = cfg.field("127.0.0.1", "address to listen on (0.0.0.0 opens it to the network)")
    port: int = cfg.field(8000, "port (0 = any free port, printed at start)")
    name: str = cfg.field("", "the model id clients ask for ('' = the folder's name)")
    max_new_tokens: int = cfg.field(512, "longest answer, and the default when a request names none")
    api_key_env: str = cfg.field("", "an environment variable holding the key clients must send ('' = no key)")
    threads: int = cfg.field(4, "worker threads for tokenising and decoding (generation runs one request at a time)")
    bf16: Precision = cfg.field(False, "bf16 autocast: true, false or auto (on where bf16 is native; log-probabilities "
                                       "less exact)")
    device: str = cfg.field("auto", "cpu, cuda or auto")
    max_request_bytes: int = cfg.field(2 * 1024 * 1024, "largest request body in bytes (413 above)")
    max_prompt_chars: int = cfg.field(0, "longest prompt in characters, checked before tokenising (0 = the context "
                                         "times the longest token: no prompt that fits is refused)")
    request_timeout: float = cfg.field(300.0, "seconds a request may take from its arrival, queueing included")
    max_connections: int = cfg.field(100, "open connections at most (503 beyond)")
    allowed_hosts: str = cfg.field("", "Host header names answered, comma-separated ('' = loopback names when "
                                       "--host is loopback, else any)")


class RequestError(ValueError):
    """A request the client must fix: answered with its HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class Settings:
    messages: Messages
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


# --- the request, checked ------------------------------------------------------------------------------------------


def parse_json(raw: bytes) -> Any:
    """The body as JSON: invalid UTF-8 or JSON, NaN and Infinity (not JSON), and nesting too deep to parse are a 400."""
    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def _text(value: Any, where: str, param: str) -> str:
    """A string that can be written as UTF-8 (JSON allows lone surrogates such as "\\ud800"; text cannot hold them)."""
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {type(value).__name__}", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{where} holds a lone surrogate (\\ud800-\\udfff), which is not text",
                           param=param) from None
    return value


def _flag(body: dict, key: str, where: str | None = None) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{where or key}' must be true or false, got {value!r}", param=where or key)
    return bool(value)


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
    where = f"messages[{index}].content"
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and set(p) <= {"type", "text"} for p in content):
            raise RequestError(f"{where} parts must be {{\"type\": \"text\", \"text\": ...}} (text only)",
                               param="messages")
        return "".join(_text(p.get("text"), f"{where}[{i}].text", "messages") for i, p in enumerate(content))
    if not isinstance(content, str):
        raise RequestError(f"{where} must be a string or a list of text parts", param="messages")
    return _text(content, where, "messages")


def _message(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"messages[{index}].role must be one of {', '.join(ROLES)}", param="messages")
    if message.get("name") is not None:
        _text(message["name"], f"messages[{index}].name", "messages")
    # a message echoed back from a response may carry empty fields (refusal, tool_calls): only content is read
    extra = [k for k, v in message.items() if k not in ("role", "content", "name") and v not in (None, [], {}, "")]
    if extra:
        raise RequestError(f"messages[{index}] has fields this server does not support: {', '.join(sorted(extra))}",
                           param="messages")
    return {"role": ROLES[message["role"]], "content": _content(message, index)}


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} strings", param="stop")
    for i, s in enumerate(stop):
        if not _text(s, f"stop[{i}]", "stop") or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop[{i}] must be 1 to {MAX_STOP_CHARS} characters long, got {len(s)}", param="stop")
    return stop


def _check_parameters(body: dict) -> None:
    for key, value in body.items():
        if key in PARAMETERS or key in IGNORED:
            continue
        if key in NEUTRAL:
            if value is not None and value != NEUTRAL[key]:
                raise RequestError(f"'{key}' is not supported (only {NEUTRAL[key]!r})", param=key)
            continue
        raise RequestError(f"unknown or unsupported parameter '{key}'", param=key)


def parse_request(body: Any, limit: int) -> Settings:
    """Check a chat-completions body → Settings; a RequestError names the offending parameter."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_parameters(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}", param="messages")
    chat = [_message(m, i) for i, m in enumerate(messages)]
    if _number(body, "n", 1, 1, 128, integer=True) != 1:
        raise RequestError("only n = 1 is supported", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, limit, 1, (1 << 31) - 1, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0:
        raise RequestError("'top_p' must be above 0 (1 keeps every token)", param="top_p")
    seed = _number(body, "seed", None, *SEEDS, integer=True) if body.get("seed") is not None else None
    top_logprobs = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return Settings(
        messages=chat, max_tokens=min(limit, max_tokens),
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature, top_p=top_p, seed=seed,
        stop=_stop(body), stream=_flag(body, "stream"),
        include_usage=_flag(options or {}, "include_usage", "stream_options.include_usage"),
        logprobs=_flag(body, "logprobs") or top_logprobs > 0, top_logprobs=top_logprobs)


# --- generation ----------------------------------------------------------------------------------------------------


Piece = tuple[str, list[dict], "str | None", int]  # new text, its log-probability entries, finish reason, tokens so far


class Halt:
    """Why a generation must end before its answer does: its client left (`set()`), or its time ran out."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.left = threading.Event()

    def set(self) -> None:
        self.left.set()

    def reason(self) -> str | None:
        if self.left.is_set():
            return "disconnected"
        return "timeout" if time.monotonic() >= self.deadline else None


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
    """The model and its tokenizer: turns Settings into text pieces with their log-probabilities.

    Not thread-safe: the app runs one generation at a time. The counters say what the server did, so that a test
    (or an operator) sees that a disconnect or a time limit stopped the work: `generations` started,
    `tokens_generated` (every token decoded), `active` (generations running now).
    """

    def __init__(self, model, tokenizer, bf16: bool):
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        eos = model.generation_config.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        # a token is at most this many characters (byte-level tokens: bytes, never fewer than characters)
        self.longest_token = max(map(len, tokenizer.get_vocab()), default=1)
        self.generations = self.tokens_generated = self.active = 0

    def token_info(self, token: int, logprobs: torch.Tensor, top: int) -> dict:
        def entry(t: int) -> dict:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": float(logprobs[t]), "bytes": list(text.encode("utf-8"))}

        info = entry(token)
        info["top_logprobs"] = [entry(t) for t in logprobs.topk(top).indices.tolist()] if top else []
        return info

    def prompt_ids(self, settings: Settings, max_chars: int = 0) -> list[int]:
        """The templated prompt; max_tokens shrinks to the room the model's context leaves after it.

        The characters are counted first, so a huge prompt is refused before the tokenizer spends time and memory
        on it; by default the bound is the context times the longest token, which no prompt that fits exceeds.
        """
        if len(settings.messages) > self.context:  # every message takes a token of the template at least
            raise RequestError(f"{len(settings.messages)} messages cannot fit the model's context of {self.context} "
                               "tokens", param="messages", code="context_length_exceeded")
        chars = sum(len(m["content"]) for m in settings.messages)
        bound = max_chars or self.context * self.longest_token
        if chars > bound:
            raise RequestError(f"the prompt ({chars} characters) is longer than this server takes ({bound})",
                               param="messages", code="context_length_exceeded")
        try:
            ids = encode_prompt(self.tokenizer, settings.messages)
        except ValueError as e:  # message text that this tokenizer cannot keep apart from its control tokens
            raise RequestError(str(e), param="messages") from None
        if len(ids) >= self.context:
            raise RequestError(f"the prompt ({len(ids)} tokens) leaves no room in the model's context of "
                               f"{self.context} tokens", param="messages", code="context_length_exceeded")
        settings.max_tokens = min(settings.max_tokens, self.context - len(ids))
        return ids

    def pieces(self, settings: Settings, prompt_ids: list[int],
               halt: Halt | None = None) -> Iterator[Piece]:
        """Yield (new text, its tokens' log-probability entries, finish reason or None, tokens so far).

        The whole answer is decoded again at each token and only the new characters are sent, so a character
        split over several tokens is never sent half-made; text that may begin a stop string waits. A stop string
        can only begin after the text already sent (what could begin one is held back), so only that tail is
        searched. `halt` ends the answer early (finish reason 'length') once its client left or its time ran out.
        """
        self.generations += 1
        self.active += 1
        try:
            with closing(decode(self.model, prompt_ids, settings, self.eos_ids, self.bf16)) as steps:
                yield from self._pieces(steps, settings, halt)
        finally:
            self.active -= 1

    def _pieces(self, steps, settings: Settings, halt: Halt | None) -> Iterator[Piece]:
        tokens: list[int] = []
        entries: list[dict] = []
        sent = ""
        for token, logprobs in steps:
            self.tokens_generated += 1
            if token in self.eos_ids:
                yield sent_rest(self.tokenizer, tokens, sent), entries, "stop", len(tokens)
                return
            tokens.append(token)
            if settings.logprobs:
                entries.append(self.token_info(token, logprobs, settings.top_logprobs))
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((at for s in settings.stop if (at := text.find(s, len(sent))) >= 0), default=-1)
            if cut >= 0:
                yield text[len(sent):cut] if cut > len(sent) else "", entries, "stop", len(tokens)
                return
            if halt is not None and halt.reason():
                break
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


# --- the app -------------------------------------------------------------------------------------------------------


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def json_error(status: int, message: str) -> tuple[bytes, str]:
    """The HTTP layer's own refusals (413, 408, 401) in the API's error format."""
    return json.dumps(error_body(message, status)).encode(), "application/json"


def error_response(message: str, status: int, param: str | None = None, code: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(message, status, param, code), status)


def key_check(api_key: str):
    """The API key check, on the headers alone (before the body is read): `Authorization: Bearer KEY`, the scheme in
    any case, the key compared in constant time."""
    expected = api_key.encode("utf-8")

    def admit(scope: dict) -> tuple[int, str] | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, sent = header.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(sent.strip(), expected):
            return None
        return 401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')"

    return admit


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Completion:
    """The ASGI answer to one chat completion: it waits its turn, generates in a worker thread and stops as soon as
    its client disconnects (a task listens for it meanwhile) or its time runs out.

    Nothing is sent until the first piece of text is ready, so a request that fails before (or waits past its
    time limit, 503) gets a JSON error, never a 200 with a cut stream.
    """

    def __init__(self, generator: Generator, settings: Settings, prompt_ids: list[int], head: dict, halt: Halt,
                 lock, threads):
        self.generator, self.settings, self.prompt_ids, self.head = generator, settings, prompt_ids, head
        self.halt, self.lock, self.threads = halt, lock, threads

    async def __call__(self, scope: dict, receive, send) -> None:
        import anyio

        async with anyio.create_task_group() as tasks:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.halt.set()
                tasks.cancel_scope.cancel()  # a request still queued leaves the queue at once

            tasks.start_soon(watch)
            try:
                await self.answer(send)
            finally:
                tasks.cancel_scope.cancel()

    async def answer(self, send) -> None:
        import anyio

        with anyio.move_on_after(max(0.0, self.halt.deadline - time.monotonic())) as queued:
            await self.lock.acquire()
        if queued.cancelled_caught:
            await send_json(send, 503, error_body("the server stayed busy for the whole request_timeout; retry later",
                                                  503, code="timeout"))
            return
        pieces = self.generator.pieces(self.settings, self.prompt_ids, self.halt)
        try:
            await (self.stream(send, pieces) if self.settings.stream else self.whole(send, pieces))
        finally:
            pieces.close()  # never while a worker thread runs it: a thread call is waited for, even when cancelled
            self.lock.release()

    async def next_piece(self, pieces):
        import anyio

        return await anyio.to_thread.run_sync(next, pieces, None, limiter=self.threads)

    async def whole(self, send, pieces) -> None:
        text, entries, finish, count = "", [], "length", 0
        try:
            while (item := await self.next_piece(pieces)) is not None:
                piece, piece_entries, reason, count = item
                text += piece
                entries += piece_entries
                finish = reason or finish
        except Exception as e:
            LOG.exception("generation failed")
            await send_json(send, 500, error_body(f"generation failed: {type(e).__name__}", 500))
            return
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": {"content": entries} if self.settings.logprobs else None, "finish_reason": finish}
        await send_json(send, 200, {**self.head, "object": "chat.completion", "choices": [choice],
                                    "usage": usage(len(self.prompt_ids), count)})

    async def stream(self, send, pieces) -> None:
        """Server-sent events: a role chunk, a chunk per piece of text, the finish reason, usage if asked, [DONE]."""
        try:
            first = await self.next_piece(pieces)
        except Exception as e:
            LOG.exception("generation failed")
            await send_json(send, 500, error_body(f"generation failed: {type(e).__name__}", 500))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        body = {"type": "http.response.body", "more_body": True}
        await send({**body, "body": self.event({"role": "assistant", "content": ""})})
        count, item = 0, first
        try:
            while item is not None:
                piece, entries, finish, count = item
                if piece or entries:
                    await send({**body, "body": self.event({"content": piece}, entries)})
                if finish:
                    await send({**body, "body": self.event({}, None, finish)})
                item = await self.next_piece(pieces)
        except Exception as e:  # the 200 is sent: the error goes in the stream, as OpenAI's does
            LOG.exception("generation failed")
            await send({**body, "body": sse(error_body(f"generation failed: {type(e).__name__}", 500))})
            await send({"type": "http.response.body", "body": b""})
            return
        if self.settings.include_usage:
            chunk = {**self.head, "object": "chat.completion.chunk", "choices": [],
                     "usage": usage(len(self.prompt_ids), count)}
            await send({**body, "body": sse(chunk)})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def event(self, delta: dict, entries: list | None = None, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta,
                  "logprobs": {"content": entries} if self.settings.logprobs and entries is not None else None,
                  "finish_reason": finish}
        return sse({**self.head, "object": "chat.completion.chunk", "choices": [choice]})


def sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def send_json(send, status: int, data: dict) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(generator: Generator, name: str, config: Config | None = None, api_key: str = ""):
    """The ASGI app: /v1/models and /v1/chat/completions behind the HTTP layer's bounds (`rlhf.httpd.protect`)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    from rlhf.httpd import protect

    config = config or Config()
    for key in ("max_request_bytes", "request_timeout", "max_connections", "threads", "max_new_tokens"):
        if getattr(config, key) <= 0:
            raise ValueError(f"--{key} must be above 0, got {getattr(config, key)}")
    if config.max_prompt_chars < 0:
        raise ValueError(f"--max_prompt_chars must be 0 (the context's bound) or more, got {config.max_prompt_chars}")
    created = int(time.time())
    lock = anyio.Lock()  # one generation at a time
    threads = anyio.CapacityLimiter(max(1, config.threads))

    def card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "rlhf"}

    async def models(request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [card()]})

    async def model(request):
        from starlette.responses import JSONResponse

        model_id = request.path_params["model_id"]
        if model_id != name:
            return error_response(f"no model '{model_id}' here; this server has '{name}'", 404, "model",
                                  "model_not_found")
        return JSONResponse(card())

    async def chat_completions(request):
        halt = Halt(time.monotonic() + config.request_timeout)
        try:
            body = parse_json(await request.body())
            if isinstance(body, dict) and body.get("model") is not None:
                asked = _text(body["model"], "'model'", "model")
                if asked != name:
                    raise RequestError(f"no model '{asked}' here; this server has '{name}'", 404, "model",
                                       "model_not_found")
            settings = parse_request(body, config.max_new_tokens)
            prompt_ids = await anyio.to_thread.run_sync(generator.prompt_ids, settings, config.max_prompt_chars,
                                                        limiter=threads)
        except RequestError as e:
            return error_response(str(e), e.status, e.param, e.code)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        return Completion(generator, settings, prompt_ids, head, halt, lock, threads)

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            return error_response(f"no such endpoint: {request.method} {request.url.path}", 404)
        if exc.status_code == 405:
            return error_response(f"{request.method} is not allowed on {request.url.path}", 405)
        return error_response(str(exc.detail), exc.status_code)

    async def server_error(request, exc: Exception):
        return error_response(f"internal error ({type(exc).__name__}); the server log has the details", 500)

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/models/{model_id:path}", model),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    return protect(app, config.host, config.max_request_bytes, json_error, config.allowed_hosts,
                   key_check(api_key) if api_key else None)


def main(config: Config) -> dict:
    from rlhf.httpd import Listener

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
    app = create_app(Generator(model, tokenizer, resolve_bf16(config.bf16, device)), name, config, api_key)
    listener = Listener(app, config.host, config.port, config.max_connections)
    url = f"{listener.url}/v1"
    say(f"[serve] {path} as '{name}' at {url} (chat completions, streaming, logprobs); Ctrl-C stops")
    try:
        listener.run()
    except KeyboardInterrupt:
        say("[serve] stopped")
    return {"stage": "serve", "url": url, "model": name}
