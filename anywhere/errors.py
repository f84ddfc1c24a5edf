"""One exception tree for Anywhere: what went wrong, and whose fault it is.

Owns the exception classes every module raises; it imports nothing of the project and does no
I/O.  It must not know about HTTP: status codes are the admin API's business (`server/api.py`
maps `Invalid`, `NotFound`, `Conflict` and `NotSaved` to 400, 404, 409 and 500), exit codes the
entry points'.  As in h11, a protocol error says whose fault it is: the peer's
(`RemoteProtocolError`: close that one connection and log it) or ours
(`LocalProtocolError`: a frame we were about to send cannot be encoded).

    AnywhereError
    ├── ProtocolError            the wire protocol (wire.py, mux.py, framed.py, trunk.py)
    │   ├── RemoteProtocolError  the peer sent something invalid
    │   └── LocalProtocolError   we were about to send something invalid
    ├── ConfigError              configuration files and flags: one line per problem
    ├── CredentialError          certificates and keys
    ├── StateError               the state directory
    ├── OperationError           an operation refused; the message says why, for the operator
    │   ├── Invalid              a request that is not valid (the API answers 400)
    │   ├── NotFound             what it names does not exist (404)
    │   ├── Conflict             it clashes with what exists (409)
    │   └── NotSaved             it could not be made durable, so it was not done (500)
    ├── CtlError                 the operator's command could not get an answer
    └── AlreadyRunning           another process holds the pid file
"""

from __future__ import annotations


class AnywhereError(Exception):
    """The root: every error Anywhere raises on purpose."""


class ProtocolError(AnywhereError):
    """The wire protocol was broken (see the subclasses for whose fault it is)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: close that connection, log it."""


class LocalProtocolError(ProtocolError):
    """A frame we were about to send cannot be encoded (too long, out of range)."""


class ConfigError(AnywhereError):
    """One or more problems in a configuration; str() has one line per problem, each naming the
    file, section, key and value (or the flag)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CredentialError(AnywhereError):
    """A certificate or key that cannot be read or used."""


class StateError(AnywhereError):
    """The state directory cannot be read or written safely."""


class OperationError(AnywhereError):
    """An operation refused; `message` is what the operator reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(OperationError):
    """The request is not valid (a bad field, a bad value)."""


class NotFound(OperationError):
    """What the request names does not exist."""


class Conflict(OperationError):
    """The request clashes with what exists (a name or port in use, a port that cannot be bound)."""


class NotSaved(OperationError):
    """The change could not be made durable, so it was not made."""


class CtlError(AnywhereError):
    """anywherectl could not get an answer from the daemon."""


class AlreadyRunning(AnywhereError):
    """Another process holds the pid file."""
