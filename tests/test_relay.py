"""anywhere/relay.py's Relay on real sockets, driven by a real Loop in a background thread.

Side A is plain (the public client / the intranet target); side B is framed: it carries the chunk
stream of wire.py.  A framed side need not be TLS, so B is one end of a socketpair and the test
speaks the chunk protocol by hand on the other end.  Only the loop thread touches the Relay
once the loop runs.

The last test runs real anywhered / anywhere processes and watches their memory while a client
refuses to read.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from anywhere import wire
from anywhere.loop import Loop
from anywhere.relay import SCRATCH_SIZE, Relay
from anywhere.wire import ABORT, END, MAX_CHUNK, ChunkDecoder

from conftest import TargetServer, wait_for

MB = 1024 * 1024


def chunk(payload: bytes) -> bytes:
    assert payload, "an empty chunk would be END"
    return wire.chunk_header(len(payload)) + payload


def chunk_stream(payload: bytes, size: int = 64 * 1024) -> bytes:
    return b"".join(chunk(payload[i:i + size]) for i in range(0, len(payload), size))


class Closes:
    """Records on_close calls (they run on the loop thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Relay, str]] = []
        self.event = threading.Event()

    def __call__(self, relay: Relay, reason: str) -> None:
        self.calls.append((relay, reason))
        self.event.set()

    def wait(self, timeout: float = 5.0) -> str:
        assert self.event.wait(timeout), f"on_close not called within {timeout} s"
        return self.calls[0][1]

    @property
    def reasons(self) -> list[str]:
        return [r for _, r in self.calls]


class Harness:
    """A Loop in a thread, socket pairs, one Relay; everything is cleaned up in `cleanup()`."""

    def __init__(self) -> None:
        self.loop = Loop()
        self.thread: threading.Thread | None = None
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.closes = Closes()
        self.relay: Relay | None = None
        self.client: socket.socket | None = None  # far end of plain side A
        self.framed: socket.socket | None = None  # far end of framed side B
        self.a_sock: socket.socket | None = None  # the relay's two sockets
        self.b_sock: socket.socket | None = None

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.socks += [a, b]
        return a, b

    def start(self, b_initial: bytes = b"", a_initial: bytes = b"", before_start=None) -> Relay:
        """Build A (plain) and B (framed), start the relay, then the loop thread."""
        self.client, a = self.pair()
        b, self.framed = self.pair()
        self.a_sock, self.b_sock = a, b
        for s in (self.client, self.framed):
            s.settimeout(10)
        if before_start is not None:
            before_start(self)
        self.relay = Relay(self.loop, a, b, b_framed=True, a_name="client", b_name="data", on_close=self.closes)
        self.relay.start(b_initial=b_initial, a_initial=a_initial)
        self.thread = threading.Thread(target=self.loop.run, name="relay-loop", daemon=True)
        self.thread.start()
        return self.relay

    def on_loop(self, fn, *args, timeout: float = 5.0):
        """Run fn(*args) on the loop thread and return its result."""
        done = threading.Event()
        box: dict = {}

        def call():
            try:
                box["result"] = fn(*args)
            except BaseException as exc:  # surfaced in the test thread
                box["error"] = exc
            finally:
                done.set()
        self.loop.call_soon_threadsafe(call)
        assert done.wait(timeout), "the loop did not run the call"
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def spawn(self, fn, *args) -> "Worker":
        w = Worker(fn, *args)
        self.threads.append(w.thread)
        w.thread.start()
        return w

    def cleanup(self) -> None:
        for s in self.socks:  # shutdown wakes any worker blocked on the socket
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(10)
        if self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            assert not self.thread.is_alive(), "the loop thread did not stop"
        self.loop.close()
        for s in self.socks:
            s.close()


class Worker:
    """A thread whose result or exception is handed back by `result()`."""

    def __init__(self, fn, *args) -> None:
        self.box: dict = {}

        def run():
            try:
                self.box["result"] = fn(*args)
            except BaseException as exc:
                self.box["error"] = exc
        self.thread = threading.Thread(target=run, daemon=True)

    def result(self, timeout: float = 30.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"worker still running after {timeout} s"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]


