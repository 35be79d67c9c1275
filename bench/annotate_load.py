"""Load check for `rlhf annotate serve` (a script, not a timed test).

Phase 1: N simulated annotators (threads, each with its own login and keep-alive HTTP
connection to 127.0.0.1) label pairs until a target count is acknowledged; prints labels/s
and latency percentiles, then checks that every acknowledged label is in the database exactly
once. Phase 2: load continues, the server is killed with SIGKILL mid-load and restarted on
the same database; after more labels, the same check runs over everything acknowledged.

An acknowledgement is a 303 from POST /label with `X-Label-Status: recorded`, which the
server sends only after the label's transaction committed.

    python bench/annotate_load.py                      # temp SQLite file
    python bench/annotate_load.py --db postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf.annotate import store  # noqa: E402  (needs the repo on sys.path first)
from rlhf.annotate.candidates import PairSpec, pair_key  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by design
POSITIONS = ("left", "right", "tie", "both_bad")
ASSIGNMENT = re.compile(r'name="assignment_id" value="(\d+)"')
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
LOGIN_CSRF = re.compile(r'name="login_csrf" value="([^"]+)"')
COOKIE = re.compile(r"(rlhf_annotate=[^;]*)")


@dataclass
class Ack:
    assignment_id: int
    user: str
    position: str


@dataclass
class Shared:
    """What the annotator threads report, behind one lock."""

    target: int
    deadline: float
    acks: list[Ack] = field(default_factory=list)
    post_latency: list[float] = field(default_factory=list)
    get_latency: list[float] = field(default_factory=list)
    connection_errors: int = 0
    other_statuses: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    reserved: int = 0  # labels being submitted or acknowledged; keeps the total at `target`

    def done(self) -> bool:
        return len(self.acks) >= self.target or time.monotonic() > self.deadline

    def reserve(self) -> bool:
        """Claim one of the `target` submissions, so the phase stops at exactly that many."""
        with self.lock:
            if self.reserved >= self.target or time.monotonic() > self.deadline:
                return False
            self.reserved += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.reserved -= 1


class Annotator:
    """One person: a login cookie and a keep-alive connection, reopened after errors."""

    def __init__(self, name: str, token: str, port: int) -> None:
        self.name, self.token, self.port = name, token, port
        self.cookie = ""
        self.conn: http.client.HTTPConnection | None = None
        self.out_of_work = False

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, dict, str]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        headers = {"Cookie": self.cookie} if self.cookie else {}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        found = COOKIE.search(response.getheader("Set-Cookie") or "")
        if found:
            self.cookie = found.group(1)
        return response.status, dict(response.getheaders()), text

    def reset(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def login(self) -> None:
        """Open the link (the Continue page), then post its form, as a browser does."""
        status, _, html = self.request("GET", f"/login/{self.token}")
        if status != 200 or not LOGIN_CSRF.search(html):
            raise RuntimeError(f"{self.name}: the login page answered HTTP {status}")
        form = urllib.parse.urlencode({"token": self.token, "login_csrf": LOGIN_CSRF.search(html).group(1)})
        status, _, _ = self.request("POST", "/login", form)
        if status != 303 or not self.cookie:
            raise RuntimeError(f"{self.name}: login failed with HTTP {status}")

    def label_once(self, shared: Shared) -> bool:
        """Fetch the next pair and answer it; True if the server acknowledged the label."""
        started = time.perf_counter()
        status, _, html = self.request("GET", "/queue")
        got = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"{self.name}: GET /queue answered {status}")
        if 'id="done"' in html:
            self.out_of_work = True
            return False
        assignment_id = int(ASSIGNMENT.search(html).group(1))
        position = random.choice(POSITIONS)
        form = urllib.parse.urlencode(
            {"csrf_token": CSRF.search(html).group(1), "assignment_id": assignment_id, "choice": position}
        )
        status, headers, _ = self.request("POST", "/label", form)
        posted = time.perf_counter()
        outcome = headers.get("X-Label-Status", f"HTTP {status}")
        with shared.lock:
            shared.get_latency.append(got - started)
            if status == 303 and outcome == "recorded":
                shared.acks.append(Ack(assignment_id, self.name, position))
                shared.post_latency.append(posted - got)
                return True
            shared.other_statuses[outcome] = shared.other_statuses.get(outcome, 0) + 1
            return False

    def run(self, shared: Shared) -> None:
        while not shared.done() and not self.out_of_work:
            if not shared.reserve():
                return
            acknowledged = False
            try:
                if not self.cookie:
                    self.login()
                acknowledged = self.label_once(shared)
            except (OSError, http.client.HTTPException):
                # The server is down (killed on purpose in phase 2): retry until it is back.
                with shared.lock:
                    shared.connection_errors += 1
                self.reset()
                time.sleep(0.05)
            finally:
                if not acknowledged:
                    shared.release()


# ---------------------------------------------------------------- server control


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(db_url: str, port: int, k: int, threads: int, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhf.annotate", "serve", "--db", db_url, "--host", HOST,
         "--port", str(port), "--k", str(k), "--threads", str(threads)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log.name}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the server did not start within 30 s")


# ---------------------------------------------------------------- load phases


def run_phase(annotators: list[Annotator], target: int, deadline: float, during=None) -> tuple[Shared, float]:
    """Run every annotator until `target` acknowledgements (or the deadline); `during(shared)`
    runs on the calling thread meanwhile (phase 2 uses it to kill and restart the server)."""
    shared = Shared(target=target, deadline=deadline)
    threads = [threading.Thread(target=a.run, args=(shared,), daemon=True) for a in annotators]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    if during is not None:
        during(shared)
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + 5))
    return shared, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report_phase(name: str, shared: Shared, seconds: float) -> None:
    acks = len(shared.acks)
    print(
        f"{name}: {acks} labels acknowledged in {seconds:.1f} s = {acks / seconds:.0f} labels/s; "
        f"POST /label latency p50 {1000 * percentile(shared.post_latency, 50):.1f} ms, "
        f"p95 {1000 * percentile(shared.post_latency, 95):.1f} ms; "
        f"GET /queue p95 {1000 * percentile(shared.get_latency, 95):.1f} ms"
    )
    if shared.connection_errors or shared.other_statuses:
        print(f"  connection errors (retried): {shared.connection_errors}; "
              f"other answers: {shared.other_statuses or 'none'}")


def check_exactly_once(engine, acks: list[Ack], k: int) -> bool:
    """Every acknowledged label is stored once, on its assignment, with the clicked answer."""
    from sqlalchemy import func, select

    with engine.connect() as conn:
        rows = {
            row.id: row
            for row in conn.execute(
                select(store.assignments.c.id, store.assignments.c.pair_id, store.assignments.c.choice,
                       store.assignments.c.a_on_left, store.users.c.name)
                .join(store.users, store.users.c.id == store.assignments.c.user_id)
                .where(store.assignments.c.choice.is_not(None))
            )
        }
        duplicates = conn.execute(
            select(store.assignments.c.pair_id, store.assignments.c.user_id)
            .where(store.assignments.c.choice.is_not(None))
            .group_by(store.assignments.c.pair_id, store.assignments.c.user_id)
            .having(func.count() > 1)
        ).all()
        over_k = conn.scalar(
            select(func.count()).select_from(store.pairs).where(store.pairs.c.n_assigned > k)
        )
    acked_ids = [ack.assignment_id for ack in acks]
    missing = [a for a in acks if a.assignment_id not in rows]
    wrong = [
        a for a in acks if a.assignment_id in rows and (
            rows[a.assignment_id].name != a.user
            or rows[a.assignment_id].choice != store.choice_from_position(a.position, rows[a.assignment_id].a_on_left)
        )
    ]
    acked_twice = len(acked_ids) - len(set(acked_ids))
    unacked = len(set(rows) - set(acked_ids))
    ok = not missing and not wrong and not duplicates and not acked_twice and not over_k
    print(
        f"  {'PASS' if ok else 'FAIL'}: every acknowledged label is in the database exactly once "
        f"({len(acks)} acknowledged, {len(rows)} stored; missing {len(missing)}, wrong answer "
        f"{len(wrong)}, stored twice {len(duplicates)}, acknowledged twice {acked_twice}, "
        f"pairs over k {over_k}; stored but never acknowledged {unacked})"
    )
    return ok


def killer(state: dict, kill_after: int, restart):
    """Phase 2's side job: SIGKILL the server once `kill_after` labels are in, then restart it."""

    def during(shared: Shared) -> None:
        while len(shared.acks) < kill_after and not shared.done():
            time.sleep(0.01)
        in_flight_at = len(shared.acks)
        os.kill(state["server"].pid, signal.SIGKILL)
        state["server"].wait()
        down = time.perf_counter()
        state["server"] = restart()
        state["restart_s"] = time.perf_counter() - down
        state["killed_at"] = in_flight_at

    return during


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="database URL (default: a SQLite file in a temp folder)")
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--labels", type=int, default=2000, help="phase 1 target")
    parser.add_argument("--kill-after", type=int, default=300, help="phase 2 labels before SIGKILL")
    parser.add_argument("--after-kill", type=int, default=700, help="phase 2 target, including the above")
    parser.add_argument("--k", type=int, default=2, help="annotators per pair")
    parser.add_argument("--threads", type=int, default=8, help="server worker threads")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (database, log)")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop each phase after this")
    return parser.parse_args(argv)


