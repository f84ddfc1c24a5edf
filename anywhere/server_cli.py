"""anywhered: `start` runs the server; `proxy`, `agent` and `conn` drive a running one (as anywherectl)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import ctl, state, tls
from .common import (DEFAULT_ADMIN_SOCKET, DEFAULT_AGENT_PORT, DEFAULT_STATE_DIR, __version__,
                     default_credential, setup_logging)
from .loop import Loop
from .server import Server, ServerConfig, parse_whitelist

log = logging.getLogger("anywhere.server")


def _hosts(text: str) -> list[str]:
    return [h.strip() for h in text.split(",")] if text else [""]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anywhered", description="The Anywhere server.")
    parser.add_argument("--version", action="version", version=f"anywhered {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    start = sub.add_parser("start", help="run the server in the foreground")
    start.add_argument("-p", "--port", type=ctl._port, default=DEFAULT_AGENT_PORT, help="agent port (default 1111)")
    start.add_argument("-s", "--server-id", default="anywhered", help="this server's id, told to agents")
    start.add_argument("--ca", default=None, help="CA certificate (default credential/ca.crt)")
    start.add_argument("--cert", default=None, help="server certificate (default credential/server.crt)")
    start.add_argument("--key", default=None, help="server private key (default credential/server.key)")
    start.add_argument("--wl", default="", help="global whitelist: comma-separated IPs/CIDRs, v4 or v6 (none: open)")
    start.add_argument("-a", "--api-port", type=ctl._port, help="REST API port (accepted; not used yet)")
    start.add_argument("-g", "--grpc-port", type=ctl._port, help="gRPC port (accepted; not used yet)")
    start.add_argument("--bind", default="", help="addresses for the agent port, comma-separated (default: all, v4+v6)")
    start.add_argument("--proxy-bind", default="", help="addresses for proxy ports, comma-separated (default: all, v4+v6)")
    start.add_argument("--admin-socket", default=DEFAULT_ADMIN_SOCKET, help=f"admin API socket (default {DEFAULT_ADMIN_SOCKET})")
    start.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"where proxies are stored (default {DEFAULT_STATE_DIR})")
    start.add_argument("--data-timeout", type=_positive, default=10.0, help="seconds to wait for the agent's data connection (default 10)")
    start.add_argument("--heartbeat", type=_positive, default=5.0, help="heartbeat interval in seconds (default 5)")
    start.add_argument("--handshake-timeout", type=_positive, default=10.0, help="TLS handshake and hello timeout (default 10)")
    start.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    start.set_defaults(func=cmd_start)
    ctl.add_admin_commands(sub)
    return parser


def cmd_start(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        parse_whitelist(args.wl, "--wl")
    except ValueError as exc:
        print(f"anywhered: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        port=args.port, bind=_hosts(args.bind), proxy_bind=_hosts(args.proxy_bind), server_id=args.server_id,
        ca=args.ca or default_credential("ca.crt"), cert=args.cert or default_credential("server.crt"),
        key=args.key or default_credential("server.key"),
        whitelist=[e.strip() for e in args.wl.split(",") if e.strip()], admin_socket=args.admin_socket,
        state_dir=args.state_dir, data_timeout=args.data_timeout, heartbeat=args.heartbeat,
        handshake_timeout=args.handshake_timeout)
    for flag, value in (("--api-port", args.api_port), ("--grpc-port", args.grpc_port)):
        if value is not None:
            log.warning("%s %d accepted but not used yet: the admin API is on the Unix socket %s",
                        flag, value, args.admin_socket)
    loop = Loop()
    server = Server(loop, config)
    try:
        server.start()
    except (OSError, tls.CredentialError, state.StateError) as exc:
        log.error("cannot start: %s", exc)
        loop.close()
        return 1

    def stop(signum: int) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        loop.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    try:
        loop.run()
    finally:
        server.close()
        loop.close()
    log.info("anywhered stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_start:
        return cmd_start(args)
    return ctl.run(args, "anywhered")


if __name__ == "__main__":
    sys.exit(main())
