"""Judges for AI feedback: given a prompt and two responses, the probability that the first is better.

What: one interface for every kind of judge, `judge.compare(comparisons) -> list[Judgement]`. A Comparison is a
prompt, two responses and the question the judge answers ("Which response is more helpful ...?"); a Judgement
is `p_first` (None when the judge gave no label, with the reason in `error`) and the judge's text, if it wrote
any. The judges, named by a spec string (`--judge ...`):
  local:MODEL        a causal LM (a folder, 'default' or 'tiny') is asked which response is better and answers
                     with a letter; p comes from the next-token probabilities of the labels "A" and "B", read
                     with the responses in both orders and averaged, which cancels the judge's position bias.
  openai:MODEL[@URL] any OpenAI-compatible /chat/completions endpoint (`rlhf serve` included; the URL defaults
                     to OpenAI's): the labels' token log-probabilities where the server returns them, the parsed
                     answer otherwise; both orders; timeouts, retries with backoff, a concurrency limit, and a
                     disk cache so that a rerun pays for nothing twice. The key comes from an environment variable.
  reward:DIR         a reward model from `rlhf reward`: p = σ(r_first − r_second), its own Bradley–Terry probability.
  simulated[:T]      the built-in simulated annotator's Bradley–Terry probability at noise temperature T (no draw).
Papers: Bai et al. 2022 (Constitutional AI: the feedback model's probabilities of the answer labels as soft
preference labels); Lee et al. 2023 (RLAIF: position bias, averaging both orders); Zheng et al. 2023 (LLM-as-a-judge).
Our deviations: an endpoint judgement needs both orders to succeed (one order alone would be a position-biased
label); an answer that names neither response, a timeout after the retries, a 5xx, malformed JSON are a missing
label with its reason, never a guess; a label token missing from the server's top log-probabilities is given the
smallest listed probability (an upper bound on its true one, so p is never more confident than the evidence).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf import config as cfg
from rlhf import httpd
from rlhf.config import cache_dir
from rlhf.data import (
    Messages,
    encode_conversation,
    encode_prompt,
    pad_left,
    position_ids_from_mask,
    prompt_for_output,
    prompt_text,
)
from rlhf.hardware import Precision, autocast, pick_device, resolve_bf16
from rlhf.models import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model_path,
    score_sequences,
)

DEFAULT_QUESTION = "Which response is more helpful, honest and harmless?"
LABELS = ("A", "B")
OPENAI_URL = "https://api.openai.com/v1"
JUDGE_SPECS = "simulated[:noise], reward:DIR, local:MODEL, or openai:MODEL[@BASE_URL]"


@dataclass
class EndpointSettings:
    """How an endpoint judge (openai:MODEL[@URL]) talks to its server: `endpoint` in `rlhf label` and in
    `rlhf constitutional prefs` (`--endpoint.timeout 30`)."""
    api_key_env: str = cfg.field("OPENAI_API_KEY", "the environment variable that holds the API key")
    timeout: float = cfg.field(60.0, "seconds to wait for an answer before retrying")
    retries: int = cfg.field(3, "retries after a timeout, 429, 5xx or malformed JSON, with backoff")
    concurrency: int = cfg.field(4, "requests in flight at once")
    cache: str = cfg.field("", "response cache file ('' = ~/.cache/rlhf/judge_cache.sqlite; none = off)")
    allow_http: bool = cfg.field(False, "send the API key over plain http:// to a host that is not this machine "
                                        "(anyone on the way can read it)")


@dataclass
class Comparison:
    prompt: Messages
    first: str
    second: str
    question: str = DEFAULT_QUESTION


@dataclass
class Judgement:
    p_first: float | None  # probability that the first response is better; None = no label (see error)
    text: str = ""  # what the judge wrote, where it wrote anything
    error: str = ""  # why there is no label: timeout, http 500, malformed, no answer, connection, ...
    # P(first is better) read with the first response shown as A, and shown as B (judges that see an order)
    p_orders: tuple[float, float] | None = None


class Judge(Protocol):
    name: str

    def compare(self, comparisons: list[Comparison]) -> list[Judgement]: ...


# --- the question a judge model reads --------------------------------------------------------------


def conversation_text(messages: Messages) -> str:
    """A prompt as the judge reads it: the user's text, or the turns written out when there are several."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def judge_messages(comparison: Comparison, swap: bool) -> Messages:
    """The judging request, with the two responses as A and B (swapped: the second response is A)."""
    a, b = (comparison.second, comparison.first) if swap else (comparison.first, comparison.second)
    text = (f"{comparison.question}\n\nConversation:\n{conversation_text(comparison.prompt)}\n\n"
            f"Response A:\n{a}\n\nResponse B:\n{b}\n\nAnswer with a single letter: A or B.")
    return [{"role": "user", "content": text}]


