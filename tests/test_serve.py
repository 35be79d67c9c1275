"""`rlhf serve` with the official `openai` client: models, chat completions, streaming, log-probabilities, errors.

The server binds 127.0.0.1 on a free port and is closed at the end of each test module.
"""

import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import openai  # the test extra installs it
import pytest

MESSAGES = [{"role": "user", "content": "Explain rain to a 10-year-old."}]


@contextmanager
def running_server(model_dir, **settings):
    """`rlhf serve`'s app under waitress on 127.0.0.1 and a free port, in this process → its base URL."""
    import torch
    from waitress import wasyncore
    from waitress.server import create_server

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.serve import Generator, create_app

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, torch.device("cpu"), trainable=False)
    app = create_app(Generator(model, tokenizer, bf16=False), model_dir.name, **settings)
    sockets: dict = {}  # the server's socket map
    server = create_server(app, map=sockets, host="127.0.0.1", port=0, threads=2)
    stop = threading.Event()

    def serve() -> None:  # the loop closes its own sockets when told to stop: no fd closed under its feet
        while not stop.is_set():
            wasyncore.loop(timeout=0.05, map=sockets, count=1)
        wasyncore.close_all(sockets)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}/v1"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.task_dispatcher.shutdown()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(tiny_model):
    with running_server(tiny_model, limit=64) as url:
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


def test_the_api_key_is_checked_when_set(tiny_model):
    with running_server(tiny_model, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).models.list().data


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
