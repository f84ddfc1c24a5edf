"""Proxies declared in a proxies.d directory (issue 16): reading and checking the files.

Every problem names file, section, key and value, all of them at once, across files; what is
valid comes back as the specs the API takes, each with its file.  Real files in a temp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anywhere.errors import ConfigError
from anywhere.server.declared import read_dir

WEB = """[web]
agent = agent-1
local_ip = 10.0.0.2
local_port = 80
remote_port = 8080
#whitelist = 203.0.113.0/24
"""


def problems(tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        read_dir(str(tmp_path))
    return err.value.problems


def test_declared_proxies_with_their_files_and_the_defaults(tmp_path):
    (tmp_path / "web.conf").write_text(WEB)
    (tmp_path / "db.conf").write_text("[db]\nagent = agent-2\nlocal_ip = db.internal\nlocal_port = 5432\n"
                                      "remote_port = 15432\nwhitelist = 198.51.100.0/24, 2001:db8::/32\n"
                                      "idle_timeout = 600\nenabled = false\n")
    (tmp_path / "notes.txt").write_text("not a .conf file: ignored\n")
    got = {d.spec["name"]: d for d in read_dir(str(tmp_path))}
    assert set(got) == {"web", "db"}
    assert got["web"].spec == {"name": "web", "agent_id": "agent-1", "agent_ids": ["agent-1"],
                               "balance": "least-connections", "local_ip": "10.0.0.2", "local_port": 80,
                               "remote_port": 8080, "whitelist": [], "idle_timeout": 0.0, "bandwidth": 0,
                                   "enabled": True}
    assert got["web"].source == f"file:{tmp_path / 'web.conf'}"
    assert got["db"].spec["whitelist"] == ["198.51.100.0/24", "2001:db8::/32"]
    assert (got["db"].spec["idle_timeout"], got["db"].spec["enabled"]) == (600.0, False)


def test_an_absent_directory_declares_nothing_and_a_file_in_its_place_is_an_error(tmp_path):
    assert read_dir(str(tmp_path / "proxies.d")) == []
    (tmp_path / "proxies.d").write_text("")
    assert problems(tmp_path / "proxies.d") == [f"{tmp_path / 'proxies.d'}: not a directory"]


@pytest.mark.parametrize("line,expected", [
    ("remote_port = 70000", "[web] remote_port = 70000: must be 1..65535"),
    ("local_port = 0", "[web] local_port = 0: must be 1..65535"),
    ("agent = -bad", "[web] agent = -bad: must be 1-64 letters, digits"),
    ("local_ip = a b", "[web] local_ip = a b: must be a host name or an IP address"),
    ("whitelist = 10.0.0.0/33", "[web] whitelist = 10.0.0.0/33: '10.0.0.0/33' is not an IP address or CIDR"),
    ("idle_timeout = -1", "[web] idle_timeout = -1: must be a number of seconds"),
    ("enabled = maybe", "[web] enabled = maybe: must be true or false"),
    ("colour = blue", "[web] colour: unknown key"),
])
def test_each_bad_key_is_named_with_file_section_and_value(tmp_path, line, expected):
    key = line.split(" = ")[0]
    text = "\n".join(row for row in WEB.splitlines() if not row.startswith(f"{key} ")) + f"\n{line}\n"
    (tmp_path / "web.conf").write_text(text)
    found = problems(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'web.conf'} {expected}"), found


def test_a_missing_key_a_bad_name_and_a_malformed_file_are_all_reported_at_once(tmp_path):
    (tmp_path / "a.conf").write_text("[web]\nagent = agent-1\nlocal_ip = 10.0.0.2\nlocal_port = 80\n")
    (tmp_path / "b.conf").write_text("[12345]\nagent = agent-1\nlocal_ip = 10.0.0.2\nlocal_port = 80\n"
                                     "remote_port = 8081\n")
    (tmp_path / "c.conf").write_text("[ok]\nagent agent-1\n")
    found = problems(tmp_path)
    assert f"{tmp_path / 'a.conf'} [web] remote_port: is required" in found
    assert any(p.startswith(f"{tmp_path / 'b.conf'} [12345]: the section names the proxy") for p in found), found
    assert any(p.startswith(f"{tmp_path / 'c.conf'} line 2:") for p in found), found
    assert len(found) == 3, found


def test_a_name_or_port_declared_twice_across_files_is_refused(tmp_path):
    (tmp_path / "a.conf").write_text(WEB)
    (tmp_path / "b.conf").write_text(WEB.replace("remote_port = 8080", "remote_port = 8081"))
    (tmp_path / "c.conf").write_text(WEB.replace("[web]", "[web2]"))
    found = problems(tmp_path)
    assert found == [f"{tmp_path / 'b.conf'} [web]: proxy web is declared in {tmp_path / 'a.conf'} too",
                     f"{tmp_path / 'c.conf'} [web2] remote_port = 8080: already used by proxy web in "
                     f"{tmp_path / 'a.conf'}"]


def test_the_shipped_example_declares_nothing_and_uncommented_declares_web(tmp_path):
    example = (Path(__file__).resolve().parent.parent / "etc" / "proxies.d" / "example.conf").read_text()
    (tmp_path / "example.conf").write_text(example)
    assert read_dir(str(tmp_path)) == []

    def uncommented(skip: str) -> str:  # the section and every key but `skip` (agent or agents)
        keep = lambda line: line.startswith("#[") or (line.startswith("#") and " = " in line.split("#", 2)[1]
                                                       and not line.startswith(f"#{skip} "))
        return "\n".join(line[1:] if keep(line) else line for line in example.splitlines())

    (tmp_path / "example.conf").write_text(uncommented("agents"))
    [web] = read_dir(str(tmp_path))
    assert web.spec == {"name": "web", "agent_id": "agent-1", "agent_ids": ["agent-1"], "balance": "least-connections",
                        "local_ip": "10.0.0.2", "local_port": 80,
                        "remote_port": 8080, "whitelist": ["203.0.113.0/24", "2001:db8::/32"], "idle_timeout": 0.0,
                        "bandwidth": 10_000_000, "enabled": True}
    (tmp_path / "example.conf").write_text(uncommented("agent"))
    [web] = read_dir(str(tmp_path))
    assert web.spec["agent_ids"] == ["agent-1", "agent-2"]


def test_an_unreadable_directory_is_an_error_not_an_empty_set(tmp_path):
    (tmp_path / "web.conf").write_text(WEB)
    (tmp_path / ".hidden.conf").write_text("not read: editors and tools keep their temporary files hidden\n")
    assert [d.spec["name"] for d in read_dir(str(tmp_path))] == ["web"]
    if os.geteuid() != 0:
        pytest.skip("needs root, to read the directory as user nobody")
    # as user nobody (a forked child), the directory cannot be listed: an error, not "no proxies"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                read_dir(str(tmp_path))
                os.write(wfd, b"no error")
            except ConfigError as exc:
                os.write(wfd, str(exc).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    assert said == f"{tmp_path}: cannot read: Permission denied"


@pytest.mark.parametrize("lines,expected", [
    ("agents = agent-1, agent-2\n", "[web] agent = agent-1: give agent or agents, not both"),
    (None, "[web] agent: is required (or agents = ID, ID, ... for several)"),
    ("balance = random\n", "[web] balance = random: must be one of least-connections, round-robin, failover"),
])
def test_agent_agents_and_balance_are_checked(tmp_path, lines, expected):
    text = WEB if lines is not None else WEB.replace("agent = agent-1\n", "")
    (tmp_path / "web.conf").write_text(text + (lines or ""))
    assert problems(tmp_path) == [f"{tmp_path / 'web.conf'} {expected}"]


def test_several_agents_with_a_balance_mode(tmp_path):
    (tmp_path / "web.conf").write_text(WEB.replace("agent = agent-1\n", "agents = agent-2, agent-1\nbalance = failover\n"))
    [web] = read_dir(str(tmp_path))
    assert (web.spec["agent_id"], web.spec["agent_ids"], web.spec["balance"]) == ("agent-2", ["agent-2", "agent-1"],
                                                                                  "failover")
    (tmp_path / "web.conf").write_text(WEB.replace("agent = agent-1\n", "agents = agent-1, agent-1\n"))
    assert problems(tmp_path) == [f"{tmp_path / 'web.conf'} [web] agents = agent-1, agent-1: names agent-1 twice"]


def test_proxy_protocol_is_off_by_default_v1_or_v2_when_given_and_round_trips_through_render(tmp_path):
    from anywhere.proxyfile import render
    (tmp_path / "web.conf").write_text(WEB)
    [web] = read_dir(str(tmp_path))
    assert "proxy_protocol" not in web.spec  # off: left out, as the API stores it
    for value, expected in (("off", None), ("v1", "v1"), ("v2", "v2")):
        (tmp_path / "web.conf").write_text(WEB + f"proxy_protocol = {value}\n")
        [web] = read_dir(str(tmp_path))
        assert web.spec.get("proxy_protocol") == expected
        text = render([web.spec])
        assert (f"proxy_protocol = {value}\n" in text) == (expected is not None)
        (tmp_path / "web.conf").write_text(text)
        [again] = read_dir(str(tmp_path))
        assert again.spec == web.spec
    for value in ("v3", "V1", "1", "on"):
        (tmp_path / "web.conf").write_text(WEB + f"proxy_protocol = {value}\n")
        assert problems(tmp_path) == [f"{tmp_path / 'web.conf'} [web] proxy_protocol = {value}: must be v1, v2 or off"]