def average_orders(p_label_a: list[float | None], texts: list[str] | None = None,
                   errors: list[str] | None = None) -> list[Judgement]:
    """Judgements from P(answer is "A") for 2N requests: N in the given order, then the same N swapped.

    In the given order "A" is the first response, in the swapped order "B" is, so
    p_first = (P_A(given) + 1 − P_A(swapped)) / 2 and swapping the inputs gives exactly 1 − p_first.
    """
    n = len(p_label_a) // 2
    texts = texts or [""] * (2 * n)
    errors = errors or [""] * (2 * n)
    out = []
    for i in range(n):
        given, swapped = p_label_a[i], p_label_a[n + i]
        text = "\n".join(t for t in (texts[i], texts[n + i]) if t)
        if given is None or swapped is None:
            out.append(Judgement(None, text, errors[i] or errors[n + i] or "no answer"))
            continue
        orders = (given, 1.0 - swapped)
        out.append(Judgement((orders[0] + orders[1]) / 2, text, p_orders=orders))
    return out


# --- local: a causal LM's next-token probabilities of "A" and "B" -----------------------------------


def single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the judge needs the label '{text}' to be one token of its tokenizer; "
                         f"it is {len(ids)}: {ids}")
    return ids[0]


class LocalJudge:
    """Reads P("A") against P("B") at the first position of the answer; both orders, averaged."""

    def __init__(self, model: str, device: str = "auto", bf16: Precision = "auto", batch_size: int = 16,
                 max_response_tokens: int = 256):
        path = resolve_model_path(model)
        self.name = f"local:{model}"
        self.device = pick_device(device)
        self.bf16, self.batch_size, self.max_response_tokens = (resolve_bf16(bf16, self.device), batch_size,
                                                                max_response_tokens)
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path, self.device, trainable=False)
        self.label_ids = [single_token_id(self.tokenizer, label) for label in LABELS]

    def clip(self, text: str) -> str:
        """A long response is cut to `max_response_tokens`, so that both fit the judge's context."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_response_tokens else self.tokenizer.decode(ids[: self.max_response_tokens])

    @torch.no_grad()
    def compare(self, comparisons: list[Comparison]) -> list[Judgement]:
        clipped = [Comparison(c.prompt, self.clip(c.first), self.clip(c.second), c.question) for c in comparisons]
        encoded = [encode_prompt(self.tokenizer, judge_messages(c, swap)) for swap in (False, True) for c in clipped]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # little padding per batch
        p_label_a: list[float | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            ids, mask = pad_left([encoded[i] for i in index], self.tokenizer.pad_token_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with autocast(self.device, self.bf16):
                # only the last position's logits: the LM head over the whole prompt would be wasted
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                    use_cache=False, logits_to_keep=1).logits
            two = torch.softmax(logits[:, -1, self.label_ids].float(), dim=-1)[:, 0]
            for i, p in zip(index, two.tolist()):
                p_label_a[i] = p
        return average_orders(p_label_a)


# --- openai: any OpenAI-compatible chat-completions endpoint ---------------------------------------


# An answer that is only a label ("A", "**B**", "(A)."), or states one ("Response B is better", "[[A]]").
_ONLY_LABEL = re.compile(r"^\W*(?:response\s*)?([AB])\W*$", re.IGNORECASE)
_VERDICTS = [  # the label letter is upper case: a lone "a" inside a sentence is an article
    re.compile(r"\[\[([AB])\]\]"),
    re.compile(r"^\W*(?i:response)\s+([AB])\b"),
    # a leading letter, unless a lower-case word follows it ("A good answer ..." is an article)
    re.compile(r"^\W*([AB])(?:(?=\s+(?:is|was|wins|because|since)\b)|(?![\w'])(?!\s+[a-z]))"),
    re.compile(r"\b(?i:answer|verdict|choice|choose|prefer|pick)\b\W*(?:(?i:is)\W*)?(?:(?i:response)\s*)?([AB])\b"),
    re.compile(r"\b(?i:response)\s*([AB])\s+(?i:is\s+(?:better|preferable|more|less|the better))"),
    re.compile(r"\b(?i:better (?:response|answer|one) is)\W*(?:(?i:response)\s*)?([AB])\b"),
]
_UNDECIDED = re.compile(r"\b(?:both|neither|tie|equally|the same)\b", re.IGNORECASE)


def parse_answer(text: str) -> str | None:
    """The label a written answer names ("A" or "B"), or None when it names neither, or both."""
    text = (text or "").strip()
    only = _ONLY_LABEL.match(text)
    if only:
        return only.group(1).upper()
    if _UNDECIDED.search(text):
        return None
    found = {m.group(1).upper() for pattern in _VERDICTS for m in pattern.finditer(text)}
    return found.pop() if len(found) == 1 else None


def label_probability(choice: dict[str, Any]) -> float | None:
    """P("A") from a choice's token log-probabilities: at the first generated token that is a label.

    None when the server sent no log-probabilities or no generated token is a label.
    """
    content = ((choice.get("logprobs") or {}).get("content")) or []
    for entry in content:
        if not isinstance(entry, dict) or str(entry.get("token", "")).strip() not in LABELS:
            continue
        listed = [t for t in entry.get("top_logprobs") or [] if isinstance(t, dict) and "logprob" in t]
        if not listed:  # only the sampled label's own log-probability: the rest of the mass may be the other label
            p = math.exp(float(entry["logprob"]))
            return p if entry["token"].strip() == "A" else 1.0 - p
        mass = {label: 0.0 for label in LABELS}
        for t in listed:
            if str(t.get("token", "")).strip() in mass:
                mass[t["token"].strip()] += math.exp(float(t["logprob"]))
        floor = min(math.exp(float(t["logprob"])) for t in listed)
        a, b = (mass[label] or floor for label in LABELS)
        return a / (a + b)
    return None


class ResponseCache:
    """Successful endpoint responses on disk, keyed by a hash of the endpoint and the request (SQLite, thread-safe)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self.db.commit()

    def get(self, key: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, body: dict) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(body)))
            self.db.commit()


