"""``shadowproxy report``: resolve the route, shadow and window, build the report, render it.

Bad input (unknown route or shadow, a bad window, an unreadable reference, a jsonpath
PostgreSQL rejects) raises ``UsageError`` with what was wrong and what to do; the CLI maps it
to exit status 2. With ``--fail-on`` the status is 3 when the verdict reaches that level.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shadowproxy.compare.config import CompareConfig
from shadowproxy.compare.options import DEFAULT_MAX_PAIRS, DEFAULT_SEED
from shadowproxy.compare.options import max_pairs as parse_max_pairs
from shadowproxy.compare.options import seed as parse_seed
from shadowproxy.compare.window import Window, parse_duration
from shadowproxy.config import Route, Settings
from shadowproxy.errors import UsageError

if TYPE_CHECKING:
    from shadowproxy.compare.report import Report

DEFAULT_SINCE = "24h"
FAIL_ON_STATUS = 3


def _timestamp(text: str, flag: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: expected an ISO 8601 time such as 2025-01-31T14:00:00Z "
                         f"or 2025-01-31 (got {text!r})") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def resolve_window(since: str | None, from_: str | None, to: str | None,
                   now: datetime | None = None) -> Window:
    """The [start, end) window of ``--since`` or ``--from``/``--to`` (naive times are UTC)."""
    now = now or datetime.now(UTC)
    end = _timestamp(to, "--to") if to else now
    if from_ is not None:
        start = _timestamp(from_, "--from")
    else:
        since = since or DEFAULT_SINCE
        try:
            start = end - timedelta(seconds=parse_duration(since))
        except OverflowError:  # before year 1: no record is that old
            raise UsageError(f"--since {since}: the window would start before year 1; to "
                             "take every record give --from with an early date, e.g. "
                             "--from 2000-01-01") from None
    if start >= end:
        raise UsageError(f"the window is empty: it starts at {start.isoformat()} and ends at "
                         f"{end.isoformat()}; give --from earlier than --to")
    return Window(start, end)


@dataclass(frozen=True)
class Target:
    """What to compare: the route, the shadow, its compare settings, and the names (shadow,
    baseline) that are no shadow of the route in the configuration, each with where it came
    from: those must be targets replayed into the window (checked by the report)."""

    route: Route
    shadow: str
    compare: CompareConfig
    unlisted: dict[str, str]


def resolve_target(settings: Settings, route_name: str, shadow: str | None) -> Target:
    """The route, the shadow to compare and its compare settings; UsageError if unknown."""
    try:
        route = settings.route(route_name)
    except KeyError as exc:
        raise UsageError(f"--route: {exc.args[0]}") from exc
    names = [s.name for s in route.shadows]
    compare = route.compare or CompareConfig()
    unlisted: dict[str, str] = {}
    if shadow is None:
        if not names:
            raise UsageError(f"--route {route_name}: the route has no shadows to compare; give "
                             "--shadow NAME of a target replayed with `shadowproxy replay`")
        candidates = [n for n in names if n != compare.baseline_shadow] or names
        shadow = candidates[0]
    elif shadow not in names:
        unlisted[shadow] = (f"--shadow: route {route_name!r} has no shadow named {shadow!r} "
                            f"(its shadows are {names})")
    baseline = compare.baseline_shadow
    if baseline is not None:
        if baseline == shadow:
            raise UsageError(f"--shadow {shadow} is the baseline shadow; compare another shadow "
                             "against the primary, or remove compare.baseline_shadow")
        if baseline not in names:
            unlisted[baseline] = (f"routes.{route_name}.compare.baseline_shadow: {baseline!r} "
                                  f"is not one of the route's shadows {names}")
    return Target(route, shadow, compare, unlisted)


def clean(value: Any) -> Any:
    """A copy of ``value`` that json.dumps accepts with allow_nan=False."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return clean(value.item())
    return value


