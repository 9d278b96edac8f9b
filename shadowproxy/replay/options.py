"""The replay's command line, checked once into a frozen ``ReplayOptions``.

``add_arguments`` is imported by ``cli.py`` for every command, so this module stays light.

Every problem is a ``UsageError`` (exit status 2) saying what was wrong and what to write
instead, before anything connects or sends.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shadowproxy.durations import finite_seconds
from shadowproxy.errors import UsageError
from shadowproxy.http1 import HEADER_NAME, header_value_problem, hop_by_hop_problem
from shadowproxy.jsonexact import loads_exact
from shadowproxy.recorder.bodies import parse_json_path

if TYPE_CHECKING:  # the report's module imports numpy: not for every command line
    from shadowproxy.compare.window import Window

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_CONCURRENCY = 32
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_DURATION_S = 600.0
MAX_CONCURRENCY = 10_000
CARRIED_AS = {"host": "X-Forwarded-Host"}
"""A recorded header that goes out under another name: the target gets its own ``Host``, as
a live shadow does, and the recorded one is carried in ``X-Forwarded-Host``, so a value for
a ``Host`` stored as "[redacted]" is given with ``--set-header X-Forwarded-Host=VALUE``."""


@dataclass(frozen=True)
class JsonEdit:
    """``--set-json PATH=VALUE``: the path as written, its steps, the value to put there."""

    path: str
    steps: tuple[str | int | None, ...]
    value: Any


@dataclass(frozen=True)
class ReplayOptions:
    """What to replay, where to, and how fast."""

    route: str
    url: str
    name: str
    window: Window
    where: str | None = None
    limit: int | None = None
    rate: float | None = None
    speed: float | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    """A call's whole bound, however its body flows (``timeout_s`` is re-armed while a
    streamed answer goes on), as a shadow's ``max_duration_s``."""
    set_headers: tuple[tuple[str, str], ...] = ()
    """(name as given, value), in the order given; a later one replaces an earlier one."""
    set_json: tuple[JsonEdit, ...] = ()
    force: bool = False

    def set_header_names(self) -> frozenset[str]:
        """The lower-case names of the recorded headers ``--set-header`` gives a value for:
        its own, and ``host`` when it gives ``X-Forwarded-Host`` (``CARRIED_AS``)."""
        names = {name.lower() for name, _ in self.set_headers}
        return frozenset(names | {recorded for recorded, sent in CARRIED_AS.items()
                                  if sent.lower() in names})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options (``cli.py`` adds -c/--config)."""
    p.add_argument("--route", required=True, help="the route whose recorded requests to send")
    p.add_argument("--to", action="append", required=True, metavar="URL",
                   help="the target's URL, e.g. http://127.0.0.1:9003 (a second --to T "
                        "ends the window, with --from T)")
    p.add_argument("--as", dest="as_name", required=True, metavar="NAME",
                   help="the target name its answers are stored under (role 'replay')")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--since", help="a window ending now, e.g. 15m, 1h, 7d (default 24h)")
    window.add_argument("--from", dest="from_", metavar="T",
                        help="window start (ISO 8601; a time without zone is UTC); --to T "
                             "ends it (default: now)")
    p.add_argument("--where", metavar="SQL",
                   help="only requests with a shadowproxy.pairs row matching this condition, "
                        "e.g. 'primary_status = 200'")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N requests")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, metavar="RPS", help="send at this fixed rate")
    pace.add_argument("--speed", type=float, metavar="X",
                      help="keep the recorded spacing divided by X (idle gaps capped at 10 s)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                   help="calls in flight at most (default 32); unpaced, as fast as this allows")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help="each call's timeout in seconds, to the answer's head and between "
                        "pieces of a streamed answer (default 30)")
    p.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION_S, metavar="S",
                   help="each call's whole bound in seconds, however its answer flows "
                        "(default 600)")
    p.add_argument("--set-header", action="append", metavar="K=V",
                   help="add or replace a header (also gives redacted headers a value)")
    p.add_argument("--set-json", action="append", metavar="PATH=VALUE",
                   help="set a field of the JSON body, e.g. '$.model=v3' (VALUE read as JSON, "
                        "else as a string)")
    p.add_argument("--force", action="store_true",
                   help="also redo requests already answered by NAME, replacing the answers")


def check_url(url: str) -> str:
    """``--to``: an http(s) URL with a host (a path in it is put before each request's)."""
    from shadowproxy.config import shown_url, url_user_problem

    user_problem = url_user_problem(url)
    if user_problem is not None:
        raise UsageError(f"--to: {user_problem}; take it out of the URL and give the header "
                         "with --set-header, e.g. --set-header 'Authorization=Bearer TOKEN'. "
                         "The URL is not repeated here: it holds credentials")
    parts = urlsplit(url)
    problem = None
    if parts.scheme not in ("http", "https"):
        problem = "expected an http:// or https:// URL"
    elif not parts.hostname:
        problem = "the URL has no host"
    elif parts.query or parts.fragment:
        problem = "the URL must not carry a query or fragment (each request brings its own)"
    else:
        try:
            parts.port  # noqa: B018  (raises ValueError on a malformed port)
        except ValueError:
            problem = "the URL has an invalid port"
    if problem:
        raise UsageError(f"--to {shown_url(url)}: {problem}, e.g. http://127.0.0.1:9003")
    return url.rstrip("/")


def check_name(name: str) -> str:
    """``--as``: the target name the answers are stored under."""
    if not NAME.fullmatch(name):
        raise UsageError(f"--as {name!r}: expected a name of letters, digits, '_', '.' and '-' "
                         "starting with a letter or digit, e.g. candidate-v3")
    if name == "primary":
        raise UsageError("--as primary: that name is the primary's own record; for the noise "
                         "floor replay to the primary's URL under another name, e.g. "
                         "--as primary-replay")
    return name


def parse_set_header(text: str) -> tuple[str, str]:
    """``K=V`` → (K, V); the value may be empty, never a line break."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not HEADER_NAME.fullmatch(name):
        raise UsageError(f"--set-header {text!r}: expected NAME=VALUE with a header name such "
                         "as Authorization, e.g. --set-header 'Authorization=Bearer t0ken'")
    problem = header_value_problem(value)
    if problem is not None:
        raise UsageError(f"--set-header {name}: {problem}")
    problem = hop_by_hop_problem(name)  # as a live shadow's set_headers (config.py)
    if problem is not None:
        raise UsageError(f"--set-header {problem}")
    lname = name.lower()
    if lname == "host":
        raise UsageError(f"--set-header {name}: the target gets its own Host, as a live shadow "
                         "does; the recorded Host goes out as X-Forwarded-Host: give it with "
                         f"--set-header 'X-Forwarded-Host={value.strip() or 'VALUE'}'")
    if lname == "content-length":
        raise UsageError(f"--set-header {name}: this header is set by the replay itself "
                         "(the body's length)")
    return name, value.strip()


def _split_path(text: str) -> tuple[str, str] | None:
    """``PATH=VALUE`` split at the first '=' outside brackets (``$['a=b']=1`` works)."""
    depth = 0
    quote = ""
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"" and depth:
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "=" and depth == 0:
            return text[:i], text[i + 1:]
    return None


def parse_set_json(text: str) -> JsonEdit:
    """``$.a.b=VALUE`` → the edit; VALUE is read as JSON (``0.5``, ``true``, ``{"k": 1}``),
    and as a string when it is not JSON (``$.model=v3``)."""
    split = _split_path(text)
    if split is None:
        raise UsageError(f"--set-json {text!r}: expected PATH=VALUE with a JSON path such as "
                         "$.parameters.temperature, e.g. --set-json '$.parameters.top_k=5'")
    path, raw = split
    try:
        steps = tuple(parse_json_path(path.strip()))
    except ValueError as exc:
        raise UsageError(f"--set-json {text!r}: {exc}") from exc
    try:
        # NaN and Infinity are not JSON (Python's reader takes them): text, like any other
        # value that is not JSON, not a float written out as null.
        value: Any = loads_exact(raw, allow_nan=False)[0]
    except ValueError:
        value = raw
    return JsonEdit(path.strip(), steps, value)


def _positive(value: float | None, flag: str) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{flag}: expected a number above 0 (got {value:g})")


def _seconds(value: float, flag: str, instead: str) -> None:
    """A call's bound: above 0 and finite (``inf`` waited for a silent target for ever)."""
    _positive(value, flag)
    try:
        finite_seconds(value, instead)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _pace(value: float | None, flag: str) -> None:
    _positive(value, flag)
    if value is not None and math.isinf(value):
        raise UsageError(f"{flag}: expected a finite number (got {value:g}); leave {flag} out "
                         "to send as fast as --concurrency allows")


def split_to(values: list[str]) -> tuple[str, str | None]:
    """``--to`` names both the target (a URL) and the window's end (a time), as in
    ``--to http://127.0.0.1:9003 --from 2025-01-31 --to 2025-02-01``: a value with ``://``
    is the URL. Returns (URL, end time or None)."""
    urls = [v for v in values if "://" in v]
    times = [v for v in values if "://" not in v]
    if len(urls) != 1:
        raise UsageError("--to URL: give the target's URL once, e.g. --to http://127.0.0.1:9003"
                         + (f" (got {len(urls)}: {', '.join(urls)})" if urls else ""))
    if len(times) > 1:
        raise UsageError(f"--to T: the window has one end (got {', '.join(times)})")
    return urls[0], times[0] if times else None


def from_args(args: argparse.Namespace) -> ReplayOptions:
    """The options of a parsed ``replay`` command line."""
    from shadowproxy.compare.command import resolve_window

    url, end = split_to(args.to)
    window = resolve_window(args.since, args.from_, end)
    if args.rate is not None and args.speed is not None:
        raise UsageError("--rate and --speed exclude each other: --rate RPS sends at a fixed "
                         "rate, --speed X keeps the recorded spacing divided by X")
    _pace(args.rate, "--rate")
    _pace(args.speed, "--speed")
    _seconds(args.timeout, "--timeout", "a target that never answers would hold its call "
                                        "for ever; give the longest an answer may take, "
                                        "e.g. --timeout 300")
    _seconds(args.max_duration, "--max-duration",  # NaN passes the comparison below
             "an answer that streams without end would hold its call for ever; give the "
             "longest a whole answer may take, e.g. --max-duration 3600")
    if args.max_duration < args.timeout:
        raise UsageError(f"--max-duration ({args.max_duration:g}) is shorter than --timeout "
                         f"({args.timeout:g}): it bounds each whole call, so it is at least "
                         "the time allowed to the answer's head")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: expected 1 or more (got {args.limit})")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise UsageError(f"--concurrency: expected 1 to {MAX_CONCURRENCY} "
                         f"(got {args.concurrency})")
    where = args.where.strip() if args.where is not None else None
    if where == "":
        raise UsageError("--where: the condition is empty; give a SQL condition over the "
                         "columns of shadowproxy.pairs, e.g. --where 'primary_status = 200'")
    return ReplayOptions(
        route=args.route, url=check_url(url), name=check_name(args.as_name),
        window=window, where=where, limit=args.limit, rate=args.rate, speed=args.speed,
        concurrency=args.concurrency, timeout_s=args.timeout,
        max_duration_s=args.max_duration,
        set_headers=tuple(parse_set_header(h) for h in args.set_header or ()),
        set_json=tuple(parse_set_json(j) for j in args.set_json or ()),
        force=args.force)
