"""End to end on loopback: real anywhered and anywhere processes, real sockets."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from conftest import TargetServer, recv_all, wait_for


def test_quickstart_bytes_identical_both_ways(world, echo_target):
    """50 MB of random data through the tunnel and back, checksummed."""
    world.start_server(wl="127.0.0.1,::1")
    world.start_agent("agent-1")
    port = world.add_proxy(echo_target.port)
    payload = os.urandom(50 * 1024 * 1024)
    received = hashlib.sha256()
    count = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        def reader():
            nonlocal count
            while True:
                data = c.recv(1 << 20)
                if not data:
                    return
                received.update(data)
                count += len(data)
        t = threading.Thread(target=reader)
        t.start()
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 20):
            c.sendall(view[i:i + (1 << 20)])
        c.shutdown(socket.SHUT_WR)
        t.join(60)
        assert not t.is_alive()
    assert count == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    # the connection was counted and is gone afterwards
    wait_for(lambda: world.api("GET", "/v1/connections")["connections"] == [], 5, what="connection list to empty")


def test_half_close_client_side(world):
    """The client sends its request and shuts down writing; it still gets the whole reply."""
    def handler(conn):
        data = recv_all(conn)  # until the client's EOF arrives through the tunnel
        conn.sendall(b"got " + str(len(data)).encode() + b" bytes: " + hashlib.sha256(data).hexdigest().encode())
    target = TargetServer(handler)
    try:
        world.start_server()
        world.start_agent()
        port = world.add_proxy(target.port)
        body = os.urandom(3_000_000)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(body)
            c.shutdown(socket.SHUT_WR)
            reply = recv_all(c)
        assert reply == b"got 3000000 bytes: " + hashlib.sha256(body).hexdigest().encode()
    finally:
        target.stop()


def test_half_close_target_side(world):
    """The target sends everything and shuts down writing, then keeps reading the client."""
    blob = os.urandom(2_000_000)
    result = {}

    def handler(conn):
        conn.sendall(blob)
        conn.shutdown(socket.SHUT_WR)
        result["from_client"] = recv_all(conn)
    target = TargetServer(handler)
    try:
        world.start_server()
        world.start_agent()
        port = world.add_proxy(target.port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            got = recv_all(c)  # EOF arrives after the whole blob
            assert got == blob
            c.sendall(b"after your EOF")  # the other direction still works
            c.shutdown(socket.SHUT_WR)
            c.settimeout(10)
            assert c.recv(10) == b""
        wait_for(lambda: "from_client" in result, 10, what="target to read the client's bytes")
        assert result["from_client"] == b"after your EOF"
    finally:
        target.stop()


def test_close_right_after_sending_loses_nothing(world):
    """A target that writes and closes at once: every byte still reaches the client."""
    blob = os.urandom(1_000_000)

    def handler(conn):
        conn.sendall(blob)
    target = TargetServer(handler)
    try:
        world.start_server()
        world.start_agent()
        port = world.add_proxy(target.port)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                assert recv_all(c) == blob
    finally:
        target.stop()


def test_200_concurrent_connections_each_moving_data(world, echo_target):
    world.start_server()
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    errors: list[str] = []

    def one(i: int) -> None:
        data = os.urandom(20_000 + i * 97)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)
                got = recv_all(c)
            if got != data:
                errors.append(f"conn {i}: {len(got)} bytes back instead of {len(data)}")
        except OSError as exc:
            errors.append(f"conn {i}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
