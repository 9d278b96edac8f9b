"""Benchmark: false alarms and detections of the report's decision code, against n.

    python bench/false_alarms.py            # the full table (about 5-10 minutes on one core)
    python bench/false_alarms.py --quick    # fewer windows (under a minute)

Windows are generated from known distributions and handed to the decision code the report
uses (``shadowproxy.compare.drift`` for input drift, ``shadowproxy.compare.paired`` for the
prediction verdict) with the default thresholds. A drift window has a reference and a
current sample of n rows each with three features: ``x`` normal, ``k`` Poisson(3)
counts with 2% missing values (integer-valued: tested on its levels), and ``c``
categorical with shares 40/30/20/9.5/0.5% (the 0.5% level is often absent on one side at
small n). Rows come one per request, or in requests of 5 rows whose values are correlated
(a Gaussian copula with intra-request correlation ρ).

Printed: the share of windows with no change in which anything is flagged (false alarms,
target ≤ 5%), and the share of windows with a change in which the changed feature or the
paired test is flagged (detections), per n. Fewer windows at large n, and half as many
for detections as for false alarms: the count is in each table's first row; a share from
w windows has a standard error of about √(p(1−p)/w).
"""

from __future__ import annotations

import os

# One core, as the figures say; OpenBLAS threads also spin badly on a shared machine.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy import stats  # noqa: E402

from shadowproxy.compare.drift import DriftPolicy, Sample, window_drift  # noqa: E402
from shadowproxy.compare.paired import PairedPolicy, flip_test, mean_shift  # noqa: E402

N_VALUES = (100, 300, 1000, 1001, 3000, 10_000, 100_000)
WINDOWS = {100: 400, 300: 400, 1000: 400, 1001: 400, 3000: 200, 10_000: 100, 100_000: 20}
QUICK = {100: 40, 300: 40, 1000: 40, 1001: 40, 3000: 20, 10_000: 10, 100_000: 3}
# the paired tests cost little: as many windows at every n, fewer only at 100,000
PAIRED_WINDOWS = {100_000: 100}
PAIRED_QUICK = {100_000: 10}
SHARES = np.array([0.4, 0.3, 0.2, 0.095, 0.005])
LEVELS = np.array(["a", "b", "c", "d", "rare"], dtype=object)
POISSON = stats.poisson.cdf(np.arange(80), 3)
DRIFT = DriftPolicy(seed=1)
PAIRED = PairedPolicy(seed=1)


@dataclass(frozen=True)
class Change:
    """What differs in the current sample (all zero: nothing)."""

    mean: float = 0.0
    scale: float = 1.0
    share_a: float | None = None
    unseen: float = 0.0


def _latent(rng: np.random.Generator, n: int, batch: int, rho: float
            ) -> tuple[Callable[[], np.ndarray], np.ndarray | None]:
    if batch == 1:
        return (lambda: rng.standard_normal(n)), None
    requests = np.arange(n) // batch

    def draw() -> np.ndarray:
        u = rng.standard_normal(requests[-1] + 1)[requests]
        return np.sqrt(rho) * u + np.sqrt(1 - rho) * rng.standard_normal(n)

    return draw, requests


def _window_side(rng: np.random.Generator, n: int, batch: int, rho: float, change: Change,
                 offset: int) -> dict[str, Sample]:
    draw, requests = _latent(rng, n, batch, rho)
    req = None if requests is None else requests + offset
    x = change.mean + change.scale * draw()
    k = np.searchsorted(POISSON, stats.norm.cdf(draw())).astype(np.float64)
    k[stats.norm.cdf(draw()) < 0.02] = np.nan
    shares = SHARES.copy()
    names = LEVELS
    if change.share_a is not None:
        shares = np.concatenate([[change.share_a], shares[1:] * (1 - change.share_a)
                                 / shares[1:].sum()])
    if change.unseen:
        shares = np.concatenate([shares * (1 - change.unseen), [change.unseen]])
        names = np.concatenate([LEVELS, np.array(["new"], dtype=object)])
    c = names[np.minimum(np.searchsorted(np.cumsum(shares), stats.norm.cdf(draw())),
                         len(names) - 1)]
    return {"x": Sample(x, req), "k": Sample(k, req), "c": Sample(c, req)}


def drift_window(change: Change, target: str | None, batch: int = 1, rho: float = 0.0
                 ) -> Callable[[np.random.Generator, int], bool]:
    """A drift scenario: True when anything (no target) or the target feature is flagged."""
    def run(rng: np.random.Generator, n: int) -> bool:
        ref = _window_side(rng, n, batch, rho, Change(), 0)
        cur = _window_side(rng, n, batch, rho, change, 10 * n)
        kinds = {"x": "numeric", "k": "numeric", "c": "categorical"}
        res = window_drift({f: (kinds[f], ref[f], cur[f]) for f in kinds},  # type: ignore[misc]
                           DRIFT)
        return bool(res.drifted) if target is None else target in res.drifted
    return run


