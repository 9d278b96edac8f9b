"""``shadowproxy labels import``: idempotent upserts, JSON labels, unknown ids reported."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.cli import main
from tests.compare.records import Call, Exchange, insert, write_config


async def _labels(url: str) -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT request_id, label::text FROM shadowproxy.labels")
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}


def test_import_is_idempotent_and_reports_unknown_ids(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second import changes nothing; a corrected label replaces the old one."""
    ex = [Exchange({"x": i}, Call({"p": i}), {"candidate": Call({"p": i})},
                   request_id=f"req-{i}") for i in range(3)]
    asyncio.run(insert(sync_database_url, ex))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nreq-0,1\nreq-1,cat\nreq-2,\"[1, 0]\"\nghost,0\n"
                      "req-0,1\n,5\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    out = capsys.readouterr().out
    assert "4 new labels, 0 changed, 0 unchanged" in out
    assert "1 rows without id or label skipped" in out and "1 repeated ids" in out
    assert "1 request ids match no recorded request (yet), e.g. ghost" in out
    assert asyncio.run(_labels(sync_database_url)) == {
        "req-0": "1", "req-1": '"cat"', "req-2": "[1, 0]", "ghost": "0"}

    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert "0 new labels, 0 changed, 4 unchanged" in capsys.readouterr().out
    labels.write_text("request_id,label\nreq-0,0\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert "0 new labels, 1 changed" in capsys.readouterr().out
    assert asyncio.run(_labels(sync_database_url))["req-0"] == "0"


def test_a_file_without_the_columns_is_refused(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No request_id,label header, or no file at all: exit 2 saying what is expected."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    bad = tmp_path / "bad.csv"
    bad.write_text("id,y\n1,2\n")
    assert main(["labels", "import", "-c", str(config), str(bad)]) == 2
    assert "expected a header row with the columns request_id,label" in capsys.readouterr().err
    assert main(["labels", "import", "-c", str(config), str(tmp_path / "none.csv")]) == 2
    assert "cannot read the labels file" in capsys.readouterr().err


def test_nan_and_conflicting_duplicates_are_refused_with_their_lines(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NaN or Infinity labels, a label nested too deeply to read, and one id given two
    different labels, refuse the whole file (exit 2, nothing imported) naming the line of
    each problem and both rows of a conflict."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    deep = "[" * 5000 + "]" * 5000
    labels.write_text("request_id,label\nreq-0,1\nreq-1,NaN\nreq-2,-Infinity\nreq-3,\"[1, NaN]\"\n"
                      f"req-0,1\nreq-0,2\nreq-4,{deep}\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert f"{labels}:3: the label 'NaN' of 'req-1' is not a finite number" in err
    assert f"{labels}:4: the label '-Infinity' of 'req-2'" in err
    assert f"{labels}:5: the label '[1, NaN]' of 'req-3'" in err
    assert f"{labels}:7: request id 'req-0' has the label '2' here and 1 on line 2" in err
    assert f"{labels}:8: the label of 'req-4' is nested too deeply to read" in err
    assert ":6:" not in err  # a repeated row with the same label is no problem
    assert asyncio.run(_labels(sync_database_url)) == {}


def test_a_text_label_on_a_regression_route_is_refused(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a route with compare.task: regression, a label that is not a number is refused with
    its line and the route, and nothing is imported; numbers and arrays of numbers pass."""
    ex = [Exchange({"x": i}, Call({"p": i}), {"candidate": Call({"p": i})},
                   request_id=f"req-{i}") for i in range(3)]
    asyncio.run(insert(sync_database_url, ex))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"\ntask: regression')
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nreq-0,1.5\nreq-1,high\nreq-2,\"[1, 2]\"\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert f"{labels}:3: the label \"high\" of 'req-1' is not a number, but route " \
           "'house-prices' has compare.task: regression" in err
    assert asyncio.run(_labels(sync_database_url)) == {}
    labels.write_text("request_id,label\nreq-0,1.5\nreq-1,2\nreq-2,\"[1, 2]\"\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert len(asyncio.run(_labels(sync_database_url))) == 3


def test_a_label_past_a_floats_range_on_a_regression_route_is_refused(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a route with compare.task: regression, a number past a float's range (`1e400`,
    alone or in a batch's array) is refused with its line, and nothing is imported: jsonb
    holds it, but the report reads it as infinity and left its row out of the metrics,
    saying nothing. The largest float passes, and so does a label past it on a route that
    compares classes (a class is compared as written)."""
    ex = [Exchange({"x": i}, Call({"p": i}), {"candidate": Call({"p": i})},
                   request_id=f"req-{i}") for i in range(5)]
    asyncio.run(insert(sync_database_url, ex))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"\ntask: regression')
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nreq-0,1.7976931348623157e308\nreq-1,1e400\n"
                      "req-2,\"[1, -1.7976931348623159e308]\"\nreq-3,\"[1, \"\"x\"\", 1e400]\"\n"
                      "req-4,-1e-400\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert f"{labels}:3: the label 1e400 of 'req-1' is beyond the range of a float " \
           "(±1.8e308), but route 'house-prices' has compare.task: regression" in err
    assert f"{labels}:4: the label [1, -1.7976931348623159e308] of 'req-2' is beyond" in err
    assert f"{labels}:5: the label [1, \"x\", 1e400] of 'req-3' is not a number" in err
    assert ":2:" not in err and ":6:" not in err
    assert asyncio.run(_labels(sync_database_url)) == {}
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert len(asyncio.run(_labels(sync_database_url))) == 5


def test_a_file_writing_one_yes_no_class_several_ways_is_imported_with_a_warning(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`1`, `true` and `True` in one file (two exports put together: pandas writes booleans
    `True` and `False`) are imported, with a warning naming each spelling and its first
    line; `1` and `1.0`, or `True` on every row, are one spelling and say nothing."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nr0,1\nr1,0\nr2,true\nr3,True\nr4,1.0\nr5,False\n"
                      "r6,0\nr7,yes\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    out, err = capsys.readouterr()
    assert "8 new labels" in out
    assert f"warning: {labels}: one class is written more than one way: true as 1 (line 2), " \
           "true (line 4), True (line 5); false as 0 (line 3), False (line 7)." in err
    labels.write_text("request_id,label\nr0,1\nr1,0\nr4,1.0\nr7,yes\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    labels.write_text("request_id,label\nr0,True\nr1,False\nr2,True\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_characters_postgresql_cannot_store_are_refused_with_their_lines(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A NUL (raw, or the JSON escape \\u0000) or a lone surrogate escape in a label, or a NUL
    in an id, refuses the file with the line of each (exit 2, nothing imported): PostgreSQL's
    text and jsonb cannot hold them, and the whole import failed as a database error (exit 1)
    naming no row. An escaped backslash before "u0000" is text like any other."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b'request_id,label\nreq-0,1\nreq-1,"""a\\u0000b"""\nreq-2,a\x00b\n'
                       b'req-3,"{""k"": [""\\ud800""]}"\nre\x00q-4,1\n'
                       b'req-5,"""a\\\\u0000"""\nreq-6,"""\\ud83d\\ude00"""\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert "importing labels failed" not in err
    assert f"{labels}:3: the label '\"a\\\\u0000b\"' of 'req-1' holds a NUL character" in err
    assert f"{labels}:4: the label 'a\\x00b' of 'req-2' holds a NUL character" in err
    assert f"{labels}:5: the label " in err and "of 'req-3' holds a NUL" in err
    assert f"{labels}:6: the request id 're\\x00q-4' holds a NUL character" in err
    assert ":2:" not in err and ":7:" not in err and ":8:" not in err
    assert asyncio.run(_labels(sync_database_url)) == {}

    labels.write_bytes(b'request_id,label\nreq-5,"""a\\\\u0000"""\nreq-6,"""\\ud83d\\ude00"""\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert asyncio.run(_labels(sync_database_url)) == {"req-5": '"a\\\\u0000"',
                                                        "req-6": '"\U0001f600"'}


def test_a_long_reference_answer_is_imported_and_a_field_past_the_limit_names_its_line(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A label of 200,000 characters (a long reference answer) is imported: the csv module's
    default limit of 131,072 refused the file as "not a UTF-8 CSV file". A field past the
    import's own limit is refused with its line."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    answer = "word " * 39_999 + "end"
    labels.write_text(f'request_id,label\nreq-0,1\nreq-1,"{answer}"\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert asyncio.run(_labels(sync_database_url))["req-1"] == f'"{answer}"'
    capsys.readouterr()

    labels.write_text(f'request_id,label\nreq-0,1\nreq-2,"{"a" * ((16 << 20) + 1)}"\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert f"{labels}:3: cannot be read as CSV (field larger than field limit" in err
    assert "a field is read up to 16,777,216 characters" in err


def test_a_file_that_is_not_utf8_names_its_line_and_how_to_convert_it(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Latin-1 byte far into the file is refused with the line that holds it and the way
    to convert the file, and a UTF-16 file (Excel's "Unicode Text") is named as such: the
    message gave the decoder's position within the chunk it was reading (here 788, for a
    byte half a megabyte in), and no line."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"request_id,label\n" + b"".join(
        f"req-{i},cat\n".encode() for i in range(50_000)) + b"req-x,caf\xe9\n")
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert f"{labels}:50002: nothing was imported: the byte 0xe9 at character 10 is not " \
           "UTF-8; save the file as \"CSV UTF-8\"" in err
    assert f"iconv -f LATIN1 -t UTF-8 {labels} > labels-utf8.csv" in err
    labels.write_bytes("request_id,label\nreq-0,1\n".encode("utf-16"))
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    assert "the file is UTF-16 (Excel's \"Unicode Text\"), not UTF-8" in capsys.readouterr().err
    assert asyncio.run(_labels(sync_database_url)) == {}


def test_an_id_given_the_same_label_written_two_ways_is_no_conflict(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One id labelled 1 and 1.0, [1, 0] and [1,0], or an object with its keys in another
    order, has one label (as jsonb compares them, and as a re-import finds it unchanged):
    the file was refused as giving the id two different labels. true and 1, 1 and "1", or
    numbers that differ past a float's digits are still two labels."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    labels.write_text('request_id,label\nreq-0,1\nreq-0,1.0\nreq-1,"[1, 0]"\nreq-1,"[1,0]"\n'
                      'req-2,"{""a"": 1, ""b"": [2.5]}"\nreq-2,"{""b"":[2.50],""a"":1}"\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 0
    assert "3 new labels, 0 changed, 0 unchanged; 3 repeated ids (the last row wins)" \
        in capsys.readouterr().out
    assert asyncio.run(_labels(sync_database_url)) == {
        "req-0": "1.0", "req-1": "[1, 0]", "req-2": '{"a": 1, "b": [2.50]}'}

    labels.write_text('request_id,label\nreq-3,1\nreq-3,true\nreq-4,1\nreq-4,"""1"""\n'
                      'req-5,0.1\nreq-5,0.10000000000000000001\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert ":3: request id 'req-3' has the label 'true' here and 1 on line 2" in err
    assert ":5: request id 'req-4' has the label '\"1\"' here and 1 on line 4" in err
    assert ":7: request id 'req-5' has the label '0.10000000000000000001' here" in err


def test_a_problem_in_a_row_of_several_lines_names_the_line_the_row_starts_on(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A quoted label over several lines (a reference answer) and blank lines between rows:
    each problem names the line its row starts on, where an editor finds the id; the last
    line of the row was named. A blank line before the header is skipped, as those between
    rows are; the file was refused as having no header."""
    ex = [Exchange({"x": 0}, Call({"p": 0}), {"candidate": Call({"p": 0})},
                   request_id="req-9")]
    asyncio.run(insert(sync_database_url, ex))
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"\ntask: regression')
    labels = tmp_path / "labels.csv"
    labels.write_text('\nrequest_id,label\nreq-0,"line one\nline two\nline three"\n\n'
                      'req-1,NaN\nreq-0,"other\nanswer"\nreq-9,"very\nhigh"\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    err = capsys.readouterr().err
    assert f"{labels}:7: the label 'NaN' of 'req-1'" in err
    assert f"{labels}:8: request id 'req-0' has the label 'other\\nanswer' here and " \
           '"line one\\nline two\\nline three" on line 3' in err
    labels.write_text('request_id,label\nreq-0,"line one\nline two"\nreq-9,"very\nhigh"\n')
    assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
    assert f"{labels}:4: the label \"very\\nhigh\" of 'req-9' is not a number" \
        in capsys.readouterr().err
    assert asyncio.run(_labels(sync_database_url)) == {}


def test_the_file_dash_reads_standard_input(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``labels import -c FILE -`` reads the CSV from standard input (a pipe from an export),
    named <stdin> in the summary and in each problem; it was refused as a missing file
    named "-"."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')

    def stdin(data: bytes) -> None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))

    stdin(b"\xef\xbb\xbfrequest_id,label\r\nreq-0,1\r\nreq-1,\"a,\r\nb\"\r\n")
    assert main(["labels", "import", "-c", str(config), "-"]) == 0
    assert "<stdin>: 2 rows; 2 new labels" in capsys.readouterr().out
    assert asyncio.run(_labels(sync_database_url)) == {"req-0": "1", "req-1": '"a,\\r\\nb"'}
    stdin(b"request_id,label\nreq-2,1\nreq-3,NaN\n")
    assert main(["labels", "import", "-c", str(config), "-"]) == 2
    assert "<stdin>:3: the label 'NaN' of 'req-3' is not a finite number" \
        in capsys.readouterr().err
    stdin(b"request_id,label\nreq-2,caf\xe9\n")
    assert main(["labels", "import", "-c", str(config), "-"]) == 2
    assert "<stdin>: nothing was imported: the byte 0xe9 is not UTF-8" in capsys.readouterr().err
    assert len(asyncio.run(_labels(sync_database_url))) == 2


def test_a_file_separated_by_semicolons_or_tabs_is_refused_saying_so(
        sync_database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Excel's CSV where the decimal separator is a comma uses ';', and a TSV uses tabs: the
    message says which separator the file has and to save it comma-separated; it only
    quoted the header as one column, request_id;label."""
    config = write_config(tmp_path, sync_database_url, 'prediction: "$.p"')
    labels = tmp_path / "labels.csv"
    for header, shown in [("request_id;label", "';'"), ("Request_ID\tLabel", "'\\t'")]:
        labels.write_text(f"{header}\nreq-0{header[10]}1\n")
        assert main(["labels", "import", "-c", str(config), str(labels)]) == 2
        assert f"; the file is separated by {shown}, not commas: save it as comma-separated " \
               "CSV" in capsys.readouterr().err
    assert asyncio.run(_labels(sync_database_url)) == {}
