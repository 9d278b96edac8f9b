"""Configuration: the YAML file, validated once at the edge into frozen pydantic models.

``load_config(path)`` reads the file and what it takes from the environment (``${VAR}``
interpolation, ``SHADOWPROXY_DATABASE_URL``); everything below it receives these frozen
values (only ``control.py`` looks into the raw file, for the ``data_dir`` of one that does
not validate). Every problem in a file is reported at once as ``FILE:LINE: key.path:
message``.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shadowproxy.compare.config import CompareConfig, FrozenModel
from shadowproxy.durations import finite_seconds, format_age, parse_age
from shadowproxy.errors import ConfigError

DATABASE_URL_ENV = "SHADOWPROXY_DATABASE_URL"
DEFAULT_REDACT_HEADERS = ("authorization", "cookie", "set-cookie", "proxy-authorization",
                          "x-api-key")
DEFAULT_REDACT_QUERY = ("api_key", "apikey", "api-key", "x-api-key", "key", "token",
                        "access_token", "refresh_token", "id_token", "auth", "authorization",
                        "password", "passwd", "pwd", "secret", "client_secret", "signature",
                        "sig", "session", "session_id", "sessionid", "jwt", "x-amz-signature",
                        "x-amz-security-token", "x-goog-signature")
"""Query parameters whose values are secrets by custom: API keys, OAuth tokens, passwords,
the signatures of presigned URLs (AWS SigV4, Google Cloud Storage, Azure SAS ``sig``)."""
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})
"""Request headers every upstream gets from the proxy, which frame the request (its target
and its body's length): a shadow's ``remove_headers`` cannot take them away."""
FORWARDING_HEADERS = frozenset({
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"})
"""Request headers the proxy writes for every upstream (``proxy._head_parts``) that no
request needs: a shadow's ``remove_headers`` naming one takes the proxy's line away
(``mirror.CompiledShadow.tail_skip``), e.g. to keep the client's address from a candidate
hosted by a third party."""
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
"""RFC 9110 §9 and PATCH (RFC 5789): what ``match.methods`` accepts."""

_FOREVER = {
    "timeout_s": "a call the upstream never answers would be waited for without end; give "
                 "the longest an answer may take, e.g. 300",
    "max_duration_s": "an answer that streams without end would hold its call and its "
                      "record for ever; give the longest a whole answer may take, e.g. 3600",
    "upstream_idle_s": "an idle connection would be reused however long ago the upstream "
                       "may have closed it; give less than the upstreams' keep-alive timeout "
                       "(the default, 1.5, suits most servers)",
    "client_timeout_s": "a client that sends or reads nothing would hold its connection for "
                        "ever; give the longest pause a client may make, e.g. 600",
    "shutdown_grace_s": "a stop would wait for ever on a call or a database that never "
                        "answers; give the longest a stop may take, e.g. 60",
    "maintenance_interval_s": "the maintenance would run only at start, and the partitions "
                              "made ahead would run out; the default is 300",
    "watch_interval_s": "the file would never be read again; to not watch it, write "
                        "watch: false",
}
"""What to write instead of infinity, by key: none of these waits or intervals can be
endless (``durations.finite_seconds``)."""


def _finite(value: float, info: ValidationInfo) -> float:
    return finite_seconds(value, _FOREVER.get(info.field_name or "", "give a number"))


PositiveSeconds = Annotated[float, Field(gt=0), AfterValidator(_finite)]
"""Seconds above 0 and finite (YAML's ``.inf`` is above 0)."""
MIN_WATCH_INTERVAL_S = 0.05
"""The shortest ``watch_interval_s``: a poll reads and hashes the file on the event loop."""


def url_user_problem(url: str) -> str | None:
    """Why ``url``'s user part (``http://user:token@host``) cannot be used, in words that do
    not quote it; None when it has none. An upstream is called at its host and port alone:
    the user name and password were dropped, no ``Authorization`` was made of them, and the
    upstream answered 401 to every call of a configuration that looked complete."""
    authority = url.partition("://")[2]
    for end in "/?#":  # where urlsplit ends the authority too
        authority = authority.partition(end)[0]
    if "@" not in authority:
        return None
    return ("a user name or password in the URL (before '@') is never sent: no Authorization "
            "header is made of it")


_URL_PARTS = re.compile(r"(?s)(?P<head>[^/?#]*://)?(?P<user>[^/?#]*@)?(?P<rest>[^?#]*)"
                        r"(?:\?(?P<query>[^#]*))?(?P<fragment>#.*)?")
_QUERY_PART = re.compile(r"[^&;]+")


def shown_url(url: str) -> str:
    """``url`` as a message may quote it: its user part as ``***``, the value of each query
    parameter and the fragment as ``***`` (``http://***@host/p?api_key=***#***``). The
    message of a refused URL goes to stderr, to the log and to the answer of POST
    /-/reload: it quoted a password before '@' or an API key in the query whole."""
    m = _URL_PARTS.fullmatch(url)
    if m is None:  # never: every part of the pattern is optional
        return "***"
    out = (m.group("head") or "") + ("***@" if m.group("user") else "") + m.group("rest")
    if m.group("query") is not None:
        out += "?" + _QUERY_PART.sub(
            lambda p: p.group().partition("=")[0] + "=***" if "=" in p.group() else "***",
            m.group("query"))
    if m.group("fragment"):
        out += "#***" if len(m.group("fragment")) > 1 else "#"
    return out


_PRIMARY_CREDENTIALS = ("the primary gets each client's own Authorization header, and the "
                        "proxy adds none; take it out of the URL")
_SHADOW_CREDENTIALS = ("take it out of the URL and set the header in this shadow's set_headers, "
                       'e.g. {Authorization: "Bearer ${TOKEN}"}, or "Basic " and the base64 of '
                       "user:password")


def _check_http_url(value: str, credentials: str) -> str:
    """An upstream's URL, checked; ``credentials``: what to do instead of a user part."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL (got {shown_url(value)!r})")
    problem = url_user_problem(value)
    if problem is not None:
        raise ValueError(f"{problem}; {credentials}. The URL is not repeated here: it holds "
                         "credentials")
    if not parts.hostname:
        raise ValueError(f"URL has no host (got {shown_url(value)!r})")
    try:
        # As the upstream pool writes it in the Host header: refused here, not by a
        # traceback at start or by every worker of a reload that was said to be applied.
        parts.hostname.encode("idna")
    except UnicodeError as exc:
        reason = str(exc.__cause__ or exc)  # "label empty or too long", "Invalid character"
        raise ValueError(f"URL has an invalid host name ({reason}): a host name is labels of "
                         f"1 to 63 characters joined by dots (got {shown_url(value)!r})") from exc
    if parts.query or parts.fragment:
        raise ValueError(f"URL must not carry a query or fragment (got {shown_url(value)!r})")
    # Non-ASCII is sent as UTF-8, which servers take; a space or control character is not.
    bad = next((c for c in parts.path if c <= " " or c == "\x7f"), None)
    if bad is not None:
        # The path starts the request line of every call: a space there splits it, and the
        # upstream answered each request 400.
        raise ValueError(f"URL path holds {bad!r}, which a request line cannot; "
                         f"percent-encode it (a space is %20) (got {shown_url(value)!r})")
    try:
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError as exc:
        raise ValueError(f"URL has an invalid port (got {shown_url(value)!r})") from exc
    return value.rstrip("/")


def _check_listen(value: str) -> str:
    _, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:8080, or :PORT for every "
                         f"interface (got {value!r})")
    return value


_WILDCARDS = ("0.0.0.0", "::")
_SAME_ADDRESS = ("admin_listen must differ from listen (the same port on an address both "
                 "bind, e.g. localhost and 127.0.0.1, or on every interface); give the admin "
                 "endpoints their own port, e.g. :9090")
CROSS_CHECK = "cross_check"
"""The error type of the model checks that ``load_config`` also makes on the raw data (see
``_cross_checks``), where each problem is reported at its own line: a file's errors of this
type are already listed, a ``Settings`` built in code still gets them."""


def same_address(listen: str, admin: str) -> bool:
    """Whether the client listener and the admin one (``HOST:PORT`` each) would collide
    (port 0 never does): the same port on an address both bind, or on every interface."""
    (host_a, port_a), (host_b, port_b) = split_listen(listen), split_listen(admin)
    if not port_a == port_b != 0:
        return False
    if host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS:
        return True
    # Different spellings of one address (localhost and 127.0.0.1, 127.1): resolved as each
    # listener binds, else the proxy failed at start blaming "another process" for its own
    # port. Only a config naming one port twice pays for the look-up.
    listen_family = socket.AF_INET6 if ":" in host_a else socket.AF_INET  # app._bound
    bound_a = _bound_addresses(host_a, listen_family)
    bound_b = _bound_addresses(host_b, socket.AF_UNSPEC)  # every address (aiohttp's site)
    if bound_a is None or bound_b is None:
        return False  # a name that does not resolve: the start says so
    return bool(bound_a & bound_b) or any(a in _WILDCARDS for a in bound_a | bound_b)


def _bound_addresses(host: str, family: int) -> set[str] | None:
    """The addresses a listener on ``host`` of ``family`` binds, or None if it does not
    resolve."""
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return None
    if family != socket.AF_UNSPEC:
        infos = infos[:1]  # socket.bind takes the first address of a name
    return {str(info[4][0]) for info in infos}


def _same_url(a: str, b: str) -> bool:
    """Whether two upstream URLs name the same service (scheme, host, port and path)."""
    def key(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or {"http": 80, "https": 443}.get(scheme)
        except ValueError:
            port = None
        return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")

    try:
        return key(a) == key(b)
    except ValueError:  # a malformed URL ("http://[::1"): reported by its own field's check
        return False


def split_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ``:PORT`` (the Go and Traefik form) is every IPv4
    interface, as ``0.0.0.0:PORT``; ``[::1]:PORT`` loses its brackets."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


class Upstream(FrozenModel):
    """Where the primary model service listens."""

    url: str
    timeout_s: PositiveSeconds = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_http_url(value, _PRIMARY_CREDENTIALS)


def _check_set_json_path(path: str) -> str:
    from shadowproxy.bodyedit import parse_path

    parse_path(path)  # raises ValueError saying what a path looks like
    return path


SetJsonPath = Annotated[str, AfterValidator(_check_set_json_path)]


def _check_header_name(value: str) -> str:
    from shadowproxy.http1 import HEADER_NAME

    if not HEADER_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a header name (letters, digits and "
                         "!#$%&'*+.^_`|~- only)")
    return value


HeaderName = Annotated[str, AfterValidator(_check_header_name)]
"""A header name (RFC 9110 §5.1 token): a list of them is checked item by item, so that a
typo (a space, a colon) is reported at its own line instead of matching no header."""


class Shadow(FrozenModel):
    """A shadow model service: it gets a copy of each sampled request; its answer is recorded."""

    name: str = Field(pattern=_NAME)
    url: str
    enabled: bool = True
    """False: not mirrored to (its counters and records stay), until a reload enables it."""
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    sample_key: str | None = None
    timeout_s: PositiveSeconds = 30.0
    max_duration_s: PositiveSeconds = 600.0
    """The whole call's bound, a body still flowing included (``timeout_s`` is re-armed
    while it flows): a shadow that streams or trickles without end holds a call in flight
    and the record of its request."""
    max_in_flight: int = Field(default=100, ge=1)
    set_headers: dict[str, str] = Field(default_factory=dict)
    remove_headers: list[str] = Field(default_factory=list)
    set_json: dict[SetJsonPath, Any] = Field(default_factory=dict)
    """Fields set in this shadow's copy of a JSON request body (``bodyedit.JsonEdits``)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_http_url(value, _SHADOW_CREDENTIALS)

    @field_validator("set_headers")
    @classmethod
    def _set_headers(cls, value: dict[str, str]) -> dict[str, str]:
        from shadowproxy.http1 import REQUEST_REWRITTEN, header_value_problem, hop_by_hop_problem

        seen: dict[str, str] = {}
        for name, text in value.items():
            _check_header_name(name)
            # Names are case-insensitive: both lines went to the shadow, which read either.
            first = seen.setdefault(name.lower(), name)
            if first != name:
                raise ValueError(f"{name} is set twice ({first} and {name}: header names "
                                 "are case-insensitive); keep one")
            problem = hop_by_hop_problem(name)
            if problem is not None:
                raise ValueError(problem)
            if name.lower().encode() in REQUEST_REWRITTEN:
                raise ValueError(f"{name} is written by the proxy itself (framing, the "
                                 "shadow's host, forwarding and request id headers): it "
                                 "cannot be set")
            problem = header_value_problem(text)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")
        return value

    @field_validator("remove_headers")
    @classmethod
    def _remove_headers(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_header_name(name)
            # The proxy writes these itself for every upstream, and the request cannot go
            # without them: removing the client's copy would still send the proxy's.
            if name.lower() in FRAMING_HEADERS:
                raise ValueError(f"{name} frames the request (Host, Content-Length, "
                                 "Transfer-Encoding are written by the proxy itself for "
                                 "every upstream): it cannot be removed")
        return value

    @field_validator("set_json")
    @classmethod
    def _set_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        from shadowproxy.bodyedit import JsonEdits

        JsonEdits(value)  # raises ValueError naming a value that cannot be written as JSON
        return value

    @model_validator(mode="after")
    def _duration_covers_timeout(self) -> Shadow:
        if self.max_duration_s < self.timeout_s:
            raise ValueError(f"max_duration_s ({self.max_duration_s:g}) is shorter than "
                             f"timeout_s ({self.timeout_s:g}): it bounds the whole call, "
                             "so it is at least the time allowed to the response head")
        return self

    @field_validator("sample_key")
    @classmethod
    def _sample_key(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"header:[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
            raise ValueError(f"expected 'header:NAME', e.g. 'header:X-User-Id' (got {value!r})")
        return value


class Match(FrozenModel):
    """Which requests a route takes: the longest matching path prefix wins."""

    path_prefix: str = "/"
    methods: list[str] | None = None

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"expected a path starting with '/' (got {value!r})")
        # A path is matched as the client sent it, which is ASCII: 'é' arrives as %C3%A9 and
        # a raw byte beyond ASCII gets 400. A prefix holding one matched no request, and
        # its route was dead without a word.
        bad = next((c for c in value if not " " < c < "\x7f"), None)
        if bad is not None:
            encoded = quote(value, safe="/%:@!$&'()*+,;=-._~")
            raise ValueError(f"{bad!r} is in no request path: clients send it percent-"
                             f"encoded, and the prefix is matched with the path as sent; "
                             f"write it so, e.g. {encoded!r} (got {value!r})")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("expected at least one method, or leave 'methods' out for all")
        methods = [m.upper() for m in value]
        unknown = [m for m in value if m.upper() not in HTTP_METHODS]
        if unknown:
            raise ValueError(f"not an HTTP method: {', '.join(map(repr, unknown))} "
                             f"(expected some of {', '.join(HTTP_METHODS)})")
        return methods


class Route(FrozenModel):
    """One primary, its shadows, and how the report compares them."""

    name: str = Field(pattern=_NAME)
    match: Match = Field(default_factory=Match)
    preserve_host: bool = False
    retry_non_idempotent: bool = False
    primary: Upstream
    shadows: list[Shadow] = Field(default_factory=list)
    compare: CompareConfig | None = None

    @model_validator(mode="after")
    def _unique_shadows(self) -> Route:
        names = [s.name for s in self.shadows]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PydanticCustomError(
                CROSS_CHECK, "shadow names must be unique within a route (repeated: {dupes})",
                {"dupes": str(dupes)})
        if "primary" in names:
            raise ValueError("a shadow may not be called 'primary': that name is the primary's")
        return self


class DatabaseConfig(FrozenModel):
    """Where records go; ``url: null`` starts the embedded PostgreSQL under ``data_dir``."""

    url: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        scheme = None if value is None else urlsplit(value).scheme
        if scheme is not None and scheme not in ("postgres", "postgresql"):
            # Only the scheme is named: the URL may hold a password, and this message goes
            # to the log, to stderr and to the answer of POST /-/reload.
            got = f"the scheme {scheme!r}" if scheme else "no scheme"
            raise ValueError(f"expected a postgresql:// URL, got {got} (the URL is not "
                             "repeated here: it may hold a password)")
        if value is not None:
            problem = _database_url_problem(value)
            if problem:
                raise ValueError(f"this URL cannot be read: {problem}; in a user name or "
                                 "password, write / ? # @ and % percent-encoded (%2F %3F %23 "
                                 "%40 %25). The URL is not repeated here: it may hold a "
                                 "password")
            for port in _url_ports(value):
                if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                    # Named alone: the URL may hold a password.
                    shown = port if port.isascii() and port.isdigit() else repr(port)
                    raise ValueError(f"the port {shown} is not a number from 1 to 65535; "
                                     "correct it, or leave it out for PostgreSQL's 5432")
        return value


def _database_url_problem(url: str) -> str | None:
    """Why the driver (asyncpg) cannot read ``url`` as the URL it was meant to be, in words
    that do not quote it; None if it can. A password with an unencoded ``/``, ``?`` or ``#``
    ends the URL's authority early: asyncpg then took part of the password for a port (a
    ValueError quoting it, a traceback from the CLI) or a query (the same), and the proxy
    spooled for good, ready, as if the database were down for a while."""
    parts = urlsplit(url)
    authority_end = url.index("//") + 2 + len(parts.netloc) if "//" in url else 0
    if "@" in url[authority_end:]:
        return "an '@' comes after the host"
    if parts.netloc.count("@") > 1:
        return "the part before the host holds an '@'"
    try:
        parse_qs(parts.query, strict_parsing=True)
    except ValueError:
        return "its query (after '?') is not name=value pairs joined by '&'"
    return None


def _url_ports(url: str) -> list[str]:
    """The ports a database URL names, as asyncpg reads them: after each of its hosts
    (``h1:5432,h2,[::1]:5433``) and in ``?port=`` (comma-separated too). Checked with the
    configuration: asyncpg's own parse fails with a bare ValueError (the socket's with an
    OverflowError) when the command connects, which ended it with a traceback."""
    parts = urlsplit(url)
    ports = []
    for host in parts.netloc.rpartition("@")[2].split(","):
        after = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in after:
            ports.append(after.rpartition(":")[2])
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "port":
            ports.extend(value.split(","))
    return [p for p in ports if p]


class RecordingConfig(FrozenModel):
    """What is stored, and how records are batched on their way to PostgreSQL."""

    max_body_bytes: int = Field(default=1_048_576, ge=0)
    max_decompressed_bytes: int = Field(default=8_388_608, ge=0)
    redact_headers: list[HeaderName] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_HEADERS))
    redact_json: list[str] = Field(default_factory=list)
    redact_query: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACT_QUERY))
    queue_max_records: int = Field(default=50_000, ge=1)
    queue_max_bytes: int = Field(default=134_217_728, ge=1)
    batch_max_records: int = Field(default=1_000, ge=1)
    write_after_records: int = Field(default=16, ge=1)
    flush_interval_ms: int = Field(default=200, ge=1)
    spool_max_bytes: int = Field(default=1_073_741_824, ge=0)

    @field_validator("redact_headers", "redact_query")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [v.lower() for v in value]

    @field_validator("redact_json")
    @classmethod
    def _json_paths(cls, value: list[str]) -> list[str]:
        from shadowproxy.recorder.bodies import parse_json_path

        for path in value:
            parse_json_path(path)  # raises ValueError with what is expected
        return value


