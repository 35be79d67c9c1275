"""Fixtures for the annotate tests: a database URL for SQLite and for a real PostgreSQL server,
the app served over HTTP by the real `serve` command, and a headless Debian chromium.

Nothing here skips: a missing chromium or PostgreSQL fails with the command that installs it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.annotate import KEY_ENV

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run scripts/install_test_deps.sh (it installs Debian's chromium and postgresql)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- PostgreSQL


class PostgresServer:
    """A throwaway cluster in a temp folder, listening on loopback only, trust auth.

    initdb refuses to run as root, so as root every server command runs as `postgres`.
    """

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.fail(f"PostgreSQL's initdb was not found; {INSTALL_HINT}", pytrace=False)
        self.bindir = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="rlhf-annotate-pg-"))
        self.port = free_port()
        self.databases = itertools.count()
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run(prefix + list(command), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            log = self.root / "server.log"
            detail = log.read_text() if log.exists() else ""
            pytest.fail(f"{command[0]} failed: {result.stderr}{result.stdout}\n{detail}", pytrace=False)

    def start(self) -> None:
        data = self.root / "data"
        self.run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                 "-E", "UTF8", "--no-sync")
        options = f"-k {self.root} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off"
        self.run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"),
                 "-o", options, "-w", "start")

    def stop(self) -> None:
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A fresh, empty database per test, so tests never see each other's rows."""
        import psycopg

        name = f"annotate_{next(self.databases)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path, monkeypatch) -> str:
    """The same test runs against a SQLite file and against a real PostgreSQL server. The cookie-signing key:
    a file next to the SQLite file; for PostgreSQL the environment variable (the default file would be
    ./annotate.key, in the repository)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'annotations.db'}"
    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))
    return request.getfixturevalue("postgres_server").create_database()


# ---------------------------------------------------------------- the served app


@dataclass
class LiveServer:
    base: str
    db_url: str
    process: subprocess.Popen

    def url(self, path: str) -> str:
        return self.base + path


def start_server(db_url: str, k: int = 1) -> LiveServer:
    """`rlhf annotate serve` in a subprocess on a free loopback port; returns once it answers."""
    port = free_port()
    # A file, not a pipe: nobody reads the server's output while it runs, and a full pipe
    # would block it.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhf.annotate", "serve", "--db", db_url, "--host", "127.0.0.1",
         "--port", str(port), "--k", str(k), "--threads", "4"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    process.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"serve exited early:\n{log.read()}")
        try:
            urllib.request.urlopen(base + "/static/annotate.css", timeout=1).close()
            return LiveServer(base, db_url, process)
        except OSError:
            time.sleep(0.05)
    process.kill()
    log.close()
    raise RuntimeError("serve did not answer within 30 s")


@pytest.fixture
def live_server(db_url):
    server = start_server(db_url)
    yield server
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
    server.process.log.close()


# ---------------------------------------------------------------- the browser


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


# ---------------------------------------------------------------- the store


@pytest.fixture
def engine(db_url):
    """An opened store (schema created) on the parametrised database."""
    from rlhf.annotate import store

    engine = store.open_store(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def write_candidates(tmp_path):
    """Write candidate records as JSONL and return the path."""
    import json

    def write(records, name="candidates.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return path

    return write
