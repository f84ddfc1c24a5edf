"""anywhered: `start` runs the server, `check-config` checks its configuration, and
`proxy`/`agent`/`conn`/`reload` drive a running one (as anywherectl does).

Settings come from /etc/anywhere/anywhered.conf (or `--config PATH`), and every flag given on
the command line overrides the file; proxies declared in proxies_dir (server/declared.py) are
read at start and on every reload, with the configuration, and applied all or nothing with it.  Under systemd the process notifies READY=1 once its
listeners and admin socket exist, pings the watchdog from its loop, reports live counts in
STATUS=, reloads on `anywherectl reload` or SIGHUP (RELOADING=1 … READY=1), and on SIGTERM
stops accepting, lets live connections finish for `drain_timeout` seconds, then exits 0.

It parses and wires only (the entry point: the settings from server/settings.py, the daemon from
server/core.py, the loop and signals from service.py); it must not hold any of the server's logic.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Callable

from . import config as configuration
from . import ctl, proxyfile
from .common import default_credential, port_arg, setup_logging, version_line
from .errors import ConfigError, CredentialError, StateError
from .loop import Loop
from .notify import Notifier
from .server import Server, ServerConfig
from .server.declared import read_dir
from .server.settings import DEFAULT_SERVER_CONFIG, deprecated, flag_help, flag_type, server_config
from .service import raise_nofile, run_loop, with_pidfile

log = logging.getLogger("anywhere.server")


def _hosts(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [h.strip() for h in text.split(",")] if text.strip() else [""]


def _server_options(p: argparse.ArgumentParser) -> None:
    """The flags of `start` and `check-config`: each overrides the key of the same name (its check,
    range, default and help from server/settings.py); every default is None, so that only flags
    actually given override the configuration file."""
    p.add_argument("--config", default=None, metavar="PATH",
                   help=f"configuration file (default {DEFAULT_SERVER_CONFIG}, used if it exists)")
    p.add_argument("-p", "--port", type=flag_type("port"), help=flag_help("port"))
    p.add_argument("-s", "--server-id", type=flag_type("server_id"), help=flag_help("server_id"))
    for name in ("ca", "cert", "key"):
        p.add_argument(f"--{name}", help=flag_help(name))
    p.add_argument("--wl", help=flag_help("whitelist"))
    p.add_argument("-a", "--api-port", type=port_arg, help="REST API port on every address (the original's 1112; "
                   "off by default; needs --api-token-file)")
    p.add_argument("--api-token-file", help=flag_help("api_token_file"))
    p.add_argument("--audit-log", help=flag_help("audit_log"))
    p.add_argument("-g", "--grpc-port", type=port_arg, help="gRPC port (accepted; not used yet)")
    p.add_argument("--bind", help=flag_help("bind"))
    p.add_argument("--proxy-bind", help=flag_help("proxy_bind"))
    p.add_argument("--admin-socket", help=flag_help("admin_socket"))
    p.add_argument("--state-dir", help=flag_help("state_dir"))
    p.add_argument("--proxies-dir", help=flag_help("proxies_dir"))
    for name in ("data_timeout", "heartbeat", "handshake_timeout", "drain_timeout", "trunk_idle_timeout"):
        p.add_argument(f"--{name.replace('_', '-')}", type=flag_type(name), metavar="SECONDS", help=flag_help(name))
    p.add_argument("--pool-size", type=flag_type("pool_size"), metavar="N", help=flag_help("pool_size"))
    p.add_argument("--buffer-budget", type=flag_type("buffer_budget"), metavar="SIZE", help=flag_help("buffer_budget"))
    p.add_argument("--log-level", choices=configuration.LOG_LEVELS, help="default info")
    p.add_argument("--log-file", help="append logs to this file instead of stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anywhered", description="The Anywhere server.")
    parser.add_argument("--version", action="version", version=version_line("anywhered"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    start = sub.add_parser("start", help="run the server")
    _server_options(start)
    start.add_argument("--daemon", action="store_true", help="detach (hosts without systemd; needs --pidfile)")
    start.add_argument("--pidfile", help="pid file for --daemon (locked; a second start is refused)")
    start.set_defaults(func=cmd_start)
    check = sub.add_parser("check-config", help="validate the configuration and print the effective settings")
    _server_options(check)
    check.set_defaults(func=cmd_check_config)
    ctl.add_admin_commands(sub)
    return parser


def load(args: argparse.Namespace) -> ServerConfig:
    """The effective settings: defaults < configuration file < flags.  Raises ConfigError."""
    path = args.config or DEFAULT_SERVER_CONFIG
    overrides = {
        "port": args.port, "server_id": args.server_id, "ca": args.ca, "cert": args.cert, "key": args.key,
        "whitelist": None if args.wl is None else [e.strip() for e in args.wl.split(",") if e.strip()],
        "bind": _hosts(args.bind), "proxy_bind": _hosts(args.proxy_bind), "admin_socket": args.admin_socket,
        "state_dir": args.state_dir, "proxies_dir": args.proxies_dir, "data_timeout": args.data_timeout, "heartbeat": args.heartbeat,
        "handshake_timeout": args.handshake_timeout, "drain_timeout": args.drain_timeout, "pool_size": args.pool_size,
        "trunk_idle_timeout": args.trunk_idle_timeout,
        "log_level": args.log_level, "api_token_file": args.api_token_file, "audit_log": args.audit_log,
        "api_listen": None if args.api_port is None else [f":{args.api_port}"],
        "buffer_budget": args.buffer_budget,
    }
    if args.wl is not None:
        try:
            configuration.check_networks(overrides["whitelist"])
        except configuration.ValidateError as exc:
            raise ConfigError([f"--wl {args.wl}: {exc}"]) from None
    config = server_config(path, overrides, required=args.config is not None)
    for name in ("ca", "cert", "key"):
        if getattr(config, name) is None:
            setattr(config, name, default_credential({"ca": "ca.crt", "cert": "server.crt", "key": "server.key"}[name]))
    for name in ("ca", "cert", "key", "admin_socket", "state_dir", "proxies_dir", "api_token_file"):
        if getattr(config, name) is not None:
            setattr(config, name, os.path.abspath(getattr(config, name)))
    return config


def declared(config: ServerConfig) -> list[tuple]:
    """The proxies declared in proxies_dir, as (spec, file), with section and range for one of a range
    (ProxyTable.prepare).  Raises ConfigError naming every problem."""
    return [item.as_declared() for item in read_dir(config.proxies_dir)]


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load(args)
        proxies = read_dir(config.proxies_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    settings: dict[str, Any] = dict(vars(config))
    for name in ("bind", "proxy_bind"):
        settings[name] = ["*" if h == "" else h for h in settings[name]]
    path = args.config or DEFAULT_SERVER_CONFIG
    source = path if os.path.exists(path) else f"{path} (absent: built-in defaults)"
    for note in deprecated(config):
        print(f"anywhered check-config: deprecated: {note}", file=sys.stderr)
    print(f"# {source}: OK; effective settings, flags applied:")
    print("[server]")
    print(configuration.render(settings))
    where = config.proxies_dir if os.path.isdir(config.proxies_dir) else f"{config.proxies_dir} (absent)"
    print(f"\n# {where}: OK; {len(proxies)} prox{'y' if len(proxies) == 1 else 'ies'} declared")
    for item in proxies:
        print(f"\n# {item.file}")
        print(proxyfile.render([item.spec]), end="")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    try:
        config = load(args)
        setup_logging(config.log_level, args.log_file)
        proxies = declared(config)
    except (ConfigError, OSError) as exc:
        print(f"anywhered: {exc}" if isinstance(exc, OSError) else str(exc), file=sys.stderr)
        return 2
    if args.grpc_port is not None:
        log.warning("--grpc-port %d accepted but not used: the API is HTTP/JSON, on the Unix socket %s and the "
                    "REST port (--api-port)", args.grpc_port, config.admin_socket)

    for note in deprecated(config):
        log.warning("deprecated: %s", note)

    def prepare() -> Callable[[], int] | int:
        nofile = raise_nofile()
        if nofile < config.max_agents + config.max_connections:
            log.warning("this process may open %d files, fewer than max_agents + max_connections (%d + %d), one "
                        "descriptor each at least (an agent with live clients holds pool_size more): raise "
                        "LimitNOFILE (ulimit -n) or lower those limits", nofile, config.max_agents,
                        config.max_connections)
        loop = Loop()
        server = Server(loop, config)
        try:
            server.start(proxies)
        except ConfigError as exc:
            log.error("cannot start: the proxies declared in %s:\n%s", config.proxies_dir, exc)
            loop.close()
            return 1
        except (OSError, CredentialError, StateError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            loop.close()
            return 1
        return lambda: _serve(loop, server, args)

    return with_pidfile(args, "anywhered", prepare)


def _serve(loop: Loop, server: Server, args: argparse.Namespace) -> int:
    notifier = Notifier()
    drain_timeout = server.config.drain_timeout
    deadline: float | None = None

    def reload() -> dict:
        nonlocal drain_timeout
        notifier.reloading()
        try:
            try:
                new = load(args)
                outcome = server.reload(new, declared(new))
                for note in deprecated(new):
                    log.warning("deprecated: %s", note)
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays in force:\n%s", exc)
                raise ConfigError([f"configuration refused, nothing changed:\n{exc}"]) from None
            except (CredentialError, ValueError) as exc:
                log.error("reload refused, the running configuration stays in force: %s", exc)
                raise ConfigError([f"configuration refused, nothing changed: {exc}"]) from None
            logging.getLogger().setLevel(new.log_level.upper())
            drain_timeout = new.drain_timeout
            outcome["config"] = args.config or DEFAULT_SERVER_CONFIG
            return outcome
        finally:
            notifier.ready(server.status_line())

    def on_hup(_signum: int) -> None:
        try:
            reload()
        except ConfigError:
            pass  # logged by reload()

    def on_stop(signum: int) -> None:
        nonlocal deadline
        if deadline is not None:
            log.info("received %s again; closing every connection now", signal.Signals(signum).name)
            loop.stop()
            return
        log.info("received %s; stopping: no new connections, up to %g s for live ones to finish",
                 signal.Signals(signum).name, drain_timeout)
        deadline = loop.time() + drain_timeout
        server.begin_drain()
        notifier.stopping(server.status_line())
        check_drained()

    def check_drained() -> None:
        assert deadline is not None  # set by on_stop before the first call
        if server.drained or loop.time() >= deadline:
            if not server.drained:
                log.warning("drain time over: closing %d remaining connection(s)", len(server.tunnels) + len(server.pending))
            loop.stop()
            return
        loop.call_later(0.05, check_drained)

    server.reload_hook = reload
    return run_loop(loop, notifier, "anywhered", server.status_line, on_stop, on_hup, server.close)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (cmd_start, cmd_check_config):
        return args.func(args)
    return ctl.run(args, "anywhered")


if __name__ == "__main__":
    sys.exit(main())
