"""anywhere: the agent, with the original's flags (-i -s -p --ca --cert --key)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from cryptography import x509
from cryptography.x509.oid import NameOID

from . import tls
from .agent import Agent, AgentConfig
from .common import DEFAULT_AGENT_PORT, __version__, default_credential, setup_logging
from .credentials import valid_agent_id
from .ctl import _port
from .loop import Loop

log = logging.getLogger("anywhere.agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anywhere", description="The Anywhere agent: reach targets in this network for anywhered.")
    parser.add_argument("--version", action="version", version=f"anywhere agent {__version__}")
    parser.add_argument("-i", "--agent-id", help="this agent's id (default: the identity in its certificate)")
    parser.add_argument("-s", "--server-ip", required=True, help="the server's name or address (v4 or v6)")
    parser.add_argument("-p", "--server-port", type=_port, default=DEFAULT_AGENT_PORT, help="the server's agent port (default 1111)")
    parser.add_argument("--server-name", help="the name to expect in the server's certificate (default: --server-ip)")
    parser.add_argument("--ca", help="CA certificate (default credential/ca.crt)")
    parser.add_argument("--cert", help="this agent's certificate (default credential/client.crt)")
    parser.add_argument("--key", help="this agent's private key (default credential/client.key)")
    parser.add_argument("--dial-timeout", type=float, default=5.0, help="seconds to reach a target (default 5)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def certificate_identity(cert_path: str) -> str | None:
    """The commonName of a PEM certificate file, or None if it cannot be read."""
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    cert = args.cert or default_credential("client.crt")
    identity = certificate_identity(cert)
    agent_id = args.agent_id or identity
    if not agent_id:
        print(f"anywhere: no --agent-id given and no identity readable from {cert}", file=sys.stderr)
        return 2
    if not valid_agent_id(agent_id):
        print(f"anywhere: agent id {agent_id!r} is not valid: 1-64 letters, digits, '.', '_' or '-'", file=sys.stderr)
        return 2
    if identity is not None and identity != agent_id:
        print(f"anywhere: --agent-id {agent_id!r} does not match the identity of {cert} ({identity!r}); "
              f"the server would refuse it. Issue a certificate for {agent_id!r} "
              f"(anywherectl credentials issue {agent_id} DIR)", file=sys.stderr)
        return 2
    config = AgentConfig(agent_id=agent_id, server_host=args.server_ip, server_port=args.server_port,
                         server_name=args.server_name, ca=args.ca or default_credential("ca.crt"), cert=cert,
                         key=args.key or default_credential("client.key"), dial_timeout=args.dial_timeout)
    loop = Loop()
    agent = Agent(loop, config)
    try:
        agent.start()
    except tls.CredentialError as exc:
        log.error("cannot start: %s", exc)
        loop.close()
        return 1

    def stop(signum: int) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        loop.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    log.info("anywhere agent %s (%s) starting; server %s:%d", agent_id, __version__, args.server_ip, args.server_port)
    try:
        loop.run()
    finally:
        agent.close()
        loop.close()
    log.info("agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
