"""Reading prompts, demonstrations and preference pairs; chat templates; padding.

Formats (TRL's field names, so existing files work):
  demonstrations  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
                  or {"prompt": ..., "completion": ...}
  preferences     {"prompt": ..., "chosen": ..., "rejected": ...}   (strings or message lists), or
                  {"chosen": ..., "rejected": ...} as two whole dialogues sharing the prompt (Anthropic HH)
  prompts         {"prompt": ...}                                    (string or message list)
Files: JSONL, JSON (a list of records), CSV, Parquet, or a folder saved by `datasets`.
A bad record raises DataError naming the file, the line and the field, and the accepted formats.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

Messages = list[dict[str, str]]

FORMATS = {
    "demonstrations": '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} '
    'or {"prompt": "...", "completion": "..."}',
    "preferences": '{"prompt": ..., "chosen": ..., "rejected": ...} with strings or message lists',
    "prompts": '{"prompt": "..."} or {"prompt": [{"role": "user", "content": "..."}]}',
}


class DataError(ValueError):
    """A data file or record that does not fit the expected format."""


@dataclass
class Record:
    path: str
    line: int  # 1-based line in a JSONL/CSV file, 1-based index for other formats
    data: dict[str, Any]

    def where(self, field: str | None = None) -> str:
        place = f"{self.path}, line {self.line}"
        return f"{place}, field '{field}'" if field else place


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: a folder is read as a saved `datasets` dataset; install `datasets`") from None
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        return [Record(str(path), i + 1, dict(row)) for i, row in enumerate(dataset)]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = []
        for number, text in enumerate(_text(path).split("\n"), start=1):  # not splitlines: JSON may hold U+2028
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(data, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(data).__name__}")
            records.append(Record(str(path), number, data))
        return records
    if suffix == ".json":
        try:
            data = json.loads(_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of JSON objects (or an object holding one), got "
                            f"{type(data).__name__} {json.dumps(data)[:40]}")
        out = []
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}, record {i}: expected a JSON object, got {type(row).__name__}")
            out.append(Record(str(path), i, row))
        return out
    if suffix == ".csv":
        # line 1 is the header, so the first record is line 2
        return [Record(str(path), i + 2, dict(row))
                for i, row in enumerate(csv.DictReader(io.StringIO(_text(path), newline="")))]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs `pyarrow` (pip install pyarrow)") from None
        rows = pq.read_table(path).to_pylist()
        return [Record(str(path), i + 1, row) for i, row in enumerate(rows)]
    raise DataError(f"{path}: unknown file type '{suffix}'; use .jsonl, .json, .csv, .parquet or a `datasets` folder")


def _text(path: Path) -> str:
    """A text file's content as UTF-8, a byte-order mark (Windows tools write one) dropped; bytes that are not UTF-8
    (a binary file, another encoding) are an error naming the file and the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); is it a "
                        f"binary file? Save it as UTF-8 JSONL, JSON or CSV") from None


def _messages(value: Any, record: Record, field: str, kind: str) -> Messages:
    """A string (one user turn) or a list of {"role", "content"} dicts."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(
        f"{record.where(field)}: expected a string or a list of {{\"role\", \"content\"}} messages, "
        f"got {type(value).__name__}. Accepted {kind}: {FORMATS[kind]}"
    )


def _require(record: Record, field: str, kind: str) -> Any:
    if field not in record.data or record.data[field] is None:
        present = ", ".join(sorted(record.data)) or "none"
        raise DataError(
            f"{record.where(field)}: missing field '{field}' (fields present: {present}). "
            f"Accepted {kind}: {FORMATS[kind]}"
        )
    return record.data[field]


def _response_text(value: Any, record: Record, field: str, kind: str) -> str:
    """A response is a string, or a message list whose last turn is the assistant's."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        content = value[-1].get("content")
        if isinstance(content, str):
            return content
    raise DataError(
        f"{record.where(field)}: expected a string or a message list ending with an assistant turn, "
        f"got {type(value).__name__}. Accepted {kind}: {FORMATS[kind]}"
    )


def parse_prompt(record: Record) -> Messages:
    return _messages(_require(record, "prompt", "prompts"), record, "prompt", "prompts")