def setup(db_url: str, args: argparse.Namespace) -> tuple[object, dict[str, str]]:
    """Enough pairs for both phases plus slack, and one login per annotator."""
    engine = store.open_store(db_url)
    n_pairs = (args.labels + args.after_kill) // args.k + args.annotators * 5
    specs = [
        PairSpec(f"bench prompt {i}", f"response one {i}", f"response two {i}",
                 pair_key(f"bench prompt {i}", f"response one {i}", f"response two {i}"))
        for i in range(n_pairs)
    ]
    store.import_pairs(engine, specs, source="bench")
    tokens = {}
    for i in range(args.annotators):
        name = f"bench{i:02d}-{random.randrange(10**6):06d}"
        tokens[name] = store.add_user(engine, name)
    return engine, tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-annotate-bench-"))
    db_url = args.db or f"sqlite:///{workdir / 'annotations.db'}"
    engine, tokens = setup(db_url, args)
    port = free_port()
    log = open(workdir / "server.log", "w")
    restart = lambda: start_server(db_url, port, args.k, args.threads, log)  # noqa: E731
    state = {"server": restart()}
    print(f"server on http://{HOST}:{port}/ ({store.display_url(db_url)}), {args.annotators} annotators, "
          f"k={args.k}, {args.threads} server threads, {os.cpu_count()} CPUs")
    try:
        annotators = [Annotator(name, token, port) for name, token in tokens.items()]
        phase1, seconds1 = run_phase(annotators, args.labels, time.monotonic() + args.max_seconds)
        report_phase("phase 1 (steady load)", phase1, seconds1)
        ok1 = len(phase1.acks) >= args.labels and check_exactly_once(engine, phase1.acks, args.k)

        phase2, seconds2 = run_phase(annotators, args.after_kill, time.monotonic() + args.max_seconds,
                                     during=killer(state, args.kill_after, restart))
        print(f"phase 2: SIGKILL after {state.get('killed_at')} labels; restart took "
              f"{state.get('restart_s', float('nan')):.1f} s")
        report_phase("phase 2 (kill + restart)", phase2, seconds2)
        ok2 = len(phase2.acks) >= args.after_kill and check_exactly_once(
            engine, phase1.acks + phase2.acks, args.k
        )
    finally:
        state["server"].terminate()
        state["server"].wait(timeout=10)
        log.close()
        engine.dispose()
    passed = ok1 and ok2
    if passed and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        print("RESULT: PASS")
    else:
        print(f"RESULT: {'PASS' if passed else 'FAIL'} (database and server log kept in {workdir})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