def _age(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        # A bare number would leave the unit to guess: 30 seconds or 30 days?
        return parse_age(repr(value))  # raises, naming what is expected
    return parse_age(value)


Age = Annotated[timedelta, BeforeValidator(_age), PlainSerializer(format_age, when_used="json")]
"""A duration written as ``30d``, ``12h``, ``90m`` (``durations.parse_age``)."""

PARTITION_PERIODS = ("hour", "day", "week")
PARTITION_SECONDS = {"hour": 3600, "day": 86400, "week": 604800}
PARTITIONS_AHEAD = {"hour": 48, "day": 7, "week": 4}
"""Partitions made after the current one (``store.partitions.ensure``): two days of hours, a
week of days, a month of weeks, so that a proxy whose maintenance fails for that long still
writes to partitions."""


class StorageConfig(FrozenModel):
    """How records are laid out in time: partitions and retention (docs/sql.md)."""

    partition: Literal["hour", "day", "week"] = "day"
    """The time range of each partition of requests and responses, in UTC (a week starts
    on Monday). A change applies to the partitions created from then on."""
    retention: Age | None = None
    """Records older than this are dropped by the running proxy (``null``: kept until
    ``shadowproxy prune``)."""
    maintenance_interval_s: PositiveSeconds = 300.0
    """How often the proxy creates partitions ahead and applies the retention."""

    @field_validator("maintenance_interval_s")
    @classmethod
    def _before_the_partitions_ahead_end(cls, value: float, info: ValidationInfo) -> float:
        # Each run makes the partitions of the next PARTITIONS_AHEAD periods: with runs
        # further apart, the records of the time between went to the DEFAULT partition,
        # whose rows the next run moves while the recorder's writes to it wait.
        period = info.data.get("partition")  # absent when it is invalid: reported there
        if period not in PARTITIONS_AHEAD:
            return value
        ahead = PARTITIONS_AHEAD[period] * PARTITION_SECONDS[period]
        if value >= ahead:
            raise ValueError(
                f"expected less than the partitions made ahead, {PARTITIONS_AHEAD[period]} "
                f"{period}s ({ahead} s) with partition: {period} (got {value:.15g}): the "
                "records of the time between two runs would go to the DEFAULT partition; "
                "run it more often (the default is 300)")
        return value


class Limits(FrozenModel):
    """Bounds that protect the proxy from large or slow input."""

    max_mirror_body_bytes: int = Field(default=16_777_216, ge=0)
    max_header_bytes: int = Field(default=65_536, ge=1024)
    max_response_header_bytes: int = Field(default=65_536, ge=1024)
    upstream_idle_s: PositiveSeconds = 1.5
    client_timeout_s: PositiveSeconds = 60.0
    shutdown_grace_s: PositiveSeconds = 10.0


class Settings(FrozenModel):
    """The whole configuration file."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str | None = "127.0.0.1:9090"
    access_log: bool = False
    admin_token: str | None = None
    watch: bool = False
    """Reload when the file's content changes (polled; see ``configwatch.py``)."""
    watch_interval_s: PositiveSeconds = 1.0
    workers: int = Field(default=1, ge=1, le=64)
    data_dir: Path = Path(".shadowproxy")
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    recording: RecordingConfig = Field(default_factory=RecordingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    limits: Limits = Field(default_factory=Limits)
    routes: list[Route] = Field(min_length=1)

    _listen = field_validator("listen")(_check_listen)

    @field_validator("listen", "admin_listen", mode="before")
    @classmethod
    def _address_text(cls, value: object) -> object:
        # `listen: 8080` is read by YAML as a number: say what to write, not "a valid string".
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f'expected "HOST:PORT", e.g. "127.0.0.1:{value}", or ":{value}" '
                             f"for every interface (got the number {value})")
        return value

    @field_validator("database", mode="before")
    @classmethod
    def _database_block(cls, value: object) -> object:
        if isinstance(value, str):
            raise ValueError("expected a block with the URL under url: (database: {url: "
                             "postgresql://...}), or url: null for the embedded database; "
                             "SHADOWPROXY_DATABASE_URL also sets it")
        return value

    @field_validator("watch_interval_s")
    @classmethod
    def _watch_interval(cls, value: float) -> float:
        # Each poll reads and hashes the file on the event loop that serves clients: an
        # interval of a microsecond was accepted and kept a core busy with it.
        if value < MIN_WATCH_INTERVAL_S:
            raise ValueError(f"expected at least {MIN_WATCH_INTERVAL_S:g} s (got {value:g}): "
                             "each poll reads the file on the proxy's event loop; the "
                             "default, 1, sees an edit within 2 s")
        return value

    @field_validator("admin_listen")
    @classmethod
    def _admin(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value)

    @field_validator("admin_token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        # "" is no token: `admin_token: "${SHADOWPROXY_ADMIN_TOKEN:-}"` makes it optional.
        return value or None

    @model_validator(mode="after")
    def _unique_routes(self) -> Settings:
        names = [r.name for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PydanticCustomError(CROSS_CHECK,
                                      "route names must be unique (repeated: {dupes})",
                                      {"dupes": str(dupes)})
        if self.admin_listen is not None and same_address(self.listen, self.admin_listen):
            raise PydanticCustomError(CROSS_CHECK, _SAME_ADDRESS)
        return self

    def route(self, name: str) -> Route:
        """The route called ``name``; KeyError lists the known names."""
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(f"no route named {name!r}; the config has {[r.name for r in self.routes]}")


# --- loading --------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Located:
    """The parsed YAML as plain data, plus the line of every key path."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        self.problems: list[tuple[tuple[str | int, ...], str]] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: tuple[str | int, ...]) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar(key_node, path + (str(getattr(key_node, "value", "")),))
                if not isinstance(key, str):
                    key = str(key)
                if key in out:
                    self.problems.append((path + (key,), "duplicate key"))
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        value = self._scalar(node, path)
        if isinstance(value, str):
            value = self._interpolate(value, path)
        return value

    def _scalar(self, node: yaml.Node, path: tuple[str | int, ...]) -> Any:
        """The value of a scalar at ``path``; one YAML cannot construct (a tag it does not
        know, a date that is none) is a problem at its line, and its text stands in for it."""
        if not isinstance(node, yaml.ScalarNode):
            self.problems.append(((), f"line {node.start_mark.line + 1}: expected a plain key"))
            return str(node.start_mark)
        self.lines.setdefault(path, node.start_mark.line + 1)
        if node.tag not in self._constructor.yaml_constructors:
            self.problems.append((path, f"the tag {node.tag} is not supported (the file is "
                                        "plain YAML; ${VAR} reads the environment)"))
            return node.value
        try:
            return self._constructor.construct_object(node)
        except Exception as exc:  # PyYAML's constructors raise what their parsing raises
            kind = node.tag.rsplit(":", 1)[-1]
            reason = f" ({exc})" if isinstance(exc, ValueError) else ""
            self.problems.append((path, f"cannot read {node.value!r} as a YAML {kind}"
                                        f"{reason}; quote it if it is text"))
            return node.value

    def _interpolate(self, value: str, path: tuple[str | int, ...]) -> str:
        def replace(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            self.problems.append((path, f"environment variable {name} is not set "
                                        f"(set it, or write ${{{name}:-default}})"))
            return m.group(0)

        return _VAR.sub(replace, value)

    def line_of(self, path: tuple[str | int, ...]) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _cross_checks(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems between keys, checked on the raw data so that each is reported at its own
    line together with every other problem (pydantic skips model checks after field
    errors): repeated route and shadow names, a shadow that is its route's primary, an
    admin listener on the proxy's address."""
    found = _duplicate_names(data)
    listen, admin = data.get("listen", "127.0.0.1:8080"), data.get("admin_listen")
    if isinstance(listen, str) and isinstance(admin, str):
        try:
            if same_address(listen, admin):
                found.append((("admin_listen",), _SAME_ADDRESS))
        except ValueError:
            pass  # a malformed address is reported by its own field
    routes = data.get("routes")
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        primary = route.get("primary")
        url = primary.get("url") if isinstance(primary, dict) else None
        shadows = route.get("shadows")
        for j, shadow in enumerate(shadows if isinstance(shadows, list) else []):
            surl = shadow.get("url") if isinstance(shadow, dict) else None
            if isinstance(url, str) and isinstance(surl, str) and _same_url(url, surl):
                found.append((("routes", i, "shadows", j, "url"),
                              f"the shadow's URL is the primary's ({shown_url(surl)}): every "
                              "request would reach the primary twice; point it at the "
                              "candidate service"))
    return found


def _duplicate_names(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Repeated route and shadow names."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    routes = data.get("routes")
    if not isinstance(routes, list):
        return found
    seen_routes: set[str] = set()
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in seen_routes:
                found.append((("routes", i, "name"),
                              f"route names must be unique ({name!r} is used twice)"))
            seen_routes.add(name)
        shadows = route.get("shadows")
        seen_shadows: set[str] = set()
        for j, shadow in enumerate(shadows if isinstance(shadows, list) else []):
            sname = shadow.get("name") if isinstance(shadow, dict) else None
            if isinstance(sname, str):
                if sname in seen_shadows:
                    found.append((("routes", i, "shadows", j, "name"),
                                  f"shadow names must be unique within a route "
                                  f"({sname!r} is used twice)"))
                seen_shadows.add(sname)
    return found


_TYPE_WORDS = {"string_type": "text", "int_type": "a whole number",
               "int_parsing": "a whole number", "int_from_float": "a whole number",
               "float_type": "a number", "float_parsing": "a number",
               "bool_type": "true/false", "bool_parsing": "true/false",
               "model_type": "a mapping", "dict_type": "a mapping",
               "model_attributes_type": "a mapping", "list_type": "a list"}
"""What a value of a union's member is, by the error pydantic gives a value of another type."""


def _key_path(loc: tuple[str | int, ...], data: Any,
              kind: str) -> tuple[tuple[str | int, ...], int | None]:
    """A pydantic error's location as the file's key path, and where a union's member label
    was left out of it (None: no union on the way).

    Pydantic names the member of a union (``positive_class: str | int``, a slice as SQL text
    or ``{feature: F}``) in the location (``positive_class.int``, ``slices.s.function-after
    [_sorted(), SliceConfig].bins``): those labels are no key of the file. A step of the
    location that the file's data does not hold is such a label, but for the last step of
    a key that is missing."""
    path: list[str | int] = []
    union_at: int | None = None
    node = data
    for i, step in enumerate(loc):
        held = (step in node if isinstance(node, dict) else
                isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node))
        if held:
            node = node[step]
        elif not (i == len(loc) - 1 and kind == "missing"):
            if union_at is None:
                union_at = len(path)
            continue
        path.append(step)
    return tuple(path), union_at


def _value_problems(exc: ValidationError,
                    data: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Each value problem pydantic found, as (key path, message), in its order: one problem
    per value of a union (the member the value was meant for, or what it may be)."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    unions: dict[tuple[str | int, ...], list[tuple[tuple[str | int, ...], dict[str, Any]]]] = {}
    for err in exc.errors(include_url=False):
        if err["type"] == CROSS_CHECK:
            continue  # already reported by _cross_checks, at the problem's own line
        loc = tuple(err["loc"])
        if loc[-1:] == ("[key]",):  # a mapping's key (a set_json path) was refused
            loc = loc[:-1]
        path, union_at = _key_path(loc, data, err["type"])
        if union_at is None:
            problems.append((path, _message(err)))
            continue
        at = path[:union_at]
        if at not in unions:
            unions[at] = []
            problems.append((at, ""))  # filled in below, in the order found
        unions[at].append((path, dict(err)))
    out: list[tuple[tuple[str | int, ...], str]] = []
    for path, msg in problems:
        if msg or path not in unions:
            out.append((path, msg))
            continue
        members = unions[path]
        # A value of the right type for one member failed on its content there (a slice's
        # bins, a misspelt key in it): that is the problem; the other members' "not text"
        # would only mislead.
        meant = [(p, e) for p, e in members if p != path or e["type"] not in _TYPE_WORDS]
        if meant:
            out.extend((p, _message(e)) for p, e in meant)
            continue
        words = list(dict.fromkeys(_TYPE_WORDS[e["type"]] for _, e in members))
        if "a number" in words and "a whole number" in words:
            words.remove("a whole number")
        expected = words[0] if len(words) == 1 else (
            f"{', '.join(words[:-1])} or {words[-1]}")
        got = repr(members[0][1].get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        out.append((path, f"expected {expected} (got {got})"))
    return out


_YAML_READS = ((bool, "true/false"), (int, "a number"), (float, "a number"),
               (date, "a date"))
"""What YAML reads an unquoted scalar as, by the type it made of it (a bool is an int)."""


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (check its spelling and the configuration reference)"
    if err["type"] == "string_type":
        # `admin_token: 84729183746`: say what YAML did, not "Input should be a valid
        # string". The value is not repeated: it may be a secret (a token, a URL's
        # password), and YAML may have changed it (0123 is read as the number 83).
        kind = next((k for t, k in _YAML_READS if isinstance(err["input"], t)), None)
        if kind is not None:
            key = err["loc"][-1] if err["loc"] else None
            example = f', e.g. {key}: "..."' if isinstance(key, str) else ""
            return (f"expected text, but YAML reads this value as {kind} when it is not "
                    f"quoted: put it in quotes{example}")
    msg: str = err["msg"].removeprefix("Value error, ")
    return msg


def load_config(path: str | os.PathLike[str], *, data: bytes | None = None) -> Settings:
    """Read, interpolate and validate a config file; raise ConfigError listing every problem.

    ``data``: the file's bytes, when the caller has read them (a reload tells its watcher
    which content runs: that must be the content validated, not a second read of a file
    that may be rewritten in between)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8") if data is None else data.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the config file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: the config file is not UTF-8 text"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(exc, "problem", None) or str(exc)
        if mark is not None and text[mark.index:mark.index + 1] == "\t":
            reason = (f"a tab character (column {mark.column + 1}): YAML indents with "
                      "spaces only; replace the tab with spaces")
        raise ConfigError([f"{file}:{line}: (YAML): {reason}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{file}:1: (YAML): nested too deeply"]) from exc
    if node is None:
        raise ConfigError([f"{file}:1: (top level): the file is empty; "
                           "it needs at least a 'routes:' list"])
    located = _Located()
    try:
        data = located.build(node, ())
    except RecursionError as exc:  # nested too deeply, or an alias inside itself (&a [*a])
        raise ConfigError([f"{file}:1: (YAML): nested too deeply, or an alias refers to "
                           "the block it is in"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{file}:1: (top level): expected a mapping of settings"])
    env_url = os.environ.get(DATABASE_URL_ENV)
    if env_url:
        database = data.setdefault("database", {}) or {}
        if isinstance(database, dict):
            database["url"] = env_url
            data["database"] = database
    found = located.problems + _cross_checks(data)
    problems = [f"{file}:{located.line_of(p)}: {_dotted(p)}: {msg}" for p, msg in found]
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        unset = {path for path, _ in located.problems}
        for loc, msg in _value_problems(exc, data):
            if loc in unset:
                continue  # an unset ${VAR}: already reported, its placeholder is no value
            problems.append(f"{file}:{located.line_of(loc)}: {_dotted(loc)}: {msg}")
        raise ConfigError(problems) from exc
    if problems:
        raise ConfigError(problems)
    # Resolved once here: the embedded database and worker processes need an absolute path.
    return settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
