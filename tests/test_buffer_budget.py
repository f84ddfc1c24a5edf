"""The process-wide buffer budget (trunk.py, "The budget"): clients that do not read cannot make a
daemon hold more than `buffer_budget` (plus a small floor per stream) however many they are, a
client that reads is still served meanwhile, and nothing is lost: once the stalled clients read,
each gets every byte, in order.

Real processes and a real target on loopback (the `world` fixture), and in-process trunks over
socketpairs on a real Loop; no mocks.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from anywhere import mux, trunk
from anywhere.loop import Loop
from anywhere.trunk import FLOOR_WINDOW, Stream, Trunk
from conftest import TargetServer, echo_handler, recv_all, wait_for
from looptest import drive
from procstat import rss_kb

MiB = 1024 * 1024


def _blob(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


# -- whole daemons ------------------------------------------------------------------------------------
CLIENTS = 40
PUSH = 4 * MiB  # what the target sends each client
BUDGET = 8 * MiB


def _client_number(conn: socket.socket) -> int | None:
    """The 8-digit number a client sends first, or None if it closes before."""
    head = b""
    while len(head) < 8:
        data = conn.recv(8 - len(head))
        if not data:
            return None
        head += data
    return int(head)


def _pusher(conn: socket.socket) -> None:
    """The target: reads an 8-digit client number, sends that client's PUSH bytes, then EOF."""
    number = _client_number(conn)
    if number is None:
        return
    conn.sendall(_blob(number, PUSH))
    conn.shutdown(socket.SHUT_WR)


def _stalled_clients(clients: list[socket.socket], port: int, rcvbuf: int) -> None:
    """CLIENTS clients with a small receive buffer that send their number and then read nothing;
    each goes into `clients` as soon as it exists, for the caller to close."""
    for i in range(CLIENTS):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        clients.append(c)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        c.settimeout(30)
        c.connect(("127.0.0.1", port))
        c.sendall(b"%08d" % i)


def _echo_10mb(port: int) -> float:
    """A 10 MB echo through the tunnel (sent from a thread while reading); seconds it took."""
    data = os.urandom(10_000_000)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = recv_all(c, 30)
        sender.join(30)
    assert not errors, errors
    assert len(got) == len(data) and got == data, f"{len(got)} of {len(data)} bytes echoed"
    return time.monotonic() - started


def _scrape(world) -> dict[str, float]:
    """The server's unlabelled Prometheus samples, parsed by prometheus_client's own parser."""
    from anywhere.ctl import BASE, _UnixAdapter
    with requests.Session() as sess:
        sess.mount(BASE + "/", _UnixAdapter(world.sock))
        resp = sess.get(BASE + "/metrics", timeout=10)
    assert resp.status_code == 200
    return {sample.name: sample.value for family in text_string_to_metric_families(resp.text)
            for sample in family.samples if not sample.labels}


def _settled(world, what: str, timeout: float = 60.0, key: str = "bytes_out") -> int:
    """Wait until the bytes the server moved for its connections (`key`: bytes_out, from the
    agent to the clients; bytes_in, the other way) stop growing for a second (the stalled side's
    sockets are full and the sending side has stopped); returns that total."""
    seen = {"total": -1, "since": time.monotonic()}

    def still() -> int | None:
        total = sum(c[key] for c in world.api("GET", "/v1/connections")["connections"])
        now = time.monotonic()
        if total != seen["total"]:
            seen["total"], seen["since"] = total, now
            return None
        return total if now - seen["since"] >= 1.0 else None
    return wait_for(still, timeout, interval=0.1, what=what)


