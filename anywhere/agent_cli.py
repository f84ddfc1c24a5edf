"""anywhere: the agent, with the original's flags (-i -s -p --ca --cert --key).

Settings may also come from an INI file (`--config /etc/anywhere/agents/NAME.conf`, as the
systemd template `anywhere-agent@NAME` runs it); flags given override the file, and the agent
id defaults to NAME.  `anywhere check-config --config PATH` validates a file and prints the
effective settings.  Under systemd: READY=1 once started, STATUS= with the connection state,
watchdog pings from the loop; SIGHUP reloads the file (relays are kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Callable

from . import config as configuration
from . import tls
from .agent import Agent, AgentConfig
from .common import __version__, default_credential, setup_logging, valid_agent_id, version_line
from .loop import Loop
from .notify import Notifier
from .service import run_loop, with_pidfile
from .trunk import BUFFER_BUDGET

log = logging.getLogger("anywhere.agent")


def _checked(key: str) -> Callable[[str], Any]:
    """The argparse type of the flag that overrides `key`: that key's own check and bounds (config.py)."""
    return configuration.flag_type(configuration.AGENT_SPEC, key)


def _range(key: str) -> str:
    return configuration.describe(configuration.AGENT_SPEC, key)


def build_parser(check: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anywhere check-config" if check else "anywhere",
                                     description="The Anywhere agent: reach targets in this network for anywhered. "
                                                 "`anywhere check-config --config PATH` validates a configuration file.")
    parser.add_argument("--version", action="version", version=version_line("anywhere agent"))
    parser.add_argument("--config", metavar="PATH", help="configuration file, e.g. /etc/anywhere/agents/NAME.conf")
    parser.add_argument("-i", "--agent-id", help="this agent's id (default: NAME of the config file, else the certificate's identity)")
    parser.add_argument("-s", "--server-ip", help="the server's name or address (v4 or v6)")
    parser.add_argument("-p", "--server-port", type=_checked("server_port"),
                        help=f"the server's agent port ({_range('server_port')})")
    parser.add_argument("--server-name", help="the name to expect in the server's certificate (default: --server-ip)")
    parser.add_argument("--ca", help="CA certificate (default credential/ca.crt)")
    parser.add_argument("--cert", help="this agent's certificate (default credential/client.crt)")
    parser.add_argument("--key", help="this agent's private key (default credential/client.key)")
    parser.add_argument("--dial-timeout", type=_checked("dial_timeout"), metavar="SECONDS",
                        help=f"seconds to reach a target ({_range('dial_timeout')})")
    parser.add_argument("--allow", metavar="LIST", help="targets the server may ask for: comma-separated IP, CIDR or "
                        "host, each with an optional :PORT; * for any (default with no --config: *)")
    parser.add_argument("--buffer-budget", type=_checked("buffer_budget"), metavar="SIZE",
                        help="memory for data that targets are slow to read, over all connections "
                             f"({_range('buffer_budget')}); beyond it the server is asked to wait (nothing is lost)")
    parser.add_argument("--log-level", choices=configuration.LOG_LEVELS, help="default info")
    parser.add_argument("--log-file", help="append logs to this file instead of stderr")
    if not check:
        parser.add_argument("--daemon", action="store_true", help="detach (hosts without systemd; needs --pidfile)")
        parser.add_argument("--pidfile", help="pid file for --daemon (locked; a second start is refused)")
    return parser


def certificate_identity(cert_path: str) -> str | None:
    """The commonName of a PEM certificate file, or None if it cannot be read."""
    try:
        with open(cert_path, "rb") as f:
            return tls.certificate_common_name(f.read())
    except (OSError, ValueError):
        return None


