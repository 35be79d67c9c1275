"""Data files as people have them: a BOM, a binary file, a bare number, Anthropic HH's whole dialogues, multi-turn
demonstrations; prompts longer than the limit; reward pairs that truncation would make identical."""

import json

import pytest

from rlhf import data
from rlhf.data import DataError


def test_a_utf8_bom_is_accepted(tmp_path):
    for name, text in (("d.jsonl", '{"prompt": "hi", "completion": "hello"}\n'),
                       ("d.json", '[{"prompt": "hi", "completion": "hello"}]'),
                       ("d.csv", "prompt,completion\nhi,hello\n")):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert data.read_demonstrations(tmp_path / name) == [([{"role": "user", "content": "hi"}], "hello")], name


def test_a_binary_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe\x00"}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: not UTF-8 text \(byte 0xff at offset 47\)"):
        data.read_demonstrations(path)


@pytest.mark.parametrize("content", ["42", "\"text\"", "null"])
def test_json_holding_no_records_is_a_clear_error(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError, match="d.json: expected a list of JSON objects"):
        data.read_prompts(path)


HH_CHOSEN = "\n\nHuman: What is rain?\n\nAssistant: Water falling.\n\nHuman: And snow?\n\nAssistant: Frozen water."
HH_REJECTED = "\n\nHuman: What is rain?\n\nAssistant: Water falling.\n\nHuman: And snow?\n\nAssistant: No idea."


def test_hh_shaped_pairs_get_the_shared_prompt(write_jsonl):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye?"}]
    path = write_jsonl("hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                    {"chosen": messages + [{"role": "assistant", "content": "Goodbye!"}],
                                     "rejected": messages + [{"role": "assistant", "content": "No."}]}])
    first, second = data.read_preferences(path)
    assert first == ([{"role": "user", "content": "What is rain?"}, {"role": "assistant", "content": "Water falling."},
                      {"role": "user", "content": "And snow?"}], "Frozen water.", "No idea.")
    assert second == (messages, "Goodbye!", "No.")


def test_hh_pairs_that_share_no_prompt_are_an_error(write_jsonl):
    other = HH_REJECTED.replace("What is rain?", "What is hail?")
    with pytest.raises(DataError, match="line 1: 'chosen' and 'rejected' are dialogues that differ before"):
        data.read_preferences(write_jsonl("hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": other}]))
    with pytest.raises(DataError, match="line 1, field 'prompt': missing field 'prompt', and 'chosen' is not a whole"):
        data.read_preferences(write_jsonl("plain.jsonl", [{"chosen": "yes", "rejected": "no"}]))


def test_multi_turn_demonstrations_teach_every_assistant_turn(write_jsonl):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Rain?"},
                    {"role": "assistant", "content": "Water."}]
    path = write_jsonl("d.jsonl", [{"messages": conversation}])
    assert data.read_demonstrations(path, every_turn=True) == [(conversation[:2], "Hello"),
                                                               (conversation[:4], "Water.")]
    assert data.read_demonstrations(path) == [(conversation[:4], "Water.")]


def test_sft_assistant_turns_setting(tiny_model, write_jsonl, tmp_path):
    from rlhf import sft

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Rain?"}, {"role": "assistant", "content": "Water."}]
    path = write_jsonl("d.jsonl", [{"messages": conversation}] * 2)
    every = sft.main(sft.Config(model=str(tiny_model), data=str(path), output_dir=str(tmp_path / "a"), batch_size=1,
                                bf16=False))
    last = sft.main(sft.Config(model=str(tiny_model), data=str(path), output_dir=str(tmp_path / "b"), batch_size=1,
                               bf16=False, assistant_turns="last"))
    assert (every["examples"], last["examples"]) == (4, 2)


def test_pairs_cut_long_prompts_to_the_limit(tiny_model, write_jsonl, tmp_path):
    from rlhf import pairs

    long_prompt = "Explain rain to a child. " * 400
    path = write_jsonl("p.jsonl", [{"prompt": long_prompt}, {"prompt": "Explain wind."}])
    out = tmp_path / "pairs"
    pairs.main(pairs.Config(model=str(tiny_model), data=str(path), output_dir=str(out), max_new_tokens=4,
                            max_prompt_length=64, bf16=False))
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(len(r["prompt"]) < len(long_prompt) / 4 for r in rows)
    with pytest.raises(ValueError, match="every prompt is longer than max_prompt_length=64"):
        pairs.main(pairs.Config(model=str(tiny_model), data=str(write_jsonl("q.jsonl", [{"prompt": long_prompt}])),
                                output_dir=str(out), max_new_tokens=4, max_prompt_length=64, truncation="skip",
                                bf16=False))


def test_reward_pairs_identical_after_truncation_are_reported_not_trained(tiny_model, write_jsonl, tmp_path):
    from rlhf import reward

    shared_tail = " and that is the whole story of the rain" * 20
    rows = [{"prompt": f"Explain rain {i}.", "chosen": f"Good {i}." + shared_tail,
             "rejected": f"Bad {i}." + shared_tail} for i in range(3)]
    rows += [{"prompt": f"Explain wind {i}.", "chosen": f"Air moves {i}.", "rejected": f"Who knows {i}."}
             for i in range(4)]
    summary = reward.main(reward.Config(model=str(tiny_model), data=str(write_jsonl("p.jsonl", rows)), max_length=32,
                                        output_dir=str(tmp_path / "rm"), batch_size=2, bf16=False))
    assert summary["skipped_identical_after_truncation"] == 3
    assert summary["train_pairs"] + summary["eval_pairs"] == 4
