"""Data connections made ahead of demand: trunks (many clients multiplexed on a few TLS
connections, see trunk.py) and warm single-use data connections, reused once both directions ended.

Correctness only (speed is bench/'s business): trunks are opened ahead of demand and no client
pays a handshake, streams never carry bytes from one client to the next, a warm connection that
died is never handed to a client, and everything still works with no pool at all.
The servers here keep trunks open from the agent's connect on (trunk_idle_timeout = 0); trunks
opened on demand and closed when idle are test_on_demand.py's.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from anywhere import mux
from anywhere.wire import PROTO_VERSION, FrameDecoder, chunk_header
from conftest import TargetServer, echo, recv_all, wait_for
from handpeer import client_ctx
from procstat import rss_kb


def status(world) -> dict:
    return world.api("GET", "/v1/status")




def test_trunks_are_opened_ahead_of_demand_and_no_client_pays_a_handshake(world, echo_target):
    world.start_server("--pool-size", "2", "--trunk-idle-timeout", "0")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    wait_for(lambda: status(world)["trunks"] == 2, 10, what="2 trunks")
    assert world.api("GET", "/v1/agents")["agents"][0]["trunks"] == 2
    before = status(world)["tls_handshakes"]
    for i in range(200):
        data = os.urandom(1 + i * 37)
        assert echo(port, data) == data, f"connection {i}"
    after = status(world)
    assert after["tls_handshakes"] == before, after  # 200 clients, not one more TLS handshake
    assert after["trunks"] == 2 and after["connections_total"] == 200


def test_concurrent_clients_share_the_trunks(world, echo_target):
    world.start_server("--pool-size", "2", "--trunk-idle-timeout", "0")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    wait_for(lambda: status(world)["trunks"] == 2, 10, what="2 trunks")
    base = status(world)["tls_handshakes"]
    errors: list[str] = []

    def one(i: int) -> None:
        data = os.urandom(5000 + i * 101)
        try:
            got = echo(port, data)
            if got != data:
                errors.append(f"client {i}: {len(got)} bytes back instead of {len(data)}")
        except OSError as exc:
            errors.append(f"client {i}: {exc}")
    for _ in range(4):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert status(world)["tls_handshakes"] == base


def test_reuse_never_leaks_bytes_between_clients(world):
    """A client that leaves mid-stream kills that data connection; the next client only sees its own bytes."""
    def talker(conn: socket.socket) -> None:
        first = conn.recv(100)
        if first.startswith(b"flood"):
            for _ in range(2000):  # keeps sending after the client has gone
                conn.sendall(b"F" * 4096)
        else:
            conn.sendall(b"only-for:" + first)
            conn.shutdown(socket.SHUT_WR)
            recv_all(conn, 5)
    target = TargetServer(talker)
    try:
        world.start_server("--pool-size", "1", "--trunk-idle-timeout", "0")
        world.start_agent()
        port = world.add_proxy(target.port)
        for round_ in range(10):
            flood = socket.create_connection(("127.0.0.1", port), timeout=10)
            flood.sendall(b"flood")
            assert flood.recv(4096).startswith(b"F")
            flood.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            flood.close()  # reset mid-stream
            for i in range(3):
                tag = f"client-{round_}-{i}".encode()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                    c.sendall(tag)
                    c.shutdown(socket.SHUT_WR)
                    assert recv_all(c, 10) == b"only-for:" + tag
    finally:
        target.stop()


def test_no_pool_still_works_and_used_connections_are_reused(world, echo_target):
    world.start_server("--pool-size", "0")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    time.sleep(0.3)
    assert status(world)["warm_data_connections"] == 0
    base = status(world)["tls_handshakes"]
    assert echo(port, b"first") == b"first"  # asked on the admin connection, new data connection
    wait_for(lambda: status(world)["warm_data_connections"] == 1, 5, what="the used connection to be kept")
    for i in range(20):
        assert echo(port, b"again %d" % i) == b"again %d" % i
    assert status(world)["tls_handshakes"] - base == 1


def test_target_refused_keeps_the_trunk(world):
    world.start_server("--pool-size", "2", "--trunk-idle-timeout", "0")
    world.start_agent()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens there once closed
    port = world.add_proxy(dead_port)
    wait_for(lambda: status(world)["trunks"] == 2, 10, what="trunks")
    base = status(world)["tls_handshakes"]
    for _ in range(5):
        started = time.monotonic()
        assert echo(port, b"x") == b""
        assert time.monotonic() - started < 1.0  # closed at once, not after the data timeout
    # the agent answered FAIL on its trunk, which carries on: no new connection per failure
    assert status(world)["tls_handshakes"] == base and status(world)["trunks"] == 2


def _hand_agent(world, creds, peers, pool: int):
    """A hand-written agent-1: admin connection plus `pool` warm data connections."""
    ctx = client_ctx(creds.ca, creds.agent("agent-1"))
    admin = peers(world.port, ctx)
    admin.send("hello", proto=PROTO_VERSION, agent_id="agent-1", version="hand")
    welcome = admin.recv()
    assert welcome["type"] == "welcome" and welcome["pool"] >= 0
    warm = []
    for _ in range(pool):
        w = peers(world.port, ctx)
        w.send("pool", proto=PROTO_VERSION, agent_id="agent-1")
        warm.append(w)
    wait_for(lambda: status(world)["warm_data_connections"] == pool, 5, what="warm connections registered")
    return admin, warm


def test_a_warm_connection_that_died_is_never_handed_to_a_client(world, creds, peers):
    world.start_server("--trunk-idle-timeout", "0")
    admin, (dead, live) = _hand_agent(world, creds, peers, 2)
    dead.close()  # dies while idle
    wait_for(lambda: status(world)["warm_data_connections"] == 1, 5, what="the dead one to be dropped")
    port = world.add_proxy(9)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        opened = live.recv()
        assert opened["type"] == "open" and opened["port"] == 9
        live.send("ready", conn=opened["conn"])
        client.sendall(b"ping")
        stream = live.decoder.take_leftover()
        while len(stream) < 8:
            stream += live.sock.recv(100)
        assert stream == chunk_header(4) + b"ping"
        live.send_raw(chunk_header(4) + b"pong" + chunk_header(0))
        client.settimeout(5)
        assert client.recv(10) == b"pong"
        client.shutdown(socket.SHUT_WR)
        assert live.sock.recv(100) == chunk_header(0)  # END: both directions ended
        assert client.recv(10) == b""
    # the same connection is warm again and gets the next client's open
    wait_for(lambda: status(world)["warm_data_connections"] == 1, 5, what="reuse")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        live.decoder = FrameDecoder()
        assert live.recv()["type"] == "open"


def test_warm_connection_lost_after_open_falls_back_to_the_admin_connection(world, creds, peers):
    world.start_server("--trunk-idle-timeout", "0")
    admin, (warm,) = _hand_agent(world, creds, peers, 1)
    port = world.add_proxy(9)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        opened = warm.recv()
        assert opened["type"] == "open"
        warm.close()  # lost before answering: the server asks again on the admin connection
        again = admin.recv()
        assert again["type"] == "open" and again["conn"] == opened["conn"]
        admin.send("fail", conn=again["conn"], reason="refused by the test")
        client.settimeout(5)
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass


def test_a_stalled_stream_does_not_block_the_others_on_its_trunk(world):
    """One trunk, two streams: a client that stops reading while its target pushes 40 MB must not
    hold up the other stream, and what waits for it in the daemons is bounded by its window."""
    blob = os.urandom(40 * 1024 * 1024)

    def pusher(conn: socket.socket) -> None:
        first = conn.recv(16)
        if first == b"push":
            conn.sendall(blob)
            conn.shutdown(socket.SHUT_WR)
        else:
            conn.sendall(first)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
    target = TargetServer(pusher)
    try:
        world.start_server("--pool-size", "1", "--trunk-idle-timeout", "0")
        world.start_agent()
        port = world.add_proxy(target.port)
        wait_for(lambda: status(world)["trunks"] == 1, 10, what="one trunk")
        base = rss_kb(world.server.pid) + rss_kb(world.procs[-1].pid)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        stalled.sendall(b"push")
        time.sleep(1.5)  # the target pushes; the client reads nothing
        with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
            for i in range(50):
                msg = b"ping %d" % i
                other.sendall(msg)
                assert other.recv(100) == msg
        grown = rss_kb(world.server.pid) + rss_kb(world.procs[-1].pid) - base
        assert grown < 20 * 1024, f"{grown} KiB buffered for a stalled client"
        stalled.settimeout(30)
        got = recv_all(stalled, 30)
        assert len(got) == len(blob) and got == blob
        stalled.close()
    finally:
        target.stop()


def test_a_trunk_that_died_is_never_used(world, creds, peers):
    world.start_server("--trunk-idle-timeout", "0")
    admin, _ = _hand_agent(world, creds, peers, 0)
    ctx = client_ctx(creds.ca, creds.agent("agent-1"))
    trunk = peers(world.port, ctx)
    trunk.send("trunk", proto=PROTO_VERSION, agent_id="agent-1")
    wait_for(lambda: status(world)["trunks"] == 1, 5, what="the trunk to register")
    trunk.close()
    wait_for(lambda: status(world)["trunks"] == 0, 5, what="the dead trunk to be dropped")
    port = world.add_proxy(9)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        opened = admin.recv()  # asked on the admin connection, not on the dead trunk
        assert opened["type"] == "open" and opened["port"] == 9


# -- opening without a round trip: the client's first bytes follow OPEN, bounded until READY ------------
def _hand_trunk(world, creds, peers):
    """A hand-written agent-1 with one trunk; returns (admin, trunk peer)."""
    admin, _ = _hand_agent(world, creds, peers, 0)
    trunk = peers(world.port, client_ctx(creds.ca, creds.agent("agent-1")))
    trunk.send("trunk", proto=PROTO_VERSION, agent_id="agent-1")
    wait_for(lambda: status(world)["trunks"] == 1, 5, what="the trunk to register")
    return admin, trunk


def _frames(trunk, decoder, seconds: float, until=None) -> list[tuple[int, int, bytes]]:
    """Mux frames read from the hand trunk for up to `seconds` (or until `until(frames)` holds)."""
    frames: list[tuple[int, int, bytes]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until(frames)):
        trunk.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = trunk.sock.recv(262144)
        except (TimeoutError, socket.timeout):
            break
        assert data, "the server closed the trunk"
        frames += [(kind, sid, bytes(p)) for kind, sid, p in decoder.feed(memoryview(data))]
    return frames


def _data_bytes(frames, sid: int) -> int:
    return sum(len(p) for kind, s, p in frames if kind == mux.DATA and s == sid)


def test_first_bytes_follow_open_at_once_and_are_bounded_until_ready(world, creds, peers):
    world.start_server("--trunk-idle-timeout", "0")
    _admin, trunk = _hand_trunk(world, creds, peers)
    port = world.add_proxy(9)
    blob = os.urandom(mux.WINDOW_SIZE)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    sender = threading.Thread(target=client.sendall, args=(blob,), daemon=True)
    sender.start()
    try:
        decoder = mux.MuxDecoder()
        frames = _frames(trunk, decoder, 5, until=lambda f: _data_bytes(f, f[0][1]) >= mux.EARLY_WINDOW if f else False)
        kind, sid, payload = frames[0]
        assert kind == mux.OPEN and mux.parse_open(payload) == ("127.0.0.1", 9)
        # the agent has not answered: no more than the early window arrives, however long we wait
        frames += _frames(trunk, decoder, 1.0)
        assert _data_bytes(frames, sid) == mux.EARLY_WINDOW
        # READY opens the whole window: the rest of the client's megabyte follows without any credit
        trunk.send_raw(mux.frame(mux.READY, sid))
        frames += _frames(trunk, decoder, 10, until=lambda f: _data_bytes(f, sid) >= len(blob))
        got = b"".join(p for kind, s, p in frames if kind == mux.DATA and s == sid)
        assert got == blob
    finally:
        client.close()
        sender.join(5)


def test_fail_before_ready_discards_the_early_bytes_and_closes_the_client(world, creds, peers):
    world.start_server("--trunk-idle-timeout", "0")
    _admin, trunk = _hand_trunk(world, creds, peers)
    port = world.add_proxy(9)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        decoder = mux.MuxDecoder()
        frames = _frames(trunk, decoder, 5, until=lambda f: bool(f) and _data_bytes(f, f[0][1]) >= 18)
        sid = frames[0][1]
        assert frames[0][0] == mux.OPEN and _data_bytes(frames, sid) == 18
        trunk.send_raw(mux.frame(mux.FAIL, sid, b"connection refused"))
        client.settimeout(5)
        try:
            assert client.recv(100) == b""  # closed, nothing sent back
        except ConnectionResetError:
            pass
    wait_for(lambda: status(world)["rejected"]["target_refused"] == 1, 5, what="the refusal to be counted")
    assert status(world)["connections"] == 0
    # the trunk goes on serving: a second client is opened on it
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        frames = _frames(trunk, decoder, 5, until=lambda f: any(k == mux.OPEN for k, _, _ in f))
        assert any(k == mux.OPEN and s != sid for k, s, _ in frames)


# -- receive windows that grow for a fast stream, within bounds ------------------------------------------
def _fast_stream(trunk, decoder, port: int, total: int) -> int:
    """One client reading at once, the hand agent always sending all the credit it has: every byte
    must arrive in order; returns the credit the server gave for the `total` bytes."""
    blob = os.urandom(total)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(recv_all(client, 60)), daemon=True)
    try:
        frames = _frames(trunk, decoder, 5, until=lambda f: any(k == mux.OPEN for k, _, _ in f))
        sid = next(s for k, s, _ in frames if k == mux.OPEN)
        trunk.send_raw(mux.frame(mux.READY, sid))
        reader.start()
        sent = credit = 0

        def take_credit(wait: float, first: bool = True) -> None:
            nonlocal credit
            for kind, s, payload in _frames(trunk, decoder, wait, until=(lambda f: bool(f)) if first else None):
                assert not (s == sid and kind in (mux.ABORT, mux.FAIL)), (kind, payload)
                if kind == mux.WINDOW and s == sid:
                    credit += mux.parse_window(payload)

        deadline = time.monotonic() + 60
        while sent < total:
            assert time.monotonic() < deadline, f"only {sent} of {total} bytes sent in 60 s"
            room = mux.WINDOW_SIZE + credit - sent
            if room <= 0:
                take_credit(5)
                continue
            n = min(room, mux.MAX_PAYLOAD, total - sent)
            trunk.send_raw(mux.frame(mux.DATA, sid, blob[sent:sent + n]))
            sent += n
        trunk.send_raw(mux.frame(mux.END, sid))
        reader.join(60)
        assert not reader.is_alive() and bytes(got) == blob
        take_credit(0.5, first=False)  # every credit: it was sent before the client could read the last byte
        return credit
    finally:
        client.close()


def test_a_fast_stream_gets_a_bigger_window_never_beyond_the_maximum(world, creds, peers):
    """Credit beyond what was delivered is the window's growth (less at most a quarter window not
    yet returned): some, never past MAX_WINDOW.  Five streams one after the other on one trunk all
    grow: what a closed stream grew by goes back to the trunk's budget (which holds four)."""
    world.start_server("--trunk-idle-timeout", "0")
    _admin, trunk = _hand_trunk(world, creds, peers)
    port = world.add_proxy(9)
    decoder = mux.MuxDecoder()
    total = 24 * 1024 * 1024
    for i in range(5):
        credit = _fast_stream(trunk, decoder, port, total)
        assert credit > total, f"stream {i}: the window never grew: {credit} bytes of credit for {total} delivered"
        assert credit - total <= mux.MAX_WINDOW - mux.WINDOW_SIZE, f"stream {i}: {credit - total} bytes beyond the maximum"


