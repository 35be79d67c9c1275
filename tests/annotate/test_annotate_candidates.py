"""Reading candidates files: good lines become pairs; bad lines give an error naming the file,
the line, the field and the accepted format."""

import json

import pytest

from rlhf.annotate.candidates import pair_key, pairs_of, read_candidates
from rlhf.annotate.errors import AnnotateError


def write_lines(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_for(path) -> str:
    with pytest.raises(AnnotateError) as caught:
        read_candidates(path)
    return str(caught.value)


def test_string_and_message_prompts_are_read(tmp_path):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    path = write_lines(
        tmp_path / "c.jsonl",
        json.dumps({"prompt": "Why?", "responses": ["a", "b", "c"], "meta": 1}),
        "",
        json.dumps({"prompt": messages, "responses": ["x", "y"]}),
    )
    first, second = read_candidates(path)
    assert (first.prompt, first.responses, first.line) == ("Why?", ["a", "b", "c"], 1)
    assert (second.prompt, second.line) == (messages, 3)


def test_every_unordered_pair_of_distinct_responses(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", json.dumps({"prompt": "p", "responses": ["a", "b", "a", "c"]}))
    (candidate,) = read_candidates(path)
    pairs = {(p.response_a, p.response_b) for p in pairs_of(candidate)}
    # a/a is skipped; the second "a" repeats a-b and a-c, which share keys with the first ones.
    assert pairs == {("a", "b"), ("a", "c"), ("b", "c"), ("b", "a")}
    assert len({p.key for p in pairs_of(candidate)}) == 3


def test_pair_key_ignores_order_but_not_prompt():
    assert pair_key("p", "x", "y") == pair_key("p", "y", "x")
    assert pair_key("p", "x", "y") != pair_key("q", "x", "y")
    assert pair_key([{"role": "user", "content": "p"}], "x", "y") != pair_key("p", "x", "y")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"prompt": "p", "responses": ["a", "b"]', "line 2: not valid JSON"),
        ('["p", "a", "b"]', "line 2: expected a JSON object, got a list"),
        ('{"responses": ["a", "b"]}', 'line 2: missing field "prompt"'),
        ('{"prompt": "p"}', 'line 2: missing field "responses"'),
        ('{"prompt": 7, "responses": ["a", "b"]}',
         'line 2: field "prompt": expected a string or a list of messages, got a number'),
        ('{"prompt": "  ", "responses": ["a", "b"]}', 'line 2: field "prompt": expected a non-empty string'),
        ('{"prompt": [{"role": "user"}], "responses": ["a", "b"]}',
         'line 2: field "prompt": message 0: missing "content"'),
        ('{"prompt": "p", "responses": "a"}',
         'line 2: field "responses": expected a list of two or more strings, got a string'),
        ('{"prompt": "p", "responses": ["a"]}', 'line 2: field "responses": expected two or more responses, got 1'),
        ('{"prompt": "p", "responses": ["a", null]}',
         'line 2: field "responses": response 1: expected a string, got null'),
    ],
)
def test_bad_line_names_file_line_field_and_format(tmp_path, line, expected):
    path = write_lines(tmp_path / "cands.jsonl", '{"prompt": "ok", "responses": ["a", "b"]}', line)
    message = error_for(path)
    assert f"{path}, {expected}" in message
    assert "Accepted format" in message and '"responses"' in message


def test_all_problems_are_listed_not_just_the_first(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", "{", '{"prompt": "p"}', "[]")
    message = error_for(path)
    assert "line 1" in message and "line 2" in message and "line 3" in message


def test_missing_empty_and_binary_files(tmp_path):
    assert "cannot read" in error_for(tmp_path / "absent.jsonl")
    assert "no candidates" in error_for(write_lines(tmp_path / "empty.jsonl", "", "  "))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"prompt": "p", "responses": ["a", "b"]}\n\xff\xfe\n')
    assert f"{binary}, line 2: not UTF-8" in error_for(binary)
