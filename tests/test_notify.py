"""sd_notify against a real AF_UNIX datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from anywhere.loop import Loop
from anywhere.notify import Notifier, monotonic_usec

from conftest import wait_for
from looptest import advance, manual_loop


class NotifySocket:
    """What systemd would receive: (arrival time, {field: value}) per datagram, stamped by a reader thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode("utf-8").splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def poll(self) -> list[tuple[float, dict[str, str]]]:
        return list(self.messages)

    def having(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.poll() if key in m and (value is None or m[key] == value)]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    yield ns
    ns.close()


def test_server_lifecycle_notifications(world, notify_socket, monkeypatch, echo_target):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nwhitelist = 127.0.0.1\n")
    server = world.start_server("--config", str(conf), wait=False)
    os.environ.pop("NOTIFY_SOCKET")  # only the server gets it
    os.environ.pop("WATCHDOG_USEC")
    wait_for(lambda: notify_socket.having("READY", "1"), 15, what="READY=1")
    # READY means the listeners and the admin socket exist already
    assert os.path.exists(world.sock)
    socket.create_connection(("127.0.0.1", world.port), timeout=2).close()
    ready_at, first = notify_socket.having("READY", "1")[0]
    assert "STATUS" in first and "agent" in first["STATUS"]

    world.start_agent()
    world.add_proxy(echo_target.port)
    wait_for(lambda: any("1 agent(s), 1 proxy" in m.get("STATUS", "") for _, m in notify_socket.poll()), 10,
             what="STATUS with live counts")

    # the watchdog: about 5 pings a second (every half of WATCHDOG_USEC)
    t0 = time.monotonic()
    time.sleep(2.0)
    pings = [t for t, m in notify_socket.having("WATCHDOG", "1") if t0 <= t <= t0 + 2.0]
    assert 6 <= len(pings) <= 16, len(pings)

    # reload: RELOADING=1 with MONOTONIC_USEC, then READY=1
    before_usec = monotonic_usec()
    res = world.ctl("reload", "--admin-socket", world.sock)
    assert "reloaded" in res.stdout
    msgs = [m for _, m in notify_socket.poll()]
    reloading = [i for i, m in enumerate(msgs) if m.get("RELOADING") == "1"]
    assert reloading, msgs
    r = msgs[reloading[-1]]
    assert int(r["MONOTONIC_USEC"]) >= before_usec
    assert any(m.get("READY") == "1" for m in msgs[reloading[-1] + 1:])

    # SIGSTOP: the pings stop
    server.signal(signal.SIGSTOP)
    try:
        time.sleep(0.3)
        count = len(notify_socket.having("WATCHDOG"))
        time.sleep(1.0)
        assert len(notify_socket.having("WATCHDOG")) == count
    finally:
        server.signal(signal.SIGCONT)
    wait_for(lambda: len(notify_socket.having("WATCHDOG")) > count, 5, what="pings to resume")

    # STOPPING=1 on SIGTERM, and a clean exit
    assert server.stop() == 0
    assert notify_socket.having("STOPPING", "1")


def test_watchdog_pid_of_another_process_means_no_pings(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    loop, clock = manual_loop()
    notifier = Notifier()
    try:
        assert notifier.start_watchdog(loop) is None
        advance(loop, clock, 0.4)  # eight ping intervals of loop time, no waiting
        notifier.status("marker")  # datagrams arrive in order: once this is read, any ping would have been
        wait_for(lambda: notify_socket.having("STATUS", "marker"), 5, what="the marker")
        assert notify_socket.having("WATCHDOG") == []
    finally:
        notifier.close()
        loop.close()


def test_a_blocked_loop_stops_the_watchdog_pings(notify_socket, monkeypatch):
    """The pings come from the loop: a callback that blocks it for 1 s leaves a 1 s gap."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    loop = Loop()
    notifier = Notifier()
    try:
        assert notifier.start_watchdog(loop) == pytest.approx(0.1)
        loop.call_later(0.3, time.sleep, 1.0)  # wedge the loop on purpose
        loop.call_later(1.6, loop.stop)
        loop.run()
        time.sleep(0.1)  # let the reader thread take the last datagrams
        times = [t for t, _ in notify_socket.having("WATCHDOG", "1")]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) >= 0.9  # nothing while the loop was blocked
        assert sum(1 for g in gaps if g < 0.2) >= 8  # steady pings before and after
    finally:
        notifier.close()
        loop.close()


def test_watchdog_pings_every_half_interval_of_loop_time_while_healthy(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    loop, clock = manual_loop()
    notifier = Notifier()
    healthy = [True]

    def quarter_second(n: int) -> None:
        """A quarter second of loop time, then a marker: datagrams arrive in order, so once it is
        read every ping before it is too (in steps: the kernel queues only 10 datagrams here)."""
        advance(loop, clock, 0.25)
        notifier.status(f"step {n}")
        wait_for(lambda: notify_socket.having("STATUS", f"step {n}"), 5, what=f"marker {n}")
    try:
        assert notifier.start_watchdog(loop, lambda: healthy[0]) == pytest.approx(0.1)
        for n in range(4):
            quarter_second(n)  # the first ping at once, then one per 50 ms of loop time
        assert len(notify_socket.having("WATCHDOG", "1")) == 21
        healthy[0] = False
        for n in range(4, 8):
            quarter_second(n)
        assert len(notify_socket.having("WATCHDOG", "1")) == 21  # a failed health check sends nothing
    finally:
        notifier.close()
        loop.close()


def test_status_is_utf8_and_no_socket_means_silence(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    notifier = Notifier()
    notifier.status("agent ünïcode → ok")
    notifier.close()
    wait_for(lambda: notify_socket.having("STATUS"), 2, what="STATUS")
    assert notify_socket.having("STATUS")[0][1]["STATUS"] == "agent ünïcode → ok"
    monkeypatch.delenv("NOTIFY_SOCKET")
    quiet = Notifier()
    assert not quiet.enabled and quiet.send("READY=1") is False
    quiet.close()