def test_clients_that_do_not_read_are_held_to_the_budget_and_lose_nothing(world):
    pusher, echo = TargetServer(_pusher), TargetServer(echo_handler)
    clients: list[socket.socket] = []
    try:
        world.start_server("--trunk-idle-timeout", "0", "--pool-size", "2", "--buffer-budget", f"{BUDGET // MiB}M")
        world.start_agent()
        push_port, echo_port = world.add_proxy(pusher.port), world.add_proxy(echo.port)
        wait_for(lambda: world.api("GET", "/v1/status")["trunks"] == 2, 10, what="two trunks")
        _echo_10mb(echo_port)  # warm: what a bulk echo allocates is in the base
        base = rss_kb(world.server.pid)

        _stalled_clients(clients, push_port, rcvbuf=16384)
        moved = _settled(world, "the stalled clients' data to stop moving")
        grown = rss_kb(world.server.pid) - base
        # Without the budget each client's stream holds what is left of its window once its
        # socket is full: here (loopback, the kernel takes ~3.4 MiB a socket) 23 MiB in all,
        # about 40 MiB with 1 MiB windows elsewhere.  With it: the budget, a floor per stream.
        assert grown < (BUDGET + 4 * MiB) // 1024, \
            f"anywhered grew by {grown} KiB for {CLIENTS} clients that do not read ({moved} bytes moved)"
        held = world.api("GET", "/v1/status")
        assert held["buffer_budget"] == BUDGET
        assert 0 < held["buffered_bytes"] <= held["buffer_committed_bytes"] <= BUDGET + CLIENTS * FLOOR_WINDOW, held

        took = _echo_10mb(echo_port)  # a client that reads is served meanwhile
        assert took < 20, f"10 MB echo took {took:.1f} s beside the stalled clients"
        grown = max(grown, rss_kb(world.server.pid) - base)
        assert grown < (BUDGET + 4 * MiB) // 1024, f"anywhered grew by {grown} KiB"

        for i, c in enumerate(clients):  # now they read: every byte arrives, in order
            got = recv_all(c, 30)
            assert len(got) == PUSH and got == _blob(i, PUSH), f"client {i}: {len(got)} bytes, or not the ones sent"
        for c in clients:
            c.close()
        wait_for(lambda: world.api("GET", "/v1/status")["connections"] == 0, 10, what="every connection to end")
        after = world.api("GET", "/v1/status")
        assert (after["buffered_bytes"], after["buffer_committed_bytes"]) == (0, 0), after
        metrics = _scrape(world)
        assert metrics["anywhere_buffered_bytes"] == 0 and metrics["anywhere_buffer_budget_bytes"] == BUDGET
        assert not pusher.errors and not echo.errors
    finally:
        for c in clients:
            c.close()
        pusher.stop()
        echo.stop()


def test_first_windows_are_granted_within_the_budget(world):
    """A client that never reads from its first byte on, with a receive buffer as small as the
    kernel allows: what its stream holds is the first window the agent was allowed to send
    before any credit.  Granted from the budget (OPEN's window), forty such clients make the
    server hold the budget and a floor each, not forty whole windows."""
    pusher = TargetServer(_pusher)
    clients: list[socket.socket] = []
    try:
        world.start_server("--trunk-idle-timeout", "0", "--pool-size", "2", "--buffer-budget", f"{BUDGET // MiB}M")
        world.start_agent()
        push_port = world.add_proxy(pusher.port)
        wait_for(lambda: world.api("GET", "/v1/status")["trunks"] == 2, 10, what="two trunks")
        _stalled_clients(clients, push_port, rcvbuf=1024)
        _settled(world, "the stalled clients' data to stop moving")
        held = world.api("GET", "/v1/status")
        # whole first windows: about 40 MiB held here; granted from the budget: at most this
        assert held["buffered_bytes"] <= BUDGET + CLIENTS * FLOOR_WINDOW, held
        assert held["buffer_committed_bytes"] <= BUDGET + CLIENTS * FLOOR_WINDOW, held
        for i, c in enumerate(clients):  # nothing lost
            got = recv_all(c, 60)
            assert len(got) == PUSH and got == _blob(i, PUSH), f"client {i}: {len(got)} bytes, or not the ones sent"
        assert not pusher.errors
    finally:
        for c in clients:
            c.close()
        pusher.stop()