def test_streams_of_a_congested_trunk_take_turns(world):
    """One trunk, 40 clients each asking for 1 MiB answers one after the other (what wrk does
    through nginx): the trunk's queue is what holds them, and streams waiting for it must take
    turns: once 800 answers have arrived, no client is more than 6 answers ahead of another
    (measured: 2 to 4 apart; with an unordered wait set the same streams went first every time
    and clients were 17 to 25 answers apart)."""
    import select as select_mod
    clients, answers, size = 40, 800, 1024 * 1024
    blob = os.urandom(size)

    def answerer(conn: socket.socket) -> None:
        conn.settimeout(60)
        while conn.recv(1):
            conn.sendall(blob)
    target = TargetServer(answerer)
    socks: list[socket.socket] = []
    try:
        world.start_server("--pool-size", "1", "--trunk-idle-timeout", "0")
        world.start_agent()
        port = world.add_proxy(target.port)
        wait_for(lambda: status(world)["trunks"] == 1, 10, what="one trunk")
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(clients)]
        pending = [0] * clients
        done = [0] * clients
        for s in socks:
            s.sendall(b"?")
        deadline = time.monotonic() + 120
        while sum(done) < answers:
            assert time.monotonic() < deadline, f"only {sum(done)} answers in 120 s: {done}"
            readable, _, _ = select_mod.select(socks, [], [], 5)
            for s in readable:
                i = socks.index(s)
                data = s.recv(262144)
                assert data, f"client {i}: the stream ended"
                pending[i] += len(data)
                if pending[i] >= size:
                    assert pending[i] == size, f"client {i}: {pending[i]} bytes for one answer"
                    pending[i] = 0
                    done[i] += 1
                    s.sendall(b"?")
        assert max(done) - min(done) <= 6, f"answers per client: {sorted(done)}"
    finally:
        for s in socks:
            s.close()
        target.stop()
