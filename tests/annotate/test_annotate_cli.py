"""The four commands through `rlhf.annotate.cli:main`, on SQLite and PostgreSQL."""

import hashlib
import json
import re
import socket
import subprocess
import sys

from sqlalchemy import func, select

from rlhf.annotate import store
from rlhf.annotate.cli import main

MESSAGES = [{"role": "system", "content": "Answer for a child."}, {"role": "user", "content": "What is rain?"}]


def count_pairs(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(store.pairs))


def test_import_twice_does_not_duplicate(db_url, engine, write_candidates, capsys):
    path = write_candidates([
        {"prompt": "Why is the sky blue?", "responses": ["Light scatters.", "Magic.", "Paint."]},
        {"prompt": MESSAGES, "responses": ["Water falling.", "Sky crying."]},
    ])
    assert main(["import", str(path), "--db", db_url]) == 0
    assert "added 4, skipped 0" in capsys.readouterr().out
    assert main(["import", str(path), "--db", db_url]) == 0
    assert "added 0, skipped 4" in capsys.readouterr().out
    assert count_pairs(engine) == 4
    # The same comparison with its responses swapped, from another file, is not new either.
    swapped = write_candidates([{"prompt": MESSAGES, "responses": ["Sky crying.", "Water falling."]}], "b.jsonl")
    assert main(["import", str(swapped), "--db", db_url]) == 0
    assert count_pairs(engine) == 4


def test_bad_file_is_refused_whole_with_a_clear_message(db_url, engine, tmp_path, capsys):
    path = tmp_path / "cands.jsonl"
    path.write_text('{"prompt": "ok", "responses": ["a", "b"]}\n{"prompt": "p", "responses": [1, "b"]}\n')
    assert main(["import", str(path), "--db", db_url]) == 2
    err = capsys.readouterr().err
    assert f'{path}, line 2: field "responses": response 0: expected a string, got a number' in err
    assert "Accepted format" in err and "Traceback" not in err
    assert count_pairs(engine) == 0  # the good first line was not imported either


def test_add_user_prints_link_and_stores_only_a_hash(db_url, engine, capsys):
    assert main(["add-user", "alice", "--admin", "--db", db_url, "--port", "8123"]) == 0
    token = re.search(r"http://127\.0\.0\.1:8123/login/(\S+)", capsys.readouterr().out).group(1)
    assert len(token) >= 40
    with engine.connect() as conn:
        rows = [tuple(map(str, row)) for row in conn.execute(select(store.users))]
    assert not any(token in value for row in rows for value in row)
    assert store.user_by_token(engine, token).token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert store.user_by_token(engine, token).is_admin


def test_add_user_refuses_duplicates_and_reset_replaces_the_link(db_url, engine, capsys):
    assert main(["add-user", "bob", "--db", db_url]) == 0
    old = capsys.readouterr().out.split("/login/")[1].strip()
    assert main(["add-user", "bob", "--db", db_url]) == 2
    assert "--reset" in capsys.readouterr().err
    assert main(["add-user", "bob", "--reset", "--db", db_url]) == 0
    new = capsys.readouterr().out.split("/login/")[1].strip()
    assert store.user_by_token(engine, old) is None
    assert store.user_by_token(engine, new).name == "bob"
    assert main(["add-user", "bad name!", "--db", db_url]) == 2
    assert "not allowed" in capsys.readouterr().err


def vote(engine, votes_by_response_a: dict[str, list[str]], users: list[int], k: int) -> None:
    """Each user labels everything in their queue; the wanted answer (about response_a /
    response_b) is looked up by the pair's response_a and turned into the clicked side."""
    for index, user_id in enumerate(users):
        while (row := store.current_or_next(engine, user_id, k)) is not None:
            wanted = votes_by_response_a[row.response_a][index]
            position = {"a": "left" if row.a_on_left else "right",
                        "b": "right" if row.a_on_left else "left"}.get(wanted, wanted)
            assert store.record_label(engine, user_id, row.id, position, None) == "recorded"


def test_export_majority_vote_drops_and_counts_the_rest(db_url, engine, write_candidates, tmp_path, capsys):
    path = write_candidates([
        {"prompt": MESSAGES, "responses": ["A1", "B1"]},
        {"prompt": "two", "responses": ["A2", "B2"]},
        {"prompt": "three", "responses": ["A3", "B3"]},
        {"prompt": "four", "responses": ["A4", "B4"]},
        {"prompt": "five", "responses": ["A5", "B5"]},
    ])
    assert main(["import", str(path), "--db", db_url]) == 0
    users = [store.user_by_token(engine, store.add_user(engine, name)).id for name in ("u1", "u2", "u3")]
    vote(engine, {
        "A1": ["a", "a", "b"],            # A wins
        "A2": ["b", "b", "tie"],          # B wins
        "A3": ["tie", "tie", "a"],        # tie: dropped
        "A4": ["both_bad", "a", "both_bad"],  # both bad: dropped
        "A5": ["a", "b", "tie"],          # no majority: dropped
    }, users, k=3)
    main(["import", str(write_candidates([{"prompt": "six", "responses": ["A6", "B6"]}], "more.jsonl")),
          "--db", db_url])
    capsys.readouterr()

    out = tmp_path / "prefs" / "prefs.jsonl"
    assert main(["export", "--out", str(out), "--db", db_url]) == 0
    summary = capsys.readouterr().out
    assert "wrote 2 preference pairs" in summary
    assert "1 tie, 1 both bad, 1 without a majority" in summary and "1 pairs not labelled" in summary
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [
        {"prompt": MESSAGES, "chosen": "A1", "rejected": "B1"},  # message list comes back as a list
        {"prompt": "two", "chosen": "B2", "rejected": "A2"},
    ]
    assert main(["export", "--out", str(out), "--min-labels", "4", "--db", db_url]) == 0
    assert "wrote 0 preference pairs" in capsys.readouterr().out and out.read_text() == ""


def test_bad_database_url_gives_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "p.jsonl"), "--db", "nosuchdb://x/y"]) == 2
    assert "not a database URL" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "absent.jsonl"), "--db", str(tmp_path / "a.db")]) == 2
    assert "cannot read the candidates file" in capsys.readouterr().err
    refused = "postgresql://someone:hunter2@127.0.0.1:1/db"
    assert main(["add-user", "x", "--db", refused]) == 2
    err = capsys.readouterr().err
    assert "cannot open the database" in err and "hunter2" not in err


def test_module_entry_point_is_cheap_to_import():
    probe = ("import sys, rlhf.annotate.cli; "
             "print(sorted(m for m in ('flask', 'sqlalchemy', 'uvicorn', 'starlette') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "rlhf.annotate", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    assert all(word in helped.stdout for word in ("import", "serve", "add-user", "export"))
    assert main(["export"]) == 2  # argparse usage error becomes a return code, not SystemExit


def test_serve_reports_a_busy_port(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = main(["serve", "--db", str(tmp_path / "a.db"), "--port", str(port)])
    assert status == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
