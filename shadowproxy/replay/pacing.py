"""When each replayed request leaves: as recorded, at a fixed rate, or as fast as allowed.

Each pacer gives a request's due time on the replay's clock (seconds since the first
request left). The times are a schedule, not sleeps between requests: a request that is
due goes at once, one that is late does not push the others back, so the rate holds on
average even with a millisecond timer and a loop that is busy now and then.

As recorded, the schedule is the recording's own spacing divided by ``--speed``, with each
gap capped at ``MAX_GAP_S`` seconds of replay time: a night without traffic, or an outage,
in the recording does not stop the replay for hours.
"""

from __future__ import annotations

MAX_GAP_S = 10.0


class Pacer:
    """As fast as the concurrency allows: every request is due at once."""

    description = "as fast as --concurrency allows"

    def due(self, received_at: float) -> float:
        return 0.0


class FixedRate(Pacer):
    """``--rate RPS``: request i is due at i / RPS."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.count = 0
        self.description = f"{rate:g} requests/s"

    def due(self, received_at: float) -> float:
        at = self.count * self.interval
        self.count += 1
        return at


class AsRecorded(Pacer):
    """``--speed X``: the recorded spacing divided by X, each gap capped at ``max_gap_s``."""

    def __init__(self, speed: float, max_gap_s: float = MAX_GAP_S) -> None:
        self.speed = speed
        self.max_gap = max_gap_s
        self.previous: float | None = None
        self.at = 0.0
        self.description = (f"as recorded, {speed:g}x (gaps over {max_gap_s:g}s "
                            f"shortened to {max_gap_s:g}s)")

    def due(self, received_at: float) -> float:
        previous = self.previous
        self.previous = received_at
        if previous is not None:
            gap = max(received_at - previous, 0.0) / self.speed
            if gap > self.max_gap:
                gap = self.max_gap
            self.at += gap
        return self.at


def pacer_for(rate: float | None, speed: float | None) -> Pacer:
    if rate is not None:
        return FixedRate(rate)
    if speed is not None:
        return AsRecorded(speed)
    return Pacer()
