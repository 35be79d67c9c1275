"""Load check: 8 clients, 2 of them hostile, against `rlhf serve` and `rlhf annotate serve` (a script, not a test).

Each server runs as its real command in a child process on 127.0.0.1. Six honest clients make requests in a loop on
keep-alive connections (serve: a greedy 8-token chat completion from the tiny model; annotate: GET /queue then POST
/label, logged in); two hostile clients, in a process of their own, attack meanwhile: one sends a huge body (a
256 MiB Content-Length and a junk field, as fast as the server takes it), one a slow chunked upload (a chunk-size
line that never ends, 1 KiB every millisecond); each reconnects whenever the server cuts it off. The honest clients
are timed alone and under attack, in alternating rounds (so that a change in the machine's other load falls on both);
PASS when the honest p95 latency under attack is within 2x of the p95 without.

    python bench/hostile_load.py                      # both servers, 20 s per phase
    python bench/hostile_load.py --target serve --seconds 30
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from annotate_load import HOST, REPO, Annotator, free_port, percentile, setup, start_server

HONEST, HOSTILE = 6, 2
QUESTION = [{"role": "user", "content": "Explain rain to a 10-year-old."}]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.1)


def start_serve(port: int, log) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "rlhf", "serve", "tiny", "--port", str(port), "--device", "cpu",
                                "--max_new_tokens", "8"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, process)
    return process


class ChatClient:
    """An honest client of `rlhf serve`: a greedy 8-token completion per request."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=120)
        self.body = json.dumps({"messages": QUESTION, "max_tokens": 8, "temperature": 0})

    def once(self) -> None:
        self.conn.request("POST", "/v1/chat/completions", self.body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"serve answered {response.status}")


class LabelClient:
    """An honest annotator of `rlhf annotate serve`: GET /queue, POST /label (timed as one request each)."""

    def __init__(self, annotator: Annotator):
        self.annotator = annotator
        self.form = None

    def once(self) -> None:
        import random
        import urllib.parse

        from annotate_load import ASSIGNMENT, CSRF, POSITIONS

        if self.form is None:
            status, _, html = self.annotator.request("GET", "/queue")
            if status != 200 or not ASSIGNMENT.search(html):
                raise RuntimeError(f"annotate answered {status} (or ran out of pairs)")
            self.form = urllib.parse.urlencode({"csrf_token": CSRF.search(html).group(1), "choice":
                                                random.choice(POSITIONS),
                                                "assignment_id": ASSIGNMENT.search(html).group(1)})
        else:
            status, _, _ = self.annotator.request("POST", "/label", self.form)
            self.form = None
            if status != 303:
                raise RuntimeError(f"annotate answered {status} to a label")


def run_honest(clients: list, seconds: float) -> tuple[list[float], int]:
    """Every client in its own thread, one request after another → (latencies in seconds, errors)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(client) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.once()
            except (OSError, http.client.HTTPException, RuntimeError):
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def hostile(port: int, path: str, stop, report) -> None:
    """The attackers' process: a huge body and a slow chunked upload, each reconnecting when cut off."""
    counts = {"huge cut off": 0, "slow cut off": 0, "MiB sent": 0.0}
    lock = threading.Lock()

    def attack(head: bytes, piece: bytes, pause: float, name: str) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((HOST, port), timeout=10) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.sendall(head)
                    while not stop.is_set():
                        sock.sendall(piece)
                        with lock:
                            counts["MiB sent"] += len(piece) / 2**20
                        if pause:
                            time.sleep(pause)
            except OSError:
                with lock:
                    counts[name] += 1
                time.sleep(0.01)

    size = 256 * 2**20
    huge = (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {size}"
            f"\r\n\r\n").encode() + b'{"messages": [{"role": "user", "content": "hi"}], "junk": "'
    slow = f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    threads = [threading.Thread(target=attack, args=(huge, b"x" * 65536, 0.0, "huge cut off"), daemon=True),
               threading.Thread(target=attack, args=(slow, b"1" * 1024, 0.001, "slow cut off"), daemon=True)]
    for thread in threads:
        thread.start()
    stop.wait()
    report.put(dict(counts))


def measure(target: str, args: argparse.Namespace, workdir: Path) -> bool:
    port = free_port()
    log = open(workdir / f"{target}.log", "w")
    if target == "serve":
        server = start_serve(port, log)
        clients = [ChatClient(port) for _ in range(HONEST)]
        path = "/v1/chat/completions"
    else:
        db_url = f"sqlite:///{workdir / 'annotations.db'}"
        engine, tokens = setup(db_url, argparse.Namespace(labels=20000, after_kill=0, k=1, annotators=HONEST))
        engine.dispose()
        server = start_server(db_url, port, 1, 8, log)
        annotators = [Annotator(name, token, port) for name, token in tokens.items()]
        for annotator in annotators:
            annotator.login()
        clients = [LabelClient(a) for a in annotators]
        path = "/label"
    calm, attacked, calm_errors, attacked_errors = [], [], 0, 0
    counts = {"huge cut off": 0, "slow cut off": 0, "MiB sent": 0.0}
    try:
        run_honest(clients, 2.0)  # warm-up: first requests load code and fill caches
        for _ in range(args.rounds):
            latencies, errors = run_honest(clients, args.seconds / args.rounds)
            calm, calm_errors = calm + latencies, calm_errors + errors
            stop, report = multiprocessing.Event(), multiprocessing.Queue()
            attacker = multiprocessing.Process(target=hostile, args=(port, path, stop, report))
            attacker.start()
            time.sleep(2.0)  # the attack under way before timing starts
            latencies, errors = run_honest(clients, args.seconds / args.rounds)
            attacked, attacked_errors = attacked + latencies, attacked_errors + errors
            stop.set()
            counts = {key: value + counts[key] for key, value in report.get(timeout=30).items()}
            attacker.join(timeout=10)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    p95_calm, p95_attacked = percentile(calm, 95), percentile(attacked, 95)
    passed = p95_attacked <= 2 * p95_calm and not attacked_errors
    print(f"{target}: {HONEST} honest clients, p50/p95 {1000 * percentile(calm, 50):.1f}/{1000 * p95_calm:.1f} ms "
          f"alone ({len(calm)} requests, {calm_errors} errors), {1000 * percentile(attacked, 50):.1f}/"
          f"{1000 * p95_attacked:.1f} ms with {HOSTILE} hostile ({len(attacked)} requests, {attacked_errors} errors): "
          f"p95 x{p95_attacked / p95_calm:.2f}; hostile: {counts['huge cut off']} huge bodies and "
          f"{counts['slow cut off']} slow uploads cut off, {counts['MiB sent']:.0f} MiB sent; "
          f"{'PASS' if passed else 'FAIL'}", flush=True)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=["serve", "annotate", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=20.0, help="time of each phase (alone, under attack)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two phases")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (database, server logs)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-hostile-"))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.seconds:g} s per phase in "
          f"{args.rounds} rounds; logs in {workdir}", flush=True)
    results = [measure(t, args, workdir) for t in (["serve", "annotate"] if args.target == "both" else [args.target])]
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"RESULT: {'PASS' if all(results) else 'FAIL'}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
