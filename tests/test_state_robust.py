"""The state file never loses a proxy the operator did not delete, and its writes stay off the loop.

A stored proxy whose port is busy at start stays, marked failed, and serves once the port is
free; a corrupt stored entry is kept as it is across saves.  Real anywhered and anywhere
processes on loopback.  Then `state.Store` and `Server.save_stats` in this process, with a
writer that waits for the test: counter saves go in the background, one writer at a time, and
an admin change saved during a slow counter save is never overwritten by an older snapshot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from pathlib import Path

import pytest

from anywhere import state
from anywhere.common import CtlError
from anywhere.loop import Loop
from anywhere.server import Server, ServerConfig
from conftest import echo, free_port, log_lines, wait_for, wait_log_line


# -- helpers ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def holding(port: int):
    """A listening socket on every address (v4 and v6) at `port`, as the proxy would bind it."""
    holder = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        holder.bind(("::", port))
        holder.listen(8)
        yield holder
    finally:
        holder.close()


def spec(name: str, remote_port: int, local_port: int, **extra) -> dict:
    return {"name": name, "agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": local_port,
            "remote_port": remote_port, "whitelist": [], "enabled": True, "idle_timeout": 0.0, **extra}


def write_state(world, entries: list) -> Path:
    """A state file as an earlier anywhered left it (the format of state.py)."""
    world.state_dir = str(world.tmp / "state")
    file = Path(state.path(world.state_dir))
    file.parent.mkdir(exist_ok=True)
    file.write_text(json.dumps({"format": state.FORMAT, "proxies": entries}))
    return file


def stored(world) -> dict:
    return json.loads(Path(state.path(world.state_dir)).read_text())


def stored_names(world) -> list[str]:
    return [p.get("name") for p in stored(world)["proxies"] if isinstance(p, dict)]


def listed(world) -> dict[str, dict]:
    return {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}


def serves(port: int) -> bool:
    try:
        return echo(port, b"through") == b"through"
    except OSError:  # refused between the holder's close and the proxy's bind
        return False


def config_file(world, **settings) -> str:
    path = world.tmp / "anywhered.conf"
    path.write_text("[server]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    return str(path)


# -- a stored proxy whose port is busy ------------------------------------------------------------------
def test_stored_proxy_on_a_busy_port_is_kept_failed_and_serves_once_the_port_is_free(world, echo_target):
    busy, other = free_port(), free_port()
    write_state(world, [spec("busy", busy, echo_target.port)])
    conf = config_file(world, stats_save_interval=0.5)
    with holding(busy) as holder:
        server = world.start_server("--config", conf)
        world.start_agent()
        # listed, failed, with the reason; counted in the status
        proxy = listed(world)["busy"]
        assert proxy["state"] == "failed" and proxy["enabled"] is True
        assert f"remote port {busy}" in proxy["failed"] and "in use" in proxy["failed"]
        status = world.api("GET", "/v1/status")
        assert status["proxies"] == 1 and status["proxies_failed"] == ["busy"]
        out = world.ctl("proxy", "list", "--admin-socket", world.sock).stdout
        assert out.splitlines()[1].split()[:5] == ["busy", "agent-1", "yes", "yes", "failed"]
        assert f"proxy busy failed: cannot listen on remote port {busy}" in out
        assert len(log_lines(server, "proxy busy restored but not serving", f"remote port {busy}")) == 1
        # an admin change keeps it in the file
        world.add_proxy(echo_target.port, remote_port=other)
        assert sorted(stored_names(world)) == sorted(["busy", f"agent-1:{other}"])
        # so does the periodic counter save: a connection through the other proxy changes the counters
        assert echo(other, b"count me") == b"count me"
        wait_for(lambda: stored(world).get("stats", {}).get("proxies", {}).get(f"agent-1:{other}", {})
                 .get("connections") == 1, 10, what="the periodic save of the counters")
        assert "busy" in stored_names(world)
        holder.close()  # the port is free: the proxy binds it by itself
        wait_for(lambda: serves(busy), 10, what=f"proxy busy to serve on port {busy}")
    assert listed(world)["busy"]["state"] == "listening" and listed(world)["busy"]["failed"] is None
    assert len(log_lines(server, "proxy busy: remote port", "bound now")) == 1
    assert world.server.stop() == 0
    assert "busy" in stored_names(world)
    world.start_server()  # a restart: still there, serving
    world.start_agent()
    assert listed(world)["busy"]["state"] == "listening"
    assert serves(busy)


def test_enable_of_a_failed_proxy_whose_port_is_still_busy_is_409(world, echo_target):
    busy = free_port()
    write_state(world, [spec("busy", busy, echo_target.port)])
    with holding(busy) as holder:
        world.start_server()
        assert listed(world)["busy"]["state"] == "failed"
        with pytest.raises(CtlError) as refused:
            world.api("POST", "/v1/proxies/busy/enable")
        assert "409" in str(refused.value) and f"remote port {busy}" in str(refused.value)
        res = world.ctl("proxy", "enable", "busy", "--admin-socket", world.sock, check=False)
        assert res.returncode == 1 and f"remote port {busy}" in res.stderr and "409" in res.stderr
        assert listed(world)["busy"]["state"] == "failed"
        holder.close()
        # freed: enable binds it at once (unless the periodic retry already did)
        world.ctl("proxy", "enable", "busy", "--admin-socket", world.sock)
        assert listed(world)["busy"]["state"] == "listening"
    # disable and delete work on it like on any proxy
    world.ctl("proxy", "disable", "busy", "--admin-socket", world.sock)
    assert listed(world)["busy"]["state"] == "disabled"
    world.ctl("proxy", "del", "busy", "--admin-socket", world.sock)
    assert stored_names(world) == []


# -- a corrupt stored entry -------------------------------------------------------------------------------
def test_corrupt_stored_entry_is_kept_across_saves_and_logged(world, echo_target):
    good = free_port()
    corrupt = spec("broken", free_port(), 80, agent_id="no such id!")
    junk = 42
    write_state(world, [spec("good", good, echo_target.port), corrupt, junk])
    server = world.start_server()
    assert list(listed(world)) == ["good"]
    world.add_proxy(echo_target.port)  # an admin change
    entries = stored(world)["proxies"]
    assert corrupt in entries and junk in entries and len(entries) == 4
    line = wait_log_line(server, "stored proxy broken", "not served")
    assert "agent_id" in line and "ERROR" in line
    assert wait_log_line(server, "stored proxy 42", "not served")
    world.ctl("proxy", "del", "good", "--admin-socket", world.sock)  # another
    assert corrupt in stored(world)["proxies"] and junk in stored(world)["proxies"]
    assert world.server.stop() == 0
    entries = stored(world)["proxies"]
    assert corrupt in entries and junk in entries and "good" not in stored_names(world)
    server = world.start_server()  # and again after a restart
    wait_log_line(server, "stored proxy broken", "not served")


# -- state.Store: the guard, and writes in the background ---------------------------------------------------
class GatedWriter:
    """Writes like state.write_file; once armed, the next write waits until the test opens the gate."""

    def __init__(self, armed: bool = True) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.armed = armed
        self.written: list[dict] = []  # what each write put in the file, in order

    def arm(self) -> None:
        self.gate.clear()
        self.entered.clear()
        self.armed = True

    def __call__(self, state_dir: str, body: bytes) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        state.write_file(state_dir, body)
        self.written.append(json.loads(body))


class Seen(logging.Handler):
    """Sets an event when a log message containing `text` is emitted (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def seen(text: str):
    handler = Seen(text)
    logger = logging.getLogger("anywhere")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.event
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def opener(writer: GatedWriter, when: threading.Event):
    """A thread that opens the writer's gate once `when` is set (or at the end, whatever happened)."""
    thread = threading.Thread(target=lambda: (when.wait(30), writer.gate.set()), daemon=True)
    thread.start()
    try:
        yield
    finally:
        when.set()
        thread.join(30)


def names(snapshot: dict) -> list[str]:
    return [p["name"] for p in snapshot["proxies"]]


def test_store_refuses_a_save_that_loses_a_proxy_nobody_deleted(tmp_path, caplog):
    state.save(str(tmp_path), [spec("a", 1001, 80), spec("b", 1002, 80)])
    before = Path(state.path(str(tmp_path))).read_bytes()
    store = state.Store(str(tmp_path))
    store.load()
    with pytest.raises(state.StateError, match="lose proxies nobody deleted: b"):
        store.save([spec("a", 1001, 80)])
    with pytest.raises(state.StateError):
        store.save_later([spec("a", 1001, 80)])
    assert Path(state.path(str(tmp_path))).read_bytes() == before
    assert any("refusing to write" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    store.save([spec("a", 1001, 80)], deleted=["b"])  # said deleted: written
    store.save([spec("a", 1001, 80), spec("c", 1003, 80)])
    with pytest.raises(state.StateError, match="c"):  # one saved since the load is kept as well
        store.save([spec("a", 1001, 80)])
    store.close()
    assert names(json.loads(Path(state.path(str(tmp_path))).read_text())) == ["a", "c"]


def test_store_admin_save_during_a_slow_counter_save_is_never_overwritten(tmp_path):
    writer = GatedWriter()
    store = state.Store(str(tmp_path), write=writer)
    store.save_later([spec("a", 1001, 80)], {"n": 1})  # returns at once: the thread writes it
    assert writer.entered.wait(10) and not writer.written
    store.save_later([spec("a", 1001, 80)], {"n": 2})  # waits in the slot, behind the slow write
    with seen("waiting for the counter save") as waiting, opener(writer, waiting):
        store.save([spec("a", 1001, 80), spec("b", 1002, 80)], {"n": 3})  # the admin change: waits its turn
        assert waiting.is_set()  # it did wait for the slow write
    store.save_later([spec("a", 1001, 80), spec("b", 1002, 80)], {"n": 4})
    store.close()  # flushes what waits
    order = [w["stats"]["n"] for w in writer.written]
    assert order[0] == 1 and order[-1] == 4 and order == sorted(order), order  # {"n": 2} written before 3, or never
    final = json.loads(Path(state.path(str(tmp_path))).read_text())
    assert names(final) == ["a", "b"] and final["stats"] == {"n": 4}


def test_server_counter_save_returns_before_the_write_and_an_admin_change_during_it_is_kept(tmp_path):
    loop = Loop()
    writer = GatedWriter(armed=False)
    server = Server(loop, ServerConfig(state_dir=str(tmp_path / "state"), admin_socket=str(tmp_path / "sock")))
    server.store = state.Store(server.config.state_dir, write=writer)
    ports = [free_port(), free_port()]
    try:
        server.add_proxy({"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": 80, "remote_port": ports[0]})
        writer.arm()  # that write went through; the next one waits for the gate
        server.stats_dirty = True
        server.save_stats()  # the periodic save
        assert writer.entered.wait(10)
        assert len(writer.written) == 1 and not server.stats_dirty  # returned, its write still waiting
        ticks = []
        loop.call_later(0.01, lambda: (ticks.append(1), loop.stop()))
        loop.run()  # the loop runs meanwhile
        assert ticks == [1] and len(writer.written) == 1
        with seen("waiting for the counter save") as waiting, opener(writer, waiting):
            server.add_proxy({"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": 80,
                              "remote_port": ports[1]})  # durable when it returns
            assert waiting.is_set()
        assert [len(w["proxies"]) for w in writer.written] == [1, 1, 2]
        assert len(stored_file(server)["proxies"]) == 2
        server.stats_dirty = True
        server.save_stats()
    finally:
        server.close()  # flushes the counters and stops the writer thread
        loop.close()
    assert writer.written[-1]["proxies"] == stored_file(server)["proxies"] and len(writer.written) == 4
    assert all(t.name != "anywhere-state" for t in threading.enumerate())


def stored_file(server: Server) -> dict:
    return json.loads(Path(state.path(server.config.state_dir)).read_text())
