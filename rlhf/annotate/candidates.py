"""Read and check a candidates file: one JSON object per line with a prompt and two or more responses.

Every problem is reported with the file, the line and the field, followed by the accepted
format, so a person can fix the file without reading code. The whole file is checked before
anything is written, so a bad file imports nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from rlhf.annotate.errors import AnnotateError

Prompt = Union[str, list[dict[str, str]]]

ACCEPTED_FORMAT = (
    "Accepted format: one JSON object per line, e.g.\n"
    '  {"prompt": "Why is the sky blue?", "responses": ["Because ...", "Light ..."]}\n'
    '  {"prompt": [{"role": "user", "content": "Why is the sky blue?"}], "responses": ["...", "..."]}\n'
    '"prompt" is a non-empty string or a list of {"role": string, "content": string} messages; '
    '"responses" is a list of two or more strings. Other fields are ignored; blank lines are skipped.'
)

# Stop collecting after this many problems: a wholly wrong file would otherwise print thousands.
MAX_REPORTED_ERRORS = 10


@dataclass(frozen=True)
class Candidate:
    prompt: Prompt
    responses: list[str]
    line: int


@dataclass(frozen=True)
class PairSpec:
    """One comparison to show annotators. `key` identifies it regardless of response order."""

    prompt: Prompt
    response_a: str
    response_b: str
    key: str


def json_type(value: object) -> str:
    """Name a parsed JSON value's type the way the file's author would: string, list, object..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def check_prompt(prompt: object) -> str | None:
    """Return what is wrong with a prompt, or None when it is acceptable."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "expected a non-empty string, got an empty one"
    if not isinstance(prompt, list):
        return f"expected a string or a list of messages, got {json_type(prompt)}"
    if not prompt:
        return "expected at least one message, got an empty list"
    for index, message in enumerate(prompt):
        if not isinstance(message, dict):
            return f"message {index}: expected an object, got {json_type(message)}"
        for key in ("role", "content"):
            if key not in message:
                return f'message {index}: missing "{key}"'
            if not isinstance(message[key], str):
                return f'message {index}: "{key}" must be a string, got {json_type(message[key])}'
    return None


def check_responses(responses: object) -> str | None:
    """Return what is wrong with a responses list, or None when it is acceptable."""
    if not isinstance(responses, list):
        return f"expected a list of two or more strings, got {json_type(responses)}"
    if len(responses) < 2:
        return f"expected two or more responses, got {len(responses)}"
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            return f"response {index}: expected a string, got {json_type(response)}"
    return None


def parse_line(text: str) -> tuple[Candidate | None, str | None]:
    """Parse one non-blank line into a Candidate, or return a problem description."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {json_type(record)}"
    for field, check in (("prompt", check_prompt), ("responses", check_responses)):
        if field not in record:
            return None, f'missing field "{field}"'
        problem = check(record[field])
        if problem:
            return None, f'field "{field}": {problem}'
    prompt = record["prompt"]
    # Keep only role/content so an exported prompt is exactly the messages that were shown.
    if isinstance(prompt, list):
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return Candidate(prompt, list(record["responses"]), 0), None


def read_candidates(path: Path) -> list[Candidate]:
    """Read and check every line; raise AnnotateError listing the problems if any line is bad."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AnnotateError(f"{path}: cannot read the candidates file ({exc.strerror}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AnnotateError(f"{path}, line {line}: not UTF-8 text.\n{ACCEPTED_FORMAT}") from None
    candidates: list[Candidate] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        candidate, problem = parse_line(line)
        if problem:
            problems.append(f"{path}, line {number}: {problem}")
            if len(problems) >= MAX_REPORTED_ERRORS:
                problems.append("(stopped after the first problems; later lines were not checked)")
                break
        else:
            candidates.append(Candidate(candidate.prompt, candidate.responses, number))
    if problems:
        raise AnnotateError("\n".join(problems) + "\n" + ACCEPTED_FORMAT)
    if not candidates:
        raise AnnotateError(f"{path}: no candidates found (the file is empty).\n{ACCEPTED_FORMAT}")
    return candidates


def pair_key(prompt: Prompt, first: str, second: str) -> str:
    """Hash of the prompt and the unordered response pair: the same comparison gets the same key
    whatever file or order it came from, which is what makes re-importing a file a no-op."""
    canonical = json.dumps([prompt, sorted([first, second])], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def pairs_of(candidate: Candidate) -> Iterator[PairSpec]:
    """Every unordered pair of distinct responses (n responses give n*(n-1)/2 comparisons)."""
    for first, second in itertools.combinations(candidate.responses, 2):
        if first == second:
            continue  # comparing a response with itself teaches nothing
        yield PairSpec(candidate.prompt, first, second, pair_key(candidate.prompt, first, second))
