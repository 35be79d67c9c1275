"""`rlhf serve` with the official `openai` client: models, chat completions, streaming, log-probabilities, errors.

The server binds 127.0.0.1 on a free port and is closed at the end of each test module.
"""

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import openai  # the test extra installs it
import pytest

MESSAGES = [{"role": "user", "content": "Explain rain to a 10-year-old."}]


def load_generator(model_dir):
    import torch

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.serve import Generator

    tokenizer = load_tokenizer(model_dir)
    return Generator(load_causal_lm(model_dir, torch.device("cpu"), trainable=False), tokenizer, bf16=False)


@contextmanager
def running_server(model_dir, generator=None, api_key: str = "", **settings):
    """`rlhf serve`'s app on 127.0.0.1 and a free port, served from a thread of this process → its base URL.
    `settings` are `rlhf.serve.Config` fields."""
    from rlhf.httpd import serving
    from rlhf.serve import Config, create_app

    generator = generator or load_generator(model_dir)
    app = create_app(generator, model_dir.name, Config(model=str(model_dir), **settings), api_key)
    with serving(app) as listener:
        yield f"{listener.url}/v1"


@pytest.fixture(scope="module")
def client(tiny_model):
    with running_server(tiny_model, max_new_tokens=64) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)


def test_models_and_a_greedy_completion(client, tiny_model):
    assert [m.id for m in client.models.list().data] == [tiny_model.name]
    kwargs = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=8, temperature=0)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    choice = first.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert first.usage.completion_tokens <= 8 and first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert choice.message.content == second.choices[0].message.content  # greedy is deterministic
    sampled = [client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample


def test_streaming_gives_the_same_text(client, tiny_model):
    kwargs = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert ([c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            in (["stop"], ["length"]))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 12


def test_logprobs_with_alternatives(client, tiny_model):
    response = client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        alternatives = [t.logprob for t in token.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        assert token.logprob == pytest.approx(alternatives[0], abs=1e-6)  # greedy picks the most likely token
    assert "".join(t.token for t in content) == response.choices[0].message.content or \
        response.choices[0].message.content in "".join(t.token for t in content)
    streamed = [c for c in client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=6,
                                                          temperature=0, logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs]
    tokens = [t for c in streamed for t in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content]


def test_stop_strings_cut_the_answer(client, tiny_model):
    kwargs = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(whole) >= 4, "the tiny model's greedy answer is too short to cut"
    stop = whole[2:4]
    cut = client.chat.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].message.content == whole[: whole.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stop=stop, stream=True, **kwargs) if c.choices)
    assert streamed == whole[: whole.find(stop)]


def test_bad_requests_get_openai_errors(client, tiny_model):
    with pytest.raises(openai.NotFoundError, match="no model 'gpt-4'"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=tiny_model.name, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=tiny_model.name, messages=[{"role": "user", "content": "rain " * 600}])


def test_the_api_key_is_checked_when_set(tiny_model, monkeypatch):
    import rlhf.serve

    compared = []
    real = rlhf.serve.hmac.compare_digest
    monkeypatch.setattr(rlhf.serve.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with running_server(tiny_model, api_key="s3cret", max_request_bytes=1000) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).models.list().data
        assert compared  # compared in constant time, not with !=
        assert request(url, "GET", "/models", headers={"Authorization": "bearer s3cret"})[0] == 200  # any case
        assert request(url, "GET", "/models", headers={"Authorization": "BEARER  s3cret "})[0] == 200
        # the key is checked before the body is read: a stranger's big upload is refused unread
        status, headers, body = request(url, "POST", "/chat/completions", b" " * 5000)
        assert status == 401 and headers["content-type"] == "application/json" and "API key" in body.decode()


def test_rlhf_serve_command_on_loopback(tiny_model):
    """The real command: `rlhf serve MODEL_DIR --port 0` prints its URL; the openai client uses it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rlhf", "serve", str(tiny_model), "--host", "127.0.0.1",
                                "--port", "0", "--max_new_tokens", "8", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = ""
        for line in process.stdout:  # bounded: the process prints its URL at start, or exits
            if "[serve]" in line:
                break
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
        reply = client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=100, temperature=0)
        assert reply.usage.completion_tokens <= 8  # the server's own limit caps the request's
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- hostile requests: bounded in size and time, and answered in JSON --------------------------------------------


def request(url: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
            chunked: bool = False) -> tuple[int, dict, bytes]:
    """One raw request (http.client: the body exactly as given) → (status, lower-case headers, body)."""
    import http.client
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        if chunked:
            conn.request(method, parsed.path + path, body=iter([data[:100], data[100:]]), encode_chunked=True,
                         headers={**(headers or {}), "Transfer-Encoding": "chunked"})
        else:
            conn.request(method, parsed.path + path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def chat_body(tiny_model, **extra) -> dict:
    return {"model": tiny_model.name, "messages": MESSAGES, "max_tokens": 2, **extra}


def test_a_body_one_byte_over_the_limit_is_refused(tiny_model):
    body = json.dumps(chat_body(tiny_model)).encode()
    limit = len(body) + 10
    fits = body + b" " * (limit - len(body))
    with running_server(tiny_model, max_request_bytes=limit) as url:
        assert request(url, "POST", "/chat/completions", fits)[0] == 200
        for chunked in (False, True):  # declared up front, or counted as a chunked upload arrives
            status, headers, answer = request(url, "POST", "/chat/completions", fits + b" ", chunked=chunked)
            assert status == 413 and headers["content-type"] == "application/json"
            assert f"limit of {limit} bytes" in json.loads(answer)["error"]["message"]


def test_a_huge_prompt_is_refused_before_it_is_tokenised(tiny_model, monkeypatch):
    import rlhf.serve

    tokenised = []
    real = rlhf.serve.encode_prompt
    monkeypatch.setattr(rlhf.serve, "encode_prompt", lambda *args: tokenised.append(1) or real(*args))
    generator = load_generator(tiny_model)
    bound = generator.context * generator.longest_token  # no prompt of more characters fits the context
    with running_server(tiny_model, generator) as url:
        huge = [{"role": "user", "content": "a" * (bound + 1)}]
        status, _, answer = request(url, "POST", "/chat/completions", {"messages": huge})
        assert status == 400 and json.loads(answer)["error"]["code"] == "context_length_exceeded"
        assert tokenised == []  # refused on its characters: the tokenizer never saw it
        fits_in_characters = [{"role": "user", "content": "rain " * 600}]  # but not in tokens
        status, _, answer = request(url, "POST", "/chat/completions", {"messages": fits_in_characters})
        assert status == 400 and json.loads(answer)["error"]["code"] == "context_length_exceeded"
        assert tokenised == [1]


def test_stop_strings_are_bounded_in_number_and_length(client, tiny_model):
    ok = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=4)
    assert client.chat.completions.create(stop=["x" * 256, "y", "z", "w"], **ok).choices
    with pytest.raises(openai.BadRequestError, match="1 to 256 characters"):
        client.chat.completions.create(stop=["x" * 257], **ok)
    with pytest.raises(openai.BadRequestError, match="up to 4 strings"):
        client.chat.completions.create(stop=["a", "b", "c", "d", "e"], **ok)


@pytest.mark.parametrize("name,body,param", [
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, None),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ("top_p 0", {"messages": MESSAGES, "top_p": 0}, "top_p"),
    ("seed of 65 bits", {"messages": MESSAGES, "seed": 2**64}, "seed"),
    ("seed not an integer", {"messages": MESSAGES, "seed": 1.5}, "seed"),
    ("stream as a string", {"messages": MESSAGES, "stream": "false"}, "stream"),
    ("logprobs as a number", {"messages": MESSAGES, "logprobs": 1}, "logprobs"),
    ("unsupported parameter", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    ("model not a string", {"model": ["x"], "messages": MESSAGES}, "model"),
    ("an image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ("not an object", b"[1, 2]", None),
])
def test_bad_values_get_a_json_400(client, name, body, param):
    status, headers, answer = request(str(client.base_url).rstrip("/"), "POST", "/chat/completions", body)
    assert status == 400 and headers["content-type"] == "application/json", name
    error = json.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_values_at_the_edges_are_answered(client, tiny_model):
    kwargs = dict(model=tiny_model.name, messages=MESSAGES, max_tokens=6)
    greedy = client.chat.completions.create(temperature=0, **kwargs).choices[0].message.content
    assert client.chat.completions.create(temperature=1e-300, **kwargs).choices[0].message.content == greedy
    for seed in (2**64 - 1, -(2**63)):
        assert client.chat.completions.create(seed=seed, **kwargs).choices[0].finish_reason in ("stop", "length")
    neutral = client.chat.completions.create(frequency_penalty=0, user="ann", **kwargs)  # accepted, no effect
    assert neutral.choices[0].message.content is not None


def test_every_error_is_json_even_an_unexpected_one(tiny_model):
    generator = load_generator(tiny_model)
    generator.prompt_ids = lambda *args: 1 / 0
    with running_server(tiny_model, generator) as url:
        status, headers, answer = request(url, "POST", "/chat/completions", {"messages": MESSAGES})
        assert status == 500 and headers["content-type"] == "application/json"
        assert json.loads(answer)["error"]["type"] == "server_error"
        for method, path, expected in (("GET", "/nowhere", 404), ("GET", "/chat/completions", 405)):
            status, headers, _ = request(url, method, path)
            assert status == expected and headers["content-type"] == "application/json"


def test_only_loopback_host_names_are_answered_on_loopback(client):
    url = str(client.base_url).rstrip("/")
    for host, expected in (("evil.example", 400), ("evil.example:8000", 400), ("localhost:8000", 200),
                           ("127.0.0.1", 200), ("[::1]:8000", 200)):
        assert request(url, "GET", "/models", headers={"Host": host})[0] == expected, host


# --- disconnects and time limits stop the generation -------------------------------------------------------------


@pytest.fixture
def endless(tiny_model):
    """A generator whose answers never end by themselves, at 20 ms a token: only a limit or a disconnect stops it."""
    generator = load_generator(tiny_model)
    generator.eos_ids = {-1}
    forward = generator.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    generator.model.forward = slow_forward
    return generator


def wait_until(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there within 30 s"
        time.sleep(0.01)


def open_request(url: str, body: dict) -> socket.socket:
    """A chat completion sent on a raw socket, left open: the test decides when the client goes."""
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
    sock.sendall(f"POST {parsed.path}/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_generation_stops_when_the_client_disconnects(tiny_model, endless):
    body = {"model": tiny_model.name, "messages": MESSAGES, "max_tokens": 400}
    with running_server(tiny_model, endless, max_new_tokens=400) as url:
        streaming = open_request(url, {**body, "stream": True})
        received = b""
        while b"data:" not in received:  # the stream starts once the first piece of text is ready
            received += streaming.recv(4096)
        streaming.close()
        wait_until(lambda: endless.active == 0)
        streamed = endless.tokens_generated
        assert 0 < streamed < 50  # not 400: the server's own counter stopped soon after the client left

        whole = open_request(url, body)
        wait_until(lambda: endless.tokens_generated > streamed)  # generating now
        whole.close()
        wait_until(lambda: endless.active == 0)
        assert endless.tokens_generated - streamed < 50
        assert endless.generations == 2


def test_queued_requests_whose_clients_left_never_run(tiny_model, endless):
    body = {"model": tiny_model.name, "messages": MESSAGES, "max_tokens": 400}
    with running_server(tiny_model, endless, max_new_tokens=400) as url:
        running = open_request(url, {**body, "stream": True})
        wait_until(lambda: endless.active == 1)
        queued = [open_request(url, body) for _ in range(3)]  # they wait for the generation lock
        time.sleep(0.2)  # let them reach the queue
        for sock in queued:
            sock.close()
        time.sleep(0.2)  # let the server see them go before the running one ends
        running.close()
        wait_until(lambda: endless.active == 0)
        assert endless.generations == 1


def test_the_time_limit_ends_an_answer(tiny_model, endless):
    with running_server(tiny_model, endless, max_new_tokens=400, request_timeout=0.5) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
        reply = client.chat.completions.create(model=tiny_model.name, messages=MESSAGES, max_tokens=400)
    assert reply.choices[0].finish_reason == "length" and 0 < reply.usage.completion_tokens < 400
