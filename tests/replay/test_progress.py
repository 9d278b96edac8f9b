"""The progress bar and the plain progress lines: handled/pending, rate, errors, time left."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from shadowproxy.replay.progress import progress_bar
from shadowproxy.replay.replayer import Tally


def test_the_bar_shows_handled_rate_errors_and_time_left() -> None:
    """On a terminal the bar reads like 'replay cand ━━ 40/100 99/s 4 errors eta 0:00:01'."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    tally = Tally()
    with progress_bar(100, "cand", console) as update:
        for _ in range(4):
            tally.recorded += 10
            tally.errors["timeout"] += 1
            update(tally)
            time.sleep(0.05)
    text = out.getvalue()
    assert "replay cand" in text and "40/100" in text and "4 errors" in text
    assert "/s" in text and "eta" in text


def test_without_a_terminal_a_plain_line_says_the_same(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Not on a terminal: a line on stderr now and then, and one at the end."""
    console = Console(file=io.StringIO(), force_terminal=False)
    tally = Tally(recorded=7)
    tally.errors["connect"] = 2
    with progress_bar(9, "cand", console) as update:
        update(tally, final=True)
    assert capsys.readouterr().err == "replay cand: 7/9 handled, 2 errors\n"