def paired_regression(offset: float, batch: int = 1, rho: float = 0.0
                      ) -> Callable[[np.random.Generator, int], bool]:
    """Shadow = primary + offset + noise (SD 0.1; a request effect when batched)."""
    def run(rng: np.random.Generator, n: int) -> bool:
        primary = rng.normal(10, 1, n)
        draw, requests = _latent(rng, n, batch, rho)
        shadow = primary + offset + 0.1 * draw()
        return mean_shift(primary, shadow, requests, PAIRED).decision
    return run


def paired_flips(one_way: float) -> Callable[[np.random.Generator, int], bool]:
    """6% of pairs flipped, half each way; plus ``one_way`` of pairs flipped 0 → 1."""
    def run(rng: np.random.Generator, n: int) -> bool:
        primary = (rng.random(n) < 0.3).astype(int)
        u = rng.random(n)
        flip = u < 0.06
        primary[flip] = rng.random(int(flip.sum())) < 0.5
        shadow = np.where(flip, 1 - primary, primary)
        extra = (u >= 0.06) & (u < 0.06 + one_way)
        primary[extra], shadow[extra] = 0, 1
        return flip_test(primary, shadow, None, PAIRED).decision
    return run


Scenario = Callable[[np.random.Generator, int], bool]
FALSE_ALARMS: list[tuple[str, str, Scenario]] = [
    ("drift", "no change, rows independent", drift_window(Change(), None)),
    ("drift", "no change, 5-row requests, ρ = 0.2", drift_window(Change(), None, 5, 0.2)),
    ("drift", "no change, 5-row requests, ρ = 0.5", drift_window(Change(), None, 5, 0.5)),
    ("paired", "regression, no offset", paired_regression(0.0)),
    ("paired", "regression, no offset, 5-row requests, ρ = 0.5",
     paired_regression(0.0, 5, 0.5)),
    ("paired", "classes, 6% flips, as many each way", paired_flips(0.0)),
]
DETECTIONS: list[tuple[str, str, Scenario]] = [
    ("drift", "mean shift 0.25 SD (x)", drift_window(Change(mean=0.25), "x")),
    ("drift", "scale change ×1.5 (x)", drift_window(Change(scale=1.5), "x")),
    ("drift", "share of a 40% → 50% (c)", drift_window(Change(share_a=0.5), "c")),
    ("drift", "unseen category at 6% (c)", drift_window(Change(unseen=0.06), "c")),
    ("drift", "mean shift 0.25 SD, 5-row requests, ρ = 0.5 (x)",
     drift_window(Change(mean=0.25), "x", 5, 0.5)),
    ("drift", "negligible: mean shift 0.05 SD (x; should fall)",
     drift_window(Change(mean=0.05), "x")),
    ("paired", "offset +0.02 (noise SD 0.1)", paired_regression(0.02)),
    ("paired", "offset +0.02, 5-row requests, ρ = 0.5", paired_regression(0.02, 5, 0.5)),
    ("paired", "one-way flips 0 → 1 in 2% of pairs", paired_flips(0.02)),
]


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def rate(run: Scenario, n: int, windows: int, seed: int) -> float:
    rng = np.random.default_rng([seed, n])
    return sum(run(rng, n) for _ in range(windows)) / windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer windows (under a minute)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--n", type=int, nargs="*", default=list(N_VALUES), help="sample sizes")
    args = ap.parse_args()
    plan = QUICK if args.quick else WINDOWS
    paired_plan = PAIRED_QUICK if args.quick else PAIRED_WINDOWS
    small = plan[min(plan)]
    started, cpu = time.perf_counter(), time.process_time()
    print(f"# bench/false_alarms.py{' --quick' if args.quick else ''} — "
          f"{datetime.now(UTC):%Y-%m-%d}, {_machine()}, Python "
          f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    header = "| | " + " | ".join(f"n = {n:,}" for n in args.n) + " |"
    rule = "|---|" + "---:|" * len(args.n)
    for title, rows, share in (
            ("False alarms (no change; target ≤ 5%)", FALSE_ALARMS, 1.0),
            ("Detections (a change; the changed feature or test flagged)", DETECTIONS, 0.5)):
        print(f"\n{title}\n\n{header}\n{rule}")
        for kind, windows_at in (("drift", plan), ("paired", paired_plan)):
            windows = [max(2, int(share * windows_at.get(n, small))) for n in args.n]
            print(f"| **{kind}** (windows) | " + " | ".join(str(w) for w in windows) + " |")
            for _, name, run in (r for r in rows if r[0] == kind):
                cells = [f"{100 * rate(run, n, w, args.seed):.1f}%"
                         for n, w in zip(args.n, windows, strict=True)]
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s elapsed, "
          f"{time.process_time() - cpu:.0f} s of CPU")


if __name__ == "__main__":
    main()