@pytest.fixture
def h():
    harness = Harness()
    try:
        yield harness
    finally:
        harness.cleanup()


# -- reading helpers (the test's side of each socket) -----------------------------------------------------
def read_chunks(sock: socket.socket, want: int | None = None, until_end: bool = False,
                timeout: float = 10.0) -> tuple[bytes, str | None, list[int]]:
    """Decode the chunk stream on `sock` until `want` payload bytes arrived or, with until_end,
    until END/ABORT.  Returns (payload, ended, chunk lengths seen)."""
    dec = ChunkDecoder()
    got = bytearray()
    deadline = time.monotonic() + timeout
    raw = bytearray()
    while True:
        if until_end and dec.ended is not None:
            break
        if not until_end and want is not None and len(got) >= want:
            break
        left = deadline - time.monotonic()
        assert left > 0, f"timed out with {len(got)} payload bytes decoded"
        sock.settimeout(left)
        data = sock.recv(MB)
        if not data:
            break
        raw += data
        payloads, _ = dec.feed(memoryview(data))
        for p in payloads:
            got += p
    return bytes(got), dec.ended, chunk_lengths(bytes(raw))


def chunk_lengths(raw: bytes) -> list[int]:
    """The length field of every chunk header in a well-formed stream."""
    out, pos = [], 0
    while pos + 4 <= len(raw):
        (n,) = wire._HEADER.unpack_from(raw, pos)
        out.append(n)
        pos += 4 + (n if n not in (END, ABORT) else 0)
    return out


