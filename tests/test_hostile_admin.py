"""Hostile clients of the admin API, on a live anywhered: the REST port (TCP, bearer token) and
the Unix socket.

* Pipelining floods, with and without the token, then junk: the daemon's memory stays bounded,
  the flooding connection gets its answers in order, nothing raises, and anywherectl is served
  meanwhile.  A client that sends without reading finds the daemon not reading either.
* Connection caps: idle TCP clients cannot take the Unix socket's room, and one source address
  cannot take every TCP slot.
* Log injection: control characters in the path, query or headers never start a log line of
  their own; they appear escaped.
* The request head limit holds whether the head arrives in one read or byte by byte.

Real sockets on loopback only.  Every load loop is bounded in count and in time.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
import time

import pytest

from anywhere.admin import MAX_HEADERS
from conftest import free_port, wait_for, wait_log_line
from handpeer import until_closed
from procstat import fd_count, rss_kb

MIB = 1024 * 1024
RSS_GROWTH_MAX = 30 * MIB // 1024  # KiB
FLOOD = 3000  # pipelined requests
JUNK_MAX = 96 * MIB  # junk sent after them, at most ...
LOAD_TIME = 20.0  # ... and for at most this long
MAX_TCP_CONNS, MAX_TCP_PER_SOURCE = 64, 16  # admin.py's caps on the REST port (spelt out here so that
#                                          these tests also run, and fail, on code without them)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


# -- helpers --------------------------------------------------------------------------------------------------
def start_rest(world, admin_timeout: float = 10) -> tuple[int, str]:
    """anywhered with the REST port on 127.0.0.1; (its port, the token)."""
    token = "t0k3n-" + os.urandom(12).hex()
    token_file = world.tmp / "api.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    conf = world.tmp / "anywhered.conf"
    conf.write_text(f"[server]\napi_listen = 127.0.0.1:{port}\napi_token_file = {token_file}\n"
                    f"admin_timeout = {admin_timeout}\n")
    world.start_server("--config", str(conf))
    return port, token


def hwm_kb(pid: int) -> int:
    """Peak resident set size of `pid` in KiB (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each whole HTTP/1.1 response in `data`, in order (a cut-off last one is left out)."""
    out = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out
        head = data[:end].split(b"\r\n")
        status = int(head[0].split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head[1:] if line.lower().startswith(b"content-length:"))
        if len(data) < end + 4 + length:
            return out
        out.append((status, data[end + 4:end + 4 + length]))
        data = data[end + 4 + length:]


def get(path: str, token: str | None = None, close: bool = False) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    conn = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: anywhered\r\n{auth}{conn}\r\n".encode()


def connect_tcp(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed `s` (EOF or reset); False while it is open and silent.  Does not wait."""
    timeout = s.gettimeout()
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        s.settimeout(timeout)


def assert_clean_log(server, mark: int) -> None:
    log = server.log()[mark:]
    for bad in ("Traceback", "RecursionError"):
        assert bad not in log, log[log.index(bad) - 500:][:3000]


# -- 1. pipelining: bounded memory, answers in order, backpressure --------------------------------------------
@pytest.mark.parametrize("with_token", [False, True], ids=["401s", "200s"])
def test_pipelined_flood_then_junk_keeps_memory_bounded(world, with_token):
    port, token = start_rest(world)
    server = world.server
    rss_before, mark = rss_kb(server.pid), len(server.log())
    sock = connect_tcp(port)
    flood = get("/v1/status", token if with_token else None) * FLOOD
    sent = {"junk": 0, "end": ""}

    def send() -> None:
        deadline = time.monotonic() + LOAD_TIME
        junk = b"\x00" * 65536
        try:
            sock.sendall(flood)
            while sent["junk"] < JUNK_MAX and time.monotonic() < deadline:
                sock.sendall(junk)
                sent["junk"] += len(junk)
            sent["end"] = "limit"
        except OSError as exc:  # the server closed: reset or broken pipe
            sent["end"] = type(exc).__name__

    got = {"data": b"", "how": ""}

    def receive() -> None:
        got["data"], got["how"] = until_closed(sock, LOAD_TIME + 5)

    threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=receive, daemon=True)]
    for t in threads:
        t.start()
    served = 0
    for _ in range(50):  # anywherectl is served while the flood runs (bounded: 50 calls)
        if not threads[0].is_alive():
            break
        assert world.api("GET", "/v1/status")["server_id"] == "anywhered"
        served += 1
    for t in threads:
        t.join(LOAD_TIME + 10)
        assert not t.is_alive()
    sock.close()
    peak = hwm_kb(server.pid)
    answers = responses(got["data"])
    print(f"\nRSS before {rss_before} KiB, peak {peak} KiB (+{(peak - rss_before) / 1024:.1f} MiB); "
          f"{len(answers)} answers, {sent['junk'] / MIB:.1f} MiB of junk sent, sender ended by {sent['end']}, "
          f"reader by {got['how']}; anywherectl served {served} times meanwhile")
    assert peak - rss_before < RSS_GROWTH_MAX, f"RSS grew from {rss_before} to a peak of {peak} KiB"
    assert_clean_log(server, mark)
    expected = 200 if with_token else 401
    assert [status for status, _ in answers[:FLOOD]] == [expected] * FLOOD, (len(answers), answers[-3:])
    assert len(answers) <= FLOOD + 1
    if len(answers) == FLOOD + 1:  # the junk: a 4xx, then a close
        assert 400 <= answers[-1][0] < 500 and "error" in json.loads(answers[-1][1])
    assert server.alive()
    assert world.api("GET", "/v1/status")["server_id"] == "anywhered"


