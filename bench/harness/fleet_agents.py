"""One worker process of bench/fleet.py: many agent sessions (anywhere.agent.Agent) over one Loop.

    python bench/harness/fleet_agents.py CREDS_DIR PORT LOG_FILE

Theory of operation: the parent talks to this process through its stdin and stdout, one JSON
object a line each way; every command gets exactly one answer line.

    {"cmd": "add", "ids": [...], "rate": R}   queue these agents, started at R a second
    {"cmd": "drop_pending"}                      forget the agents queued and not started yet
    {"cmd": "close_unwelcomed"}                  close the agents whose session is not up (kept out)
    {"cmd": "report"}                            states, trunks, worst backoff since "reset", RSS
    {"cmd": "reset"}                             forget the worst backoff seen so far
    {"cmd": "quit"}                              close every agent and exit

Every agent is the project's own `Agent` with its own `AgentConfig` and certificate (CREDS_DIR/ID.crt),
all on this process's one loop, connecting to 127.0.0.1:PORT.  Nothing here changes the agent:
backoff is observed by reading each session's `failures` every POLL seconds and keeping the
largest seen since the last "reset" (a session's `failures` only grows until it is welcomed,
and each retry waits at least backoff_min / 2, so a poll faster than that misses no step).

End of stdin (the parent gone) closes everything and exits; SIGINT is ignored (the parent
handles Ctrl-C and ends this process by pid).  Logs (WARNING and above) go to LOG_FILE.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import resource
import signal
import sys

from anywhere.agent import Agent, AgentConfig
from anywhere.agent.session import SessionState
from anywhere.agent.settings import ServerAddress
from anywhere.loop import READ, Loop
from anywhere.wire import MAX_TRUNKS

POLL = 0.2  # seconds between looks at every session's failures
START_TICK = 0.05  # seconds between batches of agents started


def max_backoff_failures(low: float, high: float) -> int:
    """The smallest failure count whose backoff ceiling is `high` (session.backoff_delay)."""
    return 1 + max(0, math.ceil(math.log2(high / low)))


class Fleet:
    def __init__(self, loop: Loop, creds: str, port: int) -> None:
        self.loop = loop
        self.creds = creds
        self.port = port
        self.agents: dict[str, Agent] = {}
        self.pending: collections.deque[str] = collections.deque()
        self.rate = 100.0
        self.worst: dict[str, int] = {}  # agent id -> most failures in a row seen since "reset"
        self.start_errors: list[str] = []
        self._starter = None
        self._inbuf = b""
        loop.call_later(POLL, self._poll)

    # -- agents ---------------------------------------------------------------------------------
    def _config(self, agent_id: str) -> AgentConfig:
        return AgentConfig(agent_id=agent_id, servers=[ServerAddress("127.0.0.1", self.port)],
                           ca=os.path.join(self.creds, "ca.crt"), cert=os.path.join(self.creds, f"{agent_id}.crt"),
                           key=os.path.join(self.creds, f"{agent_id}.key"), allow=["127.0.0.1"],
                           log_level="warning")

    def _start_some(self) -> None:
        self._starter = None
        for _ in range(max(1, round(self.rate * START_TICK))):
            if not self.pending:
                break
            agent_id = self.pending.popleft()
            try:
                agent = Agent(self.loop, self._config(agent_id))
                agent.start()
            except Exception as exc:  # reported, not fatal: the parent sees the count fall short
                if len(self.start_errors) < 5:
                    self.start_errors.append(f"{agent_id}: {exc}")
                continue
            self.agents[agent_id] = agent
        if self.pending:
            self._starter = self.loop.call_later(START_TICK, self._start_some)

    def _poll(self) -> None:
        worst = self.worst
        for agent_id, agent in self.agents.items():
            for link in agent.links.values():
                failures = link.session.failures
                if failures > worst.get(agent_id, 0):
                    worst[agent_id] = failures
        self.loop.call_later(POLL, self._poll)

    def report(self) -> dict:
        states: collections.Counter[str] = collections.Counter()
        trunks = wanted = 0
        threshold = None
        for agent in self.agents.values():
            cfg = agent.config
            threshold = threshold or max_backoff_failures(cfg.backoff_min, cfg.backoff_max)
            for link in agent.links.values():
                session = link.session
                states[session.state.value] += 1
                if session.state is SessionState.WELCOMED:
                    trunks += len(link.trunks.current)
                    wanted += min(session.wanted, MAX_TRUNKS)
        threshold = threshold or max_backoff_failures(AgentConfig.backoff_min, AgentConfig.backoff_max)
        worst = list(self.worst.values())
        return {"started": len(self.agents), "pending": len(self.pending), "states": dict(states),
                "welcomed": states[SessionState.WELCOMED.value], "trunks": trunks, "trunks_wanted": wanted,
                "max_backoff_threshold": threshold, "at_max_backoff": sum(1 for f in worst if f >= threshold),
                "worst_failures": max(worst, default=0), "failed_once": sum(1 for f in worst if f > 0),
                "start_errors": self.start_errors, "rss_kib": rss_kib(), "fds": len(os.listdir("/proc/self/fd"))}

    # -- commands -------------------------------------------------------------------------------
    def on_stdin(self, _mask: int) -> None:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:
            self.quit()
            return
        self._inbuf += data
        while b"\n" in self._inbuf:
            line, self._inbuf = self._inbuf.split(b"\n", 1)
            if line.strip():
                self.handle(json.loads(line))

    def handle(self, msg: dict) -> None:
        cmd = msg.get("cmd")
        if cmd == "add":
            self.rate = float(msg.get("rate", self.rate))
            self.pending.extend(msg["ids"])
            if self._starter is None:
                self._starter = self.loop.call_later(0, self._start_some)
            answer({"ok": True})
        elif cmd == "drop_pending":
            dropped = len(self.pending)
            self.pending.clear()
            answer({"ok": True, "dropped": dropped})
        elif cmd == "close_unwelcomed":
            self.pending.clear()
            gone = [a for a, agent in self.agents.items()
                    if not all(link.session.state is SessionState.WELCOMED for link in agent.links.values())]
            for agent_id in gone:
                self.agents.pop(agent_id).close()
                self.worst.pop(agent_id, None)
            answer({"ok": True, "closed": len(gone)})
        elif cmd == "report":
            answer(self.report())
        elif cmd == "reset":
            self.worst = {}
            answer({"ok": True})
        elif cmd == "quit":
            answer({"ok": True})
            self.quit()
        else:
            answer({"error": f"unknown command {cmd!r}"})

    def quit(self) -> None:
        self.pending.clear()
        for agent in self.agents.values():
            agent.close()
        self.loop.stop()


def answer(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    creds, port, log_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(filename=log_file, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = Loop()
    fleet = Fleet(loop, creds, port)
    os.set_blocking(0, False)
    loop.register(sys.stdin.fileno(), READ, fleet.on_stdin)
    answer({"ready": True, "pid": os.getpid(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]})
    try:
        loop.run()
    finally:
        loop.close()


if __name__ == "__main__":
    main()
