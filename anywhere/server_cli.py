"""anywhered: `start` runs the server, `check-config` checks its configuration, and
`proxy`/`agent`/`conn`/`reload` drive a running one (as anywherectl does).

Settings come from /etc/anywhere/anywhered.conf (or `--config PATH`), and every flag given on
the command line overrides the file.  Under systemd the process notifies READY=1 once its
listeners and admin socket exist, pings the watchdog from its loop, reports live counts in
STATUS=, reloads on `anywherectl reload` or SIGHUP (RELOADING=1 … READY=1), and on SIGTERM
stops accepting, lets live connections finish for `drain_timeout` seconds, then exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Callable

from . import config as configuration
from . import ctl, state, tls
from .admin import ApiError
from .common import DEFAULT_ADMIN_SOCKET, default_credential, port_arg, setup_logging, version_line
from .loop import Loop
from .notify import Notifier
from .service import run_loop, with_pidfile
from .server import Server, ServerConfig
from .wire import MAX_TRUNKS

log = logging.getLogger("anywhere.server")


def _hosts(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [h.strip() for h in text.split(",")] if text.strip() else [""]


def _checked(key: str) -> Callable[[str], Any]:
    """The argparse type of the flag that overrides `key`: that key's own check and bounds (config.py)."""
    return configuration.flag_type(configuration.SERVER_SPEC, key)


def _range(key: str) -> str:
    return configuration.describe(configuration.SERVER_SPEC, key)


def _server_options(p: argparse.ArgumentParser) -> None:
    # every default is None: only flags actually given override the configuration file
    p.add_argument("--config", default=None, metavar="PATH",
                   help=f"configuration file (default {configuration.DEFAULT_SERVER_CONFIG}, used if it exists)")
    p.add_argument("-p", "--port", type=_checked("port"), help=f"agent port ({_range('port')})")
    p.add_argument("-s", "--server-id", type=_checked("server_id"),
                   help=f"this server's id, told to agents ({_range('server_id')})")
    p.add_argument("--ca", help="CA certificate (default credential/ca.crt)")
    p.add_argument("--cert", help="server certificate (default credential/server.crt)")
    p.add_argument("--key", help="server private key (default credential/server.key)")
    p.add_argument("--wl", help="global whitelist: comma-separated IPs/CIDRs, v4 or v6 (none: open)")
    p.add_argument("-a", "--api-port", type=port_arg, help="REST API port on every address (the original's 1112; "
                   "off by default; needs --api-token-file)")
    p.add_argument("--api-token-file", help="file (mode 0600) holding the REST API's bearer token")
    p.add_argument("--audit-log", help="audit log: journal, or an absolute file path (default: off)")
    p.add_argument("-g", "--grpc-port", type=port_arg, help="gRPC port (accepted; not used yet)")
    p.add_argument("--bind", help="addresses for the agent port, comma-separated (default: all, v4+v6)")
    p.add_argument("--proxy-bind", help="addresses for proxy ports, comma-separated (default: all, v4+v6)")
    p.add_argument("--admin-socket", help=f"admin API socket (default {DEFAULT_ADMIN_SOCKET})")
    p.add_argument("--state-dir", help="where proxies are stored (default /var/lib/anywhere)")
    p.add_argument("--data-timeout", type=_checked("data_timeout"), metavar="SECONDS",
                   help=f"seconds to wait for the agent's data connection ({_range('data_timeout')})")
    p.add_argument("--heartbeat", type=_checked("heartbeat"), metavar="SECONDS",
                   help=f"heartbeat interval in seconds ({_range('heartbeat')})")
    p.add_argument("--handshake-timeout", type=_checked("handshake_timeout"), metavar="SECONDS",
                   help=f"TLS handshake and hello timeout in seconds ({_range('handshake_timeout')})")
    p.add_argument("--drain-timeout", type=_checked("drain_timeout"), metavar="SECONDS",
                   help=f"seconds live connections may finish on SIGTERM ({_range('drain_timeout')})")
    p.add_argument("--pool-size", type=_checked("pool_size"), metavar="N",
                   help=f"trunks (multiplexed data connections) each agent is asked to keep ({_range('pool_size')}; "
                        f"an agent keeps at most {MAX_TRUNKS}; 0: a data connection of its own per client)")
    p.add_argument("--buffer-budget", type=_checked("buffer_budget"), metavar="SIZE",
                   help="memory for data that clients are slow to read, over all connections "
                        f"({_range('buffer_budget')}); beyond it the agent is asked to wait (nothing is lost)")
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


