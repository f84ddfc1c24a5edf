"""agent/settings.py: AgentConfig is the one home of the agent's defaults; the spec, the flags and
check-config are derived from it and agree with it."""

from __future__ import annotations

from dataclasses import fields

from anywhere import config
from anywhere.agent import settings
from anywhere.agent.settings import AgentConfig


def test_an_empty_file_gives_every_field_default(tmp_path):
    path = tmp_path / "agent-1.conf"
    path.write_text("[agent]\n")
    values, _ = settings.agent_config(str(path), None, {})
    assert values == settings.defaults()  # the spec's defaults read back are the fields' (256M, 5, list())
    defaults = {f.name: f.default for f in fields(AgentConfig)}
    assert values["buffer_budget"] == defaults["buffer_budget"] and values["dial_timeout"] == defaults["dial_timeout"]
    assert values["server"] is None and values["allow"] == []


def test_every_key_is_a_field_and_every_flag_checks_as_its_key():
    keys = {line.split("=")[0].strip() for line in settings.AGENT_SPEC if "=" in line}
    assert keys == set(settings.defaults())
    assert keys - {"server"} <= {f.name for f in fields(AgentConfig)}
    assert config.describe(settings.AGENT_SPEC, "buffer_budget") == "1M..1T, in bytes or with K, M, G; default 256M"
    assert config.flag_type(settings.AGENT_SPEC, "dial_timeout")("2.5") == 2.5


def test_resolve_without_a_file_allows_everything_and_fills_the_defaults(creds):
    crt, key = creds.agent("agent-1")
    cfg = settings.resolve(None, {"server": "127.0.0.1", "ca": str(creds.ca), "cert": str(crt), "key": str(key)})
    assert cfg.agent_id == "agent-1"  # the certificate's identity
    assert cfg.allow == settings.COMMAND_LINE_ALLOW
    assert (cfg.server_port, cfg.dial_timeout, cfg.log_level) == (1111, 5.0, "info")
