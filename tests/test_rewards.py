"""Python reward functions: loading by file or module, the call with the rows' fields, errors that name the
function; the built-in arithmetic task and its checker."""

import pytest

from rlhf import rewards, verifiable
from rlhf.data import read_prompt_rows, resolve_data_path

LENGTH_RULE = '''
def short(prompts, completions, **fields):
    return [1.0 if len(c.split()) <= 3 else 0.0 for c in completions]

def echo_answer(prompts, completions, answer, **fields):
    return [float(str(a) in c) for c, a in zip(completions, answer)]

def broken(prompts, completions, **fields):
    raise RuntimeError("the checker crashed")

def not_numbers(prompts, completions, **fields):
    return ["yes" for _ in completions]

def too_few(prompts, completions, **fields):
    return [1.0]

def infinite(prompts, completions, **fields):
    return [float("inf") for _ in completions]
'''


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.py"
    path.write_text(LENGTH_RULE)
    return path


def test_a_function_from_a_file_is_called_with_the_rows_fields(rules):
    combined = rewards.WeightedRewards([f"{rules}:short", f"{rules}:echo_answer"], [0.5, 2.0])
    total, means = combined(["q1", "q2"], ["It is 19.", "I think the answer is forty"], {"answer": [19, 40]})
    assert total == [0.5 * 1 + 2.0 * 1, 0.0 + 2.0 * 0]
    assert means == {f"{rules}:short": 0.5, f"{rules}:echo_answer": 0.5}


def test_a_function_from_a_module():
    function = rewards.load("rlhf.verifiable:reward")
    assert function(["What is 2 + 3?"] * 2, ["2 + 3 = 5", "6"], answer=[5, 5]) == [1.0, 0.0]


@pytest.mark.parametrize("name, message", [
    ("broken", r"'.*:broken' raised RuntimeError\('the checker crashed'\)"),
    ("not_numbers", r"'.*:not_numbers' must return one number per completion"),
    ("too_few", r"'.*:too_few' returned 1 values for 2 completions"),
    ("infinite", r"'.*:infinite' returned inf for row 0 \(prompt 'q1'"),
])
def test_a_bad_function_is_a_clear_error_naming_it(rules, name, message):
    with pytest.raises(rewards.RewardFunctionError, match=message):
        rewards.WeightedRewards([f"{rules}:{name}"])(["q1", "q2"], ["a", "b"], {})


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "write it as path/to/file.py:function"),
    ("nowhere.py:f", "no file nowhere.py"),
    ("rlhf.no_such_module:f", "cannot import rlhf.no_such_module"),
    ("rlhf.verifiable:nothing", "has no function 'nothing'"),
])
def test_a_function_that_cannot_be_loaded_is_named(spec, message):
    with pytest.raises(rewards.RewardFunctionError, match=message):
        rewards.load(spec)


def test_the_arithmetic_task_splits_and_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    train, held_out = verifiable.problems("train"), verifiable.problems("heldout")
    assert len(train) == 400 and len(held_out) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert verifiable.problems("heldout") == held_out  # seeded
    rows = read_prompt_rows(resolve_data_path("builtin:arithmetic_heldout"))
    assert rows[0][1]["answer"] == held_out[0]["answer"] and rows[0][0][0]["content"] == held_out[0]["prompt"]
    assert verifiable.correct("7 + 12 = 19", 19) and verifiable.correct("The answer is 1,024.", 1024)
    assert not verifiable.correct("The answer is 14.", 15) and not verifiable.correct("I am not sure.", 3)