def is_loopback(url: str) -> bool:
    return httpd.is_loopback(urllib.parse.urlparse(url).hostname or "")


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error ('http 30x'): urllib would send the Authorization header to wherever it points."""

    def redirect_request(self, *args, **kwargs):
        return None


@dataclass
class EndpointStats:
    requests: int = 0  # HTTP requests sent (retries included)
    cached: int = 0  # answers read from the disk cache
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # final errors by reason


class EndpointJudge:
    """Asks an OpenAI-compatible /chat/completions endpoint, both orders, and reads the label's probability."""

    def __init__(self, model: str, base_url: str = OPENAI_URL, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, retries: int = 3, concurrency: int = 4, cache: str = "",
                 backoff: float = 1.0, max_tokens: int = 16, top_logprobs: int = 5, allow_http: bool = False):
        self.name = f"openai:{model}@{base_url}"
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.timeout, self.retries, self.concurrency, self.backoff = timeout, retries, concurrency, backoff
        self.max_tokens, self.top_logprobs = max_tokens, top_logprobs
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if not self.api_key and not is_loopback(base_url):
            raise ValueError(f"the judge endpoint {base_url} needs an API key in the environment variable "
                             f"'{api_key_env}' (set it, or name another with --endpoint.api_key_env)")
        if (self.api_key and urllib.parse.urlparse(base_url).scheme != "https" and not is_loopback(base_url)
                and not allow_http):
            raise ValueError(f"the judge endpoint {base_url} is plain http: the API key in '{api_key_env}' would "
                             "cross the network readable by anyone on the way. Use https://, or pass "
                             "--endpoint.allow_http true if the network is yours")
        self.cache = None if cache == "none" else ResponseCache(cache or cache_dir() / "judge_cache.sqlite")
        # a proxy from the environment must never see requests meant for this machine
        self.opener = urllib.request.build_opener(
            NoRedirects, *([urllib.request.ProxyHandler({})] if is_loopback(base_url) else []))
        self.logprobs = True  # turned off for good if the server refuses the parameter
        self.stats = EndpointStats()
        self.lock = threading.Lock()

    def count(self, key: str) -> None:
        with self.lock:
            setattr(self.stats, key, getattr(self.stats, key) + 1)

    def fail(self, reason: str) -> tuple[None, str, str]:
        with self.lock:
            self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        return None, "", reason

    def post(self, body: dict) -> tuple[dict | None, str]:
        """(the response JSON, '') or (None, the reason): retries timeouts, 429, 5xx, broken connections and JSON."""
        key = hashlib.sha256(json.dumps([self.url, body], sort_keys=True).encode()).hexdigest()
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            self.count("cached")
            return cached, ""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error, wait = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                self.count("retries")
                # exponential backoff with jitter, so that concurrent workers do not retry in lockstep
                time.sleep(max(wait, self.backoff * 2 ** (attempt - 1) * (0.5 + random.random())))
            self.count("requests")
            wait = 0.0
            request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                error = f"http {e.code}"
                if e.code != 429 and e.code < 500:
                    return None, error  # the request itself is wrong: the same request fails again
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                wait = min(float(retry_after), 60.0) if retry_after.replace(".", "", 1).isdigit() else 0.0
                continue
            except urllib.error.URLError as e:
                error = "timeout" if isinstance(e.reason, TimeoutError) else "connection"
                continue
            except TimeoutError:
                error = "timeout"
                continue
            except (ConnectionError, HTTPException, OSError):
                error = "connection"
                continue
            try:
                data = json.loads(raw)
                choice = data["choices"][0]
                if not isinstance(choice["message"]["content"], (str, type(None))):
                    raise TypeError("content is not a string")
            except (ValueError, KeyError, IndexError, TypeError):
                error = "malformed"
                continue
            if self.cache:
                self.cache.put(key, data)
            return data, ""
        return None, error

    def ask(self, messages: Messages) -> tuple[float | None, str, str]:
        """→ (P("A") or None, the judge's text, the reason there is no label)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "temperature": 0.0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        data, error = self.post(body)
        # some servers refuse logprobs: ask again for the answer only
        if error in ("http 400", "http 422") and self.logprobs:
            self.logprobs = False
            body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
            data, error = self.post(body)
        if data is None:
            return self.fail(error)
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
        p = label_probability(choice)
        if p is None:
            label = parse_answer(text)
            p = None if label is None else (1.0 if label == "A" else 0.0)
        if p is None:
            self.fail("no answer")
            return None, text, "no answer"
        return p, text, ""

    def compare(self, comparisons: list[Comparison]) -> list[Judgement]:
        requests = [judge_messages(c, swap) for swap in (False, True) for c in comparisons]
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            answers = list(pool.map(self.ask, requests))
        return average_orders([a[0] for a in answers], [a[1] for a in answers], [a[2] for a in answers])


# --- reward model and simulated annotator ---------------------------------------------------------


class RewardJudge:
    """p = σ(r(prompt, first) − r(prompt, second)): the reward model's own Bradley–Terry probability."""

    def __init__(self, model: str, device: str = "auto", bf16: Precision = "auto", batch_size: int = 32):
        path = resolve_model_path(model)
        self.name = f"reward:{model}"
        self.device = pick_device(device)
        self.bf16, self.batch_size = resolve_bf16(bf16, self.device), batch_size
        self.tokenizer = load_tokenizer(path)
        self.model = load_reward_model(path, self.device, self.tokenizer, trainable=False)

    def compare(self, comparisons: list[Comparison]) -> list[Judgement]:
        sequences = ([encode_conversation(self.tokenizer, c.prompt, c.first) for c in comparisons]
                     + [encode_conversation(self.tokenizer, c.prompt, c.second) for c in comparisons])
        scores = score_sequences(self.model, sequences, self.model.config.pad_token_id, self.device, self.bf16,
                                 self.batch_size)
        n = len(comparisons)
        return [Judgement(torch.sigmoid(scores[i] - scores[n + i]).item()) for i in range(n)]


