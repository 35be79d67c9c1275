"""Stage configs: one dataclass per stage, filled from a YAML file and `--key value` overrides.

An unknown key is an error that names the closest known key, so a typo never silently becomes a
default. Values from the command line are parsed as YAML scalars (`--lr 1e-5`, `--lora_r 0`,
`--bf16 false`), then checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def cache_dir() -> Path:
    """Where converted models, judge answers and generated task files are kept (`RLHF_CACHE`, else ~/.cache/rlhf)."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def cached_jsonl(name: str, rows: list[dict]) -> Path:
    """Rows written as `<cache>/tasks/<name>.jsonl` (rewritten only when they changed, atomically) → the file: how
    generated built-in data (`builtin:hhh_*`, `builtin:arithmetic_*`) becomes a file like any other."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path = cache_dir() / "tasks" / f"{name}.jsonl"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def fingerprint(path: str | Path) -> str:
    """What a file or folder holds, cheaply: a file's sha256 (up to 256 MB; larger ones by size and mtime), a folder's
    files by name, size and mtime; "missing" when there is nothing there."""
    import hashlib

    path = Path(path)
    if path.is_file():
        stat = path.stat()
        if stat.st_size > 256 * 2**20:
            return f"size {stat.st_size} mtime {stat.st_mtime_ns}"
        return "sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        return "files " + digest.hexdigest()
    return "missing"


class ConfigError(ValueError):
    """A config file or override that does not fit the stage's config."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a value against a field's annotation, converting the few safe cases (int → float, str → Path)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) > 1:  # bool | Literal["auto"]: say every accepted form
            accepted = " or ".join(e.split(": expected ", 1)[1].split(", got ")[0]
                                   for e in errors if ": expected " in e)
            raise ConfigError(f"{where}: expected {accepted}, got {value!r}")
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):  # `--key a,b,c` on the command line
            value = [parse_scalar(v.strip()) for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # `--betas 0.1`: a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):  # a shared piece of settings, e.g. `endpoint: {timeout: 30}`
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of its keys ({', '.join(_field_types(annotation))}), "
                              f"got {value!r}")
        return build(annotation, value, where)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, str) and value in choices:
            return value
        raise ConfigError(f"{where}: expected {' or '.join(map(str, choices))}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Known keys: {', '.join(sorted(known))}")


# --- value checks: one rule per key name, the same meaning in every stage -----------------------------------
Check = typing.Callable[[Any], "str | None"]  # a value → what is wrong with it, or None


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f"must be greater than {low}"


def between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def device_check(value: str) -> str | None:
    """auto, cpu, cuda or cuda:N, and a CUDA device only where this machine has one."""
    if value in ("auto", "cpu"):
        return None
    if not re.fullmatch(r"cuda(:\d+)?", value):
        return "must be auto, cpu, cuda or cuda:N"
    import torch

    if not torch.cuda.is_available():
        return "asks for CUDA, but this machine has no CUDA device; use cpu or auto"
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= torch.cuda.device_count():
        return f"asks for CUDA device {index}, but this machine has {torch.cuda.device_count()}"
    return None


RULES: dict[str, Check] = {
    "lr": above(0), "value_lr": above(0), "critic_lr": above(0), "weight_decay": at_least(0),
    "warmup_ratio": between(0, 1), "eval_fraction": between(0, 0.9),
    "epochs": above(0), "ppo_epochs": at_least(1), "steps": at_least(1), "rounds": at_least(1),
    "batch_size": at_least(1), "mini_batch_size": at_least(1), "generation_batch_size": at_least(1),
    "max_length": at_least(16), "max_prompt_length": at_least(4), "max_new_tokens": at_least(1),
    "truncation": one_of("truncate", "skip"), "device": device_check,
    "beta": above(0), "simpo_beta": above(0), "label_smoothing": between(0, 0.5), "target_kl": at_least(0),
    "kl_horizon": at_least(1), "kl_estimator": one_of("k1", "k3"), "critic": one_of("head", "model"),
    "gamma": between(0, 1), "lam": between(0, 1), "clip": above(0), "value_clip": above(0), "vf_coef": at_least(0),
    "missing_eos_penalty": at_least(0), "temperature": at_least(0), "top_p": between(0, 1),
    "lora_r": at_least(0), "lora_alpha": at_least(1), "seed": at_least(0), "log_every": at_least(1),
    "sample_every": at_least(1), "monitor_every": at_least(0), "monitor_size": at_least(1),
    "monitor_window": at_least(1), "monitor_length_drift": above(0), "monitor_distinct_drift": above(0),
    "save_every": at_least(0), "keep_last": at_least(1), "max_bad_steps": at_least(1),
    "resume": one_of("auto", "never", "must"), "n_responses": at_least(2), "max_prompts": at_least(0),
    "max_pairs": at_least(0), "samples": at_least(1), "examples": at_least(0), "annotator_noise": at_least(0),
    "port": between(0, 65535), "threads": at_least(1), "concurrency": at_least(1), "retries": at_least(0),
    "timeout": above(0), "request_timeout": above(0), "max_connections": at_least(1),
    "max_request_bytes": at_least(1024), "max_prompt_chars": at_least(0),
}


def check_value(cls: type, key: str, value: Any, where: str) -> None:
    """The field's own check (`field(..., check=)`), else the rule for its name; a failure names the key."""
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    rule = f.metadata.get("check") or RULES.get(key)
    if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return
    problem = rule(value)
    if problem:
        raise ConfigError(f"{where}: '{key}' {problem}, got {value!r}")


def build(cls: type[C], values: dict[str, Any], where: str = "config") -> C:
    """Make a `cls` from a dict, rejecting unknown keys with a suggestion and out-of-range values with the key.
    A stage's own rules across keys (`mini_batch_size` divides `batch_size`) are its Config's `__post_init__`, which
    raises ConfigError."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(key, list(types_), where)
        kwargs[key] = _coerce(value, types_[key], f"{where}: '{key}'")
        check_value(cls, key, kwargs[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_scalar(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string; people mean a number
        try:
            return float(value)
        except ValueError:
            pass
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def overrides_to_dict(args: list[str]) -> dict[str, Any]:
    """`['--lr', '1e-5', '--sft.epochs=2']` → `{'lr': 1e-5, 'sft.epochs': 2}`."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides are written --key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:  # a bare flag means true
            raw = "true"
            i += 1
        out[key.replace("-", "_")] = parse_scalar(raw)
    return out


def merge_nested(base: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """Apply `{'sft.lr': x}` style overrides onto a nested dict."""
    merged = json.loads(json.dumps(base, default=str))
    for key, value in dotted.items():
        parts = key.split(".")
        node = merged
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return merged


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save(config: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _keys(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, doc, default) of every field; a nested settings dataclass gives its own keys as `name.key`."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            keys += _keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append((prefix + f.name, f.metadata.get("help", ""), default))
    return keys


def describe(cls: type) -> str:
    """One line per key: name, default and the field's doc (from `metadata['help']`)."""
    return "\n".join(f"  --{name:<24} {doc} (default: {default})" for name, doc, default in _keys(cls))


def field(default: Any, help: str, check: Check | None = None) -> Any:
    """A dataclass field with a one-line doc that `rlhf <stage> --help` prints; `check` (value → problem or None)
    replaces the rule of `RULES` for its name."""
    metadata = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