def load(args: argparse.Namespace) -> tuple[ServerConfig, dict[str, Any]]:
    """The effective settings: defaults < configuration file < flags.  Raises configuration.ConfigError."""
    path = args.config or configuration.DEFAULT_SERVER_CONFIG
    overrides = {
        "port": args.port, "server_id": args.server_id, "ca": args.ca, "cert": args.cert, "key": args.key,
        "whitelist": None if args.wl is None else [e.strip() for e in args.wl.split(",") if e.strip()],
        "bind": _hosts(args.bind), "proxy_bind": _hosts(args.proxy_bind), "admin_socket": args.admin_socket,
        "state_dir": args.state_dir, "data_timeout": args.data_timeout, "heartbeat": args.heartbeat,
        "handshake_timeout": args.handshake_timeout, "drain_timeout": args.drain_timeout, "pool_size": args.pool_size,
        "log_level": args.log_level, "api_token_file": args.api_token_file, "audit_log": args.audit_log,
        "api_listen": None if args.api_port is None else [f":{args.api_port}"],
        "buffer_budget": args.buffer_budget,
    }
    if args.wl is not None:
        try:
            configuration.check_networks(overrides["whitelist"])
        except configuration.ValidateError as exc:
            raise configuration.ConfigError([f"--wl {args.wl}: {exc}"]) from None
    config, extra = configuration.server_config(path, overrides, required=args.config is not None)
    for name in ("ca", "cert", "key"):
        if getattr(config, name) is None:
            setattr(config, name, default_credential({"ca": "ca.crt", "cert": "server.crt", "key": "server.key"}[name]))
    for name in ("ca", "cert", "key", "admin_socket", "state_dir", "api_token_file"):
        if getattr(config, name) is not None:
            setattr(config, name, os.path.abspath(getattr(config, name)))
    return config, extra


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config, extra = load(args)
    except configuration.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    settings: dict[str, Any] = dict(vars(config))
    for name in ("bind", "proxy_bind"):
        settings[name] = ["*" if h == "" else h for h in settings[name]]
    settings.update(extra)
    path = args.config or configuration.DEFAULT_SERVER_CONFIG
    source = path if os.path.exists(path) else f"{path} (absent: built-in defaults)"
    print(f"# {source}: OK; effective settings, flags applied:")
    print("[server]")
    print(configuration.render(settings))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    try:
        config, extra = load(args)
        setup_logging(extra["log_level"], args.log_file)
    except (configuration.ConfigError, OSError) as exc:
        print(f"anywhered: {exc}" if isinstance(exc, OSError) else str(exc), file=sys.stderr)
        return 2
    if args.grpc_port is not None:
        log.warning("--grpc-port %d accepted but not used: the API is HTTP/JSON, on the Unix socket %s and the "
                    "REST port (--api-port)", args.grpc_port, config.admin_socket)

    def prepare() -> Callable[[], int] | int:
        loop = Loop()
        server = Server(loop, config)
        try:
            server.start()
        except (OSError, tls.CredentialError, state.StateError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            loop.close()
            return 1
        return lambda: _serve(loop, server, args, extra)

    return with_pidfile(args, "anywhered", prepare)


def _serve(loop: Loop, server: Server, args: argparse.Namespace, extra: dict[str, Any]) -> int:
    notifier = Notifier()
    drain_timeout = float(extra["drain_timeout"])
    deadline: float | None = None

    def reload() -> dict:
        nonlocal drain_timeout
        notifier.reloading()
        try:
            try:
                new, new_extra = load(args)
                outcome = server.reload(new)
            except configuration.ConfigError as exc:
                log.error("reload refused, the running configuration stays in force:\n%s", exc)
                raise ApiError(422, f"configuration refused, nothing changed:\n{exc}") from None
            except (tls.CredentialError, ValueError) as exc:
                log.error("reload refused, the running configuration stays in force: %s", exc)
                raise ApiError(422, f"configuration refused, nothing changed: {exc}") from None
            logging.getLogger().setLevel(new_extra["log_level"].upper())
            drain_timeout = float(new_extra["drain_timeout"])
            outcome["config"] = args.config or configuration.DEFAULT_SERVER_CONFIG
            return outcome
        finally:
            notifier.ready(server.status_line())

    def on_hup(_signum: int) -> None:
        try:
            reload()
        except ApiError:
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
