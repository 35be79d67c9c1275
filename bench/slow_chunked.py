"""What a slow chunked upload does to each HTTP server we could run on (the evidence behind `rlhf/httpd.py`).

Each candidate serves the same tiny WSGI app in a child process on 127.0.0.1. Honest clients GET / in a loop on
keep-alive connections; hostile clients (another process) open `POST / Transfer-Encoding: chunked` and send a
chunk-size line that never ends (hex digits, no CRLF) a little at a time, reconnecting whenever the server drops
them. Printed per candidate: the honest latency p50/p95 without and with the hostile clients, the server's CPU
seconds in each phase, and how many times the hostile clients were cut off with how many bytes sent.

    python bench/slow_chunked.py                          # every candidate, 15 s per phase
    python bench/slow_chunked.py --candidates waitress,uvicorn-h11 --seconds 30 --hostile 3

Candidates: `waitress` (its defaults: 1 GiB body limit), `waitress-4MiB` and `waitress-64KiB` (max_request_body_size
set), `uvicorn-h11` (the WSGI app through a2wsgi behind `rlhf.httpd`, as both rlhf servers run: h11's 16 KiB bound
on an incomplete line, the body read whole and bounded before the app). waitress is no dependency of rlhf any more:
`pip install waitress==3.0.2` to measure it. A timing script, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
CANDIDATES = ("waitress", "waitress-4MiB", "waitress-64KiB", "uvicorn-h11")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def serve(candidate: str, port: int) -> None:
    """The child process: one candidate server until killed."""
    if candidate.startswith("waitress"):
        import waitress

        limits = {"waitress-4MiB": 4 << 20, "waitress-64KiB": 64 << 10}
        extra = {"max_request_body_size": limits[candidate]} if candidate in limits else {}
        waitress.serve(app, host=HOST, port=port, threads=4, _quiet=True, **extra)
    elif candidate == "uvicorn-h11":
        from a2wsgi import WSGIMiddleware

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from rlhf import httpd

        httpd.Listener(httpd.protect(WSGIMiddleware(app, workers=4), HOST, 4 << 20), HOST, port).run()
    else:
        raise SystemExit(f"unknown candidate {candidate!r}; use one of {', '.join(CANDIDATES)}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def honest(port: int, seconds: float, clients: int) -> list[float]:
    """`clients` threads each GET / in a loop on a keep-alive connection → every latency, in seconds."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def hostile(port: int, connections: int, piece: int, interval: float, stop, report) -> None:
    """The attacker process: `connections` slow chunked uploads, each reconnecting when dropped."""
    counts = {"dropped": 0, "bytes": 0}
    lock = threading.Lock()

    def attack() -> None:
        while not stop.is_set():
            try:
                sock = socket.create_connection((HOST, port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                while not stop.is_set():
                    sock.sendall(b"1" * piece)  # a chunk-size line that never ends
                    with lock:
                        counts["bytes"] += piece
                    time.sleep(interval)
            except OSError:
                with lock:
                    counts["dropped"] += 1
            finally:
                sock.close()

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    stop.wait()
    report.put(dict(counts))


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")


def measure(candidate: str, args: argparse.Namespace) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", candidate, "--port", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{candidate} did not start") from None
                time.sleep(0.05)
        cpu0 = cpu_seconds(server.pid)
        calm = honest(port, args.seconds, args.honest)
        cpu1 = cpu_seconds(server.pid)
        stop, report = multiprocessing.Event(), multiprocessing.Queue()
        attacker = multiprocessing.Process(target=hostile, args=(port, args.hostile, args.piece, args.interval, stop,
                                                                 report))
        attacker.start()
        time.sleep(args.warmup)  # let the attack build up before measuring
        cpu2 = cpu_seconds(server.pid)
        attacked = honest(port, args.seconds, args.honest)
        cpu3 = cpu_seconds(server.pid)
        stop.set()
        counts = report.get(timeout=30)
        attacker.join(timeout=10)
    finally:
        server.kill()
        server.wait()
    return {"candidate": candidate, "calm": calm, "attacked": attacked, "cpu_calm": cpu1 - cpu0,
            "cpu_attacked": cpu3 - cpu2, **counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="attack time before the attacked phase starts")
    parser.add_argument("--honest", type=int, default=2, help="honest clients")
    parser.add_argument("--hostile", type=int, default=3, help="hostile connections")
    parser.add_argument("--piece", type=int, default=1024, help="bytes per send of a hostile client")
    parser.add_argument("--interval", type=float, default=0.001, help="seconds between a hostile client's sends")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    print(f"{args.honest} honest clients, {args.hostile} hostile connections sending {args.piece} B every "
          f"{1000 * args.interval:g} ms; {args.seconds:g} s per phase after {args.warmup:g} s of attack; "
          f"{os.cpu_count()} CPUs")
    for candidate in args.candidates.split(","):
        r = measure(candidate, args)
        print(f"{candidate:>15}: honest p50/p95 {1000 * percentile(r['calm'], 50):.1f}/"
              f"{1000 * percentile(r['calm'], 95):.1f} ms calm ({len(r['calm'])} requests), "
              f"{1000 * percentile(r['attacked'], 50):.1f}/{1000 * percentile(r['attacked'], 95):.1f} ms attacked "
              f"({len(r['attacked'])} requests); server CPU {r['cpu_calm']:.1f} s calm, {r['cpu_attacked']:.1f} s "
              f"attacked; hostile clients dropped {r['dropped']} times after {r['bytes'] / 2**20:.0f} MiB sent",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
