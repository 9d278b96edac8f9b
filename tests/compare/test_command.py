"""``shadowproxy report`` through the real command line: formats, --fail-on, bad input."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import resource
import stat
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from shadowproxy.cli import main
from shadowproxy.compare.command import resolve_window
from shadowproxy.compare.visible import visible
from shadowproxy.compare.window import Window
from shadowproxy.errors import UsageError
from tests.compare.blocked import CLI, run_without
from tests.compare.records import Call, Exchange, insert, write_config

COMPARE = """
prediction: "$.prediction"
ignore: ["$.model_version"]
features:
  sqft: {path: "$.features.sqft", min: 0}
slices:
  big: "(request_body_json #>> '{features,sqft}')::float > 3000"
"""


@pytest.fixture
def config(sync_database_url: str, tmp_path: Path) -> Path:
    """A config over a database holding 200 exchanges from two differing models."""
    rng = np.random.default_rng(21)
    sqft = rng.uniform(500, 4000, 200)
    exchanges = [Exchange({"features": {"sqft": float(x)}},
                          Call({"prediction": 50 * x, "model_version": "v1"}),
                          {"candidate": Call({"prediction": 52 * x, "model_version": "v2"})})
                 for x in sqft]
    asyncio.run(insert(sync_database_url, exchanges))
    return write_config(tmp_path, sync_database_url, COMPARE)


def test_json_output_has_every_contract_key(config: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--format json -o FILE writes the canonical document with the contract's keys."""
    out = tmp_path / "report.json"
    assert main(["report", "-c", str(config), "--route", "house-prices", "--since", "1h",
                 "--format", "json", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"counts", "operational", "diff", "predictions", "performance", "data_checks",
            "slices", "verdict"} <= set(report)
    assert report["counts"]["pairs"] == 200
    assert report["predictions"]["within_tolerance"] == 0
    assert "verdict" in capsys.readouterr().err


def test_text_markdown_and_html_render_the_same_report(config: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Text goes to stdout as tables; Markdown has tables; HTML is self-contained with SVGs."""
    args = ["report", "-c", str(config), "--route", "house-prices"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Verdict:" in text and "Predictions (regression" in text and "MAE" in text
    md = tmp_path / "r.md"
    assert main([*args, "--format", "markdown", "-o", str(md)]) == 0
    assert "| MAE |" in md.read_text() and md.read_text().startswith("# shadowproxy report")
    page = tmp_path / "r.html"
    assert main([*args, "--format", "html", "-o", str(page)]) == 0
    html = page.read_text()
    assert html.count("<svg") >= 6  # latency, 4 prediction plots, feature histogram + ECDF
    for fetch in ('src="http', 'href="http', "url(http", "@import", "<script", "<link"):
        assert fetch not in html  # nothing to fetch: namespaces (xmlns) are only names


def test_fail_on_sets_exit_status_3(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--fail-on warn exits 3 when the verdict is warn or worse; --fail-on fail does not."""
    args = ["report", "-c", str(config), "--route", "house-prices", "--format", "json"]
    assert main([*args, "--fail-on", "warn"]) == 3
    status = json.loads(capsys.readouterr().out)["verdict"]["status"]
    assert status == "warn"
    assert main([*args, "--fail-on", "fail"]) == 0


@pytest.mark.parametrize(("extra", "message"), [
    (["--route", "nope"], "no route named 'nope'"),
    (["--route", "house-prices", "--shadow", "ghost"], "has no shadow named 'ghost'"),
    (["--route", "house-prices", "--since", "soon"], "expected a duration"),
    (["--route", "house-prices", "--since", "-1h"], "a negative duration makes no sense"),
    (["--route", "house-prices", "--since=-1h"], "(for the last 1h, write 1h)"),
    (["--route", "house-prices", "--from", "2025-02-01", "--to", "2025-01-01"],
     "the window is empty"),
    (["--route", "house-prices", "--from", "yesterday"], "ISO 8601"),
    (["--route", "house-prices", "--reference", "/nonexistent.csv"], "no such file"),
])
def test_bad_arguments_exit_2_with_what_to_do(config: Path, capsys: pytest.CaptureFixture[str],
                                             extra: list[str], message: str) -> None:
    """Unknown route or shadow, a bad window, a missing reference: exit 2, a clear message."""
    assert main(["report", "-c", str(config), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("compare", "message"), [
    ('prediction: "$.pred[[["', "compare.prediction: PostgreSQL rejects the jsonpath"),
    ('prediction: "$.p"\nslices:\n  bad: "no_such_column > 1"',
     "compare.slices.bad: PostgreSQL rejects the condition"),
    # A placeholder would take one of the report's own values (the route's name, the window).
    ('prediction: "$.p"\nslices:\n  bad: "route = $1"',
     "compare.slices.bad: the condition 'route = $1' has a parameter placeholder"),
    ('prediction: "$.p"\nignore: ["$.a ? (@ > 1)"]', "ignore supports"),
])
def test_configuration_postgresql_rejects_exits_2(sync_database_url: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   compare: str, message: str) -> None:
    """A jsonpath, slice or ignore path PostgreSQL cannot use is named by its config key."""
    path = write_config(tmp_path, sync_database_url, compare)
    assert main(["report", "-c", str(path), "--route", "house-prices"]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_reference_exits_2(config: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A reference without the features' columns, or not a data file, is a usage error."""
    ref = tmp_path / "train.csv"
    ref.write_text("area,price\n1,2\n")
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--reference", str(ref)]) == 2
    assert "no column for the features ['sqft']" in capsys.readouterr().err
    bad = tmp_path / "train.parquet"
    bad.write_text("not parquet")
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--reference", str(bad)]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_window_forms() -> None:
    """--since ends now, --from/--to is explicit, naive times are UTC, --to alone uses 24h."""
    now = datetime(2025, 3, 1, 12, tzinfo=UTC)
    w = resolve_window("15m", None, None, now)
    assert (w.start, w.end) == (now - timedelta(minutes=15), now)
    w = resolve_window(None, "2025-02-01T00:00", "2025-02-02T00:00+01:00", now)
    assert w.start == datetime(2025, 2, 1, tzinfo=UTC)
    assert w.end == datetime(2025, 2, 1, 23, tzinfo=UTC)
    w = resolve_window(None, None, "2025-02-02T00:00Z", now)
    assert w.end - w.start == timedelta(hours=24)
    assert w.earlier().end == w.start
    w = resolve_window(None, "1000-01-01", None, now)
    assert w.earlier() == Window(datetime.min.replace(tzinfo=UTC), w.start)
    with pytest.raises(UsageError):
        resolve_window("0h", None, None, now)


@pytest.mark.parametrize("window", [
    ["--from", "0001-01-01"], ["--from", "0001-01-01T00:30"], ["--from", "1000-01-01"],
    ["--since", "60000w"], ["--from", "2020-01-01", "--to", "9999-12-31T23:59:59"]])
def test_a_window_from_year_1_or_to_year_9999_is_reported(
        config: Path, tmp_path: Path, window: list[str]) -> None:
    """Every record, however early the window starts or late it ends: the data checks'
    earlier window starts at year 1 at the earliest, and the summaries are looked up from
    the hour before the start, which PostgreSQL subtracts (both overflowed Python's
    datetime: exit with a traceback)."""
    out = tmp_path / "report.json"
    assert main(["report", "-c", str(config), "--route", "house-prices", *window,
                 "--format", "json", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["counts"]["pairs"] == 200
    reference = report["data_checks"]["reference"]
    assert reference["kind"] == "earlier_window"
    assert reference["end"] == report["meta"]["window"]["start"]
    assert datetime.fromisoformat(reference["start"]) >= datetime.min.replace(tzinfo=UTC)


def test_a_report_written_over_a_symlink_goes_to_its_target_with_the_old_mode(
        config: Path, tmp_path: Path) -> None:
    """-o a symlink (latest.json -> reports/2025-01-01.json, a published report kept
    private with mode 0600) writes the report to the link's target, keeping the link and
    the target's mode; the new file was renamed over the link and made with the default
    mode, readable by all. A new file gets the default mode."""
    reports = tmp_path / "reports"
    reports.mkdir()
    target = reports / "2025-01-01.json"
    target.write_text("old")
    target.chmod(0o600)
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    chain = tmp_path / "chain.json"
    chain.symlink_to(link)
    for out in (link, chain):
        assert main(["report", "-c", str(config), "--route", "house-prices",
                     "--format", "json", "-o", str(out)]) == 0
        assert out.is_symlink() and link.is_symlink() and out.resolve() == target
        assert json.loads(target.read_text())["counts"]["pairs"] == 200
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        target.write_text("old")
    assert sorted(p.name for p in reports.iterdir()) == ["2025-01-01.json"]
    dangling = tmp_path / "next.json"
    dangling.symlink_to(reports / "2025-01-02.json")
    assert main(["report", "-c", str(config), "--route", "house-prices", "--format", "json",
                 "-o", str(dangling)]) == 0
    assert dangling.is_symlink() and (reports / "2025-01-02.json").is_file()
    fresh = tmp_path / "fresh.json"
    assert main(["report", "-c", str(config), "--route", "house-prices", "--format", "json",
                 "-o", str(fresh)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_report_on_replayed_targets_named_outside_the_config(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--shadow and baseline_shadow may name targets replayed into the window, not in config."""
    exchanges = [Exchange({"x": i}, Call({"prediction": float(i), "at": f"p{i}"}),
                          {"candidate": Call({"prediction": float(i) + 1, "at": f"c{i}"})},
                          replays={"candidate-replay": Call({"prediction": float(i) + 1,
                                                             "at": f"r{i}"}, latency_ms=90.0),
                                   "primary-replay": Call({"prediction": float(i),
                                                           "at": f"b{i}"}, latency_ms=80.0)})
                 for i in range(40)]
    asyncio.run(insert(sync_database_url, exchanges))
    config = write_config(tmp_path, sync_database_url,
                          'prediction: "$.prediction"\nbaseline_shadow: primary-replay')
    args = ["report", "-c", str(config), "--route", "house-prices", "--format", "json"]
    assert main([*args, "--shadow", "candidate-replay"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"]["shadow_role"] == "replay" and report["counts"]["pairs"] == 40
    assert report["predictions"]["baseline_noise"]["shadow"] == "primary-replay"
    assert report["diff"]["noise_fields"] == ["$.at"]
    assert main(args) == 0  # the live shadow, against the replayed baseline
    assert json.loads(capsys.readouterr().out)["meta"]["shadow_role"] == "shadow"
    assert main([*args, "--shadow", "ghost"]) == 2
    err = capsys.readouterr().err
    assert "has no shadow named 'ghost'" in err and "no target was replayed as 'ghost'" in err


@pytest.mark.parametrize(("blocked", "extra", "named"), [
    (["numpy"], [], "numpy"),
    (["scipy"], [], "scipy"),
    (["rapidfuzz"], [], "rapidfuzz"),
    (["matplotlib"], ["--format", "html", "-o", "r.html"], "matplotlib"),
    (["pyarrow"], ["--reference", "train.parquet"], "pyarrow"),
])
def test_a_report_without_its_extra_says_what_to_install(
        config: Path, tmp_path: Path, blocked: list[str], extra: list[str], named: str) -> None:
    """numpy, scipy, rapidfuzz, matplotlib (HTML) or pyarrow (Parquet) missing: exit 1
    naming the extra, as every command with an extra missing."""
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    args = ["report", "-c", str(config), "--route", "house-prices",
            *[str(tmp_path / a) if a.startswith(("r.", "train.")) else a for a in extra]]
    done = run_without(blocked, CLI, *args)
    assert done.returncode == 1, done.stderr
    assert named in done.stderr and "pip install 'shadowproxy[report]'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r.html").exists()


def test_a_csv_reference_needs_no_pyarrow(config: Path, tmp_path: Path) -> None:
    """--reference x.csv with pyarrow missing: the report reads it and checks against it."""
    rng = np.random.default_rng(22)
    sqft = rng.normal(2000, 500, 300)
    path = tmp_path / "train.csv"
    path.write_text("sqft,other\n" + "".join(f"{float(x)!r},a\n" for x in sqft))
    done = run_without(["pyarrow"], CLI, "report", "-c", str(config), "--route", "house-prices",
                       "--reference", str(path), "--format", "json")
    assert done.returncode == 0, done.stderr
    checks = json.loads(done.stdout)["data_checks"]
    assert checks["reference"] == {"kind": "file", "path": str(path)}
    ref = checks["features"][0]["reference"]
    assert ref["n"] == 300 and ref["mean"] == pytest.approx(np.mean(sqft))
    assert ref["sd"] == pytest.approx(np.std(sqft, ddof=1))


@pytest.mark.parametrize(("n", "since"), [(0, "1h"), (40, "1h")])
def test_a_report_on_too_little_evidence_does_not_pass_a_gate(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        n: int, since: str) -> None:
    """No pairs, or fewer comparable pairs than min_pairs: verdict fail, --fail-on exits 3."""
    asyncio.run(insert(sync_database_url, [
        Exchange({"x": i}, Call({"prediction": float(i)}),
                 {"candidate": Call({"prediction": float(i)})}) for i in range(n)]))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.prediction"')
    args = ["report", "-c", str(config), "--route", "house-prices", "--since", since,
            "--format", "json"]
    assert main([*args, "--fail-on", "fail"]) == 3
    verdict = json.loads(capsys.readouterr().out)["verdict"]
    assert verdict["status"] == "fail"
    assert [r["section"] for r in verdict["reasons"] if r["level"] == "fail"] == ["counts"]
    assert "min_pairs (100)" in verdict["reasons"][0]["message"]


def _hostile_config(url: str, tmp_path: Path, values: list[str]) -> Path:
    """A config over 200 exchanges whose recorded category and request ids are ``values``
    (a categorical feature, a slice family by it, the largest differences by request id)."""
    rng = np.random.default_rng(23)
    exchanges = [Exchange({"features": {"kind": values[i % len(values)]}},
                          Call({"prediction": float(rng.normal())}),
                          {"candidate": Call({"prediction": float(rng.normal())})},
                          request_id=f"{values[i % len(values)]}-{i}")
                 for i in range(200)]
    asyncio.run(insert(url, exchanges))
    return write_config(tmp_path, url, 'prediction: "$.prediction"\nfeatures:\n'
                        '  kind: {path: "$.features.kind", type: categorical}\n'
                        'slices:\n  kinds: {feature: kind}')


def test_recorded_values_are_text_not_markup_in_the_text_report(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recorded value with rich's markup brackets is shown as recorded, and the text
    report is written."""
    config = _hostile_config(sync_database_url, tmp_path, ["[/bold]", "[red]hot[/red]"])
    assert main(["report", "-c", str(config), "--route", "house-prices"]) == 0
    text = capsys.readouterr().out
    assert "kind = [/bold]" in text and "kind = [red]hot[/red]" in text


def test_control_characters_in_recorded_values_do_not_reach_the_terminal(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ESC and CSI sequences in a recorded value are shown as escapes in the text report;
    no control character but newline reaches the terminal."""
    config = _hostile_config(sync_database_url, tmp_path,
                             ["\x1b[2J\x1b]0;owned\x07", "\x9b31mred"])
    assert main(["report", "-c", str(config), "--route", "house-prices"]) == 0
    text = capsys.readouterr().out
    assert not {c for c in text if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f}
    assert "kind = \\x1b[2J\\x1b]0;owned\\x07" in text and "kind = \\x9b31mred" in text


def test_bidirectional_overrides_in_recorded_values_are_shown_as_escapes(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recorded value with a right-to-left override, an isolate or a line separator is
    shown with their escapes in the text report: a terminal that reorders the line would
    show LIAF after a right-to-left override as FAIL."""
    config = _hostile_config(sync_database_url, tmp_path,
                             ["\u202eLIAF", "\u2067x\u2069", "a\u2028b\u200fc"])
    assert main(["report", "-c", str(config), "--route", "house-prices"]) == 0
    text = capsys.readouterr().out
    assert not set(text) & set("\u202e\u2067\u2069\u2028\u200f")
    assert "kind = \\u202eLIAF" in text and "kind = \\u2067x\\u2069" in text
    assert "kind = a\\u2028b\\u200fc" in text

def test_line_breaks_in_generated_texts_are_escapes_in_the_text_report(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A generated text with newlines is shown on one line of the text report, its
    newlines as ``\\n``: printed as lines, it could fake a verdict or a tool call below
    it. Each real tool call still has a line of its own."""
    fake = "ok\n\nVerdict: PASS\n→ transfer({})"

    def chat(text: str, call: bool) -> dict[str, object]:
        message: dict[str, object] = {"role": "assistant", "content": text}
        if call:
            message["tool_calls"] = [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
        return {"object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": message, "finish_reason": "stop"}]}

    asyncio.run(insert(sync_database_url, [
        Exchange({"messages": [{"role": "user", "content": "hi"}]},
                 Call(chat(f"answer {i}", False)), {"candidate": Call(chat(fake, True))},
                 route="chat", path="/v1/chat/completions") for i in range(40)]))
    config = write_config(tmp_path, sync_database_url, "task: generation", route="chat")
    assert main(["report", "-c", str(config), "--route", "chat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines
                if line.lstrip(" │").startswith(("Verdict: PASS", "→ transfer"))]
    pairs = lines[next(i for i, line in enumerate(lines)
                       if line.startswith("Generation: most different pairs")):]
    assert any("ok\\n\\nVerdict: PASS\\n→ transfer({})" in line for line in pairs)
    assert any(line.rstrip().endswith('│ → get_weather({"city": "Oslo"})') for line in pairs)
    assert any(line.startswith("diff: ") and line.endswith("PASS\\n→ transfer({})+}")
               for line in pairs)


def _markdown_tables(path: Path) -> list[list[list[str]]]:
    """Every table of a Markdown file as a CommonMark parser with GFM tables reads it:
    rows of cell texts."""
    from markdown_it import MarkdownIt

    tables: list[list[list[str]]] = []
    in_table = False
    for token in MarkdownIt("commonmark").enable("table").parse(
            path.read_bytes().decode()):
        if token.type in ("table_open", "table_close"):
            in_table = token.type == "table_open"
            tables += [[]] if in_table else []
        elif in_table and token.type == "tr_open":
            tables[-1].append([])
        elif in_table and token.type == "inline":
            tables[-1][-1].append(token.content)
    return tables


def test_line_breaks_in_recorded_values_keep_markdown_rows_whole(
        sync_database_url: str, tmp_path: Path) -> None:
    """A recorded value with CR, CRLF or LF stays within its row of a Markdown table."""
    config = _hostile_config(sync_database_url, tmp_path, ["a\rb", "c\r\nd", "e\nf"])
    md = tmp_path / "r.md"
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--format", "markdown", "-o", str(md)]) == 0
    slices = next(t for t in _markdown_tables(md) if t[0][0] == "slice")
    assert [row[0] for row in slices[1:]] == ["(whole)", "kind = a b", "kind = c d",
                                              "kind = e f"]
    assert {len(row) for row in slices} == {6}


def test_tags_in_recorded_values_are_text_in_the_markdown_report(
        sync_database_url: str, tmp_path: Path) -> None:
    """A recorded value with HTML tags is text in the page a Markdown viewer makes of the
    report (CommonMark passes raw HTML through): no script, no image, the value readable."""
    from markdown_it import MarkdownIt

    config = _hostile_config(sync_database_url, tmp_path, [
        "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "AT&amp;T"])
    md = tmp_path / "r.md"
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--format", "markdown", "-o", str(md)]) == 0
    page = MarkdownIt("commonmark").enable("table").render(md.read_text())
    assert "<script" not in page and "<img" not in page
    assert "<td>kind = &lt;script&gt;alert(1)&lt;/script&gt;</td>" in page
    assert "<td>kind = &quot;&gt;&lt;img src=x onerror=alert(1)&gt;</td>" in page
    assert "<td>kind = AT&amp;amp;T</td>" in page


HOSTILE_MARKDOWN = ["![x](http://e.vil/i.png)", "[click](http://e.vil/)", "a\\|b",
                    "**b** _i_ `c` ~~s~~", "\x1b[2J\x1b]8;;http://e.vil/\x07l\x1b]8;;\x07"]


def test_markdown_syntax_in_recorded_values_is_text_in_the_markdown_report(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recorded value with an image, a link, emphasis, a backslash before a pipe or
    control characters is shown as recorded by a Markdown viewer: no image loaded from
    another host, no link, every row with its cells, no control character in the report
    printed to the terminal."""
    from markdown_it import MarkdownIt

    config = _hostile_config(sync_database_url, tmp_path, HOSTILE_MARKDOWN)
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert not {c for c in text if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f}
    md = tmp_path / "r.md"
    md.write_text(text)
    page = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(text)
    assert [tag for tag in ("<img", "<a ", "<strong>", "<code>", "<s>") if tag in page] == []
    slices = next(t for t in _markdown_tables(md) if t[0][0] == "slice")
    assert {len(row) for row in slices} == {6}
    for cell in ("kind = ![x](http://e.vil/i.png)", "kind = [click](http://e.vil/)",
                 "kind = a\\|b", "kind = **b** _i_ `c` ~~s~~",
                 "kind = \\x1b[2J\\x1b]8;;http://e.vil/\\x07l\\x1b]8;;\\x07"):
        assert f"<td>{cell}</td>" in page.replace("<wbr>", "")  # URLs broken: no autolink


def _hostile_generation_config(url: str, tmp_path: Path) -> Path:
    """A config over 40 chat exchanges whose shadow answered with an image, a link and an
    ESC sequence in its text."""
    def chat(text: str) -> dict[str, object]:
        return {"object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"}]}

    exchanges = [Exchange({"messages": [{"role": "user", "content": "hi"}]},
                          Call(chat(f"answer {i}")),
                          {"candidate": Call(chat(f"see ![x](http://e.vil/{i}.png) "
                                                  "[click](http://e.vil/) \x1b[2J"))},
                          route="chat", path="/v1/chat/completions")
                 for i in range(40)]
    asyncio.run(insert(url, exchanges))
    return write_config(tmp_path, url, "task: generation", route="chat")


def test_markdown_syntax_in_generated_texts_is_text_in_the_markdown_diff(
        sync_database_url: str, tmp_path: Path) -> None:
    """Generated texts with an image, a link or control characters are text in the
    Markdown report's pairs and their word diff."""
    from markdown_it import MarkdownIt

    config = _hostile_generation_config(sync_database_url, tmp_path)
    md = tmp_path / "r.md"
    assert main(["report", "-c", str(config), "--route", "chat", "--format", "markdown",
                 "-o", str(md)]) == 0
    text = md.read_text()
    assert "\x1b" not in text
    page = MarkdownIt("commonmark").enable("table").render(text)
    assert "Generation: most different pairs" in page
    assert "<img" not in page and "<a " not in page
    assert re.search(r"<ins>!\[x\]\(http:<wbr>//e\.vil/\d+\.png\) \[click\]\(http:<wbr>//e\.vil/\) "
                     r"\\x1b\[2J</ins>", page)
    assert re.search(r"<td>see !\[x\]\(http:<wbr>//e\.vil/\d+\.png\) "
                     r"\[click\]\(http:<wbr>//e\.vil/\) \\x1b\[2J</td>", page)


# What GitHub links or turns into a notification in a text node: a URL, www., a mention
# or an email address, an issue reference.
GITHUB_LINKING = re.compile(r"(?i)(://|\bwww\.|@[0-9a-z]|#[0-9]|\bGH-[0-9])")
LINKING_VALUES = ["cc @octocat", "fixes #123 and GH-7", "see https://e.vil/x", "www.e.vil",
                  "ftp://e.vil", "mail a@b.co"]


def _text_nodes(page: str) -> list[str]:
    """The text nodes of an HTML page: where GitHub looks for mentions and references."""
    from html.parser import HTMLParser

    class Texts(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.texts: list[str] = []

        def handle_data(self, data: str) -> None:
            self.texts.append(data)

    parser = Texts()
    parser.feed(page)
    return parser.texts


def test_links_and_mentions_in_recorded_values_are_broken_in_the_markdown_report(
        sync_database_url: str, tmp_path: Path) -> None:
    """Recorded values and generated texts with a bare URL, ``www.``, an ``@mention``, an
    email address or an issue reference (``#123``, ``GH-7``) are shown as recorded in the
    Markdown report, but no text node of the page has one whole: pasted into a GitHub
    issue, the report linked out, notified those users and back-linked from those issues."""
    from markdown_it import MarkdownIt

    config = _hostile_config(sync_database_url, tmp_path, LINKING_VALUES)
    md = tmp_path / "r.md"
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--format", "markdown", "-o", str(md)]) == 0
    page = MarkdownIt("commonmark").enable("table").render(md.read_text())
    assert [t for t in _text_nodes(page) if GITHUB_LINKING.search(t)] == []
    for value in LINKING_VALUES:  # shown as recorded: <wbr> is only a break opportunity
        assert f"<td>kind = {html.escape(value)}</td>" in page.replace("<wbr>", "")

    def chat(text: str) -> dict[str, object]:
        return {"object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"}]}

    text = " ".join(LINKING_VALUES)
    asyncio.run(insert(sync_database_url, [
        Exchange({"messages": [{"role": "user", "content": "hi"}]}, Call(chat(f"answer {i}")),
                 {"candidate": Call(chat(text))}, route="chat", path="/v1/chat/completions")
        for i in range(40)]))
    config = write_config(tmp_path, sync_database_url, "task: generation", route="chat")
    assert main(["report", "-c", str(config), "--route", "chat", "--format", "markdown",
                 "-o", str(md)]) == 0
    page = MarkdownIt("commonmark").enable("table").render(md.read_text())
    assert "Generation: most different pairs" in page
    assert [t for t in _text_nodes(page) if GITHUB_LINKING.search(t)] == []
    assert f"<td>{html.escape(text)}</td>" in page.replace("<wbr>", "")

def test_tags_in_recorded_values_are_text_in_the_html_report(
        sync_database_url: str, tmp_path: Path) -> None:
    """Recorded values with tags, a closing script tag, a javascript: URL or a line
    separator are text of the HTML report (tables, plots, the embedded JSON): the page has
    no element and no attribute that came from them."""
    from html.parser import HTMLParser

    values = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>',
              "</script><script>alert(1)</script>", "javascript:alert(1)", "a\u2028b"]
    config = _hostile_config(sync_database_url, tmp_path, values)
    page = tmp_path / "r.html"
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--format", "html", "-o", str(page)]) == 0

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: set[str] = set()
            self.attributes: set[tuple[str, str]] = set()
            self.texts: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags.add(tag)
            self.attributes |= {(name, value or "") for name, value in attrs}

        def handle_data(self, data: str) -> None:
            self.texts.append(data)

    parsed = Page()
    parsed.feed(page.read_text())
    assert not parsed.tags & {"script", "img", "a", "iframe", "link", "object", "embed"}
    assert not [a for a in parsed.attributes
                if a[0].startswith("on") or "javascript:" in a[1] or "alert" in a[1]]
    for value in map(visible, values):
        assert f"kind = {value}" in parsed.texts  # a slice's cell
        assert value in parsed.texts  # a bar of the plot of the categories

def test_control_characters_in_recorded_values_do_not_reach_the_terminal_in_html(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The HTML report printed to the terminal (no -o) holds no control character or
    bidirectional override of a recorded value: they are shown as escapes, as in the text
    report, in the tables and the generation pairs and diff."""
    config = _hostile_config(sync_database_url, tmp_path,
                             ["\x1b[2J\x1b]0;owned\x07", "\x9b31mred", "\u202eLIAF"])
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--format", "html"]) == 0
    page = capsys.readouterr().out
    assert not {c for c in page if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f
                or c == "\u202e"}
    assert all(f"<td>kind = {value}</td>" in page for value in (
        "\\x1b[2J\\x1b]0;owned\\x07", "\\x9b31mred", "\\u202eLIAF"))
    config = _hostile_generation_config(sync_database_url, tmp_path)
    assert main(["report", "-c", str(config), "--route", "chat", "--format", "html"]) == 0
    page = capsys.readouterr().out
    assert "\x1b" not in page and "[click](http://e.vil/) \\x1b[2J</ins>" in page
    assert re.search(r"<td>see !\[x\]\(http://e\.vil/\d+\.png\) \[click\]\(http://e\.vil/\) "
                     r"\\x1b\[2J</td>", page)

def test_dollar_signs_in_recorded_values_are_drawn_as_text_in_html_plots(
        sync_database_url: str, tmp_path: Path) -> None:
    """Categories with dollar signs (mathtext to matplotlib) are drawn as written in the
    HTML report's plots; "$$" or "$x^$" stopped the report with a traceback."""
    config = _hostile_config(sync_database_url, tmp_path, ["$$", "$x^$", "$5 or $10"])
    page = tmp_path / "r.html"
    assert main(["report", "-c", str(config), "--route", "house-prices",
                 "--format", "html", "-o", str(page)]) == 0
    svg = page.read_text().split('<div class="plots">')[-1]
    assert all(f">{value}</text>" in svg for value in ("$$", "$x^$", "$5 or $10"))


def test_control_characters_in_recorded_values_are_drawn_as_escapes_in_html_plots(
        sync_database_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Categories with control characters are drawn as their escapes in the HTML report's
    plots: matplotlib has no glyph for them and warned on stderr quoting the character, so
    an ESC reached the terminal that ran the report."""
    config = _hostile_config(sync_database_url, tmp_path, ["\x1b[2J", "\x07bell", "\u202eLIAF"])
    page = tmp_path / "r.html"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["report", "-c", str(config), "--route", "house-prices",
                     "--format", "html", "-o", str(page)]) == 0
    assert [str(w.message) for w in caught] == []
    assert not {c for c in capfd.readouterr().err if ord(c) < 32 and c != "\n"}
    svg = page.read_text().split('<div class="plots">')[-1]
    assert all(f">{value}</text>" in svg for value in ("\\x1b[2J", "\\x07bell",
                                                       "\\u202eLIAF"))


def test_a_flip_matrix_of_many_classes_shows_the_most_frequent_and_sums_the_others(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """150 item ids predicted as classes (numeric strings): the text, Markdown and HTML
    flip matrices show the 10 classes in the most pairs and one "(140 others)" row and
    column holding the rest, and say so; the JSON keeps all 150. The matrix had a column
    per class, squeezed to nothing in a terminal and hundreds of columns on a page."""
    rng = np.random.default_rng(31)
    names = [str(1000 + i) for i in range(150)]
    weights = np.where(np.arange(150) % 15 == 0, 20.0, 1.0)  # 1000, 1015, … are frequent
    p = rng.choice(150, 1200, p=weights / weights.sum())
    s = np.where(rng.random(1200) < 0.8, p, rng.choice(150, 1200))
    asyncio.run(insert(sync_database_url, [
        Exchange({"features": {"x": i}}, Call({"item": names[p[i]]}),
                 {"candidate": Call({"item": names[s[i]]})}) for i in range(1200)]))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.item"')
    args = ["report", "-c", str(config), "--route", "house-prices"]
    top = [names[i] for i in range(0, 150, 15)]
    others = [i for i in range(150) if i % 15]
    other_row = [int(np.sum(np.isin(p, others) & (s == j))) for j in range(0, 150, 15)]
    other_row.append(int(np.sum(np.isin(p, others) & np.isin(s, others))))

    out = tmp_path / "r.json"
    assert main([*args, "--format", "json", "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["predictions"]["flip_matrix"]["classes"]) == 150

    assert main(args) == 0
    text = capsys.readouterr().out
    assert "the other 140 summed in the last row and column" in text
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith(" primary \\ shadow"))
    assert [c.strip() for c in head.split("┃")[1:]] == [
        *top, "(140 others)"]
    last = next(line for line in lines if line.startswith(" (140 others)"))
    assert [int(c.replace(",", "")) for c in last.split("│")[1:]] == other_row

    md = tmp_path / "r.md"
    assert main([*args, "--format", "markdown", "-o", str(md)]) == 0
    flips = next(t for t in _markdown_tables(md) if t[0][0].startswith("primary"))
    assert flips[0][1:] == [*top, "(140 others)"] and len(flips) == 12
    assert [int(c.replace(",", "")) for c in flips[-1][1:]] == other_row

    page = tmp_path / "r.html"
    assert main([*args, "--format", "html", "-o", str(page)]) == 0
    table = page.read_text().split("<caption>flip matrix")[1].split("</table>")[0]
    assert table.count("<th>") == 12 and table.count("<tr>") == 12


def test_a_roc_auc_not_computed_says_why_in_the_text_report(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Labels of one class give no ROC-AUC (it ranks positives against negatives): the
    text report's cell says so, and ``roc_auc_why`` in the JSON. It showed a bare –, as
    if the report had failed to compute it."""
    rng = np.random.default_rng(32)
    exchanges = [Exchange({"features": {"x": i}},
                          Call({"label": int(rng.integers(0, 2)), "proba": float(rng.random())}),
                          {"candidate": Call({"label": int(rng.integers(0, 2)),
                                              "proba": float(rng.random())})})
                 for i in range(120)]
    asyncio.run(insert(sync_database_url, exchanges))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.label"\nscore: "$.proba"')
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\n" + "".join(f"{e.request_id},1\n" for e in exchanges))
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    args = ["report", "-c", str(config), "--route", "house-prices"]
    assert main(args) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith(" roc_auc "))
    assert [c.strip() for c in row.split("│")[1:]] == ["– (one class in the labels: 1)"] * 2
    out = tmp_path / "r.json"
    assert main([*args, "--format", "json", "-o", str(out)]) == 0
    shadow = json.loads(out.read_text())["performance"]["shadow"]
    assert shadow["roc_auc"] is None and shadow["roc_auc_why"] == "one class in the labels: 1"


def test_a_paired_test_on_few_pairs_reads_not_significant_not_no_difference(
        sync_database_url: str, tmp_path: Path) -> None:
    """Five pairs, two flipped one way (McNemar p = 0.5), or all shifted up (Wilcoxon
    p = 0.0625): the JSON's explanation says the test is not significant, with its p-value
    against alpha; the verdict is unchanged. It said "no one-way flips" and "no
    systematic difference", which read as evidence that the shadow does not differ."""
    asyncio.run(insert(sync_database_url, [
        Exchange({"features": {"x": i}}, Call({"label": "a", "v": 1.0}),
                 {"candidate": Call({"label": "b" if i < 2 else "a", "v": 1.5 + i})})
        for i in range(5)]))
    out = tmp_path / "r.json"
    paired: dict[str, dict[str, str]] = {}
    for path, task in (("$.label", "classification"), ("$.v", "regression")):
        config = write_config(tmp_path, sync_database_url,
                              f'prediction: "{path}"\ntask: {task}')
        assert main(["report", "-c", str(config), "--route", "house-prices",
                     "--format", "json", "-o", str(out)]) == 0
        paired[path] = json.loads(out.read_text())["predictions"]["paired"]
    assert paired["$.label"]["decision"] is False
    assert paired["$.label"]["explanation"] == (
        "one-way flips not significant: a → b in 2 pairs and back in 0 (net 40.00% of 5); "
        "mcnemar_exact p = 0.5 ≥ 0.05")
    assert paired["$.v"]["decision"] is False
    assert paired["$.v"]["explanation"].startswith("systematic difference not significant: ")
    assert paired["$.v"]["explanation"].endswith("p = 0.0625 ≥ 0.05")


def test_a_wrapped_diff_line_starts_no_report_line_with_recorded_text(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A generated text padded with spaces so that, wrapped at the console's width, its
    ``Verdict: PASS`` fell at the start of a line: the diff's continuation lines are
    indented under its first word, so the only line that starts with ``Verdict`` is the
    report's own. They started at column 0."""
    def chat(text: str) -> dict[str, object]:
        return {"object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"}]}

    fake = "x" * 100 + " " * 14 + "Verdict: PASS" + " " * 200
    asyncio.run(insert(sync_database_url, [
        Exchange({"messages": [{"role": "user", "content": "hi"}]},
                 Call(chat(f"answer {i}")), {"candidate": Call(chat(fake))},
                 route="chat", path="/v1/chat/completions") for i in range(40)]))
    config = write_config(tmp_path, sync_database_url, "task: generation", route="chat")
    assert main(["report", "-c", str(config), "--route", "chat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("Verdict")] == [lines[0]]
    assert any(line.startswith("      Verdict:+}") for line in lines)  # the diff, indented
    assert max(map(len, lines)) <= 120


def test_a_report_that_cannot_be_written_whole_leaves_the_earlier_file(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-o onto an earlier report, on a disk that fills up while the new one is written (a
    file-size limit, which the kernel enforces as it would a full disk): exit status 2,
    and the earlier report is left as it was. It was cut to the part that fitted."""
    page = tmp_path / "r.html"
    page.write_text("the earlier report\n", encoding="utf-8")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        status = main(["report", "-c", str(config), "--route", "house-prices", "--format",
                       "html", "-o", str(page)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 2
    assert "cannot write the report: File too large" in capsys.readouterr().err
    assert page.read_text(encoding="utf-8") == "the earlier report\n"
    assert [p.name for p in tmp_path.iterdir() if "r.html" in p.name] == ["r.html"]
