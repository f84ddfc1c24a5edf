"""Config files: every key's bad value names file, section, key, value and what is expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from anywhere import config
from anywhere.server import settings
from anywhere.agent import settings as agent_settings

ETC = Path(__file__).resolve().parent.parent / "etc"

SERVER_BAD = [
    ("port", "70000", "must be 1..65535"),
    ("port", "http", "must be 1..65535"),
    ("bind", "not an address!", "is not an address"),
    ("proxy_bind", "1.2.3.4, -bad-", "is not an address"),
    ("server_id", "x" * 65, "must be 1-64 printable characters"),
    ("ca", '""', "must be a path"),
    ("cert", '""', "must be a path"),
    ("key", '""', "must be a path"),
    ("whitelist", "203.0.113.7, 10.0.0.0/33", "'10.0.0.0/33' is not an IP address or CIDR"),
    ("admin_socket", '""', "must be a path"),
    ("state_dir", '""', "must be a path"),
    ("stats_save_interval", "0", "must be a number of seconds greater than 0"),
    ("data_timeout", "soon", "must be a number of seconds greater than 0"),
    ("handshake_timeout", "-1", "must be a number of seconds greater than 0"),
    ("heartbeat", "0", "must be a number of seconds greater than 0"),
    ("drain_timeout", "1e9", "must be a number of seconds greater than 0"),
    ("pool_size", "2000", "must be a whole number 0..1024"),
    ("pool_max", "-1", "must be a whole number 0..65536"),
    ("pool_idle_timeout", "0", "must be a number of seconds greater than 0"),
    ("trunk_idle_timeout", "-1", "must be a number of seconds greater than 0"),
    ("audit_log", "relative/audit.log", "must be empty (off), journal, or an absolute file path"),
    ("api_listen", "localhost", "is not HOST:PORT"),
    ("api_token_file", '""', "must be a path"),
    ("metrics_public", "maybe", "must be true or false"),
    ("max_connections", "0", "must be a whole number 1..1000000"),
    ("max_connections_per_proxy", "many", "must be a whole number 1..1000000"),
    ("rate_limit", "-5", "must be a whole number 0..1000000"),
    ("rate_burst", "0", "must be a whole number 1..1000000"),
    ("max_agents", "0", "must be a whole number 1..100000"),
    ("max_pending_per_agent", "1.5", "must be a whole number 1..100000"),
    ("max_unauthenticated", "0", "must be a whole number 1..100000"),
    ("max_unauthenticated_per_source", "x", "must be a whole number 1..100000"),
    ("buffer_budget", "12X", "must be a size in bytes, optionally with K, M or G"),
    ("idle_timeout", "-1", "must be a number of seconds greater than 0"),
    ("admin_timeout", "0", "must be a number of seconds greater than 0"),
    ("admin_max_request", "10", "must be a whole number 1024..16777216"),
    ("deny", "agent 1", "is neither an agent id nor serial:HEX"),
    ("admin_group", '""', "must be 1-64 printable characters"),
    ("proxies_dir", '""', "must be a path"),
    ("health_public", "maybe", "must be true or false"),
    ("log_level", "loud", "must be one of debug, info, warning, error"),
]

AGENT_BAD = [
    ("agent_id", "agent 1", "must be 1-64 letters, digits"),
    ("server", "bad host!", "must be a host name or an IP address"),
    ("server_port", "0", "must be 1..65535"),
    ("server_name", "a b", "must be a host name or an IP address"),
    ("ca", '""', "must be a path"),
    ("cert", '""', "must be a path"),
    ("key", '""', "must be a path"),
    ("dial_timeout", "x", "must be a number of seconds greater than 0"),
    ("handshake_timeout", "0", "must be a number of seconds greater than 0"),
    ("allow", "10.0.0.0/33:80", "is not an IP address, CIDR or host name"),
    ("buffer_budget", "2T", "must be a size in bytes, optionally with K, M or G (powers of 1024, e.g. 256M), 1M..1T"),
    ("log_level", "verbose", "must be one of debug, info, warning, error"),
]


def test_every_server_key_is_covered():
    keys = {line.split("=")[0].strip() for line in settings.SERVER_SPEC if "=" in line}
    assert keys == {k for k, _, _ in SERVER_BAD}


def test_every_agent_key_is_covered():
    keys = {line.split("=")[0].strip() for line in agent_settings.AGENT_SPEC if "=" in line}
    assert keys == {k for k, _, _ in AGENT_BAD}


@pytest.mark.parametrize("key,value,expected", SERVER_BAD)
def test_server_bad_value_message(tmp_path, key, value, expected):
    path = tmp_path / "anywhered.conf"
    path.write_text(f"[server]\n{key} = {value}\n")
    with pytest.raises(config.ConfigError) as err:
        settings.server_config(str(path), {})
    shown = value.strip('"')
    assert str(err.value).startswith(f"{path} [server] {key} = {shown}: ")
    assert expected in str(err.value)


@pytest.mark.parametrize("key,value,expected", AGENT_BAD)
def test_agent_bad_value_message(tmp_path, key, value, expected):
    path = tmp_path / "agent-1.conf"
    path.write_text(f"[agent]\nserver = 127.0.0.1\n{key} = {value}\n" if key != "server" else f"[agent]\n{key} = {value}\n")
    with pytest.raises(config.ConfigError) as err:
        agent_settings.agent_config(str(path), "agent-1", {})
    shown = value.strip('"')
    assert f"{path} [agent] {key} = {shown}: " in str(err.value)
    assert expected in str(err.value)


def test_documented_example_message(tmp_path):
    path = tmp_path / "anywhered.conf"
    path.write_text("[server]\nport = 70000\n")
    with pytest.raises(config.ConfigError) as err:
        settings.server_config(str(path), {})
    assert str(err.value) == f"{path} [server] port = 70000: must be 1..65535"


def test_all_problems_reported_at_once_with_unknown_keys_and_sections(tmp_path):
    path = tmp_path / "anywhered.conf"
    path.write_text("[server]\nport = 70000\ncolour = blue\nheartbeat = 0\n[extra]\na = 1\n")
    with pytest.raises(config.ConfigError) as err:
        settings.server_config(str(path), {})
    problems = err.value.problems
    assert f"{path} [server] port = 70000: must be 1..65535" in problems
    assert f"{path} [server] colour: unknown key" in problems
    assert f"{path} [extra]: unknown section" in problems
    assert any("heartbeat = 0" in p for p in problems)
    assert len(problems) == 4


@pytest.mark.parametrize("text,size", [("268435456", 256 * 2**20), ("256M", 256 * 2**20), ("256MiB", 256 * 2**20),
                                       ("8m", 8 * 2**20), ("1G", 2**30), ("1gb", 2**30), ("4096K", 4 * 2**20),
                                       ("1T", 2**40), ("12X", None), ("1.5G", None), ("-1M", None), ("", None),
                                       ("M", None)])
def test_sizes(text, size):
    assert config.parse_size(text) == size


def test_buffer_budget_default_range_and_flag(tmp_path):
    cfg = settings.server_config(str(tmp_path / "absent.conf"), {})
    assert cfg.buffer_budget == 256 * 2**20
    path = tmp_path / "anywhered.conf"
    path.write_text("[server]\nbuffer_budget = 512K\n")
    with pytest.raises(config.ConfigError) as err:
        settings.server_config(str(path), {})
    assert "buffer_budget = 512K: must be a size in bytes" in str(err.value) and "1M..1T" in str(err.value)
    path.write_text("[server]\nbuffer_budget = 1G\n")
    res = _run("anywhere.server_cli", "check-config", "--config", str(path), "--buffer-budget", "8M")
    assert res.returncode == 0, res.stderr
    assert "buffer_budget = 8388608" in res.stdout.splitlines()
    res = _run("anywhere.server_cli", "check-config", "--buffer-budget", "lots")
    assert res.returncode == 2 and "--buffer-budget: lots: must be a size in bytes" in res.stderr


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "anywhered.conf"
    path.write_text("[server]\nport 1111\n")
    with pytest.raises(config.ConfigError) as err:
        settings.server_config(str(path), {})
    assert f"{path} line 2:" in str(err.value)


def test_defaults_without_file_and_flags_override_file(tmp_path):
    cfg = settings.server_config(str(tmp_path / "absent.conf"), {})
    extra = vars(cfg)  # drain_timeout and log_level are ServerConfig's too
    assert (cfg.port, cfg.heartbeat, cfg.whitelist, extra["drain_timeout"], extra["log_level"]) == (1111, 5.0, [], 10.0, "info")
    path = tmp_path / "anywhered.conf"
    path.write_text("[server]\nport = 2222\nwhitelist = 10.0.0.0/8, 2001:db8::/32\nheartbeat = 2\n")
    cfg = settings.server_config(str(path), {"port": 3333, "heartbeat": None})
    assert cfg.port == 3333  # the flag wins
    assert cfg.heartbeat == 2.0  # a flag not given leaves the file's value
    assert cfg.whitelist == ["10.0.0.0/8", "2001:db8::/32"]


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        settings.server_config(str(tmp_path / "nope.conf"), {}, required=True)
    assert "nope.conf: no such file" in str(err.value)


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)


def test_check_config_prints_effective_settings(tmp_path):
    path = tmp_path / "anywhered.conf"
    path.write_text("[server]\nport = 2222\nwhitelist = 203.0.113.7\n")
    res = _run("anywhere.server_cli", "check-config", "--config", str(path), "--heartbeat", "3")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "port = 2222" in lines
    assert "heartbeat = 3.0" in lines  # the flag applied
    assert "whitelist = 203.0.113.7" in lines
    assert "bind = *" in lines


def test_check_config_refuses_bad_file_and_start_binds_nothing(tmp_path):
    path = tmp_path / "anywhered.conf"
    sock = tmp_path / "a.sock"
    path.write_text(f"[server]\nport = 70000\nadmin_socket = {sock}\n")
    res = _run("anywhere.server_cli", "check-config", "--config", str(path))
    assert res.returncode == 1
    assert f"{path} [server] port = 70000: must be 1..65535" in res.stderr
    res = _run("anywhere.server_cli", "start", "--config", str(path))
    assert res.returncode != 0
    assert f"{path} [server] port = 70000: must be 1..65535" in res.stderr
    assert not sock.exists()


def test_agent_check_config_defaults_id_to_file_name(tmp_path, creds):
    path = tmp_path / "agent-1.conf"
    crt, key = creds.agent("agent-1")
    path.write_text(f"[agent]\nserver = 127.0.0.1\nca = {creds.ca}\ncert = {crt}\nkey = {key}\n")
    res = _run("anywhere.agent_cli", "check-config", "--config", str(path))
    assert res.returncode == 0, res.stderr
    assert "agent_id = agent-1" in res.stdout.splitlines()
    assert "server_port = 1111" in res.stdout.splitlines()
    # an id that does not match the certificate is refused before anything starts
    res = _run("anywhere.agent_cli", "check-config", "--config", str(path), "-i", "agent-2")
    assert res.returncode == 1
    assert "does not match the identity" in res.stderr


def test_example_configs_are_valid():
    cfg = settings.server_config(str(ETC / "anywhered.conf"), {}, required=True)
    assert cfg.port == 1111
    values, _ = agent_settings.agent_config(str(ETC / "agents" / "agent.conf.example"), "agent-1", {})
    assert values["server"] == "tunnel.example.com" and values["agent_id"] == "agent-1"


# -- the ranges the wire protocol imposes: what check-config accepts can be sent to every agent --------------
def test_what_the_config_accepts_a_welcome_can_carry(tmp_path):
    from anywhere import wire
    path = tmp_path / "anywhered.conf"
    accepted = []
    for key, value in (("heartbeat", "0.001"), ("heartbeat", "3600"), ("heartbeat", "3600.5"), ("heartbeat", "7200"),
                       ("heartbeat", "86400"), ("pool_size", "0"), ("pool_size", "1024"), ("pool_size", "1025")):
        path.write_text(f"[server]\n{key} = {value}\npool_max = 2048\n")
        try:
            cfg = settings.server_config(str(path), {})
        except config.ConfigError as exc:
            assert str(exc).startswith(f"{path} [server] {key} = {value}: must be "), exc
            continue
        wire.encode("welcome", proto=wire.PROTO_VERSION, server_id=cfg.server_id, heartbeat=cfg.heartbeat,
                    pool=cfg.pool_size)
        accepted.append((key, value))
    assert accepted == [("heartbeat", "0.001"), ("heartbeat", "3600"), ("pool_size", "0"), ("pool_size", "1024")]


def test_check_config_refuses_a_heartbeat_beyond_the_wire_limit(tmp_path):
    path = tmp_path / "anywhered.conf"
    path.write_text("[server]\nheartbeat = 7200\n")
    res = _run("anywhere.server_cli", "check-config", "--config", str(path))
    assert res.returncode == 1, res.stdout
    assert res.stderr.strip() == f"{path} [server] heartbeat = 7200: must be a number of seconds greater than 0 (at most 3600)"
    path.write_text("[server]\nheartbeat = 3600\n")  # the limit itself is fine
    res = _run("anywhere.server_cli", "check-config", "--config", str(path))
    assert res.returncode == 0, res.stderr
    assert "heartbeat = 3600.0" in res.stdout.splitlines()


def test_reload_with_a_heartbeat_beyond_the_wire_limit_is_refused_and_changes_nothing(world):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nheartbeat = 2\n")
    server = world.start_server("--config", str(conf))
    conf.write_text("[server]\nheartbeat = 7200\n")
    res = world.ctl("reload", "--admin-socket", world.sock, check=False)
    assert res.returncode == 1, res.stdout
    assert f"{conf} [server] heartbeat = 7200: must be a number of seconds greater than 0 (at most 3600)" in res.stderr
    assert server.alive()
    # an agent that connects now is welcomed (with the heartbeat still in force), not left without an answer
    agent = world.start_agent("agent-1")
    agent.wait_log("connected to server")
    conf.write_text("[server]\nheartbeat = 2\n")
    assert "nothing changed" in world.ctl("reload", "--admin-socket", world.sock).stdout


def test_server_refuses_to_start_or_reload_with_what_a_welcome_cannot_carry(tmp_path, creds):
    """The server's own guard, for a configuration made in code rather than read from a file."""
    from dataclasses import replace

    from anywhere.loop import Loop
    from anywhere.server import Server, ServerConfig
    from conftest import free_port
    sock = tmp_path / "anywhered.sock"
    base = ServerConfig(port=free_port(), bind=["127.0.0.1"], proxy_bind=["127.0.0.1"], ca=str(creds.ca),
                        cert=str(creds.server_cert), key=str(creds.server_key), admin_socket=str(sock),
                        state_dir=str(tmp_path / "state"))
    loop = Loop()
    try:
        for bad in ({"heartbeat": 7200.0}, {"pool_size": 1025}, {"pool_size": -1}):
            server = Server(loop, replace(base, **bad))
            with pytest.raises(ValueError, match="heartbeat must be more than 0 and at most 3600 seconds, pool_size 0..1024"):
                server.start()
            assert not sock.exists()
        server = Server(loop, replace(base))
        server.start()
        try:
            running = server.config
            with pytest.raises(ValueError, match="heartbeat 7200"):
                server.reload(replace(running, heartbeat=7200.0, whitelist=["10.0.0.0/8"]))
            assert server.config is running and running.heartbeat == 5.0 and server.global_nets == []
        finally:
            server.close()
    finally:
        loop.close()
