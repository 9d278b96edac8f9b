"""Says where a stop waits when it outlives its bound.

A graceful stop takes at most about twice ``limits.shutdown_grace_s`` (docs/operations.md,
"Stop"): one grace for requests and shadow calls, one for the database to take the queue
and the spool, then a bounded close. A stop still going a second past that waits on
something it should not, and a supervisor's kill (Kubernetes' grace period, a harness's
limit) will end it without a trace of what. So the log gets, once, the stack of every task
still pending at that moment: the next look at the log shows where the stop waited.
"""

from __future__ import annotations

import asyncio
import io
import logging

log = logging.getLogger("shadowproxy")

SLACK_S = 1.0
"""How far past twice the grace a stop may go before it is reported."""

_FRAMES = 12
"""Frames of each task's stack in the report: enough to reach the await that holds it."""


def watch_stop(grace_s: float) -> asyncio.TimerHandle:
    """Report the pending tasks if the stop beginning now is still going after twice
    ``grace_s`` and ``SLACK_S``; cancel the returned handle when the stop is over."""
    loop = asyncio.get_running_loop()
    return loop.call_later(2 * grace_s + SLACK_S, _report, loop.time(), grace_s)


def _report(began: float, grace_s: float) -> None:
    loop = asyncio.get_running_loop()
    stacks = []
    for task in asyncio.all_tasks(loop):
        if task.done():
            continue
        text = io.StringIO()
        task.print_stack(limit=_FRAMES, file=text)
        stacks.append(text.getvalue().rstrip())
    log.warning("the stop is still going %.1f s after it began, past twice "
                "limits.shutdown_grace_s (%g s) and %g s: the %d tasks it waits on:\n%s",
                loop.time() - began, grace_s, SLACK_S, len(stacks), "\n".join(stacks))