def read_exactly(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out after {len(buf)} of {n} bytes"
        sock.settimeout(left)
        data = sock.recv(n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


def read_to_eof(sock: socket.socket, timeout: float = 10.0, limit: int = 64 * MB) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF within {timeout} s ({len(buf)} bytes read)"
        sock.settimeout(left)
        data = sock.recv(MB)
        if not data:
            return bytes(buf)
        buf += data
        assert len(buf) <= limit


def sees_close(sock: socket.socket, timeout: float = 1.0) -> bytes:
    """Read until EOF or reset; fail if neither comes within `timeout`.  Returns the bytes read."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        left = deadline - time.monotonic()
        assert left > 0, f"peer still open after {timeout} s ({len(buf)} bytes read)"
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return bytes(buf)
        except socket.timeout:
            raise AssertionError(f"neither EOF nor reset within {timeout} s") from None
        if not data:
            return bytes(buf)
        buf += data
    raise AssertionError("too many reads")


def assert_quiet(sock: socket.socket, wait: float = 0.2) -> None:
    """Nothing arrives (and no EOF) on sock for `wait` seconds."""
    sock.settimeout(wait)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        return
    raise AssertionError(f"expected nothing, got {data[:50]!r}")


# -- moving bytes ---------------------------------------------------------------------------------------
def test_plain_to_framed_encodes_chunks_and_framed_to_plain_decodes(h):
    h.start()
    h.client.sendall(b"hello from the client")
    payload, ended, lengths = read_chunks(h.framed, want=21)
    assert payload == b"hello from the client"
    assert ended is None
    assert lengths and all(0 < n <= MAX_CHUNK for n in lengths)

    h.framed.sendall(chunk(b"hello ") + chunk(b"from ") + chunk(b"the target"))
    assert read_exactly(h.client, 20) == b"hello from the target"[:20]
    assert read_exactly(h.client, 1) == b"t"
    assert h.closes.calls == []


def test_twenty_megabytes_both_ways_at_once_checksummed(h):
    up = os.urandom(20 * MB)
    down = os.urandom(20 * MB)
    h.start()

    def client_send():
        view = memoryview(up)
        for i in range(0, len(up), 300_001):
            h.client.sendall(view[i:i + 300_001])
        h.client.shutdown(socket.SHUT_WR)

    def framed_send():
        # chunks of varying size, up to the maximum, then END
        sizes = [1, 17, MAX_CHUNK, 65536, 4093, MAX_CHUNK - 1, 300_000]
        pos = i = 0
        while pos < len(down):
            n = sizes[i % len(sizes)]
            h.framed.sendall(chunk(down[pos:pos + n]))
            pos += n
            i += 1
        h.framed.sendall(wire.chunk_header(END))

    def framed_recv():
        return read_chunks(h.framed, until_end=True, timeout=60)

    def client_recv():
        return read_to_eof(h.client, timeout=60, limit=len(down))

    workers = [h.spawn(f) for f in (client_send, framed_send)]
    up_reader = h.spawn(framed_recv)
    down_reader = h.spawn(client_recv)
    for w in workers:
        w.result(60)
    got_up, ended, lengths = up_reader.result(60)
    got_down = down_reader.result(60)
    assert len(got_up) == len(up)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert ended == "end"
    assert lengths[-1] == END and all(0 < n <= MAX_CHUNK for n in lengths[:-1])
    assert len(got_down) == len(down)
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert h.closes.wait() == "done"


def test_byte_counters_equal_the_payload_moved_under_backpressure(h):
    """bytes_a_to_b / bytes_b_to_a (shown by the admin API as bytes_in / bytes_out) count every
    payload byte, also when many small chunks arrive in one read while the client is slow."""
    down = os.urandom(2 * MB)
    up = os.urandom(MB)
    h.start()
    sender = h.spawn(h.framed.sendall, chunk_stream(down, 1000) + wire.chunk_header(END))
    up_reader = h.spawn(read_chunks, h.framed, None, True, 30)
    time.sleep(0.3)  # let the relay fill the client's socket buffer before the client reads
    assert read_to_eof(h.client, timeout=30) == down
    sender.result()
    h.client.sendall(up)
    h.client.shutdown(socket.SHUT_WR)
    assert up_reader.result()[0] == up
    assert h.closes.wait() == "done"
    assert h.on_loop(lambda: (h.relay.bytes_a_to_b, h.relay.bytes_b_to_a)) == (len(up), len(down))


# -- half-close -------------------------------------------------------------------------------------------
def test_plain_eof_becomes_end_after_all_data_and_the_other_way_keeps_working(h):
    h.start()
    data = os.urandom(3 * MB)
    sender = h.spawn(lambda: (h.client.sendall(data), h.client.shutdown(socket.SHUT_WR)))
    got, ended, lengths = read_chunks(h.framed, until_end=True)
    sender.result()
    assert got == data
    assert ended == "end" and lengths[-1] == END and END not in lengths[:-1]
    assert_quiet(h.framed)  # nothing after END, and the data connection stays open
    # the framed → plain direction still works after the client's half-close
    h.framed.sendall(chunk(b"reply after your EOF"))
    assert read_exactly(h.client, 20) == b"reply after your EOF"
    assert h.closes.calls == [], "the relay closed with one direction still open"
    # ending the other direction finishes the relay
    h.framed.sendall(wire.chunk_header(END))
    assert read_to_eof(h.client) == b""
    assert h.closes.wait() == "done"
    assert sees_close(h.framed) == b""  # the relay closed its end of the data connection
    assert (h.a_sock.fileno(), h.b_sock.fileno()) == (-1, -1)  # and both of its sockets


def test_framed_end_becomes_plain_eof_after_all_data_and_the_other_way_keeps_working(h):
    h.start()
    data = os.urandom(3 * MB)
    sender = h.spawn(lambda: h.framed.sendall(chunk_stream(data, 100_000) + wire.chunk_header(END)))
    assert read_to_eof(h.client) == data  # every byte, then EOF
    sender.result()
    assert h.closes.calls == []
    # the client → framed direction keeps working after the EOF it got
    more = os.urandom(MB)
    sender = h.spawn(h.client.sendall, more)
    got, ended, _ = read_chunks(h.framed, want=len(more))
    sender.result()
    assert got == more and ended is None
    assert h.closes.calls == [], "the relay closed with one direction still open"
    h.client.shutdown(socket.SHUT_WR)
    got, ended, lengths = read_chunks(h.framed, until_end=True)
    assert got == b"" and ended == "end" and lengths == [END]
    assert h.closes.wait() == "done"
    assert h.closes.reasons == ["done"]
    assert sees_close(h.framed) == b""
    assert (h.a_sock.fileno(), h.b_sock.fileno()) == (-1, -1)


def test_end_in_initial_bytes_waits_for_the_data_before_it(h):
    """b_initial holds 1 MB of chunks and END, more than the client's socket takes at once: the
    client still gets every byte before its EOF (the shutdown waits for the pending bytes)."""
    data = os.urandom(MB)
    h.start(b_initial=chunk_stream(data, 1000) + wire.chunk_header(END))
    assert read_to_eof(h.client) == data
    h.client.shutdown(socket.SHUT_WR)
    _, ended, _ = read_chunks(h.framed, until_end=True)
    assert ended == "end"
    assert h.closes.wait() == "done"


# -- aborts -------------------------------------------------------------------------------------------------
def _assert_aborted(h, sent_prefix: bytes = b"", check_framed: bool = True) -> None:
    got = sees_close(h.client, timeout=1.0)
    assert sent_prefix.startswith(got), f"client got {got!r}"
    reason = h.closes.wait(1.0)
    assert reason != "done"
    assert h.closes.reasons == [reason]
    assert (h.a_sock.fileno(), h.b_sock.fileno()) == (-1, -1)
    if check_framed:
        assert sees_close(h.framed, timeout=1.0) == b""


def test_abort_chunk_aborts_the_relay(h):
    h.start()
    h.client.sendall(b"request")
    assert read_chunks(h.framed, want=7)[0] == b"request"
    h.framed.sendall(chunk(b"partial") + wire.chunk_header(ABORT))
    _assert_aborted(h, b"partial")
    assert "abort" in h.closes.reasons[0]


@pytest.mark.parametrize("header", [MAX_CHUNK + 1, 0x7FFFFFFF, ABORT - 1], ids=["max+1", "2**31-1", "2**32-2"])
def test_malformed_chunk_header_aborts_the_relay(h, header):
    h.start()
    h.framed.sendall(chunk(b"fine") + wire.chunk_header(header) + b"junk")
    _assert_aborted(h, b"fine")


def test_data_after_end_in_the_same_read_aborts_the_relay(h):
    def preload(hh):
        hh.framed.sendall(chunk(b"done") + wire.chunk_header(END) + chunk(b"more"))
    h.start(before_start=preload)
    _assert_aborted(h, b"done")


@pytest.mark.parametrize("how", ["close at a chunk boundary", "close mid header", "close mid payload",
                                 "half-close at a chunk boundary"])
def test_framed_side_closing_without_end_aborts_the_relay(h, how):
    h.start()
    tail = {"mid header": b"\x00\x00", "mid payload": wire.chunk_header(10) + b"abc"}.get(how.split(" ", 1)[1], b"")
    h.framed.sendall(chunk(b"last words") + tail)
    if how.startswith("half-close"):
        h.framed.shutdown(socket.SHUT_WR)
        _assert_aborted(h, b"last words")
    else:
        h.framed.close()
        _assert_aborted(h, b"last wordsabc", check_framed=False)
    assert "without ending" in h.closes.reasons[0]


def test_plain_peer_gone_the_write_fails_and_the_relay_aborts(h):
    """The client closes entirely: its EOF goes on as END; the next bytes for it cannot be
    written, which aborts the relay and closes the data connection too."""
    h.start()
    h.client.close()
    got, ended, _ = read_chunks(h.framed, until_end=True, timeout=2)
    assert (got, ended) == (b"", "end")
    assert h.closes.calls == []
    h.framed.sendall(chunk(b"x" * 1000))
    reason = h.closes.wait(2.0)
    assert reason != "done" and "write failed" in reason
    assert sees_close(h.framed) == b""
    assert (h.a_sock.fileno(), h.b_sock.fileno()) == (-1, -1)


# -- backpressure -------------------------------------------------------------------------------------------
def _send_until_stalled(sock: socket.socket, data: bytes, stall: float = 0.5, timeout: float = 10.0) -> int:
    """Non-blocking sends of `data` until the socket stays full for `stall` seconds; returns the
    number of bytes the kernel accepted.  Stops early (returning len(data)) if everything went."""
    sock.setblocking(False)
    view = memoryview(data)
    sent = 0
    blocked_since = None
    deadline = time.monotonic() + timeout
    while sent < len(data):
        assert time.monotonic() < deadline, f"no stall within {timeout} s ({sent} bytes sent)"
        try:
            sent += sock.send(view[sent:sent + 65536])
            blocked_since = None
        except BlockingIOError:
            now = time.monotonic()
            if blocked_since is None:
                blocked_since = now
            elif now - blocked_since >= stall:
                return sent
            time.sleep(0.01)
    return sent


@pytest.mark.parametrize("direction", ["plain to framed", "framed to plain"])
def test_backpressure_a_stalled_reader_stops_the_source(h, direction):
    h.start()
    payload = os.urandom(48 * MB)
    if direction == "plain to framed":
        src, dst, stream = h.client, h.framed, payload
    else:
        src, dst, stream = h.framed, h.client, chunk_stream(payload, 256 * 1024) + wire.chunk_header(END)

    sent = _send_until_stalled(src, stream)
    # the relay holds at most one scratch buffer; the rest is in kernel socket buffers
    assert sent < 6 * MB, f"the source could push {sent / MB:.1f} MB into a relay whose reader is stalled"
    assert sent > SCRATCH_SIZE // 2  # sanity: the stall came from full buffers, not from a dead relay

    # the reader resumes: every byte arrives intact
    if direction == "plain to framed":
        reader = h.spawn(read_chunks, dst, None, True, 60)
    else:
        reader = h.spawn(read_to_eof, dst, 60, len(payload))
    src.settimeout(60)
    src.sendall(memoryview(stream)[sent:])
    if direction == "plain to framed":
        src.shutdown(socket.SHUT_WR)
        got, ended, _ = reader.result(60)
        assert ended == "end"
    else:
        got = reader.result(60)
    assert len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


# -- initial bytes ------------------------------------------------------------------------------------------
def test_b_initial_is_delivered_first_and_in_order(h):
    # the data connection already holds more bytes when the relay starts; the initial bytes end
    # in the middle of a chunk header, which the socket's bytes complete
    third = chunk(b"third, ")
    initial = chunk(b"first, ") + chunk(b"second, ") + third[:2]

    def preload(hh):
        hh.framed.sendall(third[2:] + chunk(b"fourth"))
    h.start(b_initial=initial, before_start=preload)
    assert read_exactly(h.client, 27) == b"first, second, third, fourth"[:27]
    assert read_exactly(h.client, 1) == b"h"
    assert h.on_loop(lambda: h.relay.bytes_b_to_a) == 28


def test_a_initial_from_a_plain_side_is_sent_as_a_chunk(h):
    """Bytes already read from plain side A reach framed side B as chunk payload, before what
    A sends later."""
    h.start(a_initial=b"early bytes, ")
    h.client.sendall(b"later bytes")
    got, ended, _ = read_chunks(h.framed, want=24, timeout=2)
    assert got == b"early bytes, later bytes"
    assert ended is None


def test_malformed_b_initial_aborts_at_start(h):
    h.start(b_initial=wire.chunk_header(MAX_CHUNK + 1))
    _assert_aborted(h)


# -- close() ------------------------------------------------------------------------------------------------
def test_close_is_idempotent_and_calls_on_close_once(h):
    relay = h.start()
    h.client.sendall(b"ping")
    assert read_chunks(h.framed, want=4)[0] == b"ping"

    def close_three_times():
        relay.close("operator")
        relay.close("again")
        relay.close()
        return relay.closed, relay.reason
    assert h.on_loop(close_three_times) == (True, "operator")
    assert h.closes.reasons == ["operator"]
    assert h.closes.calls[0][0] is relay
    assert sees_close(h.client) == b""
    assert sees_close(h.framed) == b""
    h.on_loop(relay.close, "later")
    assert h.closes.reasons == ["operator"]


def test_close_after_done_does_not_report_again(h):
    relay = h.start()
    h.client.shutdown(socket.SHUT_WR)
    h.framed.sendall(wire.chunk_header(END))
    assert h.closes.wait() == "done"
    h.on_loop(relay.close, "late")
    assert h.closes.reasons == ["done"]
    assert h.on_loop(lambda: relay.reason) == "done"


def test_close_never_raises_even_if_on_close_does(h):
    relay_box = {}

    def bad_callback(relay, reason):
        relay_box["reason"] = reason
        raise RuntimeError("callback bug")

    h.client, a = h.pair()
    b, h.framed = h.pair()
    relay = Relay(h.loop, a, b, b_framed=True, on_close=bad_callback)
    relay.start()
    relay.close("first")  # before the loop runs: raises nothing
    relay.close("second")
    assert relay_box == {"reason": "first"}
    assert sees_close(h.client) == b"" and sees_close(h.framed) == b""


# -- process level ------------------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_a_client_that_stops_reading_does_not_grow_memory(world):
    """A target pours 300 MB at a client that does not read: the tunnel holds a bounded amount
    (neither anywhered nor the agent buffers it), and when the client reads, every byte arrives."""
    total = 300 * MB
    block = os.urandom(MB)
    state = {"sent": 0, "sha": hashlib.sha256(), "done": threading.Event()}

    def pour(conn):
        try:
            for i in range(total // MB):
                k = (i * 7919) % MB
                data = block[k:] + block[:k]  # every megabyte different
                conn.sendall(data)
                state["sha"].update(data)
                state["sent"] += len(data)
            conn.shutdown(socket.SHUT_WR)
        finally:
            state["done"].set()

    target = TargetServer(pour)
    client = None
    try:
        world.start_server()
        agent = world.start_agent()
        port = world.add_proxy(target.port)
        base_server, base_agent = _rss_kb(world.server.pid), _rss_kb(agent.pid)

        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        wait_for(lambda: state["sent"] > 0, 10, what="the target to start sending")
        # wait until the flow stops (everything on the way is full), at most 10 s
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if state["sent"] != last:
                last, still_since = state["sent"], time.monotonic()
            elif time.monotonic() - still_since > 1.5:
                break
        time.sleep(0.5)
        grew_server = _rss_kb(world.server.pid) - base_server
        grew_agent = _rss_kb(agent.pid) - base_agent
        stuck_at = state["sent"]
        conns = world.api("GET", "/v1/connections")["connections"]
        assert len(conns) == 1, conns

        assert grew_server < 30 * 1024, f"anywhered grew by {grew_server / 1024:.0f} MB"
        assert grew_agent < 30 * 1024, f"the agent grew by {grew_agent / 1024:.0f} MB"
        assert stuck_at < 32 * MB, f"the target could send {stuck_at / MB:.0f} MB to a client that does not read"
        assert not state["done"].is_set()

        # now the client reads everything
        received = hashlib.sha256()
        count = 0
        client.settimeout(30)
        deadline = time.monotonic() + 90
        while count <= total:
            assert time.monotonic() < deadline, f"only {count} of {total} bytes within 90 s"
            data = client.recv(MB)
            if not data:
                break
            received.update(data)
            count += len(data)
        assert state["done"].wait(10)
        assert count == total == state["sent"]
        assert received.digest() == state["sha"].digest()
        assert not target.errors
        client.close()
        client = None
        wait_for(lambda: world.api("GET", "/v1/connections")["connections"] == [], 10,
                 what="the connection to disappear")
    finally:
        if client is not None:
            client.close()
        target.stop()