def test_targets_that_do_not_read_are_held_to_the_agents_budget(world):
    """The same on the agent: clients upload 4 MiB each to a target that reads nothing until told;
    the agent's own budget bounds what it holds, an echo is served meanwhile, nothing is lost."""
    go = threading.Event()
    received: dict[int, bool] = {}

    def sink(conn: socket.socket) -> None:
        number = _client_number(conn)
        if number is None:
            return
        go.wait(60)
        got = recv_all(conn, 30)
        received[number] = got == _blob(number, PUSH)
        conn.sendall(b"ok")
    target, echo = TargetServer(sink), TargetServer(echo_handler)
    target.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # inherited by what it accepts
    clients: list[socket.socket] = []
    senders: list[threading.Thread] = []
    try:
        world.start_server("--trunk-idle-timeout", "0", "--pool-size", "2")
        agent = world.start_agent("agent-1", "--buffer-budget", f"{BUDGET // MiB}M")
        sink_port, echo_port = world.add_proxy(target.port), world.add_proxy(echo.port)
        wait_for(lambda: world.api("GET", "/v1/status")["trunks"] == 2, 10, what="two trunks")
        _echo_10mb(echo_port)
        base = rss_kb(agent.pid)

        def upload(c: socket.socket, i: int) -> None:
            try:
                c.sendall(b"%08d" % i + _blob(i, PUSH))
                c.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the check below reports what did not arrive
        for i in range(CLIENTS):
            c = socket.create_connection(("127.0.0.1", sink_port), timeout=60)
            clients.append(c)
            senders.append(threading.Thread(target=upload, args=(c, i), daemon=True))
            senders[-1].start()
        _settled(world, "the uploads to stop moving", key="bytes_in")
        grown = rss_kb(agent.pid) - base
        assert grown < (BUDGET + 4 * MiB) // 1024, f"the agent grew by {grown} KiB for {CLIENTS} targets that do not read"
        took = _echo_10mb(echo_port)
        assert took < 20, f"10 MB echo took {took:.1f} s beside the stalled uploads"
        go.set()
        for i, c in enumerate(clients):
            assert recv_all(c, 60) == b"ok", f"client {i}"
        for t in senders:
            t.join(30)
        assert received == {i: True for i in range(CLIENTS)}, "uploads lost or out of order"
        assert not target.errors and not echo.errors
    finally:
        go.set()
        for c in clients:
            c.close()
        target.stop()
        echo.stop()


def test_buffer_budget_is_changed_by_reload(world):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nbuffer_budget = 8M\n")
    world.start_server("--config", str(conf))
    assert world.api("GET", "/v1/status")["buffer_budget"] == 8 * MiB
    assert "of a 8 MiB budget" in world.ctl("status", "--admin-socket", world.sock).stdout
    conf.write_text("[server]\nbuffer_budget = 1G\n")
    assert "buffer_budget" in world.ctl("reload", "--admin-socket", world.sock).stdout
    assert world.api("GET", "/v1/status")["buffer_budget"] == 1024 * MiB


# -- in one process: two trunks over a socketpair, on a real Loop ----------------------------------------
class _Pair:
    """A stream end to end: `target` (the far end of the sending side's plain socket) and
    `client` (the far end of the receiving side's), both non-blocking."""

    def __init__(self, sender: Trunk, receiver: Trunk, sid: int, size: int, grant: bool = False) -> None:
        self.target, near_t = socket.socketpair()
        self.client, near_c = socket.socketpair()
        near_c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        for s in (self.target, self.client):
            s.setblocking(False)
        self.sending = Stream(sender, sid, name=f"target {sid}")
        self.receiving = Stream(receiver, sid, name=f"client {sid}")
        if grant:  # the receiver names the first window in OPEN, from its budget (mux.py)
            self.sending.send_window = self.receiving.grant_first_window()
        self.sending.attach(near_t, read_now=False)
        self.receiving.attach(near_c, read_now=False)
        self.data = _blob(sid, size)
        self.fed = 0
        self.got = bytearray()

    def feed(self) -> None:
        """What the target's socket takes of the rest; EOF after the last byte."""
        if self.fed == len(self.data):
            return
        try:
            self.fed += self.target.send(self.data[self.fed:self.fed + 262144])
        except BlockingIOError:
            return
        if self.fed == len(self.data):
            self.target.shutdown(socket.SHUT_WR)

    def read(self, limit: int) -> None:
        """Read what is there, up to `limit` bytes in all."""
        while len(self.got) < limit:
            try:
                data = self.client.recv(min(262144, limit - len(self.got)))
            except BlockingIOError:
                return
            if not data:
                return
            self.got += data

    def close(self) -> None:
        self.target.close()
        self.client.close()


