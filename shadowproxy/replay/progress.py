"""What the replay says: the preflight before it starts, a progress bar, the summary.

The bar (rich, on stderr, only on a terminal) shows requests handled out of pending, the
rate, errors and the time left. Without a terminal a plain line goes to stderr every
``PLAIN_EVERY_S`` seconds, so that logs show progress too. The preflight and the summary
go to stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from shadowproxy.replay.options import CARRIED_AS, ReplayOptions
from shadowproxy.replay.outgoing import NO_JSON_BODY, TRUNCATED
from shadowproxy.replay.pacing import Pacer
from shadowproxy.replay.replayer import Tally
from shadowproxy.replay.source import Preflight

TICK_S = 0.2
PLAIN_EVERY_S = 10.0


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counter.items(), key=lambda kv: -kv[1]))


def preflight_lines(options: ReplayOptions, pre: Preflight, pacer: Pacer, *,
                    asked_end: datetime | None = None) -> list[str]:
    """What will be sent, and what cannot be sent as recorded: said before starting
    (``asked_end``: the end given, when it was later than the start)."""
    w = options.window
    lines = [f"replay of route {options.route!r} as {options.name!r} to {options.url}",
             f"  window {w.start.isoformat()} to {w.end.isoformat()}"
             + (f", first {options.limit}" if options.limit else "")
             + (f", where {options.where}" if options.where else "")]
    if asked_end is not None and asked_end > w.end:
        lines.append(f"  the window ends at the start (--to {asked_end.isoformat()} is later): "
                     "requests recorded from now on are not replayed")
    lines.append(f"  {pre.selected} requests selected")
    answered = pre.answered - pre.live if options.force else pre.answered
    if answered:
        lines.append(f"  {answered} already answered by {options.name!r}: "
                     + ("redone, each earlier answer replaced (--force)" if options.force
                        else "skipped (--force redoes them)"))
    if options.force and pre.live:
        lines.append(f"  {pre.live} answered by the live shadow {options.name!r}: kept and "
                     "skipped (--force redoes replayed answers only)")
    if pre.truncated:
        lines.append(f"  {pre.truncated} bodies were truncated at recording "
                     "(recording.max_body_bytes): they cannot be replayed and are stored as "
                     f"skipped ({TRUNCATED})")
    if options.set_json and pre.no_json:
        lines.append(f"  {pre.no_json} requests have no JSON body: skipped ({NO_JSON_BODY})")
    if options.set_json and pre.encoded_no_json:
        lines.append(f"  {pre.encoded_no_json} requests have a compressed body stored without "
                     "its JSON (recording.max_decompressed_bytes): decoded to be edited, "
                     f"skipped if not JSON ({NO_JSON_BODY})")
    if options.set_json and pre.unread_json:
        lines.append(f"  {pre.unread_json} requests have a body that looks like JSON stored "
                     "without its JSON (PostgreSQL's jsonb refused it: a \\u0000 escape, a "
                     "lone surrogate, or not JSON at all): read to be edited, skipped if not "
                     f"JSON ({NO_JSON_BODY})")
    if pre.redacted_requests:
        left = [name for name in pre.redacted_headers if name not in options.set_header_names()]
        names = ", ".join(f"{name} {pre.redacted_headers[name]}" for name in left)
        # --set-header names what is sent: a recorded Host goes out as X-Forwarded-Host.
        carried = "".join(f"; for {name}: --set-header {CARRIED_AS[name]}=VALUE"
                          for name in left if name in CARRIED_AS)
        lines.append(f"  {pre.redacted_requests} requests have headers stored as "
                     f"\"[redacted]\" ({names}): sent without them (--set-header NAME=VALUE "
                     f"sends a value instead{carried})")
    if pre.redacted_json:
        lines.append(f"  {pre.redacted_json} request bodies hold JSON values stored as "
                     "\"[redacted]\" (recording.redact_json): sent as stored "
                     "(--set-json PATH=VALUE sets a value instead)")
    if pre.redacted_query:
        lines.append(f"  {pre.redacted_query} requests have query parameters stored as "
                     "\"[redacted]\" (recording.redact_query): sent as stored, with that "
                     "text for their values")
    lines.append(f"  {pre.pending} to handle, {pacer.description}, "
                 f"at most {options.concurrency} at a time, timeout {options.timeout_s:g}s")
    return lines


def summary_lines(options: ReplayOptions, tally: Tally, stored: int | None, elapsed_s: float,
                  *, interrupted: bool, spooled: bool) -> list[str]:
    """The end: sent, answered, errors by kind, skipped and why, stored (None: the
    database did not answer the count)."""
    rate = tally.sent / elapsed_s if elapsed_s > 0 else 0.0
    lines = [("interrupted" if interrupted else "done")
             + f" in {elapsed_s:.1f}s: {tally.sent} sent ({rate:.0f}/s)"]
    lines.append(f"  answered  {tally.answered}"
                 + (f" ({_counts(tally.statuses)})" if tally.statuses else ""))
    lines.append(f"  errors    {tally.failed}"
                 + (f" ({_counts(tally.errors)})" if tally.errors else ""))
    lines.append(f"  skipped   {sum(tally.skipped.values())}"
                 + (f" ({_counts(tally.skipped)})" if tally.skipped else ""))
    if tally.without_redacted:
        lines.append(f"  {tally.without_redacted} sent without their \"[redacted]\" headers")
    if tally.replaced:
        lines.append(f"  {tally.replaced} earlier answers replaced (--force)")
    if tally.abandoned:
        lines.append(f"  {tally.abandoned} calls abandoned at the second Ctrl-C: not stored, "
                     "sent again by the next run")
    if stored is None:
        lines.append(f"  stored    not known: the database did not answer the count of "
                     f"{options.name!r}'s answers")
    else:
        lines.append(f"  stored    {stored} answers as {options.name!r} (role 'replay')")
    missing = tally.recorded - (stored or 0)
    if stored is None and tally.recorded:
        lines.append("  answers not in the database"
                     + (": they wait in the spool and are stored by the next shadowproxy "
                        "process on this data_dir" if spooled else
                        ": the next run sends those requests again"))
    elif missing > 0:
        lines.append(f"  {missing} answers not in the database"
                     + (": they wait in the spool and are stored by the next shadowproxy "
                        "process on this data_dir" if spooled else
                        ": the next run sends those requests again"))
    if interrupted or missing > 0:
        w = options.window
        lines.append(f"  to resume: the same command with --from {w.start.isoformat()} "
                     f"--to {w.end.isoformat()}")
    return lines


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "–/s", style="progress.data.speed")


@contextmanager
def progress_bar(total: int, name: str, console: Console | None = None) -> Iterator[Any]:
    """``with progress_bar(n, name) as update: update(tally)`` (cheap: redraws are timed)."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        last = [time.monotonic()]

        def plain(tally: Tally, final: bool = False) -> None:
            now = time.monotonic()
            if final or now - last[0] >= PLAIN_EVERY_S:
                last[0] = now
                print(f"replay {name}: {tally.done}/{total} handled, {tally.failed} errors",
                      file=sys.stderr, flush=True)

        yield plain
        return
    with Progress(TextColumn(f"[bold]replay[/] {name}"), BarColumn(), MofNCompleteColumn(),
                  _Rate(), TextColumn("[red]{task.fields[errors]} errors"),
                  TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
                  console=console, refresh_per_second=1 / TICK_S) as bar:
        task = bar.add_task("", total=total, errors=0)

        def update(tally: Tally, final: bool = False) -> None:
            bar.update(task, completed=tally.done, errors=tally.failed)

        yield update
