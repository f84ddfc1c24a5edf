"""anywhere: the agent's entry point, with the original's flags (-i -s -p --ca --cert --key).

This module only parses the command line and wires the parts (the composition root): the
settings are resolved by agent/settings.py (which also holds every default and range the
flags' help shows), the agent is agent/core.py's `Agent`, the loop and signals service.py's.

Settings may also come from an INI file (`--config /etc/anywhere/agents/NAME.conf`, as the
systemd template `anywhere-agent@NAME` runs it); flags given override the file, and the agent
id defaults to NAME.  `anywhere check-config --config PATH` validates a file and prints the
effective settings.  Under systemd: READY=1 once started, STATUS= with each server's state,
watchdog pings from the loop; SIGHUP reloads the file (relays are kept).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any, Callable

from . import config as configuration
from . import tls
from .agent import Agent, AgentConfig, settings
from .common import setup_logging, version_line
from .loop import Loop
from .notify import Notifier
from .service import raise_nofile, run_loop, with_pidfile

log = logging.getLogger("anywhere.agent")


def _checked(key: str) -> Callable[[str], Any]:
    """The argparse type of the flag that overrides `key`: that key's own check and bounds (agent/settings.py)."""
    return configuration.flag_type(settings.AGENT_SPEC, key)


def _range(key: str) -> str:
    return configuration.describe(settings.AGENT_SPEC, key)


def build_parser(check: bool = False) -> argparse.ArgumentParser:
    credential = {name: f"credential/{file}" for name, file in settings.CREDENTIALS.items()}
    parser = argparse.ArgumentParser(prog="anywhere check-config" if check else "anywhere",
                                     description="The Anywhere agent: reach targets in this network for anywhered. "
                                                 "`anywhere check-config --config PATH` validates a configuration file.")
    parser.add_argument("--version", action="version", version=version_line("anywhere agent"))
    parser.add_argument("--config", metavar="PATH", help="configuration file, e.g. /etc/anywhere/agents/NAME.conf")
    parser.add_argument("-i", "--agent-id", help="this agent's id (default: NAME of the config file, else the certificate's identity)")
    parser.add_argument("-s", "--server-ip", type=_checked("server"), metavar="HOSTS",
                        help="the server's name or address (v4 or v6), optionally with :PORT ([v6]:PORT); several "
                             "servers comma-separated, each with a session of its own")
    parser.add_argument("-p", "--server-port", type=_checked("server_port"),
                        help=f"the servers' agent port, for those given without one ({_range('server_port')})")
    parser.add_argument("--server-name", help="the name to expect in the servers' certificates (default: each "
                        "server's own name or address)")
    parser.add_argument("--ca", help=f"CA certificate (default {credential['ca']})")
    parser.add_argument("--cert", help=f"this agent's certificate (default {credential['cert']})")
    parser.add_argument("--key", help=f"this agent's private key (default {credential['key']})")
    parser.add_argument("--dial-timeout", type=_checked("dial_timeout"), metavar="SECONDS",
                        help=f"seconds to reach a target ({_range('dial_timeout')})")
    parser.add_argument("--allow", metavar="LIST", help="targets the server may ask for: comma-separated IP, CIDR or "
                        "host, each with an optional :PORT; * for any (default with no --config: "
                        f"{', '.join(settings.COMMAND_LINE_ALLOW)})")
    parser.add_argument("--buffer-budget", type=_checked("buffer_budget"), metavar="SIZE",
                        help="memory for data that targets are slow to read, over all connections "
                             f"({_range('buffer_budget')}); beyond it the server is asked to wait (nothing is lost)")
    parser.add_argument("--log-level", choices=configuration.LOG_LEVELS, help=_range("log_level"))
    parser.add_argument("--log-file", help="append logs to this file instead of stderr")
    if not check:
        parser.add_argument("--daemon", action="store_true", help="detach (hosts without systemd; needs --pidfile)")
        parser.add_argument("--pidfile", help="pid file for --daemon (locked; a second start is refused)")
    return parser


def load(args: argparse.Namespace) -> AgentConfig:
    """Effective settings (defaults < file < flags).  Raises ConfigError."""
    overrides = {"agent_id": args.agent_id, "server": args.server_ip, "server_port": args.server_port,
                 "server_name": args.server_name, "ca": args.ca, "cert": args.cert, "key": args.key,
                 "dial_timeout": args.dial_timeout, "log_level": args.log_level, "buffer_budget": args.buffer_budget,
                 "allow": None if args.allow is None else [e.strip() for e in args.allow.split(",") if e.strip()]}
    if overrides["allow"] is not None:
        try:
            configuration.check_allowlist(overrides["allow"])
        except configuration.ValidateError as exc:
            raise configuration.ConfigError([f"--allow {args.allow}: {exc}"]) from None
    return settings.resolve(args.config, overrides)


def cmd_check_config(argv: list[str]) -> int:
    args = build_parser(check=True).parse_args(argv)
    try:
        config = load(args)
    except configuration.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"# {args.config or 'command line'}: OK; effective settings, flags applied:")
    print(f"[{settings.SECTION}]")
    print(configuration.render(dict(vars(config), servers=[str(server) for server in config.servers])))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-config"]:
        return cmd_check_config(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load(args)
        setup_logging(config.log_level, args.log_file)
    except (configuration.ConfigError, OSError) as exc:
        print(f"anywhere: {exc}", file=sys.stderr)
        return 2

    def prepare() -> Callable[[], int] | int:
        raise_nofile()  # one descriptor per client connection, on top of the trunks
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
        agent.start(args.config)
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
            new = load(args)
            agent.reload(new)
            logging.getLogger().setLevel(new.log_level.upper())
        except (configuration.ConfigError, tls.CredentialError) as exc:
            log.error("reload refused, the running configuration stays in force: %s", exc)
        finally:
            notifier.ready(agent.status_line())

    return run_loop(loop, notifier, "agent", agent.status_line, stop, reload, agent.close)


if __name__ == "__main__":
    sys.exit(main())