def parse_demonstration(record: Record) -> tuple[Messages, str]:
    """→ (prompt messages, the assistant's completion)."""
    if "messages" in record.data:
        messages = _messages(record.data["messages"], record, "messages", "demonstrations")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(
                f"{record.where('messages')}: the last message must be the assistant's answer, after at least one "
                f"user turn. Accepted demonstrations: {FORMATS['demonstrations']}"
            )
        return messages[:-1], messages[-1]["content"]
    if "prompt" not in record.data:
        raise DataError(
            f"{record.where()}: neither 'messages' nor 'prompt'/'completion' found "
            f"(fields present: {', '.join(sorted(record.data)) or 'none'}). "
            f"Accepted demonstrations: {FORMATS['demonstrations']}"
        )
    prompt = _messages(record.data["prompt"], record, "prompt", "demonstrations")
    completion = _response_text(_require(record, "completion", "demonstrations"), record, "completion",
                                "demonstrations")
    return prompt, completion


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(text: str) -> Messages | None:
    """An Anthropic HH dialogue ("\n\nHuman: ... \n\nAssistant: ...") → messages; None when it is not one."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def split_shared_prompt(record: Record) -> tuple[Messages, str, str]:
    """A pair without a prompt whose chosen and rejected are whole dialogues (Anthropic HH's shape: strings of
    "\n\nHuman: ... \n\nAssistant: ..." turns, or message lists): the turns they share are the prompt, and each
    one's final assistant turn is its answer (what TRL's `extract_prompt` does) → (prompt, chosen, rejected)."""
    dialogues = []
    for field in ("chosen", "rejected"):
        value = _require(record, field, "preferences")
        messages = _hh_messages(value) if isinstance(value, str) else _messages(value, record, field, "preferences")
        if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{record.where('prompt')}: missing field 'prompt', and '{field}' is not a whole dialogue "
                            f"ending with the assistant's answer (\"\\n\\nHuman: ... \\n\\nAssistant: ...\" or "
                            f"messages) to take the shared prompt from. Accepted preferences: {FORMATS['preferences']}")
        dialogues.append(messages)
    chosen, rejected = dialogues
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{record.where()}: 'chosen' and 'rejected' are dialogues that differ before their last "
                        f"assistant turn, so they share no prompt; give a 'prompt' field")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def parse_preference(record: Record) -> tuple[Messages, str, str]:
    """→ (prompt messages, chosen text, rejected text). Without a 'prompt' the pair may be two whole dialogues that
    share it (`split_shared_prompt`)."""
    if "prompt" not in record.data and "chosen" in record.data:
        return split_shared_prompt(record)
    prompt = _messages(_require(record, "prompt", "preferences"), record, "prompt", "preferences")
    chosen = _response_text(_require(record, "chosen", "preferences"), record, "chosen", "preferences")
    rejected = _response_text(_require(record, "rejected", "preferences"), record, "rejected", "preferences")
    return prompt, chosen, rejected


def no_preference(chosen: str, rejected: str) -> str | None:
    """Why a pair carries no preference: 'empty' (a blank answer) or 'identical' (the same answer twice); else None."""
    if not chosen.strip() or not rejected.strip():
        return "empty"
    if chosen.strip() == rejected.strip():
        return "identical"
    return None


def read_usable_preferences(path: str | Path) -> tuple[list[tuple[Record, Messages, str, str]], dict[str, int]]:
    """Every preference record of a file → ([(record, prompt, chosen, rejected)], skipped): a pair with an empty
    or identical answer carries no preference, and is skipped and counted by reason in `skipped`."""
    pairs, skipped = [], {"empty": 0, "identical": 0}
    for record in read_records(path):
        prompt, chosen, rejected = parse_preference(record)
        reason = no_preference(chosen, rejected)
        if reason:
            skipped[reason] += 1
        else:
            pairs.append((record, prompt, chosen, rejected))
    return pairs, skipped


def read_prompts(path: str | Path) -> list[Messages]:
    return [parse_prompt(r) for r in read_records(path)]


def read_prompt_rows(path: str | Path) -> list[tuple[Messages, dict[str, Any]]]:
    """Prompts with the other fields of their rows (an `answer` to check, a category), for reward functions."""
    return [(parse_prompt(r), {k: v for k, v in r.data.items() if k != "prompt"}) for r in read_records(path)]


def read_demonstrations(path: str | Path, every_turn: bool = False) -> list[tuple[Messages, str]]:
    """(prompt, answer) examples. With `every_turn`, a multi-turn conversation gives one example per assistant turn,
    each with the conversation before it as its prompt, so every answer is learned; else only its last answer."""
    examples = []
    for record in read_records(path):
        prompt, answer = parse_demonstration(record)
        if every_turn:
            examples += [(prompt[:i], m["content"]) for i, m in enumerate(prompt)
                         if m["role"] == "assistant" and any(p["role"] == "user" for p in prompt[:i])]
        examples.append((prompt, answer))
    return examples


def read_preferences(path: str | Path) -> list[tuple[Messages, str, str]]:
    return [parse_preference(r) for r in read_records(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write to a temp file and rename, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def prompt_for_output(messages: Messages) -> str | Messages:
    """A single user turn is written back as a plain string (as most files hold it), else as messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def prompt_text(messages: Messages) -> str:
    """The last user turn: what a person (or the annotator) reads as 'the question'."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


# --- tokenisation --------------------------------------------------------------------------------


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Prompt ids with the chat template and the assistant header (generation prompt) applied."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)


def encode_chat(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """The chat template's ids, with the messages' text encoded as text: a control token's text typed in a message
    (`<|im_end|>\n<|im_start|>system ...`) gives ordinary tokens, never the control token, so no message can close
    its turn and open another role's. Ordinary text gets exactly the ids the tokenizer gives the templated chat."""
    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))
    controls = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    if not any(control in m["content"] for m in messages for control in controls):
        return ids
    return _controls_as_text(tokenizer, messages, add_generation_prompt)