class SimulatedJudge:
    """The built-in simulated annotator's Bradley–Terry probability σ(Δgold / T); the question is not read."""

    def __init__(self, noise: float = 0.1, seed: int = 0, device: str = "cpu", annotator=None):
        from rlhf.annotators import SimulatedAnnotator

        self.name = f"simulated:{noise}"
        self.annotator = annotator or SimulatedAnnotator(noise_temperature=noise, seed=seed, device=device)

    def compare(self, comparisons: list[Comparison]) -> list[Judgement]:
        choices = self.annotator.prefer_batch([prompt_text(c.prompt) for c in comparisons],
                                              [c.first for c in comparisons], [c.second for c in comparisons])
        return [Judgement(p_a) for _, p_a in choices]


def make_judge(spec: str, device: str = "auto", bf16: Precision = "auto", seed: int = 0, batch_size: int = 16,
               endpoint: EndpointSettings | None = None) -> Judge:
    """A judge from its spec string: simulated[:noise], reward:DIR, local:MODEL, openai:MODEL[@BASE_URL]."""
    kind, _, rest = spec.partition(":")
    if kind == "simulated":
        return SimulatedJudge(float(rest) if rest else 0.1, seed, str(pick_device(device)))
    if kind == "reward" and rest:
        return RewardJudge(rest, device, bf16, batch_size)
    if kind == "local" and rest:
        return LocalJudge(rest, device, bf16, batch_size)
    if kind == "openai" and rest:
        model, _, base_url = rest.partition("@")
        e = endpoint or EndpointSettings()
        return EndpointJudge(model, base_url or OPENAI_URL, e.api_key_env, e.timeout, e.retries, e.concurrency, e.cache,
                             allow_http=e.allow_http)
    raise ValueError(f"unknown judge '{spec}'; use {JUDGE_SPECS}")