@pytest.fixture
def trunks():
    """(loop, sending trunk, receiving trunk) over a socketpair; everything closed afterwards, and
    the budget put back."""
    loop = Loop()
    a, b = socket.socketpair()
    sender = Trunk(loop, a, b"", name="sender")
    receiver = Trunk(loop, b, b"", name="receiver")
    yield loop, sender, receiver
    sender.close("test over")
    receiver.close("test over")
    loop.close()
    trunk.set_buffer_budget(trunk.BUFFER_BUDGET)


def _run(loop: Loop, pairs: list[_Pair], readers: dict[_Pair, int], until, what: str, seconds: float = 30.0) -> None:
    """Drive the loop (feeding the targets, reading each reader up to its limit) until `until()`."""
    def feed() -> None:
        for p in pairs:
            p.feed()
        for p, limit in readers.items():
            p.read(limit)
    drive(loop, until, what, seconds, feed=feed, max_passes=200_000)


def _quiet(pairs: list[_Pair], passes: int = 40):
    """until(): nothing moved (fed, read, held) for `passes` passes in a row."""
    state = {"last": None, "same": 0}

    def check() -> bool:
        now = (sum(p.fed for p in pairs), sum(len(p.got) for p in pairs), trunk.buffer_usage()["held"])
        state["same"] = state["same"] + 1 if now == state["last"] else 0
        state["last"] = now
        return state["same"] >= passes
    return check


def test_streams_that_stop_reading_are_held_to_the_budget_readers_go_on(trunks):
    """Eight streams read past their first window (so they have had credit back), then stop; the
    budget (2 MiB) bounds what the receiving side then holds for them, exactly accounted; a ninth
    stream reads 16 MiB meanwhile; then the stalled ones read, and get every byte in order."""
    loop, sender, receiver = trunks
    assert trunk.buffer_usage()["held"] == trunk.buffer_usage()["committed"] == 0
    budget = 2 * MiB
    trunk.set_buffer_budget(budget)
    stalled = [_Pair(sender, receiver, sid, 6 * MiB) for sid in range(1, 9)]
    first = 2 * mux.WINDOW_SIZE  # read this much, then stop
    _run(loop, stalled, {p: first for p in stalled}, lambda: all(len(p.got) == first for p in stalled),
         "the stalled streams' first bytes")
    _run(loop, stalled, {}, _quiet(stalled), "the stalled streams to settle")
    usage = trunk.buffer_usage()
    outbufs = sum(len(p.receiving.outbuf) for p in stalled)
    assert usage["held"] == outbufs  # exact
    assert usage["committed"] == sum(p.receiving.committed + p.sending.committed for p in stalled)
    assert outbufs <= usage["committed"] <= budget + len(stalled) * FLOOR_WINDOW, (outbufs, usage)

    reader = _Pair(sender, receiver, 9, 16 * MiB)
    pairs = stalled + [reader]
    _run(loop, pairs, {reader: len(reader.data)}, lambda: len(reader.got) == len(reader.data),
         "the reader to get its 16 MiB beside the stalled streams")
    assert reader.got == reader.data
    assert trunk.buffer_usage()["held"] == outbufs  # the stalled ones got no more meanwhile
    assert trunk.buffer_usage()["committed"] <= budget + len(pairs) * FLOOR_WINDOW

    _run(loop, pairs, {p: len(p.data) for p in pairs}, lambda: all(len(p.got) == len(p.data) for p in pairs),
         "every byte to arrive")
    for p in stalled:
        assert p.got == p.data, f"stream {p.receiving.sid}: bytes lost or out of order"
    for p in pairs:
        p.receiving.close()
        p.sending.close()
        p.close()
    assert trunk.buffer_usage()["held"] == trunk.buffer_usage()["committed"] == 0


