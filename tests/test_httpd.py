"""The HTTP layer both servers run on (`rlhf.httpd`): bounded lines, bodies and upload time; the Host check.

Each test serves a tiny ASGI app on 127.0.0.1 and a free port from a thread, and talks to it on raw sockets.
"""

import json
import socket

import pytest

from rlhf import httpd


async def echo(scope, receive, send):
    """Answers with what it received: the body's length and its Content-Length header."""
    message = await receive()
    headers = dict(scope["headers"])
    body = json.dumps({"length": len(message.get("body", b"")), "more": message.get("more_body", False),
                       "content-length": headers.get(b"content-length", b"").decode(),
                       "chunked": b"transfer-encoding" in headers}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes (requests say `Connection: close`) → everything the server answers before it closes."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):  # the server may close before it has read everything
            pass
    return answer


HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def server():
    with httpd.serving(httpd.Guard(echo, max_bytes=1000)) as listener:
        yield listener


def test_a_chunked_body_reaches_the_app_whole_with_its_length(server):
    answer = exchange(server.port, HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert status_of(answer) == 200
    seen = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert seen == {"length": 11, "more": False, "content-length": "11", "chunked": False}


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    # the declared length is refused at once: the client has not sent a byte of the body
    answer = exchange(server.port, HEAD + b"Content-Length: 1000000000000\r\n\r\n")
    assert status_of(answer) == 413 and b"limit of 1000 bytes" in answer
    chunked = b"".join(b"64\r\n" + b"x" * 100 + b"\r\n" for _ in range(11))  # 1100 bytes, counted as they come
    answer = exchange(server.port, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert status_of(answer) == 413
    fits = HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 1000
    assert status_of(exchange(server.port, fits)) == 200


def test_an_unterminated_chunk_size_line_is_refused_at_16_kib(server):
    """A chunk-size line that never ends (the slow-upload attack on waitress) is cut off once it passes h11's
    bound, and the server goes on answering others."""
    endless_line = b"1" * (httpd.MAX_INCOMPLETE_LINE + 1)
    answer = exchange(server.port, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + endless_line)
    assert answer == b"" or status_of(answer) == 400  # refused, and the connection closed (not left waiting)
    assert status_of(exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200


def test_a_body_that_does_not_arrive_in_time_gets_a_408():
    with httpd.serving(httpd.Guard(echo, max_bytes=1000, timeout=0.2)) as listener:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly a part")
            answer = sock.recv(65536)  # the server answers and closes; the client never sent the rest
    assert status_of(answer) == 408


def test_a_foreign_host_name_is_refused_and_the_connection_closed():
    with httpd.serving(httpd.protect(echo, "127.0.0.1", 1000)) as listener:
        for host, status in ((b"evil.example", 400), (b"evil.example:80", 400), (b"localhost:1", 200),
                             (b"[::1]:8000", 200), (b"127.0.0.1", 200)):
            answer = exchange(listener.port, b"POST / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
                              b"Content-Length: 2\r\n\r\nhi")
            assert status_of(answer) == status, host
        # refused with its upload unread: the connection closes (no error from the parser meeting the rest later)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: evil.example\r\nTransfer-Encoding: chunked\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert status_of(answer) == 400 and b"connection: close" in answer.lower()


def test_host_names_answered_on_loopback_and_beyond():
    assert httpd.allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert httpd.allowed_hosts("::1") == httpd.allowed_hosts("localhost") == httpd.allowed_hosts("127.0.0.1")
    assert httpd.allowed_hosts("0.0.0.0") == ["*"]
    assert httpd.allowed_hosts("0.0.0.0", "Labels.Example.org, 10.0.0.5") == ["labels.example.org", "10.0.0.5"]
    assert not httpd.is_loopback("localhost.evil.example") and not httpd.is_loopback("")
    assert [httpd.host_name(h) for h in (b"LocalHost:8000", b"[::1]:80", b"[::1]", b"127.0.0.1", b"a:b")] == [
        "localhost", "[::1]", "[::1]", "127.0.0.1", "a:b"]


def test_a_taken_port_is_an_oserror_not_an_exit():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            httpd.Listener(echo, "127.0.0.1", busy.getsockname()[1])