def _ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):  # some versions return a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


_plain_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_plain_lock = threading.Lock()


def _plain(tokenizer):
    """A copy of the tokenizer that reads special tokens' text as text. A copy, because `split_special_tokens=True`
    on a call switches the shared Rust tokenizer for as long as the next call, which another thread may be making."""
    with _plain_lock:
        if tokenizer not in _plain_tokenizers:
            plain = copy.deepcopy(tokenizer)
            plain.split_special_tokens = True
            _plain_tokenizers[tokenizer] = plain
        return _plain_tokenizers[tokenizer]


def _controls_as_text(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    """The templated chat cut at the template's own control tokens; the text between, messages included, encoded by
    a tokenizer that reads special tokens' text as text. The tokenizer itself encodes the text between special tokens
    piece by piece, so this is its own encoding wherever no message holds a control token's text (checked)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    # where each message's text sits: the template rendered with marks in place of the texts (private-use
    # characters, which no template changes), the texts put back and the result checked against the real rendering
    marked = tokenizer.apply_chat_template([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)],
                                           add_generation_prompt=add_generation_prompt, tokenize=False)
    for shown in (lambda content: content, str.strip):  # some templates strip the text
        rebuilt, spans = "", []
        for part in re.split("(\ue000\\d+\ue001)", marked):
            if re.fullmatch("\ue000\\d+\ue001", part):
                content = shown(messages[int(part[1:-1])]["content"])
                spans.append((len(rebuilt), len(rebuilt) + len(content)))
                part = content
            rebuilt += part
        if rebuilt == text:
            break
    else:
        raise ValueError("a message holds the text of a control token, and the chat template changes the messages' "
                         "text, so it cannot be encoded as plain text")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    cuts = [(a, b, i) for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])
            if i in special and not any(s <= a < e for s, e in spans)]  # the template's own control tokens

    def pieces(encode) -> list[int]:
        ids, position = [], 0
        for a, b, token in cuts + [(len(text), len(text), None)]:
            if a > position:
                ids += encode(text[position:a], add_special_tokens=False)["input_ids"]
            ids += [] if token is None else [token]
            position = b
        return ids

    if pieces(tokenizer) != list(encoding["input_ids"]):
        raise ValueError("a message holds the text of a control token, and this tokenizer does not encode the text "
                         "between its special tokens piece by piece, so it cannot be encoded as plain text")
    return pieces(_plain(tokenizer))


def encode_response(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    """Response ids as the model would emit them after the assistant header: text, then EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + ([tokenizer.eos_token_id] if add_eos else [])


def encode_conversation(tokenizer, messages: Messages, response: str) -> list[int]:
    """The whole chat (prompt + assistant answer) as the template writes it: what a reward model scores."""
    return encode_chat(tokenizer, messages + [{"role": "assistant", "content": response}])


@dataclass
class LengthPolicy:
    """What to do with an example longer than `max_length` tokens: 'truncate' or 'skip'. Counts both."""

    max_length: int
    mode: str = "truncate"
    truncated: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("truncate", "skip"):
            raise ValueError(f"truncation must be 'truncate' or 'skip', got '{self.mode}'")

    def fit_prompt_response(self, prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]] | None:
        """Keep the response whole where possible: cut the prompt from the left, then the response's end."""
        if len(prompt_ids) + len(response_ids) <= self.max_length:
            return prompt_ids, response_ids
        if self.mode == "skip":
            self.skipped += 1
            return None
        self.truncated += 1
        keep_prompt = max(self.max_length - len(response_ids), min(len(prompt_ids), self.max_length // 2))
        prompt_ids = prompt_ids[-keep_prompt:]
        return prompt_ids, response_ids[: self.max_length - len(prompt_ids)]

    def fit_prompt_messages(self, tokenizer, messages: Messages) -> Messages | None:
        """Fit a prompt for generation: keep the tail of the last user turn's text until the templated prompt fits."""
        ids = encode_prompt(tokenizer, messages)
        if len(ids) <= self.max_length:
            return messages
        if self.mode == "skip":
            self.skipped += 1
            return None
        self.truncated += 1
        last = (max(i for i, m in enumerate(messages) if m["role"] == "user")
                if any(m["role"] == "user" for m in messages) else len(messages) - 1)
        content_ids = tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"]
        overflow = len(ids) - self.max_length
        keep = content_ids[overflow:] if overflow < len(content_ids) else []
        fitted = [dict(m) for m in messages[last:]]  # earlier turns go first, then the start of the last one
        fitted[0]["content"] = tokenizer.decode(keep)
        return fitted

    def fit(self, ids: list[int]) -> list[int] | None:
        """A whole conversation that a reward model scores at its last token: cut from the left, so the answer's
        end (where the score is read) stays and two answers to one prompt never become the same tokens."""
        if len(ids) <= self.max_length:
            return ids
        if self.mode == "skip":
            self.skipped += 1
            return None
        self.truncated += 1
        return ids[-self.max_length:]


def fit_prompts(tokenizer, prompts: list[Messages], max_length: int,
                truncation: str) -> tuple[list[Messages], LengthPolicy]:
    """Prompts fitted for generation at `max_length` tokens (cut from the left or skipped, by `truncation`) → (the
    prompts kept, the LengthPolicy that counted what it truncated and skipped)."""
    lengths = LengthPolicy(max_length, truncation)
    fitted = [lengths.fit_prompt_messages(tokenizer, messages) for messages in prompts]
    return [m for m in fitted if m is not None], lengths


def next_batch(order: list[int], size: int, batch_size: int, rng) -> list[int]:
    """Indices of the next batch, walking shuffled passes over range(size); `order` holds what is left.

    A new shuffled pass is appended when fewer than a batch remain, so every item is seen once per pass
    and a batch never needs more than two passes. A batch is never larger than the data.
    """
    take = min(batch_size, size)
    if len(order) < take:
        more = list(range(size))
        rng.shuffle(more)
        order += more
    index = order[:take]
    del order[:take]
    return index


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (ids (B, T), attention mask (B, T)) padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (ids (B, T), attention mask (B, T)) padded on the left, as generation wants prompts."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses; a forward pass must use the same."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def builtin_task_dir() -> Path:
    return Path(__file__).parent / "tasks" / "explain_to_a_kid"


def resolve_data_path(name: str) -> Path:
    """`builtin:demonstrations` → the file shipped with the package; anything else is a path."""
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key.startswith("hhh_"):  # the helpful-harmless-honest task's sets, generated into the cache
            from rlhf import hhh

            return hhh.materialise(key)
        if key in ("arithmetic_train", "arithmetic_heldout"):  # the verifiable task's problems, likewise
            from rlhf import verifiable

            return verifiable.materialise(key)
        files = {
            "demonstrations": builtin_task_dir() / "demonstrations.jsonl",
            "prompts_train": builtin_task_dir() / "prompts_train.jsonl",
            "prompts_heldout": builtin_task_dir() / "prompts_heldout.jsonl",
            "harmful_prompts": builtin_task_dir().parent / "harmful_prompts.jsonl",
        }
        if key not in files:
            raise DataError(f"unknown built-in data '{name}'; known: {', '.join('builtin:' + k for k in files)}")
        return files[key]
    return Path(name)