def test_pipelined_requests_are_answered_in_order(world):
    world.start_server()
    count = 200
    requests = b"".join(get("/v1/status") if i % 2 else get(f"/v1/nothing-{i}") for i in range(count - 1))
    requests += get("/v1/status", close=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(world.sock)
        s.sendall(requests)
        data, how = until_closed(s, 15)
    answers = responses(data)
    assert len(answers) == count, (how, len(answers))
    for i, (status, body) in enumerate(answers):
        if i % 2 or i == count - 1:
            assert status == 200 and json.loads(body)["server_id"] == "anywhered", (i, status, body)
        else:
            assert status == 404 and f"/v1/nothing-{i}" in json.loads(body)["error"], (i, status, body)


def test_client_that_does_not_read_is_not_read_either(world):
    port, _token = start_rest(world, admin_timeout=30)
    server = world.server
    rss_before, mark = rss_kb(server.pid), len(server.log())
    request = get("/v1/status") * 1000  # 401s, each far larger than its request
    sent = 0
    with connect_tcp(port) as s:
        s.setblocking(False)
        deadline = time.monotonic() + LOAD_TIME
        while sent < JUNK_MAX and time.monotonic() < deadline:
            try:
                sent += s.send(request)
            except BlockingIOError:
                # blocked: done once the daemon takes nothing more for a second
                if not select.select([], [s], [], 1.0)[1]:
                    break
        peak = hwm_kb(server.pid)
        print(f"\nsent {sent / MIB:.1f} MiB before the daemon stopped reading; RSS before {rss_before} KiB, "
              f"peak {peak} KiB")
        assert sent < 32 * MIB, f"the daemon kept reading: {sent} bytes taken from a client that reads nothing"
        assert peak - rss_before < RSS_GROWTH_MAX
        assert world.api("GET", "/v1/status")["server_id"] == "anywhered"
    assert_clean_log(server, mark)


# -- 2. connection caps ---------------------------------------------------------------------------------------
def test_rest_port_clients_cannot_lock_out_the_unix_socket(world):
    port, token = start_rest(world, admin_timeout=60)
    server = world.server
    base = fd_count(server.pid)
    sources = [f"127.0.0.{n}" for n in range(1, 1 + MAX_TCP_CONNS // MAX_TCP_PER_SOURCE)]
    idle = [connect_tcp(port, source) for source in sources for _ in range(MAX_TCP_PER_SOURCE)]
    try:
        assert len(idle) == MAX_TCP_CONNS
        wait_for(lambda: fd_count(server.pid) >= base + MAX_TCP_CONNS, 10, what="the daemon to accept them all")
        assert not any(closed_by_server(s) for s in idle)
        # the REST port is full; anywherectl still gets in
        assert world.api("GET", "/v1/status")["server_id"] == "anywhered"
        res = world.ctl("status", "--admin-socket", world.sock)
        assert "anywhered" in res.stdout
        # and one more TCP client, from an address with no connection yet, is turned away
        with connect_tcp(port, "127.0.0.99") as extra:
            extra.sendall(get("/v1/status", token))
            data, how = until_closed(extra, 5)
        assert data == b"", data
        wait_log_line(server, "refused", f"{MAX_TCP_CONNS} connections already open on the REST port")
    finally:
        for s in idle:
            s.close()


def test_one_source_address_cannot_take_every_rest_slot(world):
    port, token = start_rest(world, admin_timeout=60)
    server = world.server
    extra = 4
    first = [connect_tcp(port, "127.0.0.1") for _ in range(MAX_TCP_PER_SOURCE + extra)]
    second = []
    try:
        wait_for(lambda: sum(closed_by_server(s) for s in first) == extra, 5,
                 what=f"{extra} of the connections from 127.0.0.1 to be closed")
        assert sum(not closed_by_server(s) for s in first) == MAX_TCP_PER_SOURCE
        wait_log_line(server, "refused", f"{MAX_TCP_PER_SOURCE} connections already open from 127.0.0.1")
        # another address has room, for as many
        base = fd_count(server.pid)
        second = [connect_tcp(port, "127.0.0.2") for _ in range(MAX_TCP_PER_SOURCE)]
        wait_for(lambda: fd_count(server.pid) >= base + MAX_TCP_PER_SOURCE, 5, what="the daemon to accept them")
        with connect_tcp(port, "127.0.0.3") as third:
            third.sendall(get("/v1/status", close=True))
            data, _how = until_closed(third, 5)
        [(status, body)] = responses(data)
        assert status == 401 and "bearer token" in json.loads(body)["error"]
        assert not any(closed_by_server(s) for s in second)
        assert world.api("GET", "/v1/status")["server_id"] == "anywhered"
    finally:
        for s in first + second:
            s.close()


# -- 3. log injection -----------------------------------------------------------------------------------------
FORGED = "2026-01-01 00:00:00,000 WARNING anywhere.server: forged"
FORGED_URL = FORGED.replace(" ", "%20")


def raw_exchange(connect, data: bytes) -> list[tuple[int, bytes]]:
    with connect() as s:
        s.sendall(data)
        got, _how = until_closed(s, 5)
    return responses(got)


def test_control_characters_cannot_forge_log_lines(world):
    port, token = start_rest(world)
    server = world.server
    mark = len(server.log())

    def unix() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(world.sock)
        return s

    def tcp() -> socket.socket:
        return connect_tcp(port)

    cases = [
        (tcp, f"GET /v1/status%0a{FORGED_URL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        (tcp, f"GET /v1/status%0d%0a{FORGED_URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              f"Connection: close\r\n\r\n"),
        (unix, f"POST /v1/proxies%0a{FORGED_URL} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
               f"Connection: close\r\n\r\n{{}}"),
        (unix, f"DELETE /v1/connections?proxy=x%0a{FORGED_URL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        (unix, f"DELETE /v1/proxies/x%E2%80%A8{FORGED_URL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        (tcp, "GET /v1/\x1b[2K\x1b[1Gstatus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ]
    answers = [raw_exchange(connect, request.encode("latin-1")) for connect, request in cases]
    # CR or LF in a header value: h11 refuses a bare one as a malformed header line; obs-fold (CRLF
    # then a space) continues the value on the same logical line
    for header, status in ((f"X-Note: a\r{FORGED}", 400), (f"X-Note: a\n{FORGED}", 400),
                           (f"X-Note: a\r\n {FORGED}", 200)):
        request = f"GET /v1/status HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n"
        got = raw_exchange(unix, request.encode())
        assert [answer[0] for answer in got] == [status], (header, got)
    # the log (written before each answer was sent): one timestamped line per event, the peer's
    # text escaped within its line
    lines = server.log()[mark:].splitlines()
    assert not [line for line in lines if line.startswith(FORGED)]
    assert all(TIMESTAMP.match(line) for line in lines), [line for line in lines if not TIMESTAMP.match(line)]
    wait_log_line(server, "\\x0a" + FORGED, start=mark)
    assert "\x1b" not in server.log()[mark:]
    # the answers: one 4xx each, whose message quotes the peer's text escaped
    for (_connect, request), got in zip(cases, answers):
        assert len(got) == 1, (request, got)
        status, body = got[0]
        message = json.loads(body)["error"]
        assert 400 <= status < 500, (request, status, message)
        assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", message), (request, message)
    assert world.api("GET", "/v1/status")["server_id"] == "anywhered"


# -- 4. the request head limit --------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["one-send", "byte-by-byte", "after-a-request"])
def test_request_head_over_the_limit_gets_431(world, how):
    """h11 itself enforces the limit only on a head still incomplete; one read can bring a whole one."""
    world.start_server()
    head = b"GET /v1/status HTTP/1.1\r\nHost: anywhered\r\nX-Big: %s\r\nConnection: close\r\n\r\n"
    big = head % (b"a" * (MAX_HEADERS + 1024))
    expected = [431]
    if how == "after-a-request":  # pipelined behind a small one, in the same send
        big = get("/v1/status") + big
        expected = [200, 431]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(world.sock)
        try:
            if how == "byte-by-byte":
                for i in range(len(big)):  # bounded: the head's length
                    s.send(big[i:i + 1])
            else:
                s.sendall(big)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the end: fine
        data, _how = until_closed(s, 10)
    answers = responses(data)
    assert [status for status, _ in answers] == expected, answers
    assert "exceeds" in json.loads(answers[-1][1])["error"] or "too long" in json.loads(answers[-1][1])["error"]
    # a head just under the limit is served, also behind another request
    small = head % (b"a" * (MAX_HEADERS - 1024))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(world.sock)
        s.sendall(get("/v1/status") + small)
        data, _how = until_closed(s, 10)
    answers = responses(data)
    assert [status for status, _ in answers] == [200, 200], answers
    assert json.loads(answers[1][1])["server_id"] == "anywhered"


def test_answers_before_a_bad_request_reach_a_client_that_reads_late(world):
    """A client pipelines 200 requests, a malformed one and more bytes, and reads only later (its
    receive buffer is small, so most answers wait in the server's send queue).  Closing with its
    bytes unread would reset the connection and destroy those answers; closed gracefully (FIN
    after the last answer, its input dropped until it has acknowledged everything), the client
    gets every answer and the 400, in order."""
    port, token = start_rest(world)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    s.bind(("127.0.0.1", 0))
    s.connect(("127.0.0.1", port))
    try:
        s.sendall(get("/v1/status", token) * 200 + b"NOT HTTP AT ALL\r\n\r\n" + b"x" * 200_000)
    except OSError:
        pass  # the server may stop reading once it has answered the bad request: the test is what comes back
    time.sleep(1.0)  # the server has answered everything it will answer, and closed (without this fix: reset)
    data, how = until_closed(s, 10)
    s.close()
    answers = responses(data)
    assert [status for status, _ in answers] == [200] * 200 + [400], (len(answers), how, answers[-2:])