def test_without_the_budget_the_same_streams_hold_their_windows(trunks):
    """The same scene with the default budget: each stalled stream holds about a window, which is
    what the budget above cuts (and shows the scene is not bounded by something else)."""
    loop, sender, receiver = trunks
    stalled = [_Pair(sender, receiver, sid, 6 * MiB) for sid in range(1, 9)]
    first = 2 * mux.WINDOW_SIZE
    _run(loop, stalled, {p: first for p in stalled}, lambda: all(len(p.got) == first for p in stalled),
         "the stalled streams' first bytes")
    _run(loop, stalled, {}, _quiet(stalled), "the stalled streams to settle")
    held = trunk.buffer_usage()["held"]
    assert held == sum(len(p.receiving.outbuf) for p in stalled)
    assert held > 8 * mux.WINDOW_SIZE // 2, held
    for p in stalled:
        p.receiving.close()
        p.sending.close()
        p.close()
    assert trunk.buffer_usage()["held"] == trunk.buffer_usage()["committed"] == 0


@pytest.mark.parametrize("grant", [True, False], ids=["granted", "whole-first-windows"])
def test_streams_that_never_read_hold_the_budget_when_first_windows_are_granted(trunks, grant):
    """Sixteen streams whose clients never read a byte: what the receiving side holds is what the
    senders' first windows allowed.  Granted from the budget (2 MiB): the budget and a floor each;
    whole first windows (a peer that takes none from OPEN): about a window each."""
    loop, sender, receiver = trunks
    budget = 2 * MiB
    trunk.set_buffer_budget(budget)
    stalled = [_Pair(sender, receiver, sid, 4 * MiB, grant=grant) for sid in range(1, 17)]
    _run(loop, stalled, {}, _quiet(stalled), "the stalled streams to settle")
    usage = trunk.buffer_usage()
    if grant:
        assert usage["held"] <= usage["committed"] <= budget + len(stalled) * FLOOR_WINDOW, usage
    else:
        assert usage["held"] > len(stalled) * mux.WINDOW_SIZE // 2, usage
    _run(loop, stalled, {p: len(p.data) for p in stalled}, lambda: all(len(p.got) == len(p.data) for p in stalled),
         "every byte to arrive")
    for p in stalled:
        assert p.got == p.data, f"stream {p.receiving.sid}: bytes lost or out of order"
        p.receiving.close()
        p.sending.close()
        p.close()
    assert trunk.buffer_usage()["held"] == trunk.buffer_usage()["committed"] == 0


def test_an_idle_trunk_holds_no_read_buffer_of_its_own():
    """Every trunk of a process reads into one shared buffer: 80 idle trunks add well under 64 KiB
    of resident memory each (with a 512 KiB buffer each, bytearray's zeroed pages, 516 KiB each)."""
    loop = Loop()
    pairs = [socket.socketpair() for _ in range(40)]
    Trunk(loop, pairs[0][0], b"", name="warm-up").close("warm-up")  # the shared parts, once
    before = rss_kb(os.getpid())
    made = [Trunk(loop, s, b"", name=f"idle-{i}") for i, pair in enumerate(pairs[1:]) for s in pair]
    grown = rss_kb(os.getpid()) - before
    try:
        assert grown / len(made) < 64, f"{len(made)} idle trunks grew RSS by {grown} KiB ({grown / len(made):.0f} each)"
    finally:
        for t in made:
            t.close("test over")
        loop.close()
        for a, b in pairs:
            a.close()
            b.close()
