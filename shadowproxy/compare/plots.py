"""Plots for the HTML report, drawn from the JSON's aggregates as inline SVG (matplotlib).

Only aggregates are plotted (histogram counts, quantiles, binned scatter counts), never raw
rows, so the HTML stays small whatever the traffic. Figures are built with matplotlib's
object API (no pyplot state), so rendering is safe to call from anywhere.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

from shadowproxy.compare.tables import folded_flip_matrix
from shadowproxy.compare.visible import visible

PRIMARY, SHADOW, REFERENCE = "#1f77b4", "#d62728", "#7f7f7f"

# For texts that come from the records or the configuration (feature names, categories,
# classes): matplotlib reads text between two dollar signs as mathtext, so a category such
# as "$$" or "$x^$" stopped the HTML report and "$5 or $10" was drawn as a formula. The
# axes' own tick labels keep mathtext (a log axis writes 10² with it).
LITERAL = {"parse_math": False}
# Recorded categories and classes are drawn ``visible``: matplotlib has no glyph for a
# control character, draws a box and warns on stderr quoting the character itself, so a
# recorded ESC reached the terminal that ran the report.


def _svg(draw: Callable[[Any], None], *, width: float = 5.2, height: float = 3.0) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "shadowproxy",
                                "font.size": 9}):
        fig = Figure(figsize=(width, height), layout="constrained")
        draw(fig)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


HUGE = 1e300
"""Past this, matplotlib's axis arithmetic overflows (limits with margins, tick steps of a
span from -1.7e308 to 1.7e308) and drawing fails: such values are plotted scaled."""


def _scale(values: Sequence[float | None], label: str) -> tuple[float, str]:
    """The divisor that brings ``values`` into a range matplotlib can draw (1 for most),
    and ``label`` saying it."""
    top = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    if top <= HUGE:
        return 1.0, label
    exponent = math.floor(math.log10(top))
    return 10.0 ** exponent, f"{label} (× 1e{exponent})"


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts) or 1
    return [c / total for c in counts]


def histogram(edges: list[float], series: dict[str, list[int]], title: str, xlabel: str,
              *, log_x: bool = False) -> str:
    """Overlaid step histograms (as shares, so samples of different size compare)."""
    colors = {"primary": PRIMARY, "shadow": SHADOW, "reference": REFERENCE, "current": SHADOW,
              "shadow (under replay)": SHADOW}
    scale, xlabel = _scale(edges, xlabel)
    edges = [e / scale for e in edges]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for name, counts in series.items():
            ax.stairs(_shares(counts), edges, label=name, color=colors.get(name), linewidth=1.5)
        if log_x:
            ax.set_xscale("log")
        ax.set_title(title, **LITERAL)
        ax.set_xlabel(xlabel, **LITERAL)
        ax.set_ylabel("share")
        ax.legend(frameon=False)

    return _svg(draw)


def ecdf(levels: list[float], series: dict[str, list[float] | None], title: str,
         xlabel: str) -> str:
    """Empirical CDFs drawn from 101 quantiles per sample."""
    colors = {"primary": PRIMARY, "shadow": SHADOW, "reference": REFERENCE, "current": SHADOW}
    scale, xlabel = _scale([v for q in series.values() for v in q or ()], xlabel)

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for name, q in series.items():
            if q:
                ax.step([v if v is None else v / scale for v in q], levels, where="post",
                        label=name, color=colors.get(name))
        ax.set_title(title, **LITERAL)
        ax.set_xlabel(xlabel, **LITERAL)
        ax.set_ylabel("cumulative share")
        ax.legend(frameon=False)

    return _svg(draw)


def binned_scatter(scatter: dict[str, Any], title: str) -> str:
    """Primary (x) against shadow (y) as a 2-D histogram of counts, with the diagonal."""
    from matplotlib.colors import LogNorm

    scale, xlabel = _scale(scatter["x_edges"] + scatter["y_edges"], "primary")
    _, ylabel = _scale(scatter["x_edges"] + scatter["y_edges"], "shadow")
    x_edges = [e / scale for e in scatter["x_edges"]]
    y_edges = [e / scale for e in scatter["y_edges"]]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        counts = [[c if c else float("nan") for c in row] for row in scatter["counts"]]
        mesh = ax.pcolormesh(x_edges, y_edges, counts, norm=LogNorm(), cmap="viridis")
        lo, hi = x_edges[0], x_edges[-1]
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle="--")
        ax.set_title(title, **LITERAL)
        ax.set_xlabel(xlabel, **LITERAL)
        ax.set_ylabel(ylabel, **LITERAL)
        fig.colorbar(mesh, ax=ax, label="pairs")

    return _svg(draw, width=4.6, height=3.8)


def matrix(classes: list[str], counts: list[list[int]], title: str) -> str:
    """A flip matrix heatmap: primary's class (rows) against the shadow's (columns)."""
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.imshow(counts, cmap="Blues")
        shown = [visible(c) for c in classes]
        ax.set_xticks(range(len(classes)), shown, **LITERAL)
        ax.set_yticks(range(len(classes)), shown, **LITERAL)
        for i, row in enumerate(counts):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8)
        ax.set_xlabel("shadow")
        ax.set_ylabel("primary")
        ax.set_title(title, **LITERAL)

    return _svg(draw, width=4.2, height=3.6)


def bars(categories: list[str], series: dict[str, list[float]], title: str) -> str:
    """Grouped bars of shares per category."""
    colors = {"primary": PRIMARY, "shadow": SHADOW, "reference": REFERENCE, "current": SHADOW}

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        width = 0.8 / max(len(series), 1)
        for k, (name, values) in enumerate(series.items()):
            ax.bar([i + k * width for i in range(len(categories))], values, width=width,
                   label=name, color=colors.get(name))
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(categories))],
                      [visible(c) for c in categories], rotation=30, ha="right", **LITERAL)
        ax.set_ylabel("share")
        ax.set_title(title, **LITERAL)
        ax.legend(frameon=False)

    return _svg(draw)


def generation_plots(g: dict[str, Any]) -> dict[str, list[str]]:
    """The generation section's plots: the similarity of the pairs' texts; latency, time to
    first token and tokens per second per side (quantile curves of the answers)."""
    out: dict[str, list[str]] = {}
    hist = g["text"]["similarity_histogram"]
    if any(hist):
        k = len(hist)
        out["generation"] = [histogram([i / k for i in range(k + 1)], {"pairs": list(hist)},
                                       "Similarity of the two texts", "similarity (Indel)")]
    curves = g["timing_curves"]
    plots = []
    for key, title, xlabel in (("ttft_ms", "Time to first token", "ms"),
                               ("tokens_per_s", "Tokens per second", "tokens/s"),
                               ("latency_ms", "Total latency", "ms")):
        series = curves[key]
        if any(series.values()):
            plots.append(ecdf(curves["levels"], series, f"{title} (ECDF)", xlabel))
    if plots:
        out["generation_timing"] = plots
    return out


def report_plots(report: dict[str, Any]) -> dict[str, list[str]]:
    """Every plot of a report, as SVG strings keyed by the section they illustrate."""
    out: dict[str, list[str]] = {}
    hist = report["operational"].get("latency_histogram")
    if hist:
        # A replayed target's latency was measured under replay load: say so on the plot.
        replayed = not report["operational"].get("latency_compared", True)
        out["operational"] = [histogram(
            hist["edges"], {"primary": hist["primary"],
                            "shadow (under replay)" if replayed else "shadow": hist["shadow"]},
            "Latency" + (": the shadow measured under replay" if replayed else ""),
            "ms (log scale)", log_x=True)]
    if "generation" in report:
        out.update(generation_plots(report["generation"]))
    p = report.get("predictions", {})
    if p.get("n") and p["task"] == "regression":
        q = p["quantiles"]
        out["predictions"] = [
            histogram(p["histogram"]["edges"], {"primary": p["histogram"]["primary"],
                                                "shadow": p["histogram"]["shadow"]},
                      "Predictions", "prediction"),
            ecdf(q["levels"], {"primary": q["primary"], "shadow": q["shadow"]},
                 "Predictions (ECDF)", "prediction"),
            binned_scatter(p["scatter"], "Primary vs shadow"),
            histogram(p["diff_histogram"]["edges"], {"shadow": p["diff_histogram"]["counts"]},
                      "Shadow − primary", "difference"),
        ]
    elif p.get("n"):
        # The classes the tables show, the others summed (a plot of 150 classes is a blur).
        classes, counts, _ = folded_flip_matrix(p["flip_matrix"])
        total = sum(map(sum, counts)) or 1
        out["predictions"] = [
            matrix(classes, counts, "Flip matrix"),
            bars(classes, {"primary": [sum(row) / total for row in counts],
                           "shadow": [sum(col) / total for col in zip(*counts, strict=True)]},
                 "Predicted classes"),
        ]
    plots = []
    for f in report["data_checks"].get("features", []):
        if "histogram" in f:
            h = f["histogram"]
            series = {"reference": h["reference"]} if h.get("reference") else {}
            series["current"] = h["current"]
            plots.append(histogram(h["edges"], series, f["name"], f["name"]))
            q = f["quantiles"]
            plots.append(ecdf(q["levels"], {"reference": q["reference"],
                                            "current": q["current"]},
                              f"{f['name']} (ECDF)", f["name"]))
        elif f["current"]["top"]:
            cats = [t["value"] for t in f["current"]["top"]]
            ref_top = {t["value"]: t["n"] for t in (f["reference"] or {}).get("top", [])}
            cur_n = f["current"]["n"] - f["current"]["missing"] or 1
            series = {"current": [t["n"] / cur_n for t in f["current"]["top"]]}
            if f["reference"]:
                ref_n = f["reference"]["n"] - f["reference"]["missing"] or 1
                series = {"reference": [ref_top.get(c, 0) / ref_n for c in cats], **series}
            plots.append(bars(cats, series, f["name"]))
    if plots:
        out["data_checks"] = plots
    return out