def load(args: argparse.Namespace) -> tuple[AgentConfig, str]:
    """Effective settings (defaults < file < flags) and the log level.  Raises ConfigError."""
    overrides = {"agent_id": args.agent_id, "server": args.server_ip, "server_port": args.server_port,
                 "server_name": args.server_name, "ca": args.ca, "cert": args.cert, "key": args.key,
                 "dial_timeout": args.dial_timeout, "log_level": args.log_level, "buffer_budget": args.buffer_budget,
                 "allow": None if args.allow is None else [e.strip() for e in args.allow.split(",") if e.strip()]}
    if overrides["allow"] is not None:
        try:
            configuration.check_allowlist(overrides["allow"])
        except configuration.ValidateError as exc:
            raise configuration.ConfigError([f"--allow {args.allow}: {exc}"]) from None
    if args.config:
        name = os.path.basename(args.config)
        name = name[:-5] if name.endswith(".conf") else name
        values, _ = configuration.agent_config(args.config, name, overrides, required=True)
    else:
        values = {k: v for k, v in overrides.items() if v is not None}
        values.setdefault("server_port", 1111)
        values.setdefault("dial_timeout", 5.0)
        values.setdefault("handshake_timeout", 10.0)
        values.setdefault("log_level", "info")
        values.setdefault("buffer_budget", BUFFER_BUDGET)
        values.setdefault("allow", ["*"])  # the original's behaviour on the command line; warned about at start
    where = args.config or "the command line"
    if not values.get("server"):
        raise configuration.ConfigError([f"{where}: no server: give -s HOST" + (" or set server in [agent]" if args.config else "")])
    ca = values.get("ca") or default_credential("ca.crt")
    if args.config and not values.get("cert"):
        base = os.path.join(os.path.dirname(ca), values["agent_id"])
        cert, key = values.get("cert") or base + ".crt", values.get("key") or base + ".key"
    else:
        cert = values.get("cert") or default_credential("client.crt")
        key = values.get("key") or default_credential("client.key")
    identity = certificate_identity(cert)
    agent_id = values.get("agent_id") or identity
    if not agent_id:
        raise configuration.ConfigError([f"{where}: no agent id given and no identity readable from {cert}"])
    if not valid_agent_id(agent_id):
        raise configuration.ConfigError([f"{where}: agent id {agent_id!r} is not valid: 1-64 letters, digits, '.', '_' or '-'"])
    if identity is not None and identity != agent_id:
        raise configuration.ConfigError([
            f"{where}: agent id {agent_id!r} does not match the identity of {cert} ({identity!r}); the server "
            f"would refuse it. Issue a certificate for {agent_id!r} (anywherectl credentials issue {agent_id} DIR)"])
    config = AgentConfig(agent_id=agent_id, server_host=values["server"], server_port=int(values["server_port"]),
                         server_name=values.get("server_name"), ca=os.path.abspath(ca), cert=os.path.abspath(cert),
                         key=os.path.abspath(key), dial_timeout=float(values["dial_timeout"]),
                         handshake_timeout=float(values.get("handshake_timeout") or 10.0), allow=list(values["allow"]),
                         buffer_budget=int(values["buffer_budget"]))
    return config, values["log_level"]


def cmd_check_config(argv: list[str]) -> int:
    args = build_parser(check=True).parse_args(argv)
    try:
        config, level = load(args)
    except configuration.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    settings: dict[str, Any] = dict(vars(config))
    settings["log_level"] = level
    print(f"# {args.config or 'command line'}: OK; effective settings, flags applied:")
    print("[agent]")
    print(configuration.render(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-config"]:
        return cmd_check_config(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config, level = load(args)
        setup_logging(level, args.log_file)
    except (configuration.ConfigError, OSError) as exc:
        print(f"anywhere: {exc}", file=sys.stderr)
        return 2

    def prepare() -> Callable[[], int] | int:
        try:
            tls.client_context(config.ca, config.cert, config.key)  # fail in the terminal, before detaching
        except tls.CredentialError as exc:
            log.error("cannot start: %s", exc)
            return 1
        return lambda: _run(config, args)

    return with_pidfile(args, "anywhere", prepare)


def _run(config: AgentConfig, args: argparse.Namespace) -> int:
    loop = Loop()
    agent = Agent(loop, config)
    notifier = Notifier()
    try:
        agent.start()
    except tls.CredentialError as exc:
        log.error("cannot start: %s", exc)
        loop.close()
        return 1

    def stop(signum: int) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        notifier.stopping()
        loop.stop()

    def reload(_signum: int) -> None:
        notifier.reloading()
        try:
            new, level = load(args)
            agent.reload(new)
            logging.getLogger().setLevel(level.upper())
        except (configuration.ConfigError, tls.CredentialError) as exc:
            log.error("reload refused, the running configuration stays in force: %s", exc)
        finally:
            notifier.ready(agent.status_line())

    log.info("anywhere agent %s (%s) starting; server %s:%d; targets allowed: %s", config.agent_id, __version__,
             config.server_host, config.server_port, agent.allowlist)
    if agent.allowlist.everything:
        log.warning("allow = *: this agent connects to any target the server asks for; list the targets with "
                    "--allow or allow = in its configuration")
    elif not agent.allowlist.entries:
        log.warning("allow is empty: this agent refuses every target; list them with allow = in %s",
                    args.config or "--allow")
    return run_loop(loop, notifier, "agent", agent.status_line, stop, reload, agent.close)


if __name__ == "__main__":
    sys.exit(main())