# --- judgements → preference pairs, and what a person wants to know about them --------------------


def preference_rows(comparisons: list[Comparison], judgements: list[Judgement], judge: str,
                    extra: list[dict] | None = None) -> tuple[list[dict], list[dict], dict[str, int]]:
    """→ (preference rows, rows with no label and the reason, counts by reason).

    A row is the human-label format (`prompt`, `chosen`, `rejected`) plus `p_chosen` (the judge's probability
    that `chosen` is better, ≥ 0.5) and `confidence` = 2·p_chosen − 1 (0 a coin toss, 1 certain). p = 0.5 is
    a tie: no preference, so no row.
    """
    rows, missing, counts = [], [], {}
    for i, (c, j) in enumerate(zip(comparisons, judgements)):
        more = (extra[i] if extra else {}) | ({"judge_text": j.text} if j.text else {})
        if j.p_first is None:
            reason = j.error or "no answer"
        else:
            reason = "tie" if abs(j.p_first - 0.5) < 1e-9 else ""
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            missing.append({"prompt": prompt_for_output(c.prompt), "responses": [c.first, c.second],
                            "reason": reason, **more})
            continue
        p = j.p_first
        chosen, rejected = (c.first, c.second) if p > 0.5 else (c.second, c.first)
        p_chosen = max(p, 1.0 - p)
        rows.append({"prompt": prompt_for_output(c.prompt), "chosen": chosen, "rejected": rejected,
                     "p_chosen": round(p_chosen, 6), "confidence": round(2 * p_chosen - 1, 6), "judge": judge, **more})
    return rows, missing, counts


def position_bias(judgements: list[Judgement]) -> dict[str, Any]:
    """How much the judge favours the response it reads first, over the pairs it judged in both orders.

    bias = mean P(the response shown first wins) − 0.5 (0 = none, +0.5 = always the first shown);
    consistency = share of pairs where both orders choose the same response.
    """
    both = [j.p_orders for j in judgements if j.p_orders is not None]
    if not both:
        return {"pairs": 0, "note": "this judge sees each response alone: no position"}
    shown_first = [(given + (1.0 - swapped)) / 2 for given, swapped in both]
    consistent = [(given > 0.5) == (swapped > 0.5) for given, swapped in both]
    return {"pairs": len(both), "bias": sum(shown_first) / len(both) - 0.5,
            "consistency": sum(consistent) / len(both)}
