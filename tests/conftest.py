import os
from pathlib import Path

import pytest

# Tests never touch a hub; the MiniLM judge loads from its package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a 512-token BPE, built here, not downloaded."""
    from rlhf.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def write_jsonl(tmp_path):
    import json

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    return write
