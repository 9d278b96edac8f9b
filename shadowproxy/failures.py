"""Why an upstream call has no (complete) response: one word from a fixed list.

The kind is what code, SQL, metrics and the report match on; the human-readable detail
(``connect: Connection refused``) goes beside it in ``error`` and is never parsed.

    timeout    no complete answer within the call's ``timeout_s``
    connect    the connection could not be made (refused, unreachable, TLS handshake)
    reset      the upstream reset the connection (ECONNRESET, EPIPE)
    closed     the connection ended before the response did (upstream or client closed it)
    protocol   the upstream's answer is not acceptable HTTP/1.1 (malformed, 101, head too large)
    dropped    a shadow call not made: ``max_in_flight`` reached
    skipped    a shadow call not made on purpose (request body over the mirror limit)
    shutdown   the proxy was stopping and the call outlived the grace period
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """The kinds of failure of an upstream call (``responses.error_kind``)."""

    TIMEOUT = "timeout"
    CONNECT = "connect"
    RESET = "reset"
    CLOSED = "closed"
    PROTOCOL = "protocol"
    DROPPED = "dropped"
    SKIPPED = "skipped"
    SHUTDOWN = "shutdown"


ERROR_KINDS: tuple[str, ...] = tuple(kind.value for kind in ErrorKind)


def kind_of_legacy_error(error: str | None) -> ErrorKind | None:
    """The kind of an ``error`` text written before kinds existed (old spool files).

    Kept in step with the mapping in migration ``004_error_kinds.sql``.
    """
    if error is None:
        return None
    if error.startswith("timeout"):
        return ErrorKind.TIMEOUT
    if error.startswith("connect"):
        return ErrorKind.CONNECT
    if error.startswith("dropped"):
        return ErrorKind.DROPPED
    if error.startswith("skipped"):
        return ErrorKind.SKIPPED
    if error.startswith("malformed"):
        return ErrorKind.PROTOCOL
    if "shutting down" in error:
        return ErrorKind.SHUTDOWN
    if "reset by peer" in error or "Broken pipe" in error:
        return ErrorKind.RESET
    return ErrorKind.CLOSED