def render(report: dict[str, Any], fmt: str, *, color: bool = False) -> str:
    """The report in ``fmt``: json, markdown, html or text (ANSI colours if ``color``)."""
    if fmt == "json":
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
    if fmt == "markdown":
        from shadowproxy.compare.render_markdown import render_markdown

        return render_markdown(report)
    if fmt == "html":
        from shadowproxy.compare.render_html import render_html

        return render_html(report)
    from shadowproxy.compare.render_text import render_text

    return render_text(report, color=color)


async def _build(url: str, target: Target, window: Window, reference: Path | None,
                 config_version: str | None = None, max_pairs: int = DEFAULT_MAX_PAIRS,
                 seed: int = DEFAULT_SEED) -> Report:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from shadowproxy.compare.report import STEPS, build_report
    from shadowproxy.store.database import connection

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]report[/bold] {task.description}"), BarColumn(),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("connecting", total=len(STEPS))

        def step(name: str) -> None:
            progress.update(task, description=name, completed=STEPS.index(name))

        async with connection(url) as conn:
            report = await build_report(
                conn, route=target.route.name, shadow=target.shadow, window=window,
                compare=target.compare, reference=reference, progress=step,
                unlisted=target.unlisted, config_version=config_version,
                max_pairs=max_pairs, seed=seed)
        progress.update(task, completed=len(STEPS))
    return report


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: into a file beside it, renamed over it once
    written. Written in place, a disk that filled up (or a Ctrl-C) midway left an earlier
    report at that path cut to the part of the new one that fitted. Anything but a file
    (``/dev/stdout``, a pipe) is written to as it is.

    A symlink is written through, as writing in place would: the file it names is the one
    replaced, and the link stays (renamed over, the link became a file and its target kept
    the old report). The new file gets the old one's mode, so that a report kept private
    stays so (it was made with the default mode, readable by all); a new path gets the
    default mode."""
    if path.exists() and not path.is_file():
        path.write_text(text, encoding="utf-8")
        return
    target = Path(os.path.realpath(path))
    try:
        mode: int | None = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = None
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.unlink(missing_ok=True)  # left by a kill -9: O_EXCL would refuse it
        # Private until its mode is set: the report is not readable by all meanwhile.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o666 if mode is None else 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(text)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def run_report(args: argparse.Namespace) -> int:
    """The CLI command; returns 0, or 3 when the verdict reaches ``--fail-on``."""
    from shadowproxy.compare.extras import require_for
    from shadowproxy.compare.verdict import reaches
    from shadowproxy.config import load_config
    from shadowproxy.runner import run_command
    from shadowproxy.store.database import database_url

    reference = Path(args.reference) if args.reference else None
    max_pairs = parse_max_pairs(str(getattr(args, "max_pairs", DEFAULT_MAX_PAIRS)))
    seed = parse_seed(str(getattr(args, "seed", DEFAULT_SEED)))
    require_for(args.format, reference)
    settings = load_config(args.config)
    window = resolve_window(args.since, args.from_, args.to)
    target = resolve_target(settings, args.route, args.shadow)
    if reference is not None and not reference.is_file():
        raise UsageError(f"--reference {reference}: no such file; give a CSV or Parquet file "
                         "of training data whose columns are named like compare.features")
    url = database_url(settings)
    report = clean(run_command(
        _build(url, target, window, reference, getattr(args, "config_version", None),
               max_pairs, seed),
        interrupted="no report was made, and the database was only read"))
    text = render(report, args.format,
                  color=args.format == "text" and not args.output and sys.stdout.isatty())
    if args.output:
        try:
            _write_whole(Path(args.output), text)
        except OSError as exc:
            raise UsageError(f"-o {args.output}: cannot write the report: {exc.strerror}") \
                from exc
        print(f"report written to {args.output}: verdict {report['verdict']['status']}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.fail_on and reaches(report["verdict"]["status"], args.fail_on):
        return FAIL_ON_STATUS
    return 0
